r"""SPLADE: sparse lexical term weights from a BERT masked-language-model head.

w_j = max_i log(1 + ReLU(h_ij)) over real tokens ("max", SPLADE v2/++, arXiv
2109.10086, 2205.04733) or the sum ("sum", v1); score = Σ_j w_j(q) w_j(d).
Sparsity comes from the FLOPS / L1 regularisers (`losses/regularizers.py`).
The MLM decoder is the encoder's word table, passed in at call time (one [V, D]
parameter). Inference-free queries are IDF-weighted token bags
(`data.features`; Geng et al. 2024, arXiv 2411.04403).

Shape letters: b batch, l token position, d model width, v vocabulary.
"""

from collections.abc import Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from retrieval_jax import sharding
from retrieval_jax.layers import core
from retrieval_jax.models import transformer_encoder

AGGREGATIONS = ("max", "sum")
TRANSFORM_INITS = ("identity", "normal")


def splade_pool(
    logits_blv: jax.Array, mask_bl: jax.Array, aggregation: str = "max"
) -> jax.Array:
  """Pools [B, L, V] MLM logits over real tokens into float32 [B, V] >= 0."""
  if aggregation not in AGGREGATIONS:
    raise ValueError(
        f"aggregation={aggregation!r}: expected one of {AGGREGATIONS}"
    )
  # float32 first: bf16 would quantise log1p's small values.
  w_blv = jnp.log1p(jax.nn.relu(logits_blv.astype(jnp.float32)))
  # Multiplicative masking is exact for max and sum since weights are >= 0.
  w_blv = w_blv * mask_bl.astype(jnp.float32)[:, :, None]
  if aggregation == "max":
    return jnp.max(w_blv, axis=1)
  return jnp.sum(w_blv, axis=1)


class MlmHead(nnx.Module):
  """BERT's MLM head, decoder tied: LayerNorm(act(h W + b)) E^T + bias_v.

  Without a shipped MLM head, `transform_init="identity"` scores each term by
  state-embedding similarity; dense on all-MiniLM-L6-v2 (~28-30k of 30,522
  weights > 0), `bias_init=-5` leaves ~40-80 active terms: training starts
  sparse.
  """

  def __init__(
      self,
      config: transformer_encoder.EncoderConfig,
      transform_init: str = "identity",
      bias_init: float = 0.0,
      *,
      rngs: nnx.Rngs,
  ):
    if transform_init not in TRANSFORM_INITS:
      raise ValueError(
          f"transform_init={transform_init!r}: expected one of "
          f"{TRANSFORM_INITS}"
      )
    d, pd = config.hidden_size, config.param_dtype
    if transform_init == "identity":
      dense_init = lambda key, shape, dtype: jnp.eye(*shape, dtype=dtype)
    else:
      dense_init = nnx.initializers.normal(config.initializer_range)
    self.dtype = config.dtype
    self.hidden_act = config.hidden_act
    # One mesh axis cannot shard both dimensions: the output is replicated.
    self.transform_dd = core.param(
        dense_init, rngs, (d, d), pd, (sharding.EMBED, None)
    )
    self.transform_bias_d = core.param(
        nnx.initializers.zeros, rngs, (d,), pd, (sharding.EMBED,)
    )
    self.norm = transformer_encoder.LayerNorm(config, rngs=rngs)
    self.bias_v = core.param(
        nnx.initializers.constant(bias_init),
        rngs,
        (config.vocab_size,),
        pd,
        (sharding.VOCAB,),
    )

  def __call__(self, h_bld: jax.Array, word_vd: jax.Array) -> jax.Array:
    """[B, L, D] states, [V, D] word table -> [B, L, V] logits in `dtype`."""
    dt = self.dtype
    t_bld = jnp.einsum(
        "bld,de->ble", h_bld.astype(dt), self.transform_dd[...].astype(dt)
    ) + self.transform_bias_d[...].astype(dt)
    t_bld = self.norm(transformer_encoder.ACTIVATIONS[self.hidden_act](t_bld))
    return jnp.einsum("bld,vd->blv", t_bld, word_vd.astype(dt)) + self.bias_v[
        ...
    ].astype(dt)


class Splade(nnx.Module):
  """SPLADE encoder: TransformerEncoder + tied MLM head + pooling.

  The [B, L, V] logits (32 x 256 x 30,522 float32 ≈ 1.0 GB) dominate memory;
  pooling in the module lets XLA fuse it into the reduction over L (CPU, B=8,
  L=64: <1 MiB of temporaries for 60 MiB of logits); a gradient step holds ~4
  such buffers. `special_ids` columns (e.g. cls/sep/pad) are forced to 0.
  """

  def __init__(
      self,
      encoder: transformer_encoder.TransformerEncoder,
      *,
      aggregation: str = "max",
      transform_init: str = "identity",
      bias_init: float = 0.0,
      special_ids: Sequence[int] = (),
      rngs: nnx.Rngs,
  ):
    if aggregation not in AGGREGATIONS:
      raise ValueError(
          f"aggregation={aggregation!r}: expected one of {AGGREGATIONS}"
      )
    vocab_size = encoder.config.vocab_size
    special_ids = tuple(int(i) for i in special_ids)
    bad = [i for i in special_ids if not 0 <= i < vocab_size]
    if bad:
      raise ValueError(f"special_ids {bad} are outside [0, {vocab_size})")
    self.encoder = encoder
    self.head = MlmHead(encoder.config, transform_init, bias_init, rngs=rngs)
    self.aggregation = aggregation
    self.special_ids = special_ids

  def mlm_logits(
      self,
      input_ids_bl: jax.Array,
      attention_mask_bl: jax.Array,
      token_type_ids_bl: jax.Array | None = None,
      *,
      deterministic: bool = True,
      dropout_rng: jax.Array | None = None,
  ) -> jax.Array:
    """[B, L] ids, mask, types -> [B, L, V] MLM logits (compute dtype)."""
    h_bld = self.encoder(
        input_ids_bl,
        attention_mask_bl,
        token_type_ids_bl,
        deterministic=deterministic,
        dropout_rng=dropout_rng,
    )
    return self.head(h_bld, self.encoder.embeddings.word_vd[...])

  def __call__(
      self,
      input_ids_bl: jax.Array,
      attention_mask_bl: jax.Array,
      token_type_ids_bl: jax.Array | None = None,
      *,
      deterministic: bool = True,
      dropout_rng: jax.Array | None = None,
  ) -> jax.Array:
    """[B, L] int ids and mask -> dense float32 [B, V] term weights >= 0."""
    logits_blv = self.mlm_logits(
        input_ids_bl,
        attention_mask_bl,
        token_type_ids_bl,
        deterministic=deterministic,
        dropout_rng=dropout_rng,
    )
    w_bv = splade_pool(logits_blv, attention_mask_bl, self.aggregation)
    if self.special_ids:
      w_bv = w_bv.at[:, jnp.asarray(self.special_ids)].set(0.0)
    return w_bv
