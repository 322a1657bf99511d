"""Atomic file writes and one content hash, for results and caches.

Every writer goes to a temporary file in the target's directory and renames
it with `os.replace` (atomic within one file system), so a reader, or a run
restarted after a crash, sees the old file or the new one, never half of
one. The temporary file is removed when the write fails.

`fingerprint` is the content hash that keys the on-disk caches; a file
enters it as its `file_sha256`, read in chunks however large the file.
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
  # A unique name, so two writers of one target never share a temp file.
  fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp",
                             prefix="." + os.path.basename(path) + ".")
  try:
    with os.fdopen(fd, "wb") as f:
      yield f
      f.flush()
      # On disk before the rename makes it visible under the real name.
      os.fsync(f.fileno())
    # mkstemp makes the file 0600; results are for others to read too.
    # (Reading the umask would set it, racing other threads.)
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


def write_json_atomic(path: PathLike, obj: Any, *, indent: int | None = 1
                      ) -> None:
  """Atomically writes `obj` as JSON (UTF-8, non-ASCII kept, final newline).

  Args:
    path: the target file; its directory is created if needed.
    obj: JSON-serialisable value.
    indent: as `json.dumps`; None writes one line.

  Raises:
    TypeError, ValueError: `obj` is not JSON-serialisable (nothing written).
  """
  # Serialised before the file is opened: a bad value leaves no trace.
  text = json.dumps(obj, indent=indent, ensure_ascii=False) + "\n"
  write_text_atomic(path, text)


def save_npy_atomic(path: PathLike, array: np.ndarray) -> None:
  """Atomically writes one array in .npy format (no pickles)."""
  write_with(path, lambda f: np.save(f, np.asarray(array), allow_pickle=False))


def save_npz_atomic(path: PathLike, **arrays: Any) -> None:
  """Atomically writes named arrays in uncompressed .npz format.

  `np.savez` given a file name appends ".npz" when it is missing; given an
  open file it does not, so `path` is used exactly as passed.
  """
  write_with(path, lambda f: np.savez(f, **arrays))


def _hash_into(digest, value: Any) -> None:
  """Feeds a nested value into `digest`, unambiguously.

  Each item is tagged with its type and length-prefixed, so ("ab", "c") and
  ("a", "bc") differ, as do "1" and b"1". Sets are sorted first, their order
  being arbitrary; lists and tuples hash alike, since JSON round trips turn
  one into the other.
  """
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
    # dtype and shape too: the same bytes in another layout are another
    # array.
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
        f"sequences or sets of them, got {type(value).__name__}")


def fingerprint(*parts: Any) -> str:
  """A SHA-256 content hash of strings, bytes, arrays and nested lists.

  Cheap enough for a whole corpus: `fingerprint(doc_ids, doc_texts)`.
  Order matters (the parts and the items in a list); set order does not.

  Args:
    *parts: str, bytes, np.ndarray, or sequences / sets of them, nested to
      any depth.

  Returns:
    str, 64 hex digits.

  Raises:
    TypeError: a part of another type (convert numbers with `str`).
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
