"""Training checkpoints: an Orbax manager with three items and a resume order.

A step directory holds `state` ({step, params, opt_state}; the dropout key is
re-derived), `data` (JSON loader position: a resumed run sees the same batches),
`metadata` (JSON config) and `checksums.json`. Restores target sharded abstract
trees, so a run can resume on another mesh. Resume order (`resume_or_init`):
the run's own checkpoint, else `init_from` (another run's params), else scratch.

Integrity: the primary process hashes every file of a step just before Orbax's
commit rename, so each committed step has checksums; a restore checks them,
then Orbax's reads. A step failing either is logged in one line and skipped;
once an older one restores, the newer bad ones become `<step>.corrupt` (never
deleted). Readers of another run (`read_run_checkpoint`) check but rename
nothing. `StopSignals` turns SIGTERM/SIGINT into a save and a stop.
"""

from collections.abc import Callable, Mapping
import datetime
import json
import os
import signal
import threading
import time
from typing import Any

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from retrieval_jax import errors
from retrieval_jax import io

PyTree = Any

STATE = "state"  # item names inside each step directory
DATA = "data"
METADATA = "metadata"
CHECKSUMS_FILE = "checksums.json"  # in each step directory
CORRUPT_SUFFIX = ".corrupt"  # a step directory moved aside by a walk-back
# Top-level files Orbax writes at commit, after the checksums (it rewrites
# `_CHECKPOINT_METADATA` with the commit time): not covered.
_UNCHECKED = frozenset(
    {"_CHECKPOINT_METADATA", "commit_success.txt", CHECKSUMS_FILE}
)
_MAX_CAUSE_CHARS = 1000


def _item_handlers() -> dict[str, ocp.CheckpointHandler]:
  """Handlers up front; PyTree (not Standard) for `partial_restore`."""
  return {
      STATE: ocp.PyTreeCheckpointHandler(),
      DATA: ocp.JsonCheckpointHandler(),
      METADATA: ocp.JsonCheckpointHandler(),
  }


def check_step(step: Any) -> int:
  """Returns `step` as a python int; rejects bools, floats and negatives."""
  if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
    raise TypeError(
        f"step must be a python or numpy integer, got {type(step).__name__}"
        f" {step!r}"
    )
  if step < 0:  # would not parse back as an Orbax step directory
    raise ValueError(f"step must be >= 0, got {step}")
  return int(step)


def _json_copy(name: str, value: Any) -> dict:
  """A JSON deep copy: fails here, not in Orbax's background writer."""
  if not isinstance(value, Mapping):
    raise TypeError(f"{name} must be a dict, got {type(value).__name__}")
  try:  # allow_nan=False: NaN is not JSON for non-Python readers.
    return json.loads(json.dumps(value, allow_nan=False))
  except (TypeError, ValueError) as e:
    raise TypeError(
        f"{name} is not JSON-serialisable (use plain python str, int, float,"
        f" bool, list and dict; convert numpy/jax scalars first): {e}"
    ) from e


def _restore_args(abstract: PyTree, what: str) -> PyTree:
  """Restore args: each leaf onto its sharding, strict shapes, dtypes cast."""
  # Checked up front: Orbax's errors for these do not name the leaf.
  leaves = jax.tree_util.tree_leaves_with_path(abstract)
  if not leaves:
    raise ValueError(f"{what}: the abstract target has no leaves")
  for path, leaf in leaves:
    name = jax.tree_util.keystr(path)
    if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
      raise ValueError(
          f"{what}{name}: expected a jax.ShapeDtypeStruct with a sharding,"
          f" got {type(leaf).__name__}"
      )
    if getattr(leaf, "sharding", None) is None:
      raise ValueError(
          f"{what}{name}: the abstract target has no sharding; build it with"
          " jax.eval_shape and attach NamedShardings so the restore knows"
          " its layout"
      )
  return ocp.checkpoint_utils.construct_restore_args(abstract)


