"""Pure step functions, jitted once by their callers.

Steps take and return pytrees: the model enters as `(graphdef, state)` and is
merged inside, so no NNX graph traversal happens per call (STYLE.md, 2).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from retrieval_jax import sharding
from retrieval_jax.layers import pooling as pooling_lib


def pool_states(model: nnx.Module, hidden_bld: jax.Array, mask_bl: jax.Array,
                pooling: str) -> jax.Array:
  """[B, L, D] -> float32 [B, D]: the model's own `pool` (trained poolers)
  when it has one, else `layers.pooling.pool`."""
  if hasattr(model, "pool"):
    return model.pool(hidden_bld, mask_bl, pooling)
  return pooling_lib.pool(hidden_bld, mask_bl, pooling)


def encode_step(graphdef: nnx.GraphDef, state: nnx.State,
                batch: dict[str, jax.Array], *, pooling: str,
                normalize: bool) -> jax.Array:
  """Embeds one batch of token ids.

  Args:
    graphdef: the encoder's static graph (from `nnx.split`).
    state: the encoder's parameters.
    batch: int32 `input_ids` [B, L], `attention_mask` [B, L] and optionally
      `token_type_ids` [B, L].
    pooling: "cls" or "mean" (masked).
    normalize: L2-normalise the pooled vectors.

  Returns:
    float32 embeddings [B, D]; all-padding rows give zero vectors.
  """
  model = nnx.merge(graphdef, state)
  hidden_bld = model(batch["input_ids"], batch["attention_mask"],
                     batch.get("token_type_ids"), deterministic=True)
  # Pool in float32 even when the encoder computes in bfloat16.
  emb_bd = pool_states(model, hidden_bld.astype(jnp.float32),
                       batch["attention_mask"], pooling)
  if normalize:
    emb_bd = pooling_lib.l2_normalize(emb_bd)
  return emb_bd


def make_encode_step(graphdef: nnx.GraphDef, mesh: Mesh, *, pooling: str,
                     normalize: bool, state_shardings=None):
  """Jits `encode_step` for `mesh`: the batch split on the data axes, the
  state laid out by `state_shardings` (default replicated).

  Returns:
    `fn(state, batch) -> emb_bd`; the batch size must be a multiple of
    `sharding.data_size(mesh)`.
  """
  batch_sharding = sharding.named_sharding(mesh, (sharding.BATCH, None))
  step = functools.partial(encode_step, graphdef, pooling=pooling,
                           normalize=normalize)
  return jax.jit(
      step,
      in_shardings=(state_shardings or sharding.replicated(mesh),
                    batch_sharding),
      out_shardings=batch_sharding)


# ---------------------------------------------------------------------------
# Training.


def train_step(state, batch, rng, *, model_def, tx, loss_fn, dropout: bool,
               value_and_grad_fn=None, learning_rate_fn=None):
  """One optimizer step of any retriever kind.

  Args:
    state: {"step", "params", "opt_state"} (see `train_state`).
    batch: the kind's device batch (`kinds.base.TrainSpec.featurize`).
    rng: the run's base PRNG key; the step's dropout key is
      fold_in(rng, step), so a resumed run draws the same masks.
    model_def: `train_state.ModelDef` of the kind's model.
    tx: the optax optimizer.
    loss_fn: `loss_fn(model, batch, dropout_rng, step) -> (loss, aux)`.
    dropout: train with dropout (else the kind's loss gets rng None).
    value_and_grad_fn: optional `(model_def, params, batch, dropout_rng,
      step) -> ((loss, aux), grads)` in place of `jax.value_and_grad`.
    learning_rate_fn: schedule, only to report the rate in the metrics.

  Returns:
    (new state, metrics): float32 scalars "loss", "grad_norm", "param_norm",
    "update_norm", "learning_rate" and the loss's own aux values.
  """
  step = state["step"]
  dropout_rng = jax.random.fold_in(rng, step) if dropout else None
  if value_and_grad_fn is None:

    def loss_of_params(params):
      return loss_fn(model_def.merge(params), batch, dropout_rng, step)

    (loss, aux), grads = jax.value_and_grad(loss_of_params, has_aux=True)(
        state["params"])
  else:
    (loss, aux), grads = value_and_grad_fn(model_def, state["params"], batch,
                                           dropout_rng, step)
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  metrics = {
      "loss": loss,
      "grad_norm": optax.tree.norm(grads),
      "param_norm": optax.tree.norm(params),
      "update_norm": optax.tree.norm(updates),
  }
  if learning_rate_fn is not None:
    metrics["learning_rate"] = jnp.asarray(learning_rate_fn(step),
                                           jnp.float32)
  metrics.update({k: jnp.asarray(v, jnp.float32) for k, v in aux.items()})
  return {"step": step + 1, "params": params, "opt_state": opt_state}, metrics


def batch_shardings(mesh: Mesh, batch_spec: dict[str, tuple]) -> dict:
  """NamedSharding per batch key: the leading (example) axis on the data axes.

  Args:
    mesh: the device mesh.
    batch_spec: {key: shape} of the loader's batch.
  """
  return {k: sharding.named_sharding(mesh, (sharding.BATCH,) +
                                     (None,) * (len(shape) - 1))
          for k, shape in batch_spec.items()}


def make_train_step(mesh: Mesh, state_shardings, batch_spec: dict[str, tuple],
                    **step_kwargs):
  """Jits `train_step` once for `mesh`, donating the state.

  Args:
    mesh: the device mesh.
    state_shardings: from `train_state.state_layout(...).shardings`.
    batch_spec: {key: shape} of every batch the loader yields.
    **step_kwargs: the static arguments of `train_step`.

  Returns:
    `fn(state, batch, rng) -> (state, metrics)`; the batch must already be
    placed with `batch_shardings` (see `put_batch`).
  """
  replicated = sharding.replicated(mesh)
  step = functools.partial(train_step, **step_kwargs)
  return jax.jit(
      step,
      in_shardings=(state_shardings, batch_shardings(mesh, batch_spec),
                    replicated),
      out_shardings=(state_shardings, replicated),
      donate_argnums=0)


def put_batch(batch: dict[str, np.ndarray], shardings: dict) -> dict:
  """Places a host batch (the *global* batch) on the mesh.

  Every process holds the same global batch (the loader is a pure function
  of the step); each device receives just its rows, so this works unchanged
  when the mesh spans several processes.
  """
  return {k: jax.make_array_from_callback(a.shape, shardings[k],
                                          lambda index, a=a: a[index])
          for k, a in batch.items()}
