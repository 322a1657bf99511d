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


def pool_states(
    model: nnx.Module, hidden_bld: jax.Array, mask_bl: jax.Array, pooling: str
) -> jax.Array:
  """[B, L, D] -> float32 [B, D]: `model.pool` if any, else `layers.pooling`."""
  if hasattr(model, "pool"):
    return model.pool(hidden_bld, mask_bl, pooling)
  return pooling_lib.pool(hidden_bld, mask_bl, pooling)


def encode_step(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    batch: dict[str, jax.Array],
    *,
    pooling: str,
    normalize: bool
) -> jax.Array:
  """float32 [B, D] embeddings of a batch of int32 [B, L] ids.

  `batch`: `input_ids`, `attention_mask` and optionally `token_type_ids`;
  all-padding rows give zero vectors.
  """
  model = nnx.merge(graphdef, state)
  hidden_bld = model(
      batch["input_ids"],
      batch["attention_mask"],
      batch.get("token_type_ids"),
      deterministic=True,
  )
  # Pool in float32 even when the encoder computes in bfloat16.
  emb_bd = pool_states(
      model, hidden_bld.astype(jnp.float32), batch["attention_mask"], pooling
  )
  if normalize:
    emb_bd = pooling_lib.l2_normalize(emb_bd)
  return emb_bd


def make_encode_step(
    graphdef: nnx.GraphDef,
    mesh: Mesh,
    *,
    pooling: str,
    normalize: bool,
    state_shardings=None
):
  """`fn(state, batch) -> emb_bd`: `encode_step` jitted for `mesh`.

  The batch (a multiple of `sharding.data_size(mesh)`) splits on the data
  axes; the state is replicated unless `state_shardings` says otherwise.
  """
  batch_sharding = sharding.named_sharding(mesh, (sharding.BATCH, None))
  step = functools.partial(
      encode_step, graphdef, pooling=pooling, normalize=normalize
  )
  return jax.jit(
      step,
      in_shardings=(
          state_shardings or sharding.replicated(mesh),
          batch_sharding,
      ),
      out_shardings=batch_sharding,
  )


def train_step(
    state,
    batch,
    rng,
    *,
    model_def,
    tx,
    loss_fn,
    dropout: bool,
    value_and_grad_fn=None,
    learning_rate_fn=None
):
  """One optimizer step of any kind (`TrainSpec` fns) -> (state, metrics).

  The dropout key is fold_in(rng, step): a resumed run draws the same masks.
  Metrics: float32 "loss", "grad_norm", "param_norm", "update_norm", the
  loss's aux and, with `learning_rate_fn`, "learning_rate". A state with
  "extra" (`train_state.ExtraState`) calls `loss_fn(model, batch, rng, step,
  extra) -> (loss, (aux, next extra))`.
  """
  step = state["step"]
  dropout_rng = jax.random.fold_in(rng, step) if dropout else None
  extra = state.get("extra")
  if extra is not None and value_and_grad_fn is not None:
    raise ValueError("a state with 'extra' needs the plain loss_fn path")
  if value_and_grad_fn is None:

    def loss_of_params(params):
      args = () if extra is None else (extra,)
      return loss_fn(model_def.merge(params), batch, dropout_rng, step, *args)

    (loss, aux), grads = jax.value_and_grad(loss_of_params, has_aux=True)(
        state["params"]
    )
    if extra is not None:
      aux, extra = aux
  else:
    (loss, aux), grads = value_and_grad_fn(
        model_def, state["params"], batch, dropout_rng, step
    )
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  metrics = {
      "loss": loss,
      "grad_norm": optax.tree.norm(grads),
      "param_norm": optax.tree.norm(params),
      "update_norm": optax.tree.norm(updates),
  }
  if learning_rate_fn is not None:
    metrics["learning_rate"] = jnp.asarray(learning_rate_fn(step), jnp.float32)
  metrics.update({k: jnp.asarray(v, jnp.float32) for k, v in aux.items()})
  new_state = {"step": step + 1, "params": params, "opt_state": opt_state}
  if extra is not None:
    new_state["extra"] = extra
  return new_state, metrics


def batch_shardings(mesh: Mesh, batch_spec: dict[str, tuple]) -> dict:
  """{key: NamedSharding} of a {key: shape} batch: axis 0 on the data axes."""
  return {
      k: sharding.named_sharding(
          mesh, (sharding.BATCH,) + (None,) * (len(shape) - 1)
      )
      for k, shape in batch_spec.items()
  }


def make_train_step(
    mesh: Mesh, state_shardings, batch_spec: dict[str, tuple], **step_kwargs
):
  """`fn(state, batch, rng) -> (state, metrics)`: `train_step` jitted, donating.

  Batches must already be placed with `batch_shardings` (`put_batch`).
  """
  replicated = sharding.replicated(mesh)
  step = functools.partial(train_step, **step_kwargs)
  return jax.jit(
      step,
      in_shardings=(
          state_shardings,
          batch_shardings(mesh, batch_spec),
          replicated,
      ),
      out_shardings=(state_shardings, replicated),
      donate_argnums=0,
  )


def put_batch(batch: dict[str, np.ndarray], shardings: dict) -> dict:
  """Places the *global* host batch, the same on every process, on the mesh.

  Each device takes just its rows, so multi-process meshes work unchanged.
  """
  return {
      k: jax.make_array_from_callback(
          a.shape, shardings[k], lambda index, a=a: a[index]
      )
      for k, a in batch.items()
  }