def cause(e: BaseException) -> str:
  """One line for an error: the innermost cause's first line.

  Orbax and TensorStore wrap the real error (`OUT_OF_RANGE ... byte range`,
  `No space left on device`) in generic ones and long JSON specs.
  """
  seen = set()
  while id(e) not in seen:
    seen.add(id(e))
    inner = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    if inner is None:
      break
    e = inner
  lines = str(e).strip().splitlines()
  text = lines[0] if lines else ""
  if not isinstance(e, errors.CheckpointError):
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
  return text[:_MAX_CAUSE_CHARS]


# ---------------------------------------------------------------------------
# Checksums.


def _checked_files(step_dir: str) -> list[str]:
  """Paths under `step_dir` (relative, sorted) that the checksums cover."""
  files = []
  for root, dirs, names in os.walk(step_dir):
    dirs.sort()
    rel_root = os.path.relpath(root, step_dir)
    for name in sorted(names):
      if rel_root == "." and name in _UNCHECKED:
        continue
      files.append(os.path.normpath(os.path.join(rel_root, name)))
  return files


def write_checksums(step_dir: str | os.PathLike) -> dict:
  """Writes `<step_dir>/checksums.json`: {"files": {path: {size, sha256}}}."""
  step_dir = os.fspath(step_dir)
  if not os.path.isdir(step_dir):
    raise FileNotFoundError(f"checksums: no step directory {step_dir}")
  start, total, files = time.perf_counter(), 0, {}
  for rel in _checked_files(step_dir):
    path = os.path.join(step_dir, rel)
    size = os.path.getsize(path)
    files[rel] = {"size": size, "sha256": io.file_sha256(path)}
    total += size
  manifest = {"algorithm": "sha256", "files": files}
  io.write_json_atomic(os.path.join(step_dir, CHECKSUMS_FILE), manifest)
  logging.info(
      "checksums of %s: %d files, %.1f MB in %.2f s",
      step_dir,
      len(files),
      total / 1e6,
      time.perf_counter() - start,
  )
  return manifest


def verify_checksums(step_dir: str | os.PathLike) -> bool:
  """True if every file matches `checksums.json`; False if it has none.

  A step without the file was saved before checksums existed; only
  Orbax's own checks apply to it.

  Raises:
    errors.CheckpointError: naming the first missing, resized or changed file.
  """
  step_dir = os.fspath(step_dir)
  path = os.path.join(step_dir, CHECKSUMS_FILE)
  if not os.path.exists(path):
    logging.info("%s has no %s: not verified", step_dir, CHECKSUMS_FILE)
    return False
  try:
    with open(path, encoding="utf-8") as f:
      files = json.load(f)["files"]
    expected = {
        rel: (int(v["size"]), str(v["sha256"])) for rel, v in files.items()
    }
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise errors.CheckpointError(f"{path} is unreadable: {e}") from e
  for rel, (size, digest) in sorted(expected.items()):
    file = os.path.join(step_dir, rel)
    try:
      actual = os.path.getsize(file)
    except FileNotFoundError:
      raise errors.CheckpointError(f"{file} is missing") from None
    if actual != size:
      raise errors.CheckpointError(
          f"{file} has {actual} bytes, {size} when saved (truncated?)"
      )
    if io.file_sha256(file) != digest:
      raise errors.CheckpointError(
          f"{file} does not match its saved sha256 (changed on disk)"
      )
  return True


# ---------------------------------------------------------------------------
# Restores that skip unrestorable steps.


class IncompatibleStateError(errors.ConfigError):
  """The saved state's arrays do not match the run's (a config change)."""


