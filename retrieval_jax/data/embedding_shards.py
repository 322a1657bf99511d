"""Corpus embeddings on disk: checksummed shards and a manifest, resumable.

A shard set is a directory holding, per `shard_size` documents in corpus
order, `shard_00000.npy` ([rows, D] float32 or float16) and `shard_00000.json`
(its row range, doc ids, SHA-256 and content key), and last `manifest.json`
(the key and its parts, dtype, dim, the shard list). Every file is written
atomically (`io`). A shard is finished when its .json names this set's key
and row range and the .npy's SHA-256 matches, so `write` encodes only the
missing or damaged shards of a killed run. A directory holding another key
(other weights, settings, layout or corpus) is refused, never mixed.

Several processes split the work, shard i going to process i % P, and
process 0 writes the manifest once every process has passed the barrier.
`read` returns the rows as one [N, D] array (memory-mapped when there is one
shard) and the ids; `consolidate` streams them into one float32 .npy.
"""

from collections.abc import Callable, Mapping, Sequence
import json
import os
import pathlib
import time
from typing import Any

from absl import logging
import numpy as np

from retrieval_jax import errors
from retrieval_jax import io

FORMAT = "retrieval_jax.embedding_shards/1"
MANIFEST = "manifest.json"
# The encode mode's set in its workdir; the evaluate mode looks there in
# `config.encode.cache_dir`.
DEFAULT_DIR = "corpus_shards"
DTYPES = ("float32", "float16")
# texts: list[str] [n] -> [n, D] embeddings (any float dtype).
EncodeFn = Callable[[list[str]], np.ndarray]
# name -> None: waits until every process has called it with that name.
Barrier = Callable[[str], None]


def shard_ranges(num_docs: int, shard_size: int) -> list[tuple[int, int]]:
  """[lo, hi) row ranges of `shard_size` documents (the last may be short)."""
  if shard_size < 1:
    raise ValueError(f"shard_size={shard_size}: expected >= 1")
  return [
      (lo, min(lo + shard_size, num_docs))
      for lo in range(0, num_docs, shard_size)
  ]


def _name(index: int) -> str:
  return f"shard_{index:05d}"


def _key_parts(
    key_parts: Mapping[str, str],
    doc_ids: Sequence[str],
    texts: Sequence[str],
    shard_size: int,
    dtype: str,
) -> dict[str, str]:
  """The caller's parts plus the corpus and the layout, all strings."""
  parts = {k: str(v) for k, v in key_parts.items()}
  parts["corpus"] = io.fingerprint(list(doc_ids), list(texts))
  parts["layout"] = f"shard_size={shard_size} dtype={dtype}"
  return parts


def _key(parts: Mapping[str, str]) -> str:
  return io.fingerprint(sorted([k, v] for k, v in parts.items()))


def _read_json(path: pathlib.Path) -> dict[str, Any] | None:
  """The JSON object at `path`; None when absent or unreadable."""
  try:
    value = json.loads(path.read_text("utf-8"))
  except (OSError, ValueError):
    return None
  return value if isinstance(value, dict) else None


def _check_same_key(directory, found: dict[str, Any], key, parts) -> None:
  """ConfigError naming what differs when `found` holds another key."""
  if found.get("key") == key:
    return
  theirs = found.get("key_parts", {})
  differ = sorted(k for k in parts if theirs.get(k) != parts[k]) or ["key"]
  raise errors.ConfigError(
      f"{directory} holds corpus embeddings of another {', '.join(differ)}"
      f" (its key {str(found.get('key'))[:12]}, this run's {key[:12]}):"
      " refusing to mix them; encode into another --workdir, or delete"
      f" {directory} to start over"
  )


def _finished(directory: pathlib.Path, index: int, rows, key: str) -> bool:
  """Whether shard `index` is complete: its record, rows and checksum."""
  record = _read_json(directory / f"{_name(index)}.json")
  array = directory / f"{_name(index)}.npy"
  return (
      record is not None
      and record.get("key") == key
      and record.get("rows") == list(rows)
      and array.is_file()
      and io.file_sha256(array) == record.get("sha256")
  )


