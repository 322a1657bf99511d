r"""Trains a tiny encoder for a few sharded steps and saves its parameters.

Launched by `multihost_test.py` in two ways that must give the same result:

  * as one of several cooperating processes: the environment names the
    coordinator (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`,
    `JAX_PROCESS_ID`) and XLA_FLAGS the local CPU device count;
  * alone, with all the devices local: the single-process reference.

  XLA_FLAGS=--xla_force_host_platform_device_count=4 \
      python tests/multihost_worker.py OUT.npz

Each mesh layout in `LAYOUTS` trains the same model from the same init on
the same global batches. Every process builds the whole global batch on its
host (as the loader does: a pure function of the step) and `put_batch`
hands each local device its rows. Process 0 writes OUT.npz with

  init/<param path>            the parameters before training
  <layout>/<param path>        the parameters after the last step
  <layout>/loss                float32 [STEPS], the loss of each step
  <layout>/word_shard_shape    int [2], one device's block of the word table
  <layout>/word_held_locally   bool, whether this process's devices hold
                               every block of it
  process_count, device_count, local_device_count   int scalars
  process_indices              int [process_count], gathered from everyone
"""

import functools
import pathlib
import sys

# Run as a script: the repository root is not on the path by itself.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np
import optax
from flax import nnx

from retrieval_jax import losses
from retrieval_jax import main as main_lib
from retrieval_jax import sharding
from retrieval_jax import steps
from retrieval_jax import train_state
from retrieval_jax.kinds import bi_encoder
import test_util

# pylint: enable=g-import-not-at-top,wrong-import-position

B, G, LQ, LP, VOCAB = 8, 2, 8, 12, 100
STEPS = 3
# Mesh shapes over (data, fsdp, model): pure data parallelism, and FSDP
# over all devices, so that with two processes each holds only half of
# every sharded parameter and the gradient reduce-scatter crosses processes.
LAYOUTS = {"data": (-1, 1, 1), "fsdp": (1, -1, 1)}


def _model() -> nnx.Module:
  """The fixed seed makes every process agree."""
  return test_util.tiny_encoder(VOCAB, seed=0)


def _batch(seed: int) -> dict[str, np.ndarray]:
  """A global batch of B queries with G passages each, from `seed` alone."""
  rng = np.random.default_rng(seed)

  def tokens(n, length):
    lengths = rng.integers(3, length + 1, n)
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    ids = rng.integers(5, VOCAB, (n, length)).astype(np.int32) * mask
    return ids, mask

  q_ids, q_mask = tokens(B, LQ)
  p_ids, p_mask = tokens(B * G, LP)
  passage_doc = np.arange(B * G, dtype=np.int32)
  # The first passage of each group is the query's positive.
  relevant = passage_doc[::G, None].copy()
  return {
      "query_ids": q_ids,
      "query_mask": q_mask,
      "passage_ids": p_ids,
      "passage_mask": p_mask,
      "positive_counts": np.ones(B, np.int32),
      "passage_doc": passage_doc,
      "relevant_doc": relevant,
  }


def _flatten(params, prefix: str) -> dict[str, np.ndarray]:
  """{"<prefix>/<a>/<b>": array} for a nested dict of host arrays."""
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = "/".join(str(getattr(p, "key", p)) for p in path)
    flat[f"{prefix}/{keys}"] = np.asarray(leaf)
  return flat


def _held_locally(x: jax.Array) -> bool:
  """Whether the devices of this process hold every distinct block of `x`.

  Unlike `is_fully_addressable` this is true for a replicated array that
  other processes also hold.
  """

  def key(index):
    return tuple((s.start, s.stop) for s in index)

  local = {key(shard.index) for shard in x.addressable_shards}
  every = {
      key(index) for index in x.sharding.devices_indices_map(x.shape).values()
  }
  return local == every


def train(mesh_shape) -> tuple[dict, np.ndarray, tuple[int, ...], bool]:
  """Runs STEPS AdamW steps on `mesh_shape` over all global devices.

  Returns:
    (final params as host numpy arrays, the per-step losses, the shape of
    the word table's block on the first local device, whether this process
    holds every block of the word table).
  """
  mesh = sharding.make_mesh(mesh_shape)
  model_def, params = train_state.split_model(_model())
  tx = optax.adamw(1e-2)
  layout = train_state.state_layout(model_def, params, tx, mesh)
  state = train_state.create(params, tx, layout)
  batches = [_batch(seed) for seed in range(STEPS)]
  spec = {k: v.shape for k, v in batches[0].items()}
  # Dropout on: the masks are drawn inside the sharded step, so this also
  # checks that the random bits do not depend on the process layout.
  step_fn = steps.make_train_step(
      mesh,
      layout.shardings,
      spec,
      model_def=model_def,
      tx=tx,
      loss_fn=functools.partial(
          bi_encoder.loss,
          loss_fn=losses.get_loss("infonce").fn,
          temperature=0.1,
          pooling="mean",
          normalize=True,
      ),
      dropout=True,
  )
  rng = jax.device_put(
      jax.random.PRNGKey(0), NamedSharding(mesh, PartitionSpec())
  )
  shardings = steps.batch_shardings(mesh, spec)
  step_losses = []
  for batch in batches:
    state, metrics = step_fn(state, steps.put_batch(batch, shardings), rng)
    # The loss is replicated, so every process holds a full copy.
    step_losses.append(float(np.asarray(metrics["loss"].addressable_data(0))))
  word = state["params"]["embeddings"]["word_vd"]
  shard_shape = tuple(word.addressable_shards[0].data.shape)
  # Parameters sharded over fsdp live partly on other processes: gather
  # them into full host copies on every process.
  host_params = multihost_utils.process_allgather(state["params"], tiled=True)
  return (
      host_params,
      np.asarray(step_losses, np.float32),
      shard_shape,
      _held_locally(word),
  )


def main(argv) -> None:
  if len(argv) != 2:
    sys.exit(f"usage: {argv[0]} OUT.npz")
  main_lib.initialize_distributed()
  # Random bits that do not depend on how arrays are sharded (as main.py).
  jax.config.update("jax_threefry_partitionable", True)

  out = {
      "process_count": np.int64(jax.process_count()),
      "device_count": np.int64(jax.device_count()),
      "local_device_count": np.int64(jax.local_device_count()),
      "process_indices": np.asarray(
          multihost_utils.process_allgather(np.int32(jax.process_index()))
      ),
  }
  out.update(_flatten(train_state.split_model(_model())[1], "init"))
  for name, mesh_shape in LAYOUTS.items():
    params, step_losses, shard_shape, held_locally = train(mesh_shape)
    out.update(_flatten(params, name))
    out[f"{name}/loss"] = step_losses
    out[f"{name}/word_shard_shape"] = np.asarray(shard_shape)
    out[f"{name}/word_held_locally"] = np.bool_(held_locally)
  if jax.process_index() == 0:
    np.savez(argv[1], **out)


if __name__ == "__main__":
  main(sys.argv)
