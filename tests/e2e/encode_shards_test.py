"""End to end: the sharded, resumable encode mode and its reuse by evaluate.

`EncodeResumeTest` encodes LIMIT-small in shards of 8 (6 shards) with the
tiny BERT of `recovery_test.py`, three times through `retrieval_jax.main`:
uninterrupted (the reference), killed by a real SIGKILL right after the
third shard's array reached the disk (before its record), and rerun on that
workdir. The rerun must skip the two finished shards (log lines, untouched
files) and encode the other four, and every shard and the consolidated
corpus_embeddings.npy must equal the reference's byte for byte.

`EncodeSettingsTest` runs the library functions in-process: float16
shards, a refused second model, and the evaluate mode reading a finished
encode's corpus vectors (the same metrics and vectors as encoding them).

Both start subprocesses or compile a model: `pytest -m slow`.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

from absl.testing import absltest
import numpy as np
import pytest

from configs import evaluate as evaluate_config
from recovery_test import _write_tiny_model
from retrieval_jax import errors
from retrieval_jax import evaluate
from retrieval_jax.data import embedding_shards
import test_util
from test_util import REPO

_TIMEOUT_S = 600
SHARD_SIZE = 8  # LIMIT-small's 46 documents: 6 shards
KILL_AT_ARRAY = 3  # SIGKILL once the third shard's .npy is on disk
# The entry point with `io.save_npy_atomic` wrapped to kill the process for
# real (SIGKILL: no cleanup, no atexit) after the KILL_AT_ARRAY-th shard.
_KILLED_MAIN = """
import os, signal, sys
from absl import app
from retrieval_jax import io, main
save, arrays = io.save_npy_atomic, []
def save_then_maybe_die(path, array):
  save(path, array)
  if os.path.basename(str(path)).startswith("shard_"):
    arrays.append(path)
    if len(arrays) == int(os.environ["RJ_TEST_KILL_AT_ARRAY"]):
      os.kill(os.getpid(), signal.SIGKILL)