def _check_structure(
    manager: ocp.CheckpointManager, step: int, abstract: PyTree, what: str
) -> None:
  """Raises IncompatibleStateError if saved arrays differ in paths or shapes.

  A mismatch is a changed config, not corruption: no walk-back past it.
  """

  # Empty nodes count: optax's EmptyState of a clip on/off is one.
  def flat(tree):
    leaves = ocp.tree.to_flat_dict(tree, keep_empty_nodes=True)
    return {k: tuple(getattr(v, "shape", ())) for k, v in leaves.items()}

  saved = flat(manager.item_metadata(step)[STATE].tree)
  target = flat(abstract)
  name = "/".join  # ("opt_state", "1", "0") -> opt_state/1/0
  problems = []
  missing = sorted(set(target) - set(saved))
  extra = sorted(set(saved) - set(target))
  reshaped = sorted(
      k for k in set(saved) & set(target) if saved[k] != target[k]
  )
  if missing:
    problems.append(
        f"{len(missing)} arrays the run needs are not in it (e.g."
        f" {name(missing[0])})"
    )
  if extra:
    problems.append(
        f"{len(extra)} saved arrays the run does not have (e.g."
        f" {name(extra[0])})"
    )
  if reshaped:
    k = reshaped[0]
    problems.append(
        f"{len(reshaped)} arrays changed shape (e.g. {name(k)}: saved"
        f" {saved[k]}, now {target[k]})"
    )
  if problems:
    raise IncompatibleStateError(
        f"checkpoint {step} in {manager.directory} does not fit {what}: "
        + "; ".join(problems)
    )