def write(
    directory: str | os.PathLike,
    *,
    key_parts: Mapping[str, str],
    doc_ids: Sequence[str],
    texts: Sequence[str],
    encode_fn: EncodeFn,
    shard_size: int,
    dtype: str = "float32",
    process_index: int = 0,
    process_count: int = 1,
    barrier: Barrier | None = None,
) -> tuple[dict[str, Any], list[int]]:
  """Encodes the unfinished shards of this process.

  Args:
    directory: the shard set (created if missing).
    key_parts: what the embeddings depend on besides the texts, e.g.
      {"weights": content digest, "model": settings}; with the corpus and
      the layout they make the set's key.
    doc_ids, texts: N documents in corpus order (texts as `encode_fn`
      takes them).
    encode_fn: [n] texts -> [n, D]; called once per shard, so only one
      shard's texts are tokenised at a time.
    shard_size: documents per shard.
    dtype: "float32" or "float16" storage.
    process_index, process_count: this process encodes the shards i with
      i % process_count == process_index.
    barrier: required with several processes (e.g.
      `multihost_utils.sync_global_devices`).

  Returns:
    (the manifest, the shard indices this process encoded; the rest of
    its share were finished already).

  Raises:
    errors.ConfigError: the directory holds another key's embeddings.
    errors.DataError: a shard is missing after every process finished.
  """
  if dtype not in DTYPES:
    raise ValueError(f"dtype={dtype!r}: expected one of {DTYPES}")
  if len(doc_ids) != len(texts):
    raise ValueError(f"{len(doc_ids)} doc ids for {len(texts)} texts")
  if not doc_ids:
    raise ValueError("nothing to encode (0 documents)")
  if process_count > 1 and barrier is None:
    raise ValueError("several processes need a barrier")
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  parts = _key_parts(key_parts, doc_ids, texts, shard_size, dtype)
  key = _key(parts)
  # Any record of another key, finished or not, refuses the whole set.
  for path in [directory / MANIFEST, *sorted(directory.glob("shard_*.json"))]:
    found = _read_json(path)
    if found is not None:
      _check_same_key(directory, found, key, parts)
  ranges = shard_ranges(len(doc_ids), shard_size)
  mine = [i for i in range(len(ranges)) if i % process_count == process_index]
  encoded = []
  for i in mine:
    lo, hi = ranges[i]
    where = f"shard {i + 1}/{len(ranges)} (docs {lo}-{hi - 1})"
    if _finished(directory, i, (lo, hi), key):
      logging.info("%s: finished and verified, skipped", where)
      continue
    # Temp files of a killed write of this shard (this process owns it).
    for stale in directory.glob(f".{_name(i)}.*.tmp"):
      stale.unlink(missing_ok=True)
    start = time.perf_counter()
    emb_nd = np.asarray(encode_fn(list(texts[lo:hi])))
    if emb_nd.ndim != 2 or len(emb_nd) != hi - lo:
      raise ValueError(
          f"{where}: encode_fn gave shape {emb_nd.shape} for {hi - lo} texts"
      )
    array = directory / f"{_name(i)}.npy"
    io.save_npy_atomic(array, emb_nd.astype(dtype))
    seconds = time.perf_counter() - start
    # The record last: an array without one is re-encoded.
    io.write_json_atomic(
        directory / f"{_name(i)}.json",
        {
            "format": FORMAT,
            "index": i,
            "rows": [lo, hi],
            "sha256": io.file_sha256(array),
            "seconds": seconds,
            "key": key,
            "key_parts": parts,
            "ids": list(doc_ids[lo:hi]),
        },
        indent=None,
    )
    encoded.append(i)
    logging.info(
        "%s: encoded in %.1f s (%.0f docs/s), process %d",
        where,
        seconds,
        (hi - lo) / max(seconds, 1e-9),
        process_index,
    )
  if process_count > 1:
    barrier("embedding_shards: every shard written")
  manifest_path = directory / MANIFEST
  if process_index == 0:
    missing = [
        i
        for i, rows in enumerate(ranges)
        if not (i in mine or _finished(directory, i, rows, key))
    ]
    if missing:
      raise errors.DataError(
          str(directory),
          None,
          f"shards {[_name(i) for i in missing]} are missing or damaged after"
          f" every process finished (is {directory} shared by all hosts?)",
      )
    records = [
        _read_json(directory / f"{_name(i)}.json") for i in range(len(ranges))
    ]
    first = np.load(directory / f"{_name(0)}.npy", mmap_mode="r")
    io.write_json_atomic(
        manifest_path,
        {
            "format": FORMAT,
            "key": key,
            "key_parts": parts,
            "dtype": dtype,
            "dim": int(first.shape[1]),
            "num_docs": len(doc_ids),
            "shard_size": shard_size,
            "seconds": sum(r["seconds"] for r in records),
            "shards": [
                {
                    "file": f"{_name(i)}.npy",
                    "ids_file": f"{_name(i)}.json",
                    "rows": r["rows"],
                    "sha256": r["sha256"],
                }
                for i, r in enumerate(records)
            ],
        },
    )
  if process_count > 1:
    barrier("embedding_shards: manifest written")
  return read_manifest(directory), encoded


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
  """The manifest of a finished set; DataError when absent or unreadable."""
  path = pathlib.Path(directory) / MANIFEST
  manifest = _read_json(path)
  if manifest is None or manifest.get("format") != FORMAT:
    raise errors.DataError(
        str(path),
        None,
        "missing or not a shard-set manifest: the encode run did not finish"
        " (rerun it with the same config to complete it)",
    )
  return manifest


