"""Atomic file writes and `fingerprint`, the content hash keying the caches.

Writers fill a temp file beside the target and `os.replace` it, so a reader or
a restarted run sees the old file or the new one, never half of one.
"""

from collections.abc import Callable, Sequence
import contextlib
import hashlib
import json
import os
import tempfile
from typing import Any, BinaryIO

import numpy as np

PathLike = str | os.PathLike
_READ_CHUNK_BYTES = 1 << 20


@contextlib.contextmanager
def _atomic(path: PathLike):
  """Yields a binary file that becomes `path` when the block exits cleanly."""
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(
      dir=directory, suffix=".tmp", prefix="." + os.path.basename(path) + "."
  )
  try:
    with os.fdopen(fd, "wb") as f:
      yield f
      f.flush()
      # On disk before the rename makes it visible under the real name.
      os.fsync(f.fileno())
    # mkstemp's 0600 -> readable by others (reading the umask races threads).
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


def write_with(path: PathLike, write_fn: Callable[[BinaryIO], Any]) -> None:
  """Atomically writes `path` with `write_fn(binary_file)`."""
  with _atomic(path) as f:
    write_fn(f)


def write_bytes_atomic(path: PathLike, data: bytes) -> None:
  """Atomically writes `data` to `path`."""
  write_with(path, lambda f: f.write(data))


def write_text_atomic(path: PathLike, text: str) -> None:
  """Atomically writes `text` to `path`, UTF-8 encoded."""
  write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(
    path: PathLike, obj: Any, *, indent: int | None = 1
) -> None:
  """Atomically writes `obj` as JSON (UTF-8, non-ASCII kept, final newline)."""
  # Serialised before the file is opened: a bad value leaves no trace.
  text = json.dumps(obj, indent=indent, ensure_ascii=False) + "\n"
  write_text_atomic(path, text)


def save_npy_atomic(path: PathLike, array: np.ndarray) -> None:
  """Atomically writes one array in .npy format (no pickles)."""
  write_with(path, lambda f: np.save(f, np.asarray(array), allow_pickle=False))


def save_npz_atomic(path: PathLike, **arrays: Any) -> None:
  """Atomically writes uncompressed .npz to exactly `path` (no ".npz" added)."""
  write_with(path, lambda f: np.savez(f, **arrays))


def _hash_into(digest, value: Any) -> None:
  """Type-tagged, length-prefixed: ("ab", "c") != ("a", "bc"), "1" != b"1"."""
  if isinstance(value, str):
    # Before Sequence: a str is a sequence of one-character strings.
    data = value.encode("utf-8")
    digest.update(b"s%d:" % len(data))
    digest.update(data)
  elif isinstance(value, (bytes, bytearray, memoryview)):
    data = bytes(value)
    digest.update(b"b%d:" % len(data))
    digest.update(data)
  elif isinstance(value, np.ndarray):
    header = f"{value.dtype.str}{value.shape}".encode("ascii")
    data = np.ascontiguousarray(value).tobytes()
    digest.update(b"a%d:%d:" % (len(header), len(data)))
    digest.update(header)
    digest.update(data)
  elif isinstance(value, (set, frozenset)):
    _hash_into(digest, sorted(value))
  elif isinstance(value, Sequence):
    digest.update(b"l%d:" % len(value))
    for item in value:
      _hash_into(digest, item)
  else:
    raise TypeError(
        "fingerprint takes strings, bytes, numpy arrays and (nested) "
        f"sequences or sets of them, got {type(value).__name__}"
    )


def fingerprint(*parts: Any) -> str:
  """Hex SHA-256 of str / bytes / np.ndarray parts, nested in sequences or sets.

  Order matters except in sets; lists and tuples hash alike (JSON round trips).
  """
  digest = hashlib.sha256()
  _hash_into(digest, list(parts))
  return digest.hexdigest()


def file_sha256(path: PathLike) -> str:
  """Hex SHA-256 of a file's bytes (`sha256sum`), read 1 MiB at a time."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(_READ_CHUNK_BYTES):
      digest.update(chunk)
  return digest.hexdigest()
