"""Training checkpoints: an Orbax manager with three items and a resume order.

A step directory holds `state` ({step, params, opt_state}; the dropout key is
re-derived), `data` (JSON loader position: a resumed run sees the same batches)
and `metadata` (JSON config). An interrupted async save never hides the last
complete one (Orbax renames on commit); restores target sharded abstract trees,
so a run can resume on another mesh. Resume order (`resume_or_init`), first
match wins: the run's own checkpoint (a restarted fine-tune keeps its
progress), else `init_from` (another run's params), else scratch.
"""

from collections.abc import Callable, Mapping
import json
import os
from typing import Any

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any

STATE = "state"  # item names inside each step directory
DATA = "data"
METADATA = "metadata"


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


def _restore_params(
    manager: ocp.CheckpointManager,
    step: int | None,
    abstract_params: PyTree,
    params_key: str,
) -> PyTree:
  """Reads only `state[params_key]` of one step; see `restore_params`."""
  step = _resolve_step(manager, step)
  # Orbax's own error for a missing key is a bare KeyError.
  saved = manager.item_metadata(step).get(STATE)
  saved_keys = list(saved.tree) if saved is not None else []
  if params_key not in saved_keys:
    raise KeyError(
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


class Checkpointer:
  """Saves and restores one run's train states; a context manager."""

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
    # Orbax only records the interval; `should_save` decides.
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_interval_steps,
        max_to_keep=max_to_keep,
        create=True,
        cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save,
    )
    self._manager = ocp.CheckpointManager(
        os.fspath(directory), options=options, item_handlers=_item_handlers()
    )

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
    """
    step = check_step(step)
    latest = self.latest_step()  # counts a save still in flight
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
    # force=True: decided above; Orbax's own policy also saves every first step.
    return self._manager.save(
        step,
        args=ocp.args.Composite(**{
            STATE: ocp.args.PyTreeSave(state),
            DATA: ocp.args.JsonSave(data),
            METADATA: ocp.args.JsonSave(metadata),
        }),
        force=True,
    )

  def restore(
      self, step: int | None, abstract_state: PyTree
  ) -> tuple[PyTree, dict, dict]:
    """Restores `step` (None: latest) onto sharded `abstract_state`.

    Returns `(state, data, metadata)`; shapes must match, dtypes are cast.
    """
    self._manager.wait_until_finished()  # an async save cannot be read yet
    step = _resolve_step(self._manager, step)
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(**{
            STATE: ocp.args.PyTreeRestore(
                item=abstract_state,
                restore_args=_restore_args(abstract_state, "abstract_state"),
            ),
            DATA: ocp.args.JsonRestore(),
            METADATA: ocp.args.JsonRestore(),
        }),
    )
    logging.info("restored checkpoint %d from %s", step, self.directory)
    return restored[STATE], restored[DATA], restored[METADATA]

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
    self._manager.wait_until_finished()
    return _restore_params(self._manager, step, abstract_params, params_key)

  def reached_preemption(self, step: int) -> bool:
    """Preempted and all hosts reached `step`; the same answer on every host."""
    return self._manager.reached_preemption(step)

  def wait_until_finished(self) -> None:
    """Blocks until pending asynchronous saves are committed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def restore_params_from(
    directory: str | os.PathLike,
    abstract_params: PyTree,
    *,
    params_key: str = "params",
) -> PyTree:
  """Another run's latest params, read-only (safe while it still trains)."""
  manager = _read_only_manager(directory)
  try:
    return _restore_params(manager, None, abstract_params, params_key)
  finally:
    manager.close()


def _read_only_manager(directory: str | os.PathLike) -> ocp.CheckpointManager:
  """A manager that reads another run's checkpoints and changes nothing."""
  directory = os.fspath(directory)
  # Orbax would report a missing directory as "no checkpoint".
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
  return ocp.CheckpointManager(
      directory,
      # read_only: no tmp cleanup deleting the other run's save in progress.
      options=ocp.CheckpointManagerOptions(read_only=True, create=False),
      item_handlers=_item_handlers(),
  )


def read_run_checkpoint(
    directory: str | os.PathLike, abstract_params_fn, step: int | None = None
) -> tuple[int, dict, PyTree]:
  """Another run's `(step, metadata, params)`, read-only; step None: latest.

  `abstract_params_fn`: the saved config -> the params' sharded abstract tree.
  """
  manager = _read_only_manager(directory)
  try:
    step = _resolve_step(manager, step)
    metadata = manager.restore(
        step, args=ocp.args.Composite(**{METADATA: ocp.args.JsonRestore()})
    )[METADATA]
    params = _restore_params(
        manager, step, abstract_params_fn(metadata), "params"
    )
    return step, metadata, params
  finally:
    manager.close()


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
    params_key: str = "params",
) -> tuple[PyTree, dict | None, str]:
  """Returns `(state, data, source)` in the module's resume order.

  `init_fn` builds a fresh sharded state; `init_from`: a run directory or "".
  `data`: the saved loader position or None; `source`: "checkpoint:<step>",
  "init_from:<dir>" or "scratch".
  """
  latest = checkpointer.latest_step()
  if latest is not None:
    state, data, _ = checkpointer.restore(latest, abstract_state)
    source = f"checkpoint:{latest}"
  elif init_from:
    init_from = os.fspath(init_from)
    # Before init_fn, so a bad init_from fails before a slow initialisation.
    params = restore_params_from(
        init_from, _get(abstract_state, params_key), params_key=params_key
    )
    state, data = _replace(init_fn(), params_key, params), None
    source = f"init_from:{init_from}"
  else:
    state, data, source = init_fn(), None, "scratch"
  logging.info("train state from %s", source)
  return state, data, source
