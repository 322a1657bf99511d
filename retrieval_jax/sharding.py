"""Device mesh, logical axis names and the rules that map one to the other.

Parameters and activations name their axes with the *logical* names below;
a single rules table (from config) maps each logical name to a mesh axis (or
to None, meaning replicated). Changing the parallelism is then a config edit.
"""

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

# Logical axis names carried by parameters and activations.
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


def use_cpu_cores_as_devices(num_devices: int = 0) -> int:
  """On CPU hosts, exposes one XLA device per core (or `num_devices`).

  XLA's CPU backend runs each matmul of a transformer on a single thread, so
  one CPU device leaves the other cores idle; data parallelism over per-core
  devices uses all of them (2 cores: 1.9x the encode throughput). Only the
  CPU platform is affected; GPU/TPU hosts keep their accelerators.

  Must run before JAX creates its CPU client (the first device query). An
  explicit `--xla_force_host_platform_device_count` in XLA_FLAGS wins.

  Returns:
    The number of CPU devices requested, or 0 if XLA_FLAGS already set it.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" in flags:
    return 0
  count = num_devices or len(os.sched_getaffinity(0))
  os.environ["XLA_FLAGS"] = (
      f"{flags} --xla_force_host_platform_device_count={count}".strip())
  return count


def make_mesh(shape: Sequence[int] = (-1, 1, 1),
              axis_names: Sequence[str] = MESH_AXES,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a mesh; one entry of `shape` may be -1 ("all remaining devices").

  Axis types are Auto so `jax.lax.with_sharding_constraint` works under jit.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = list(shape)
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {shape}: at most one axis may be -1")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(
          f"mesh shape {shape} does not divide {len(devices)} devices")
    shape[shape.index(-1)] = len(devices) // known
  if int(np.prod(shape)) != len(devices):
    raise ValueError(
        f"mesh shape {shape} needs {int(np.prod(shape))} devices, "
        f"{len(devices)} available")
  return jax.make_mesh(
      tuple(shape), tuple(axis_names),
      axis_types=(AxisType.Auto,) * len(shape), devices=devices)


def logical_to_spec(logical_axes: Sequence[str | None],
                    rules=DEFAULT_RULES) -> PartitionSpec:
  """Maps logical axis names to a PartitionSpec through `rules`.

  A mesh axis is used at most once per spec; later logical axes that map to
  an axis already taken stay replicated (the t5x convention).
  """
  table = dict(rules)
  used, spec = set(), []
  for name in logical_axes:
    target = table.get(name) if name is not None else None
    targets = (target,) if isinstance(target, str) else tuple(target or ())
    targets = tuple(t for t in targets if t not in used)
    used.update(targets)
    spec.append(targets[0] if len(targets) == 1 else (targets or None))
  return PartitionSpec(*spec)


def named_sharding(mesh: Mesh, logical_axes: Sequence[str | None],
                   rules=DEFAULT_RULES) -> NamedSharding:
  """NamedSharding on `mesh` for an array with the given logical axes."""
  return NamedSharding(mesh, logical_to_spec(logical_axes, rules))


def data_size(mesh: Mesh) -> int:
  """Number of shards along the batch (`data` × `fsdp`)."""
  return int(np.prod([mesh.shape.get(a, 1) for a in (DATA, FSDP)]))