def _all_processes(ok: bool) -> bool:
  """`ok` on every process: a restore must not succeed on some hosts only."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    multihost_utils.sync_global_devices(name)


def _move_aside(manager: ocp.CheckpointManager, steps: list[int]) -> None:
  """Renames step directories to `<step>.corrupt` (never deletes them)."""
  directory = os.fspath(manager.directory)
  if jax.process_index() == 0:
    for step in steps:
      source = os.path.join(directory, str(step))
      target, n = source + CORRUPT_SUFFIX, 1
      while os.path.exists(target):
        target, n = f"{source}{CORRUPT_SUFFIX}.{n}", n + 1
      os.rename(source, target)
      logging.warning(
          "moved the unrestorable checkpoint %d aside to %s (kept for"
          " inspection; delete it when done)",
          step,
          target,
      )
  _sync("retrieval_jax_checkpoint_walk_back")
  manager.reload()


def _resolve_step(manager: ocp.CheckpointManager, step: int | None) -> int:
  """`step`, or the latest one when None; raises if it is not on disk."""
  # Committed steps (and our in-flight save); never an interrupted one.
  steps = manager.all_steps()
  if step is None:
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    return max(steps)
  step = check_step(step)
  if step not in steps:
    raise FileNotFoundError(
        f"no checkpoint for step {step} in {manager.directory};"
        f" available steps: {sorted(steps)}"
    )
  return step


def _restore_first_good(
    manager: ocp.CheckpointManager,
    step: int | None,
    attempt: Callable[[int], Any],
    *,
    move_aside: bool,
) -> tuple[int, Any]:
  """`(step, attempt(step))` of `step`, or of the newest good one when None.

  Each candidate is verified against its checksums, then `attempt`ed; a
  failure is logged in one line and, for None, the next older step is tried.
  `move_aside`: rename the failed newer steps once one restores (the run's
  owner only). ConfigError (an incompatible config) is raised at once.

  Raises:
    FileNotFoundError: no checkpoint (or no `step`) in the directory.
    errors.CheckpointError: none restores; names each step and its cause.
  """
  directory = os.fspath(manager.directory)
  if step is None:
    candidates = sorted(manager.all_steps(), reverse=True)
    if not candidates:
      raise FileNotFoundError(f"no checkpoint in {directory}")
  else:
    candidates = [_resolve_step(manager, step)]
  failures = []
  for candidate in candidates:
    why, result = None, None
    try:
      verify_checksums(os.path.join(directory, str(candidate)))
      result = attempt(candidate)
    except (errors.ConfigError, MemoryError):
      raise
    except Exception as e:  # pylint: disable=broad-exception-caught
      why = cause(e)
    if not _all_processes(why is None):
      why = why or "failed on another process"
    if why is None:
      if failures:
        logging.warning(
            "restored checkpoint %d after skipping %s",
            candidate,
            [s for s, _ in failures],
        )
        if move_aside:
          _move_aside(manager, [s for s, _ in failures])
      return candidate, result
    logging.error(
        "checkpoint %d in %s cannot be restored: %s", candidate, directory, why
    )
    failures.append((candidate, why))
  if step is not None:
    raise errors.CheckpointError(
        f"checkpoint {step} in {directory} cannot be restored: {why}"
    )
  raise errors.CheckpointError(
      f"no checkpoint in {directory} can be restored (all left in place): "
      + "; ".join(f"step {s}: {why}" for s, why in failures)
  )


def _restore_params(
    manager: ocp.CheckpointManager,
    step: int,
    abstract_params: PyTree,
    params_key: str,
) -> PyTree:
  """Reads only `state[params_key]` of one step; see `restore_params`."""
  # Orbax's own error for a missing key is a bare KeyError.
  saved = manager.item_metadata(step).get(STATE)
  saved_keys = list(saved.tree) if saved is not None else []
  if params_key not in saved_keys:
    raise IncompatibleStateError(
        f"checkpoint {manager.directory}/{step} has no {params_key!r} in its"
        f" state; top-level keys: {saved_keys}"
    )
  target = {params_key: abstract_params}
  restored = manager.restore(
      step,
      args=ocp.args.Composite(**{
          STATE: ocp.args.PyTreeRestore(
              item=target,
              restore_args=_restore_args(target, "abstract_params"),
              partial_restore=True,
          )  # optimizer moments stay on disk
      }),
  )
  return restored[STATE][params_key]


def _restore_metadata(manager: ocp.CheckpointManager, step: int) -> dict:
  return manager.restore(
      step, args=ocp.args.Composite(**{METADATA: ocp.args.JsonRestore()})
  )[METADATA]


# ---------------------------------------------------------------------------
# The run's own checkpoints.


class Checkpointer:
  """Saves and restores one run's train states; a context manager.

  Owns its directory (hold `io.lock_workdir`): it deletes interrupted saves
  and renames unrestorable steps. Save and restore failures raise
  `errors.CheckpointError` naming the step and the cause.
  """

  def __init__(
      self,
      directory: str | os.PathLike,
      *,
      save_interval_steps: int,
      max_to_keep: int | None,
      async_save: bool = True,
  ):
    """Opens (creating) `directory`; `max_to_keep=None` keeps every step.

    `async_save` writes in a background thread while training goes on.
    """
    if (
        isinstance(save_interval_steps, bool)
        or not isinstance(save_interval_steps, int)
        or save_interval_steps < 1
    ):
      raise ValueError(
          "save_interval_steps must be an int >= 1, got"
          f" {save_interval_steps!r}"
      )
    if max_to_keep is not None and (
        isinstance(max_to_keep, bool)
        or not isinstance(max_to_keep, int)
        or max_to_keep < 1
    ):
      raise ValueError(
          f"max_to_keep must be None or an int >= 1, got {max_to_keep!r}"
      )
    self._interval = save_interval_steps
    self._async = async_save
    self._in_flight: int | None = None  # the step being saved
    # Orbax only records the interval; `should_save` decides. Always Orbax's
    # async path (a sync save waits at once): only it calls back before the
    # commit, where the checksums go.
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_interval_steps,
        max_to_keep=max_to_keep,
        create=True,
        cleanup_tmp_directories=True,
        enable_async_checkpointing=True,
        async_options=ocp.AsyncOptions(
            post_finalization_callback=self._write_checksums
        ),
    )
    self._manager = ocp.CheckpointManager(
        os.fspath(directory), options=options, item_handlers=_item_handlers()
    )

  def _write_checksums(self) -> None:
    """Orbax's last call before the commit rename (primary process only)."""
    if self._in_flight is None:
      raise RuntimeError("checksums: Orbax finalised a save this did not start")
    final = os.path.join(self.directory, str(self._in_flight))
    tmp = final + ocp.path.atomicity.TMP_DIR_SUFFIX
    # Without the tmp directory, Orbax writes in place (no atomic rename).
    write_checksums(tmp if os.path.isdir(tmp) else final)

  @property
  def directory(self) -> str:
    """The run's checkpoint directory."""
    return os.fspath(self._manager.directory)

  def all_steps(self) -> list[int]:
    """Steps with a checkpoint (including one being saved), ascending."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest checkpointed step, or None if there is none."""
    return self._manager.latest_step()

  def should_save(self, step: int) -> bool:
    """True when `step` is on the interval and newer than the latest save."""
    step = check_step(step)
    latest = self.latest_step()
    return step % self._interval == 0 and (latest is None or step > latest)

  def save(
      self,
      step: int,
      state: PyTree,
      *,
      data: Mapping[str, Any],
      metadata: Mapping[str, Any],
      force: bool = False,
  ) -> bool:
    """Saves checkpoint `step` if due or `force`d; returns whether it did.

    `state`: jax.Arrays, any sharding; `data` (the loader position) and
    `metadata`: JSON dicts. A step older than the latest is a ValueError.

    Raises:
      errors.CheckpointError: this save or the previous one (async) failed.
    """
    step = check_step(step)
    self.wait_until_finished()  # a failed earlier save is reported as such
    latest = self.latest_step()
    # An older step would be dropped first by max_to_keep: two runs mixed up.
    if latest is not None and step < latest:
      raise ValueError(
          f"cannot save step {step}: {self.directory} already has step"
          f" {latest}; steps must increase"
      )
    if latest == step:
      logging.info("checkpoint %d already saved in %s", step, self.directory)
      return False
    if not force and not self.should_save(step):
      return False
    data = _json_copy("data", data)
    metadata = _json_copy("metadata", metadata)
    self._in_flight = step
    try:
      # force=True: decided above; Orbax's policy also saves every first step.
      saved = self._manager.save(
          step,
          args=ocp.args.Composite(**{
              STATE: ocp.args.PyTreeSave(state),
              DATA: ocp.args.JsonSave(data),
              METADATA: ocp.args.JsonSave(metadata),
          }),
          force=True,
      )
    except Exception as e:  # pylint: disable=broad-exception-caught
      self._in_flight = None
      raise errors.CheckpointError(
          f"saving checkpoint {step} in {self.directory} failed: {cause(e)}"
      ) from e
    if not self._async:
      self.wait_until_finished()
    return saved

  def restore(
      self,
      step: int | None,
      abstract_state: PyTree,
      *,
      check_metadata: Callable[[int, dict], None] | None = None,
  ) -> tuple[PyTree, dict, dict]:
    """Restores `step` (None: the newest that restores) onto `abstract_state`.

    Returns `(state, data, metadata)`; shapes must match, dtypes are cast.
    With None, unrestorable newer steps are renamed `<step>.corrupt`.
    `check_metadata(step, metadata)` runs before the state is read; its
    ConfigError (an incompatible config) stops the restore at once.

    Raises:
      FileNotFoundError: no such checkpoint.
      IncompatibleStateError: the saved arrays differ from the target's.
      errors.CheckpointError: nothing restores; names each step's cause.
    """
    return self._restore(step, abstract_state, check_metadata)[1:]

  def _restore(self, step, abstract_state, check_metadata):
    """`restore`, with the step that was restored first."""
    self.wait_until_finished()  # an async save cannot be read yet
    restore_args = _restore_args(abstract_state, "abstract_state")

    def attempt(candidate):
      metadata = _restore_metadata(self._manager, candidate)
      if check_metadata is not None:
        check_metadata(candidate, metadata)
      _check_structure(
          self._manager, candidate, abstract_state, "this run's train state"
      )
      restored = self._manager.restore(
          candidate,
          args=ocp.args.Composite(**{
              STATE: ocp.args.PyTreeRestore(
                  item=abstract_state, restore_args=restore_args
              ),
              DATA: ocp.args.JsonRestore(),
          }),
      )
      return restored[STATE], restored[DATA], metadata

    step, (state, data, metadata) = _restore_first_good(
        self._manager, step, attempt, move_aside=step is None
    )
    logging.info("restored checkpoint %d from %s", step, self.directory)
    return step, state, data, metadata

  def restore_params(
      self,
      step: int | None,
      abstract_params: PyTree,
      *,
      params_key: str = "params",
  ) -> PyTree:
    """Reads only `state[params_key]` of `step` (None: latest), no optimizer.

    Params saved as an `nnx.State` need an `nnx.State` target (its Variables
    nest each array under "value"; a plain dict does not match).
    """
    self.wait_until_finished()
    return _restore_first_good(
        self._manager,
        step,
        lambda s: _restore_params(
            self._manager, s, abstract_params, params_key
        ),
        move_aside=False,
    )[1]

  def reached_preemption(self, step: int) -> bool:
    """Preempted and all hosts reached `step`; the same answer on every host."""
    return self._manager.reached_preemption(step)

  def wait_until_finished(self) -> None:
    """Blocks until pending asynchronous saves are committed.

    Raises:
      errors.CheckpointError: the pending save failed (disk full, ...).
    """
    try:
      self._manager.wait_until_finished()  # may run `_write_checksums`
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise errors.CheckpointError(
          f"saving checkpoint {self._in_flight} in {self.directory} failed:"
          f" {cause(e)}"
      ) from e
    finally:
      self._in_flight = None

  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    try:
      self.wait_until_finished()
    finally:
      self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc_info) -> None:
    if exc_info[0] is None:
      self.close()
      return
    # Already failing: a second error from the close must not replace it.
    try:
      self.close()
    except Exception as e:  # pylint: disable=broad-exception-caught
      logging.error("while closing %s: %s", self.directory, cause(e))


