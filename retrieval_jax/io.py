"""Atomic file writes, `fingerprint` (the caches' content hash), workdir locks.

Writers fill a temp file beside the target and `os.replace` it, so a reader or
a restarted run sees the old file or the new one, never half of one.
`lock_workdir` gives one process at a time a workdir: two runs writing the
same checkpoints and metrics would silently interleave them.
"""

from collections.abc import Callable, Iterator, Sequence
import contextlib
import datetime
import fcntl
import hashlib
import json
import os
import socket
import tempfile
import threading
from typing import Any, BinaryIO

import numpy as np

from retrieval_jax import errors

PathLike = str | os.PathLike
_READ_CHUNK_BYTES = 1 << 20
LOCK_FILE = ".lock"  # in the workdir; holds "pid=... host=... since=..."


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


# realpath of a workdir -> [fd, depth]: the locks this process holds. flock
# locks belong to an open file, so a second open in the same process would
# block on itself; nesting reuses the first.
_HELD: dict[str, list[int]] = {}
_HELD_GUARD = threading.Lock()


def _holder(fd: int) -> str:
  """The holder line a locking process wrote, for the busy message."""
  try:
    text = os.pread(fd, 512, 0).decode("utf-8", errors="replace").strip()
  except OSError:
    text = ""
  fields = dict(f.split("=", 1) for f in text.split() if "=" in f)
  if "pid" not in fields:  # the holder has not written its line yet
    return "another process"
  return (
      f"pid {fields['pid']} on host {fields.get('host', '?')}"
      f" (since {fields.get('since', '?')})"
  )


@contextlib.contextmanager
def lock_workdir(workdir: PathLike) -> Iterator[str]:
  """Holds `<workdir>/.lock` exclusively inside the block; yields its path.

  `fcntl.flock`: the kernel drops the lock when the holder exits or dies, so
  a crashed run never blocks the next one and there is no stale-lock logic.
  Re-entrant within one process. Creates `workdir` if missing.

  Raises:
    errors.WorkdirBusyError: a live process holds it; names its pid and host.
  """
  workdir = os.fspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_FILE)
  key = os.path.realpath(path)
  with _HELD_GUARD:
    held = _HELD.get(key)
    if held is not None:
      held[1] += 1
    else:
      # O_CLOEXEC: a subprocess the run starts must not keep the lock alive.
      fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise errors.WorkdirBusyError(
            f"workdir {workdir} is in use by {holder}; wait for that run to"
            " end or use another --workdir"
        ) from None
      except BaseException:
        os.close(fd)
        raise
      since = datetime.datetime.now().isoformat(timespec="seconds")
      line = f"pid={os.getpid()} host={socket.gethostname()} since={since}\n"
      os.ftruncate(fd, 0)
      os.pwrite(fd, line.encode("utf-8"), 0)
      _HELD[key] = [fd, 1]
  try:
    yield path
  finally:
    with _HELD_GUARD:
      held = _HELD[key]
      held[1] -= 1
      if not held[1]:
        del _HELD[key]
        with contextlib.suppress(OSError):
          os.ftruncate(held[0], 0)  # no stale holder line for the next run
        os.close(held[0])  # closing the last descriptor releases the lock


def add_config_package_root(argv: Sequence[str]) -> None:
  """Puts the directory above `--config`'s package on `sys.path`.

  A config imports its siblings (`from configs import common`); with the
  package root on the path that works from any current directory, e.g.
  `--config /repo/configs/train.py` run from `/tmp`. The root is the first
  directory above the config file that has no `__init__.py`.

  Args:
    argv: the command line (`sys.argv`).
  """
  import sys  # pylint: disable=g-import-not-at-top

  values = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")]
  values += [v for a, v in zip(argv[1:], argv[2:]) if a == "--config"]
  if not values:
    return
  path = os.path.abspath(values[-1].split(":", 1)[0])
  if not os.path.isfile(path):
    return  # the flag parser reports the missing file
  root = os.path.dirname(path)
  while os.path.isfile(os.path.join(root, "__init__.py")):
    root = os.path.dirname(root)
  if root not in sys.path:
    sys.path.insert(0, root)