def matches(
    directory: str | os.PathLike,
    *,
    key_parts: Mapping[str, str],
    doc_ids: Sequence[str],
    texts: Sequence[str],
    dtype: str | None = None,
) -> bool:
  """Whether `directory` holds a finished set of these embeddings (of any
  shard size; of `dtype` unless None)."""
  path = pathlib.Path(directory) / MANIFEST
  manifest = _read_json(path)
  if manifest is None or manifest.get("format") != FORMAT:
    return False
  if dtype is not None and manifest.get("dtype") != dtype:
    return False
  parts = _key_parts(
      key_parts,
      doc_ids,
      texts,
      manifest.get("shard_size", 0),
      manifest.get("dtype", ""),
  )
  return manifest.get("key") == _key(parts)


def iter_shards(directory: str | os.PathLike, *, verify: bool = True):
  """Yields (lo, hi, emb_md memory-mapped, ids) per shard, in row order.

  Raises:
    errors.DataError: a file is missing, or (`verify`) fails its checksum.
  """
  directory = pathlib.Path(directory)
  manifest = read_manifest(directory)
  for shard in manifest["shards"]:
    path = directory / shard["file"]
    if not path.is_file() or (
        verify and io.file_sha256(path) != shard["sha256"]
    ):
      raise errors.DataError(
          str(path),
          None,
          "missing or fails its manifest checksum; rerun the encode mode to"
          " re-encode it",
      )
    record = _read_json(directory / shard["ids_file"]) or {}
    lo, hi = shard["rows"]
    emb_md = np.load(path, mmap_mode="r", allow_pickle=False)
    ids = record.get("ids", [])
    if emb_md.shape != (hi - lo, manifest["dim"]) or len(ids) != hi - lo:
      raise errors.DataError(
          str(path),
          None,
          f"holds {emb_md.shape} rows and {len(ids)} ids, the manifest"
          f" [{hi - lo}, {manifest['dim']}]",
      )
    yield lo, hi, emb_md, ids


def read(
    directory: str | os.PathLike, *, verify: bool = True
) -> tuple[np.ndarray, list[str]]:
  """(docs_nd [N, D] in the stored dtype, N doc ids) of a finished set.

  One shard comes back memory-mapped (no copy); several are concatenated
  into memory (`consolidate` writes one file to map instead).
  """
  parts = list(iter_shards(directory, verify=verify))
  ids = [i for _, _, _, shard_ids in parts for i in shard_ids]
  if len(parts) == 1:
    return parts[0][2], ids
  return np.concatenate([emb for _, _, emb, _ in parts]), ids


def consolidate(
    directory: str | os.PathLike,
    embeddings_path: str | os.PathLike,
    ids_path: str | os.PathLike,
) -> None:
  """Streams a finished set into one float32 [N, D] .npy and a JSON id list.

  The .npy is byte for byte what `np.save` writes for the whole array, one
  shard in memory at a time.
  """
  manifest = read_manifest(directory)
  ids = []

  def write_rows(f):
    np.lib.format.write_array_header_1_0(
        f,
        {
            "descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
            "fortran_order": False,
            "shape": (manifest["num_docs"], manifest["dim"]),
        },
    )
    for _, _, emb_md, shard_ids in iter_shards(directory):
      f.write(np.ascontiguousarray(emb_md, np.float32).tobytes())
      ids.extend(shard_ids)

  io.write_with(embeddings_path, write_rows)
  io.write_json_atomic(ids_path, ids)
