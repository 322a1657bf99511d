"""Pure step functions, jitted once by their callers.

Steps take and return pytrees: the model enters as `(graphdef, state)` and is
merged inside, so no NNX graph traversal happens per call (STYLE.md, 2).
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from retrieval_jax import sharding
from retrieval_jax.layers import pooling as pooling_lib


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
  emb_bd = pooling_lib.pool(hidden_bld.astype(jnp.float32),
                            batch["attention_mask"], pooling)
  if normalize:
    emb_bd = pooling_lib.l2_normalize(emb_bd)
  return emb_bd


def make_encode_step(graphdef: nnx.GraphDef, mesh: Mesh, *, pooling: str,
                     normalize: bool):
  """Jits `encode_step` for `mesh`: params replicated, batch split on data.

  Returns:
    `fn(state, batch) -> emb_bd`; the batch size must be a multiple of
    `sharding.data_size(mesh)`.
  """
  replicated = NamedSharding(mesh, PartitionSpec())
  batch_sharding = sharding.named_sharding(mesh, (sharding.BATCH, None))
  step = functools.partial(encode_step, graphdef, pooling=pooling,
                           normalize=normalize)
  return jax.jit(
      step,
      in_shardings=(replicated, batch_sharding),
      out_shardings=batch_sharding)