io.save_npy_atomic = save_then_maybe_die
app.run(main.main, argv=["main"] + sys.argv[1:], flags_parser=main._parse_flags)
"""


def _env() -> dict[str, str]:
  env = test_util.subprocess_env()
  # The same two devices whatever the CPU affinity: the same programs.
  env["XLA_FLAGS"] += " --xla_force_host_platform_device_count=2"
  env["JAX_PLATFORMS"] = "cpu"
  return env


@pytest.mark.slow
class EncodeResumeTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = pathlib.Path(tempfile.mkdtemp(prefix="rj_e2e_encode_"))
    cls.addClassCleanup(shutil.rmtree, cls.root, ignore_errors=True)
    cls.model = cls.root / "tiny_model"
    _write_tiny_model(cls.model)
    cls.reference = cls.root / "reference"
    cls.workdir = cls.root / "killed"
    env = dict(_env(), RJ_TEST_KILL_AT_ARRAY=str(KILL_AT_ARRAY))
    # The reference and the killed run at once.
    procs = {
        name: subprocess.Popen(  # pylint: disable=consider-using-with
            command,
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, command in (
            ("reference", cls._command(cls.reference)),
            ("killed", cls._command(cls.workdir, killed=True)),
        )
    }
    cls.outputs = {}
    try:
      for name, proc in procs.items():
        _, stderr = proc.communicate(timeout=_TIMEOUT_S)
        cls.outputs[name] = (proc.returncode, stderr)
    finally:
      for proc in procs.values():
        if proc.poll() is None:
          proc.kill()
          proc.wait()
    shards = cls.workdir / embedding_shards.DEFAULT_DIR
    cls.after_kill = sorted(p.name for p in shards.iterdir())
    cls.mtimes = {p.name: p.stat().st_mtime_ns for p in shards.iterdir()}
    rerun = subprocess.run(
        cls._command(cls.workdir),
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=_TIMEOUT_S,
        check=False,
    )
    cls.outputs["rerun"] = (rerun.returncode, rerun.stderr)

  @classmethod
  def _command(cls, workdir, killed=False):
    start = ["-c", _KILLED_MAIN] if killed else ["-m", "retrieval_jax.main"]
    return [
        sys.executable,
        *start,
        "--config=configs/evaluate.py:smoke",
        f"--workdir={workdir}",
        "--mode=encode",
        f"--config.model.pretrained={cls.model}",
        f"--config.encode.shard_size={SHARD_SIZE}",
    ]

  def test_kill_left_two_finished_shards_and_one_array(self):
    status, stderr = self.outputs["killed"]
    self.assertEqual(status, -9, stderr[-3000:])
    self.assertEqual(
        self.after_kill,
        [
            "shard_00000.json",
            "shard_00000.npy",
            "shard_00001.json",
            "shard_00001.npy",
            "shard_00002.npy",  # no record: unfinished
        ],
    )

  def test_rerun_encodes_only_the_missing_shards(self):
    status, stderr = self.outputs["rerun"]
    self.assertEqual(status, 0, stderr[-3000:])
    for i in range(6):
      where = f"shard {i + 1}/6 (docs {SHARD_SIZE * i}-"
      lines = [l for l in stderr.splitlines() if where in l]
      self.assertLen(lines, 1, stderr[-3000:])
      self.assertIn(
          "finished and verified, skipped" if i < 2 else ": encoded in",
          lines[0],
      )
    shards = self.workdir / embedding_shards.DEFAULT_DIR
    for name in ("shard_00000.npy", "shard_00000.json", "shard_00001.npy"):
      self.assertEqual(
          (shards / name).stat().st_mtime_ns, self.mtimes[name], name
      )
    self.assertNotEqual(
        (shards / "shard_00002.npy").stat().st_mtime_ns,
        self.mtimes["shard_00002.npy"],
    )

  def test_result_equals_the_uninterrupted_run_bit_for_bit(self):
    self.assertEqual(self.outputs["reference"][0], 0)
    self.assertEqual(self.outputs["rerun"][0], 0)
    ours = self.workdir / embedding_shards.DEFAULT_DIR
    theirs = self.reference / embedding_shards.DEFAULT_DIR
    for i in range(6):
      name = f"shard_{i:05d}.npy"
      self.assertEqual(
          (ours / name).read_bytes(), (theirs / name).read_bytes(), name
      )
    for name in ("corpus_embeddings.npy", "corpus_ids.json"):
      self.assertEqual(
          (self.workdir / name).read_bytes(),
          (self.reference / name).read_bytes(),
          name,
      )
    docs_nd, ids = embedding_shards.read(ours)
    self.assertEqual(docs_nd.shape, (46, 32))
    corpus = (REPO / "data/limit-small/corpus.jsonl").read_text().splitlines()
    self.assertEqual(ids, [json.loads(l)["_id"] for l in corpus])


@pytest.mark.slow
class EncodeSettingsTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = pathlib.Path(tempfile.mkdtemp(prefix="rj_encode_settings_"))
    cls.addClassCleanup(shutil.rmtree, cls.root, ignore_errors=True)
    cls.model = cls.root / "tiny_model"
    _write_tiny_model(cls.model)

  def _config(self, **overrides):
    config = evaluate_config.get_config("smoke")
    with config.unlocked():
      config.data.path = str(REPO / "tests/fixtures/tiny_beir")
      config.model.pretrained = str(self.model)
      for key, value in overrides.items():
        block, name = key.split(".")
        config[block][name] = value
    return config

  def test_float16_shards_and_float32_consolidated_file(self):
    workdir = self.root / "f16"
    docs16 = evaluate.encode(
        self._config(**{"encode.dtype": "float16", "encode.shard_size": 3}),
        workdir,
    )
    docs32 = evaluate.encode(self._config(), self.root / "f32")
    self.assertEqual(docs16.dtype, np.float16)
    np.testing.assert_array_equal(docs16, docs32.astype(np.float16))
    # Unit vectors rounded to 11 significant bits.
    self.assertLess(np.abs(docs16.astype(np.float32) - docs32).max(), 2**-11)
    full = np.load(workdir / "corpus_embeddings.npy")
    self.assertEqual(full.dtype, np.float32)
    np.testing.assert_array_equal(full, docs16.astype(np.float32))
    manifest = embedding_shards.read_manifest(
        workdir / embedding_shards.DEFAULT_DIR
    )
    self.assertEqual(
        [s["rows"] for s in manifest["shards"]], [[0, 3], [3, 6], [6, 8]]
    )

  def test_another_model_in_the_same_workdir_is_refused(self):
    workdir = self.root / "two_models"
    evaluate.encode(self._config(), workdir)
    with self.assertRaisesRegex(
        errors.ConfigError,
        r"corpus_shards holds corpus embeddings of another"
        r" model .*another --workdir",
    ):
      evaluate.encode(self._config(**{"model.max_length": 16}), workdir)

  def test_evaluate_reads_a_finished_encode(self):
    cache = self.root / "encoded"
    encoded = evaluate.encode(self._config(), cache)
    with self.assertLogs(level="INFO") as logs:
      reused = evaluate.evaluate(
          self._config(**{"encode.cache_dir": str(cache)}),
          self.root / "eval_reused",
      )
    self.assertIn("dense corpus embeddings from", "\n".join(logs.output))
    fresh = evaluate.evaluate(self._config(), self.root / "eval_fresh")
    self.assertEqual(reused, fresh)
    (reused_npz,) = cache.glob("dense_*.npz")
    (fresh_npz,) = (self.root / "eval_fresh").glob("dense_*.npz")
    with np.load(reused_npz) as a, np.load(fresh_npz) as b:
      np.testing.assert_array_equal(a["docs_nd"], b["docs_nd"])
      np.testing.assert_array_equal(a["docs_nd"], encoded)
      np.testing.assert_array_equal(a["queries_qd"], b["queries_qd"])
    # A float16 set is not float32 vectors: evaluate encodes instead.
    half = self.root / "encoded_f16"
    evaluate.encode(self._config(**{"encode.dtype": "float16"}), half)
    with self.assertLogs(level="INFO") as logs:
      evaluate.evaluate(
          self._config(**{"encode.cache_dir": str(half)}),
          self.root / "eval_f16",
      )
    self.assertNotIn("dense corpus embeddings from", "\n".join(logs.output))


if __name__ == "__main__":
  absltest.main()