# ---------------------------------------------------------------------------
# Another run's checkpoints, read-only.


def open_read_only(directory: str | os.PathLike) -> ocp.CheckpointManager:
  """A manager over another run's checkpoints that changes nothing on disk.

  Safe beside the run that owns them: no tmp cleanup (which would delete
  its save in flight), no directory creation, no renames. Close it after use.
  """
  directory = os.fspath(directory)
  # Orbax would report a missing directory as "no checkpoint".
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
  return ocp.CheckpointManager(
      directory,
      options=ocp.CheckpointManagerOptions(read_only=True, create=False),
      item_handlers=_item_handlers(),
  )


_read_only_manager = open_read_only  # the name earlier callers use


def restore_params_from(
    directory: str | os.PathLike,
    abstract_params: PyTree,
    *,
    params_key: str = "params",
    step: int | None = None,
) -> PyTree:
  """Another run's params at `step` (None: its latest good one), read-only
  (safe while it trains)."""
  manager = open_read_only(directory)
  try:
    return _restore_first_good(
        manager,
        step,
        lambda s: _restore_params(manager, s, abstract_params, params_key),
        move_aside=False,
    )[1]
  finally:
    manager.close()


def read_run_checkpoint(
    directory: str | os.PathLike, abstract_params_fn, step: int | None = None
) -> tuple[int, dict, PyTree]:
  """Another run's `(step, metadata, params)`, read-only, checksums verified.

  `abstract_params_fn`: the saved config -> the params' sharded abstract
  tree. step None: the newest step that restores (a corrupt newer one is
  logged and skipped, not renamed).
  """
  manager = open_read_only(directory)
  try:

    def attempt(candidate):
      metadata = _restore_metadata(manager, candidate)
      params = _restore_params(
          manager, candidate, abstract_params_fn(metadata), "params"
      )
      return metadata, params

    step, (metadata, params) = _restore_first_good(
        manager, step, attempt, move_aside=False
    )
    return step, metadata, params
  finally:
    manager.close()


