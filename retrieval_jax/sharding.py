"""Device mesh, logical axis names and the rules that map one to the other.

Arrays name their axes with the *logical* names below; one rules table,
`config.mesh.rules` (default `DEFAULT_RULES`), made current by the entry points
(`uses_config_rules`), maps them to mesh axes for every sharding derived
inside, so changing the parallelism is a config edit.
"""

import contextlib
import functools
import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

# Mesh axis names. `data` splits the batch, `fsdp` splits the batch and the
# parameters, `model` splits heads / MLP features.
DATA = "data"
FSDP = "fsdp"
MODEL = "model"
MESH_AXES = (DATA, FSDP, MODEL)

BATCH = "batch"  # examples in a batch
LENGTH = "length"  # token positions
VOCAB = "vocab"  # rows of the word-embedding table
EMBED = "embed"  # model width (hidden size)
HEADS = "heads"  # attention heads
HEAD_DIM = "head_dim"  # per-head width
MLP = "mlp"  # feed-forward hidden width
CORPUS = "corpus"  # documents of an encoded corpus
CODEBOOK = "codebook"  # codebooks (heads) of a key-value memory

# Default rules: batch and corpus over every data-like axis, parameters
# replicated except the large matrices, which FSDP shards along the width.
DEFAULT_RULES = (
    (BATCH, (DATA, FSDP)),
    (CORPUS, (DATA, FSDP)),
    (VOCAB, MODEL),
    (EMBED, FSDP),
    (HEADS, MODEL),
    (MLP, MODEL),
    (CODEBOOK, MODEL),
    (LENGTH, None),
    (HEAD_DIM, None),
)


_RULES_STACK = [DEFAULT_RULES]


def current_rules():
  """The logical-axis rules in force (`axis_rules`), else `DEFAULT_RULES`."""
  return _RULES_STACK[-1]


@contextlib.contextmanager
def axis_rules(rules):
  """Makes `rules` (pairs of logical name, mesh axes) current inside."""
  _RULES_STACK.append(
      tuple(
          (name, tuple(axes) if isinstance(axes, (list, tuple)) else axes)
          for name, axes in rules
      )
  )
  try:
    yield
  finally:
    _RULES_STACK.pop()


def config_rules(config):
  """`config.mesh.rules`, or `DEFAULT_RULES` when unset or empty."""
  mesh = config.get("mesh") or {}
  return tuple(mesh.get("rules") or ()) or DEFAULT_RULES


def uses_config_rules(fn):
  """Runs `fn(config, ...)` with the config's rules current."""

  @functools.wraps(fn)
  def wrapped(config, *args, **kwargs):
    with axis_rules(config_rules(config)):
      return fn(config, *args, **kwargs)

  return wrapped


def use_cpu_cores_as_devices(num_devices: int = 0) -> int:
  """One XLA CPU device per core (or `num_devices`); before any device query.

  A CPU matmul runs on one thread; data parallelism over per-core devices uses
  every core (2 cores: 1.9x encode). Returns 0 if XLA_FLAGS already sets it.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" in flags:
    return 0
  count = num_devices or len(os.sched_getaffinity(0))
  os.environ["XLA_FLAGS"] = (
      f"{flags} --xla_force_host_platform_device_count={count}".strip()
  )
  return count


def make_mesh(
    shape: Sequence[int] = (-1, 1, 1),
    axis_names: Sequence[str] = MESH_AXES,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
  """A mesh of Auto axes (sharding constraints work in jit); -1: the rest."""
  devices = list(jax.devices() if devices is None else devices)
  shape = list(shape)
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {shape}: at most one axis may be -1")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(
          f"mesh shape {shape} does not divide {len(devices)} devices"
      )
    shape[shape.index(-1)] = len(devices) // known
  if int(np.prod(shape)) != len(devices):
    raise ValueError(
        f"mesh shape {shape} needs {int(np.prod(shape))} devices, "
        f"{len(devices)} available"
    )
  return jax.make_mesh(
      tuple(shape),
      tuple(axis_names),
      axis_types=(AxisType.Auto,) * len(shape),
      devices=devices,
  )


def logical_to_spec(
    logical_axes: Sequence[str | None], rules=None
) -> PartitionSpec:
  """Maps logical axis names to a PartitionSpec through `rules`.

  A mesh axis is used at most once per spec; later logical axes that map to
  an axis already taken stay replicated (the t5x convention).
  """
  table = dict(current_rules() if rules is None else rules)
  used, spec = set(), []
  for name in logical_axes:
    target = table.get(name) if name is not None else None
    targets = (target,) if isinstance(target, str) else tuple(target or ())
    targets = tuple(t for t in targets if t not in used)
    used.update(targets)
    spec.append(targets[0] if len(targets) == 1 else (targets or None))
  return PartitionSpec(*spec)


def named_sharding(
    mesh: Mesh, logical_axes: Sequence[str | None], rules=None
) -> NamedSharding:
  """NamedSharding on `mesh` for an array with the given logical axes."""
  return NamedSharding(mesh, logical_to_spec(logical_axes, rules))


def replicated(mesh: Mesh) -> NamedSharding:
  """The same full array on every device of `mesh`."""
  return NamedSharding(mesh, PartitionSpec())


def data_size(mesh: Mesh) -> int:
  """Number of shards along the batch (the mesh axes `batch` maps to)."""
  spec = logical_to_spec((BATCH,))[0]
  axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
  return int(np.prod([mesh.shape.get(a, 1) for a in axes]))
