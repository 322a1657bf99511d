"""Training checkpoints: an Orbax manager with three items and a resume order.

Each checkpoint step directory holds three items:

  state     the train state, a pytree of jax.Arrays (params, optimizer
            state, step, rng), written by every process for its own shards;
  data      JSON: the data loader's position, so the batch after a restore
            is the batch an uninterrupted run would have seen;
  metadata  JSON: the run's config and anything else worth keeping beside
            the weights.

Saves are asynchronous: `Checkpointer.save` returns once the arrays are
copied to host memory, so the caller may donate or overwrite the state at
once, and the files are written in the background. A step only becomes
visible when Orbax renames its temporary directory to the final name, so a
save that is interrupted (preemption, crash) never hides or corrupts the
last complete checkpoint; its leftover temporary directory is removed the
next time a writer opens the directory.

Restores always go onto an abstract target, a pytree of
`jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding)` built with
`jax.eval_shape` and the sharding rules. The arrays come back laid out as
the target says, whatever mesh wrote them, so a run can resume on another
topology.

Resume order (`resume_or_init`), first match wins:

  1. the latest complete checkpoint in the run's own directory: the full
     state and the data position are restored (an interrupted run carries
     on exactly);
  2. else `init_from`, the checkpoint directory of another run: the state is
     initialised from scratch and its params are replaced by the params of
     that run's latest checkpoint (fine-tuning; optimizer, step and data
     position start fresh);
  3. else scratch: the state from `init_fn()`.

The order puts the run's own checkpoint first so that a restarted
fine-tuning job resumes its own progress instead of going back to the
`init_from` weights.
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

# Item names inside each step directory.
STATE = "state"
DATA = "data"
METADATA = "metadata"


def _item_handlers() -> dict[str, ocp.CheckpointHandler]:
  """One handler per item.

  The state uses the PyTree handler rather than the Standard one because
  only it supports `partial_restore`, which `restore_params` needs; an item
  must keep one handler for both saving and restoring. Registering the
  handlers up front (rather than letting Orbax infer them from the first
  save's args) also lets a fresh manager read item metadata.
  """
  return {
      STATE: ocp.PyTreeCheckpointHandler(),
      DATA: ocp.JsonCheckpointHandler(),
      METADATA: ocp.JsonCheckpointHandler(),
  }


def check_step(step: Any) -> int:
  """Returns `step` as a python int; rejects bools, floats and negatives.

  Steps name checkpoint directories and are the x-axis and join key of the
  metric logs, so 2.5 or True is always a caller's mistake.
  """
  if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
    raise TypeError(
        f"step must be a python or numpy integer, got {type(step).__name__}"
        f" {step!r}")
  # Orbax names step directories by the integer; a negative one would not
  # parse back as a step.
  if step < 0:
    raise ValueError(f"step must be >= 0, got {step}")
  return int(step)


def _json_copy(name: str, value: Any) -> dict:
  """A deep copy of `value` through JSON; fails now, naming the item.

  Orbax writes the JSON items in its background thread: an unserialisable
  value would raise there, at the next save or `wait_until_finished`, far
  from the caller's mistake, and later edits to the caller's dict (a data
  loader updating its position) could leak into the checkpoint.
  """
  if not isinstance(value, Mapping):
    raise TypeError(f"{name} must be a dict, got {type(value).__name__}")
  # allow_nan=False: NaN is not JSON, and readers other than Python's could
  # not parse the item back.
  try:
    return json.loads(json.dumps(value, allow_nan=False))
  except (TypeError, ValueError) as e:
    raise TypeError(
        f"{name} is not JSON-serialisable (use plain python str, int, float,"
        f" bool, list and dict; convert numpy/jax scalars first): {e}"
    ) from e


def _restore_args(abstract: PyTree, what: str) -> PyTree:
  """Orbax restore args that put every leaf on its target sharding.

  Args:
    abstract: pytree whose leaves are `jax.ShapeDtypeStruct`s (or arrays)
      carrying a sharding.
    what: name of the tree, for error messages.

  Returns:
    A pytree of `ocp.ArrayRestoreArgs` matching `abstract`. Shapes are
    strict (a shape mismatch with the checkpoint raises); dtypes are cast to
    the target's.

  Raises:
    ValueError: a leaf has no shape/dtype or no sharding (without one the
      restored layout would not be the target's, and a restore on another
      mesh could not work).
  """
  # Check every leaf up front: Orbax's own errors for these come from deep
  # inside the restore and do not name the leaf.
  leaves = jax.tree_util.tree_leaves_with_path(abstract)
  if not leaves:
    raise ValueError(f"{what}: the abstract target has no leaves")
  for path, leaf in leaves:
    name = jax.tree_util.keystr(path)
    if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
      raise ValueError(
          f"{what}{name}: expected a jax.ShapeDtypeStruct with a sharding,"
          f" got {type(leaf).__name__}")
    if getattr(leaf, "sharding", None) is None:
      raise ValueError(
          f"{what}{name}: the abstract target has no sharding; build it with"
          " jax.eval_shape and attach NamedShardings so the restore knows"
          " its layout")
  # ArrayRestoreArgs(sharding=leaf.sharding, global_shape=leaf.shape,
  # strict=True): each process reads only the shards its devices hold.
  return ocp.checkpoint_utils.construct_restore_args(abstract)


def _resolve_step(manager: ocp.CheckpointManager, step: int | None) -> int:
  """`step`, or the latest one when None; raises if it is not on disk."""
  # all_steps() lists committed step directories (and this manager's own
  # save in flight, which callers wait for first); a temporary directory
  # left by an interrupted save is never a candidate.
  steps = manager.all_steps()
  if step is None:
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    return max(steps)
  step = check_step(step)
  if step not in steps:
    raise FileNotFoundError(
        f"no checkpoint for step {step} in {manager.directory};"
        f" available steps: {sorted(steps)}")
  return step


def _restore_params(manager: ocp.CheckpointManager, step: int | None,
                    abstract_params: PyTree, params_key: str) -> PyTree:
  """Reads only `state[params_key]` of one step; see `restore_params`."""
  step = _resolve_step(manager, step)
  # Check the key against the saved tree first (the metadata is None when
  # the step has no state item): Orbax's own error is a bare KeyError.
  saved = manager.item_metadata(step).get(STATE)
  saved_keys = list(saved.tree) if saved is not None else []
  if params_key not in saved_keys:
    raise KeyError(
        f"checkpoint {manager.directory}/{step} has no {params_key!r} in its"
        f" state; top-level keys: {saved_keys}")
  target = {params_key: abstract_params}
  restored = manager.restore(
      step,
      args=ocp.args.Composite(**{
          STATE: ocp.args.PyTreeRestore(
              item=target,
              restore_args=_restore_args(target, "abstract_params"),
              # Everything but the params (optimizer moments: 2x the params)
              # stays on disk.
              partial_restore=True)
      }))
  return restored[STATE][params_key]


class Checkpointer:
  """Saves and restores train states of one run directory.

  A thin layer over `ocp.CheckpointManager` with the items `state`, `data`
  and `metadata` (see the module docstring). Usable as a context manager;
  leaving the block waits for pending saves and closes the manager.
  """

  def __init__(self, directory: str | os.PathLike, *,
               save_interval_steps: int, max_to_keep: int | None,
               async_save: bool = True):
    """Opens (creating if missing) a run's checkpoint directory.

    Args:
      directory: where the step directories go.
      save_interval_steps: `should_save(step)` is true when step is a
        multiple of this (>= 1).
      max_to_keep: how many of the most recent checkpoints to keep (>= 1);
        None keeps all.
      async_save: write files in a background thread (training goes on
        while they are written).
    """
    if (isinstance(save_interval_steps, bool) or
        not isinstance(save_interval_steps, int) or save_interval_steps < 1):
      raise ValueError(
          f"save_interval_steps must be an int >= 1, got"
          f" {save_interval_steps!r}")
    if max_to_keep is not None and (
        isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or
        max_to_keep < 1):
      raise ValueError(
          f"max_to_keep must be None or an int >= 1, got {max_to_keep!r}")
    self._interval = save_interval_steps
    # save_interval_steps is also given to Orbax, which records it in the
    # directory's metadata, but the decision to save is `should_save`'s.
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_interval_steps,
        max_to_keep=max_to_keep,
        create=True,
        # Temporary directories left by an interrupted save are garbage:
        # drop them (in the background) so they do not fill the disk.
        cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save)
    # Explicit handlers rather than Orbax inferring them from the first
    # save's args: a fresh manager can then restore and read metadata.
    self._manager = ocp.CheckpointManager(
        os.fspath(directory), options=options, item_handlers=_item_handlers())

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
    """Whether `save(step, ...)` without `force` would write a checkpoint.

    True when `step` is a multiple of `save_interval_steps` and newer than
    the latest checkpoint (a resumed run does not rewrite the step it
    restored).
    """
    step = check_step(step)
    latest = self.latest_step()
    return step % self._interval == 0 and (latest is None or step > latest)

  def save(self, step: int, state: PyTree, *, data: Mapping[str, Any],
           metadata: Mapping[str, Any], force: bool = False) -> bool:
    """Saves `state`, `data` and `metadata` as checkpoint `step` if due.

    Args:
      step: the train step the state belongs to (>= 0).
      state: pytree of jax.Arrays, any sharding.
      data: JSON-serialisable dict, the data loader's position.
      metadata: JSON-serialisable dict (config and the like).
      force: save even off the interval (preemption, end of training).

    Returns:
      Whether a checkpoint was written. False when the step is off the
      interval (without `force`) or already saved.

    Raises:
      ValueError: `step` is older than the latest checkpoint.
      TypeError: `data` or `metadata` is not JSON-serialisable.
    """
    step = check_step(step)
    # latest_step() already counts a save still in flight, so a repeated
    # call for the same step is caught here and not by Orbax's error.
    latest = self.latest_step()
    # An older step would sort before the latest and be deleted first by
    # the keep policy; it is almost surely a mix-up of two runs.
    if latest is not None and step < latest:
      raise ValueError(
          f"cannot save step {step}: {self.directory} already has step"
          f" {latest}; steps must increase")
    if latest == step:
      # E.g. a preemption save right after the interval save of this step.
      logging.info("checkpoint %d already saved in %s", step, self.directory)
      return False
    if not force and not self.should_save(step):
      return False
    data = _json_copy("data", data)
    metadata = _json_copy("metadata", metadata)
    # `force=True`: the decision is made above. Orbax's default policy
    # differs: it would also save the first step of every run, whatever the
    # interval.
    return self._manager.save(
        step,
        args=ocp.args.Composite(**{
            STATE: ocp.args.PyTreeSave(state),
            DATA: ocp.args.JsonSave(data),
            METADATA: ocp.args.JsonSave(metadata),
        }),
        force=True)

  def restore(self, step: int | None,
              abstract_state: PyTree) -> tuple[PyTree, dict, dict]:
    """Restores checkpoint `step` (None: the latest) onto `abstract_state`.

    Args:
      step: the step to restore, or None for the latest.
      abstract_state: the state's tree of `jax.ShapeDtypeStruct`s with
        shardings. Its structure must match the saved state's; shapes must
        match exactly; dtypes are cast to the target's.

    Returns:
      `(state, data, metadata)`: state with the target's structure and
      shardings, and the two JSON dicts as saved.

    Raises:
      FileNotFoundError: no such checkpoint.
      ValueError: a target leaf lacks a sharding, or the structure or a
        shape differs from the checkpoint.
    """
    # A step still being written asynchronously cannot be read yet.
    self._manager.wait_until_finished()
    step = _resolve_step(self._manager, step)
    # `item` fixes the output's structure (nnx.State, optax namedtuples);
    # `restore_args` its shardings and dtypes.
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(**{
            STATE: ocp.args.PyTreeRestore(
                item=abstract_state,
                restore_args=_restore_args(abstract_state, "abstract_state")),
            DATA: ocp.args.JsonRestore(),
            METADATA: ocp.args.JsonRestore(),
        }))
    logging.info("restored checkpoint %d from %s", step, self.directory)
    return restored[STATE], restored[DATA], restored[METADATA]

  def restore_params(self, step: int | None, abstract_params: PyTree, *,
                     params_key: str = "params") -> PyTree:
    """Reads only `state[params_key]` of checkpoint `step` (None: latest).

    Used by export and `init_from`: the optimizer state is never read.

    Args:
      step: the step to read, or None for the latest.
      abstract_params: tree of `jax.ShapeDtypeStruct`s with shardings, the
        structure of the saved params (params saved as an `nnx.State` need
        an `nnx.State` target: its Variables nest each array under
        "value", so a plain dict of arrays does not match).
      params_key: the key of the params in the saved state.

    Returns:
      The params, with the target's structure, dtypes and shardings.

    Raises:
      FileNotFoundError: no such checkpoint.
      KeyError: the saved state has no `params_key`.
    """
    self._manager.wait_until_finished()
    return _restore_params(self._manager, step, abstract_params, params_key)

  def reached_preemption(self, step: int) -> bool:
    """True when this job is being preempted and all hosts reached `step`.

    A multi-host sync point from JAX's preemption service: every process
    gets the same answer for the same step, so they all force the same save.
    Without the service (single process, CPU) it is always False.
    """
    # Orbax wraps jax.experimental.multihost_utils'
    # reached_preemption_sync_point and maps "service not running" to False.
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


def restore_params_from(directory: str | os.PathLike, abstract_params: PyTree,
                        *, params_key: str = "params") -> PyTree:
  """Reads the params of another run's latest checkpoint, read-only.

  The `init_from` path: nothing in `directory` is created, cleaned or
  deleted, so it is safe on a run that is still training.

  Args:
    directory: that run's checkpoint directory.
    abstract_params: tree of `jax.ShapeDtypeStruct`s with shardings, the
      structure of the saved params (see `Checkpointer.restore_params`).
    params_key: the key of the params in the saved state.

  Returns:
    The params, with the target's structure, dtypes and shardings.

  Raises:
    FileNotFoundError: `directory` is missing or holds no checkpoint.
    KeyError: the saved state has no `params_key`.
  """
  manager = _read_only_manager(directory)
  try:
    return _restore_params(manager, None, abstract_params, params_key)
  finally:
    manager.close()


def _read_only_manager(directory: str | os.PathLike) -> ocp.CheckpointManager:
  """A manager that reads another run's checkpoints and changes nothing."""
  directory = os.fspath(directory)
  # A read-only manager does not create the directory, but it would report
  # a missing one as "no checkpoint"; say which it is.
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
  return ocp.CheckpointManager(
      directory,
      # read_only also turns off the temporary-directory cleanup, which
      # would delete the other run's save in progress.
      options=ocp.CheckpointManagerOptions(read_only=True, create=False),
      item_handlers=_item_handlers())


def read_run_checkpoint(directory: str | os.PathLike, abstract_params_fn,
                        step: int | None = None
                        ) -> tuple[int, dict, PyTree]:
  """Another run's checkpoint, read-only: its step, metadata and params.

  For jobs that use a trained model (experiments, export): the saved
  metadata (the run's config) decides which model to build, so the params'
  structure comes from a function of it.

  Args:
    directory: that run's checkpoint directory.
    abstract_params_fn: metadata dict -> tree of `jax.ShapeDtypeStruct`s
      with shardings (see `Checkpointer.restore_params`).
    step: the step; None for the latest.

  Returns:
    (step, metadata, params).

  Raises:
    FileNotFoundError: `directory` is missing or holds no such checkpoint.
  """
  manager = _read_only_manager(directory)
  try:
    step = _resolve_step(manager, step)
    metadata = manager.restore(step, args=ocp.args.Composite(**{
        METADATA: ocp.args.JsonRestore()}))[METADATA]
    params = _restore_params(manager, step, abstract_params_fn(metadata),
                             "params")
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
  if hasattr(tree, "replace"):
    # flax.struct dataclasses and similar immutable train states.
    return tree.replace(**{key: value})
  raise TypeError(
      f"cannot replace {key!r} in a {type(tree).__name__}; use a dict or a"
      " dataclass with .replace()")


def resume_or_init(
    checkpointer: Checkpointer, abstract_state: PyTree, *,
    init_fn: Callable[[], PyTree], init_from: str | os.PathLike = "",
    params_key: str = "params") -> tuple[PyTree, dict | None, str]:
  """Returns the state a run starts from, in the module's resume order.

  Args:
    checkpointer: the run's own checkpointer.
    abstract_state: the state's tree of `jax.ShapeDtypeStruct`s with
      shardings (what `init_fn` returns, abstractly).
    init_fn: builds a fresh, sharded state (e.g. a jitted init with
      `out_shardings`). Not called when the run resumes its own checkpoint.
    init_from: another run's checkpoint directory whose latest params seed
      this run; "" for none.
    params_key: the key of the params in the state.

  Returns:
    `(state, data, source)`. `data` is the saved data-loader position when
    resuming, else None (start the data from the beginning). `source` is
    "checkpoint:<step>", "init_from:<dir>" or "scratch".
  """
  latest = checkpointer.latest_step()
  if latest is not None:
    state, data, _ = checkpointer.restore(latest, abstract_state)
    source = f"checkpoint:{latest}"
  elif init_from:
    init_from = os.fspath(init_from)
    # Read the params before init_fn so a bad init_from fails fast, before
    # a possibly slow initialisation. The fresh params from init_fn are
    # dropped; the restored ones already carry the target shardings.
    params = restore_params_from(
        init_from, _get(abstract_state, params_key), params_key=params_key)
    state, data = _replace(init_fn(), params_key, params), None
    source = f"init_from:{init_from}"
  else:
    state, data, source = init_fn(), None, "scratch"
  logging.info("train state from %s", source)
  return state, data, source