# ---------------------------------------------------------------------------
# Resume.


def _get(tree: PyTree, key: str) -> PyTree:
  """`tree[key]` for dict-like states, `tree.key` for dataclass ones."""
  if isinstance(tree, Mapping):
    if key not in tree:
      raise KeyError(f"state has no {key!r}; keys: {list(tree)}")
    return tree[key]
  if hasattr(tree, key):
    return getattr(tree, key)
  raise KeyError(f"{type(tree).__name__} state has no {key!r}")


def _replace(tree: PyTree, key: str, value: PyTree) -> PyTree:
  """A copy of `tree` with `key` set to `value` (dict or `.replace`)."""
  if isinstance(tree, Mapping):
    return {**tree, key: value}
  if hasattr(tree, "replace"):  # flax.struct dataclasses
    return tree.replace(**{key: value})
  raise TypeError(
      f"cannot replace {key!r} in a {type(tree).__name__}; use a dict or a"
      " dataclass with .replace()"
  )


def resume_or_init(
    checkpointer: Checkpointer,
    abstract_state: PyTree,
    *,
    init_fn: Callable[[], PyTree],
    init_from: str | os.PathLike = "",
    init_step: int | None = None,
    params_key: str = "params",
    check_metadata: Callable[[int, dict], None] | None = None,
) -> tuple[PyTree, dict | None, str]:
  """Returns `(state, data, source)` in the module's resume order.

  `init_fn` builds a fresh sharded state; `init_from`: a run directory or "",
  read at `init_step` (None: its latest good step).
  `data`: the saved loader position or None; `source`: "checkpoint:<step>",
  "init_from:<dir>" or "scratch". `check_metadata`: see `restore`. A run
  whose checkpoints all fail to restore raises; it never restarts silently.
  """
  if checkpointer.latest_step() is not None:
    step, state, data, _ = checkpointer._restore(  # pylint: disable=protected-access
        None, abstract_state, check_metadata
    )
    source = f"checkpoint:{step}"
  elif init_from:
    init_from = os.fspath(init_from)
    # Before init_fn, so a bad init_from fails before a slow initialisation.
    params = restore_params_from(
        init_from,
        _get(abstract_state, params_key),
        params_key=params_key,
        step=init_step,
    )
    state, data = _replace(init_fn(), params_key, params), None
    source = f"init_from:{init_from}"
    source += "" if init_step is None else f"@{init_step}"
  else:
    state, data, source = init_fn(), None, "scratch"
  logging.info("train state from %s", source)
  return state, data, source


