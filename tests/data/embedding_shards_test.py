"""Shard sets of corpus embeddings: round trip, resume, refusal, processes.

Oracles: the rows read back equal the encode function applied to every text
(written out per row, so shard boundaries cannot hide a misplaced row); a
rerun encodes exactly the shards whose record is missing or whose array
fails its checksum; `consolidate` writes the bytes `np.save` writes; two
"processes" (threads meeting at a real barrier) encode the shards i % 2
each and give the one-process set's files.
"""

import io as std_io
import json
import pathlib
import threading

from absl.testing import absltest
import numpy as np

from retrieval_jax import errors
from retrieval_jax import io
from retrieval_jax.data import embedding_shards

N, D = 11, 3
IDS = [f"d{i}" for i in range(N)]
TEXTS = [f"text {i}" for i in range(N)]
KEY = {"weights": "w0", "model": "m0"}


def _row(text: str) -> np.ndarray:
  """A row that only `text` determines: [i, i / 3, -i] for "text i"."""
  i = int(text.split()[1])
  return np.asarray([i, i / 3, -i], np.float64)


class _Encoder:
  """encode_fn recording the texts of each call."""

  def __init__(self):
    self.calls = []

  def __call__(self, texts):
    self.calls.append(list(texts))
    return np.stack([_row(t) for t in texts])


def _write(directory, encoder, **kwargs):
  args = dict(
      key_parts=KEY,
      doc_ids=IDS,
      texts=TEXTS,
      encode_fn=encoder,
      shard_size=4,
  )
  args.update(kwargs)
  return embedding_shards.write(directory, **args)


class EmbeddingShardsTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = pathlib.Path(self.create_tempdir()) / "shards"
    self.want_nd = np.stack([_row(t) for t in TEXTS]).astype(np.float32)

  def test_shard_ranges(self):
    self.assertEqual(
        embedding_shards.shard_ranges(11, 4), [(0, 4), (4, 8), (8, 11)]
    )
    self.assertEqual(embedding_shards.shard_ranges(4, 4), [(0, 4)])
    with self.assertRaisesRegex(ValueError, "shard_size=0"):
      embedding_shards.shard_ranges(3, 0)

  def test_round_trip_and_manifest(self):
    encoder = _Encoder()
    manifest, encoded = _write(self.dir, encoder)
    self.assertEqual(encoded, [0, 1, 2])
    self.assertEqual(encoder.calls, [TEXTS[0:4], TEXTS[4:8], TEXTS[8:11]])
    docs_nd, ids = embedding_shards.read(self.dir)
    np.testing.assert_array_equal(docs_nd, self.want_nd)
    self.assertEqual(docs_nd.dtype, np.float32)
    self.assertEqual(ids, IDS)
    self.assertEqual(
        (manifest["dim"], manifest["num_docs"], manifest["dtype"]),
        (D, N, "float32"),
    )
    self.assertEqual(
        [s["rows"] for s in manifest["shards"]], [[0, 4], [4, 8], [8, 11]]
    )
    for shard in manifest["shards"]:
      self.assertEqual(
          shard["sha256"], io.file_sha256(self.dir / shard["file"])
      )
    # One shard: the array comes back memory-mapped, not copied.
    one = pathlib.Path(self.create_tempdir())
    _write(one, _Encoder(), shard_size=N)
    docs_nd, _ = embedding_shards.read(one)
    self.assertIsInstance(docs_nd, np.memmap)
    np.testing.assert_array_equal(docs_nd, self.want_nd)

  def test_rerun_encodes_only_missing_or_damaged_shards(self):
    _write(self.dir, _Encoder(), shard_size=3)  # shards of 3, 3, 3, 2
    before = {p.name: p.read_bytes() for p in self.dir.iterdir()}
    # Killed between the array and its record, and a stale temp file.
    (self.dir / "shard_00001.json").unlink()
    (self.dir / ".shard_00001.npy.abc.tmp").write_bytes(b"half")
    # A finished shard whose array was damaged afterwards.
    damaged = bytearray((self.dir / "shard_00003.npy").read_bytes())
    damaged[-1] ^= 0xFF
    (self.dir / "shard_00003.npy").write_bytes(bytes(damaged))
    (self.dir / embedding_shards.MANIFEST).unlink()

    encoder = _Encoder()
    manifest, encoded = _write(self.dir, encoder, shard_size=3)
    self.assertEqual(encoded, [1, 3])
    self.assertEqual(encoder.calls, [TEXTS[3:6], TEXTS[9:11]])
    self.assertFalse(list(self.dir.glob("*.tmp")))
    # Every file as the uninterrupted run wrote it, bit for bit (the
    # records' timings aside).
    after = {p.name: p.read_bytes() for p in self.dir.iterdir()}
    self.assertEqual(sorted(after), sorted(before))
    for name in before:
      if name.endswith(".npy"):
        self.assertEqual(after[name], before[name], name)
    np.testing.assert_array_equal(
        embedding_shards.read(self.dir)[0], self.want_nd
    )
    self.assertLen(manifest["shards"], 4)
    # Finished: a third run encodes nothing.
    encoder = _Encoder()
    self.assertEqual(_write(self.dir, encoder, shard_size=3)[1], [])
    self.assertEqual(encoder.calls, [])

  def test_another_key_is_refused_naming_what_differs(self):
    _write(self.dir, _Encoder())
    cases = {
        "weights": dict(key_parts={"weights": "w1", "model": "m0"}),
        "corpus": dict(texts=TEXTS[:-1] + ["text 0"]),
        "layout": dict(shard_size=5),
    }
    for what, change in cases.items():
      with self.subTest(what), self.assertRaisesRegex(
          errors.ConfigError,
          rf"holds corpus embeddings of another {what} .*refusing to mix",
      ):
        _write(self.dir, _Encoder(), **change)
    # Unfinished sets are refused too: a shard record is enough.
    partial = pathlib.Path(self.create_tempdir())
    _write(partial, _Encoder())
    (partial / embedding_shards.MANIFEST).unlink()
    with self.assertRaisesRegex(errors.ConfigError, "another layout"):
      _write(partial, _Encoder(), dtype="float16")

  def test_float16_storage(self):
    manifest, _ = _write(self.dir, _Encoder(), dtype="float16")
    docs_nd, _ = embedding_shards.read(self.dir)
    self.assertEqual(manifest["dtype"], "float16")
    self.assertEqual(docs_nd.dtype, np.float16)
    np.testing.assert_array_equal(docs_nd, self.want_nd.astype(np.float16))

  def test_consolidate_writes_np_save_bytes(self):
    _write(self.dir, _Encoder(), dtype="float16")
    out = pathlib.Path(self.create_tempdir())
    embedding_shards.consolidate(self.dir, out / "emb.npy", out / "ids.json")
    buffer = std_io.BytesIO()
    np.save(buffer, self.want_nd.astype(np.float16).astype(np.float32))
    self.assertEqual((out / "emb.npy").read_bytes(), buffer.getvalue())
    self.assertEqual(json.loads((out / "ids.json").read_text()), IDS)

  def test_read_checks_the_files_against_the_manifest(self):
    _write(self.dir, _Encoder())
    path = self.dir / "shard_00002.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with self.assertRaisesRegex(errors.DataError, "shard_00002.npy.*checksum"):
      embedding_shards.read(self.dir)
    self.assertEqual(embedding_shards.read(self.dir, verify=False)[1], IDS)
    with self.assertRaisesRegex(errors.DataError, "did not finish"):
      embedding_shards.read(self.create_tempdir().full_path)

  def test_matches(self):
    _write(self.dir, _Encoder(), shard_size=5)
    same = dict(key_parts=KEY, doc_ids=IDS, texts=TEXTS)
    self.assertTrue(embedding_shards.matches(self.dir, **same))
    self.assertTrue(embedding_shards.matches(self.dir, **same, dtype="float32"))
    self.assertFalse(
        embedding_shards.matches(self.dir, **same, dtype="float16")
    )
    self.assertFalse(
        embedding_shards.matches(
            self.dir,
            key_parts={"weights": "w1", "model": "m0"},
            doc_ids=IDS,
            texts=TEXTS,
        )
    )
    self.assertFalse(
        embedding_shards.matches(
            self.dir, key_parts=KEY, doc_ids=IDS[::-1], texts=TEXTS
        )
    )

  def test_two_processes_split_the_shards(self):
    # Threads stand in for processes; the barrier is a real one.
    barrier = threading.Barrier(2, timeout=60)
    names = []
    encoders = [_Encoder(), _Encoder()]
    results, failures = {}, []

    def process(index):
      def wait(name):
        names.append((index, name))
        barrier.wait()

      try:
        results[index] = _write(
            self.dir,
            encoders[index],
            process_index=index,
            process_count=2,
            barrier=wait,
        )
      except Exception as e:  # pylint: disable=broad-exception-caught
        failures.append(e)
        barrier.abort()

    threads = [threading.Thread(target=process, args=(i,)) for i in (0, 1)]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
    self.assertEqual(failures, [])
    self.assertEqual(results[0][1], [0, 2])
    self.assertEqual(results[1][1], [1])
    self.assertEqual(encoders[0].calls, [TEXTS[0:4], TEXTS[8:11]])
    self.assertEqual(encoders[1].calls, [TEXTS[4:8]])
    self.assertEqual(results[0][0], results[1][0])  # both read the manifest
    self.assertLen({n for _, n in names}, 2)  # two barriers, met by both
    single = pathlib.Path(self.create_tempdir())
    _write(single, _Encoder())
    for name in ("shard_00000.npy", "shard_00001.npy", "shard_00002.npy"):
      self.assertEqual(
          (self.dir / name).read_bytes(), (single / name).read_bytes()
      )
    np.testing.assert_array_equal(
        embedding_shards.read(self.dir)[0], self.want_nd
    )

  def test_several_processes_need_a_barrier(self):
    with self.assertRaisesRegex(ValueError, "barrier"):
      _write(self.dir, _Encoder(), process_count=2)


if __name__ == "__main__":
  absltest.main()