# ---------------------------------------------------------------------------
# Stopping on SIGTERM / SIGINT.


# Why several processes do not leave SIGTERM to XLA's own notifier (the C
# handler that `jax.distributed.initialize` installs): it replaces Python's,
# so a second SIGTERM only sets its flag again instead of ending the process,
# and no process can say which signal stopped the run. Why the preemption
# service and not a per-step all-reduce of a "stop requested" flag
# (multihost_utils): the service agrees on a step (the fastest process's
# next) in the background and each step's check is local, while an
# all-reduce every step would make the host wait for that step's device work,
# ending its run-ahead (async dispatch) on accelerators.
#
# So Python handles both signals everywhere, and the process that got one
# writes the key that the notifier's callback writes: XLA's
# PreemptionSyncManager (xla/pjrt/distributed/preemption) on every process
# watches this key of the coordination service's key-value store, its value
# the RFC 3339 death time; a time already past starts the protocol at once.
# tests/e2e/multihost_stop_test.py fails if a JAX version renames it.
_PREEMPTION_NOTICE_KEY = "RECEIVED_PREEMPTION_NOTICE"
_STOP_REASON_KEY = "retrieval_jax/stop_reason"  # "SIGTERM on process 1"


def _distributed_state():
  return jax._src.distributed.global_state  # pylint: disable=protected-access


def announce_stop(reason: str) -> bool:
  """Asks every process of the run to stop at one step; returns if it could.

  Starts JAX's preemption sync protocol: `Checkpointer.reached_preemption`
  turns True on every process at the same step. `reason` is what
  `stop_reason()` says on each of them.
  """
  state = _distributed_state()
  if state.client is None or state.preemption_sync_manager is None:
    logging.warning(
        "%s: cannot stop every process at one step: JAX's preemption service"
        " is off (jax_enable_preemption_service); training goes on",
        reason,
    )
    return False
  death_time = datetime.datetime.now(datetime.timezone.utc).isoformat()
  # The reason first: a process that learns of the notice finds it.
  for key, value in (
      (_STOP_REASON_KEY, reason),
      (_PREEMPTION_NOTICE_KEY, death_time),
  ):
    try:
      state.client.key_value_set(key, value)
    except Exception as e:  # pylint: disable=broad-exception-caught
      # Set already: another process (or a real preemption) was first.
      logging.info("stop notice %s not written: %s", key, cause(e))
  return True


def stop_reason() -> str:
  """The announced reason to stop, else "a preemption notice" (the host's)."""
  client = _distributed_state().client
  if client is not None:
    try:
      return client.key_value_try_get(_STOP_REASON_KEY)
    except Exception:  # pylint: disable=broad-exception-caught
      pass  # not set: XLA's own notifier saw a SIGTERM before the loop
  return "a preemption notice"


class StopSignals:
  """SIGTERM/SIGINT inside the block ask the loop to save and stop.

  The first signal is logged and sets `received` ("SIGTERM"); the loop
  finishes its step, saves and stops. A second one ends the process at once
  with the signal's default action (exit status 128 + signal number).
  Several processes must stop at the same step, though a signal may reach
  only one: there `requested()` announces it (`announce_stop`) and the loop
  stops when `Checkpointer.reached_preemption` says so, on every process at
  the same step, naming `stop_reason()`.
  """

  def __init__(self):
    self.received: str | None = None
    self._announced = False
    self._previous: dict[int, Any] = {}

  def requested(self) -> str | None:
    """The signal to stop for, where this process may decide alone.

    With several processes, None; the first call after a signal announces
    it to all of them.
    """
    if jax.process_count() == 1:
      return self.received
    if self.received is not None and not self._announced:
      self._announced = True
      announce_stop(f"{self.received} on process {jax.process_index()}")
    return None

  def _handle(self, signum, frame) -> None:
    del frame
    name = signal.Signals(signum).name
    if self.received is not None:
      os.write(2, f"\n{name} again: exiting now, without saving\n".encode())
      signal.signal(signum, signal.SIG_DFL)
      os.kill(os.getpid(), signum)
      return
    self.received = name
    logging.warning(
        "%s: finishing the current step, then saving and exiting (send it"
        " again to exit at once, without saving)",
        name,
    )

  def __enter__(self) -> "StopSignals":
    if threading.current_thread() is not threading.main_thread():
      logging.warning(
          "not on the main thread: SIGTERM/SIGINT keep their usual effect"
      )
      return self
    for signum in (signal.SIGTERM, signal.SIGINT):
      self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc_info) -> None:
    self.restore()

  def restore(self) -> None:
    """Gives the signals their earlier handlers back; idempotent."""
    for signum, previous in self._previous.items():
      # None: set from C (not Python); the default is the closest restore.
      signal.signal(signum, signal.SIG_DFL if previous is None else previous)
    self._previous.clear()
