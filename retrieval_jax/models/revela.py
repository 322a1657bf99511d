r"""Revela's LM: a causal LM that also reads the batch's other chunks,
weighted by a retriever (Cai et al. 2025, arXiv 2506.16552).

Per block and head, chunk i's attention output (before the projection):
  a_i = softmax_causal(q_i K_i^T / sqrt(h)) V_i
        + sum_{j != i} w_ij vnorm(softmax(q_i Kc_j^T / sqrt(h)) Vc_j)
w_ij = softmax_{j != i}(cos(e_i, e_j) / tau) (`neighbour_weights`); Kc_j,
Vc_j come from chunk j's own causal pass (its in-batch states saw chunk i's
future tokens); vnorm divides by the attention-weighted L2 norm of the
values mixed, as in the released code. GPT-2-style blocks (pre-LN, learned
positions, GELU MLP, tied output) sized by an `EncoderConfig`, not the
paper's LLaMA. Shape letters: b / c chunks (query / key side), q / k
positions, l position, d width, n heads, h head width, v vocabulary.
"""

import math

from flax import nnx
import jax
import jax.numpy as jnp

from retrieval_jax import sharding
from retrieval_jax.layers import core
from retrieval_jax.models import transformer_encoder

# Finite, so a fully masked row gives no NaN; exp() of it is exactly 0.
_MASK_BIAS = -0.5 * float(jnp.finfo(jnp.float32).max)
# Added to vnorm's divisor (the public code's epsilon).
V_NORM_EPS = 1e-6


def neighbour_weights(emb_bd: jax.Array, temperature: float) -> jax.Array:
  """float32 [B, B] p(j | i): softmax over j != i of emb_i . emb_j / tau.

  The diagonal is exactly 0 and every row sums to 1 (B >= 2).
  """
  emb_bd = emb_bd.astype(jnp.float32)
  scores_bc = (
      jnp.einsum(
          "bd,cd->bc", emb_bd, emb_bd, preferred_element_type=jnp.float32
      )
      / temperature
  )
  eye_bc = jnp.eye(emb_bd.shape[0], dtype=bool)
  return jax.nn.softmax(jnp.where(eye_bc, -jnp.inf, scores_bc), axis=-1)


class InBatchAttention(transformer_encoder.SelfAttention):
  """Causal self-attention plus the weighted cross-chunk term (module doc).

  The parameters are `SelfAttention`'s (q/k/v/out projections and biases).
  """

  def __call__(
      self,
      x_bld: jax.Array,
      mask_bl: jax.Array,
      cross=None,
      *,
      v_norm: bool = True,
      deterministic: bool,
      rng: jax.Array | None,
  ):
    """[B, L, D] states -> ([B, L, D] output, (keys, values) [B, N, L, H]).

    cross: None (each chunk alone), or (keys_cnkh, values_cnkh, weights_bc)
    of the chunks' own passes and the retriever's float32 [B, B] weights.
    """
    dt = self.dtype
    keys = [None] * 2 if rng is None else list(jax.random.split(rng, 2))

    def heads(w_dnh, bias_nh):
      return (
          jnp.einsum("bld,dnh->bnlh", x_bld, w_dnh[...].astype(dt))
          + bias_nh[...].astype(dt)[:, None, :]
      )

    q_bnqh = heads(self.query_dnh, self.query_bias_nh)
    k_bnkh = heads(self.key_dnh, self.key_bias_nh)
    v_bnkh = heads(self.value_dnh, self.value_bias_nh)
    q_bnqh = q_bnqh * jnp.asarray(1.0 / math.sqrt(q_bnqh.shape[-1]), dt)
    length = x_bld.shape[1]
    real_bk = mask_bl.astype(bool)
    causal_qk = jnp.tril(jnp.ones((length, length), bool))
    allowed_bqk = causal_qk[None] & real_bk[:, None, :]
    # Logits, masks and softmax in float32 (as the encoder).
    logits_bnqk = jnp.einsum("bnqh,bnkh->bnqk", q_bnqh, k_bnkh).astype(
        jnp.float32
    )
    logits_bnqk = jnp.where(allowed_bqk[:, None], logits_bnqk, _MASK_BIAS)
    probs_bnqk = jax.nn.softmax(logits_bnqk, axis=-1).astype(dt)
    probs_bnqk = core.dropout(self.dropout, probs_bnqk, deterministic, keys[0])
    context_bnqh = jnp.einsum("bnqk,bnkh->bnqh", probs_bnqk, v_bnkh)
    if cross is not None:
      context_bnqh = context_bnqh + self._cross(
          q_bnqh, mask_bl, *cross, v_norm, deterministic, keys[1]
      )
    out_bld = jnp.einsum(
        "bnqh,nhd->bqd", context_bnqh, self.out_nhd[...].astype(dt)
    ) + self.out_bias_d[...].astype(dt)
    return out_bld, (k_bnkh, v_bnkh)

  def _cross(
      self,
      q_bnqh,
      mask_ck,
      k_cnkh,
      v_cnkh,
      weights_bc,
      v_norm,
      deterministic,
      rng,
  ):
    """sum_c w_bc vnorm(softmax(q_b Kc_c^T) Vc_c): [B, N, Lq, H]."""
    dt = q_bnqh.dtype
    # [B, C, N, Lq, Lk]: every chunk's queries against every chunk's keys;
    # the diagonal (weight 0) is computed too, which keeps it one einsum.
    logits_bcnqk = jnp.einsum("bnqh,cnkh->bcnqk", q_bnqh, k_cnkh).astype(
        jnp.float32
    )
    logits_bcnqk = jnp.where(
        mask_ck.astype(bool)[None, :, None, None, :], logits_bcnqk, _MASK_BIAS
    )
    probs_bcnqk = jax.nn.softmax(logits_bcnqk, axis=-1)
    dropped = core.dropout(
        self.dropout, probs_bcnqk.astype(dt), deterministic, rng
    )
    out_bcnqh = jnp.einsum("bcnqk,cnkh->bcnqh", dropped, v_cnkh).astype(
        jnp.float32
    )
    if v_norm:
      norm_cnk = jnp.linalg.norm(v_cnkh.astype(jnp.float32), axis=-1)
      divisor_bcnq = jnp.einsum("bcnqk,cnk->bcnq", dropped, norm_cnk)
      out_bcnqh = out_bcnqh / (divisor_bcnq[..., None] + V_NORM_EPS)
    return jnp.einsum("bc,bcnqh->bnqh", weights_bc, out_bcnqh).astype(dt)


class Block(nnx.Module):
  """Pre-LN block: x + attn(LN(x)), then x + mlp(LN(x)), dropout on both."""

  def __init__(
      self, config: transformer_encoder.EncoderConfig, *, rngs: nnx.Rngs
  ):
    self.attention_norm = transformer_encoder.LayerNorm(config, rngs=rngs)
    self.attention = InBatchAttention(config, rngs=rngs)
    self.mlp_norm = transformer_encoder.LayerNorm(config, rngs=rngs)
    self.mlp = transformer_encoder.FeedForward(config, rngs=rngs)
    self.dropout = nnx.Dropout(config.hidden_dropout, rngs=rngs)

  def __call__(self, x_bld, mask_bl, cross=None, *, v_norm, deterministic, rng):
    """[B, L, D] -> ([B, L, D], this block's (keys, values))."""
    keys = [None] * 3 if rng is None else list(jax.random.split(rng, 3))
    y_bld, kv = self.attention(
        self.attention_norm(x_bld),
        mask_bl,
        cross,
        v_norm=v_norm,
        deterministic=deterministic,
        rng=keys[0],
    )
    x_bld = x_bld + core.dropout(self.dropout, y_bld, deterministic, keys[1])
    y_bld = self.mlp(self.mlp_norm(x_bld))
    return x_bld + core.dropout(self.dropout, y_bld, deterministic, keys[2]), kv


class InBatchLM(nnx.Module):
  """Causal LM over [B, L] chunks; with weights, chunks read each other."""

  def __init__(
      self,
      config: transformer_encoder.EncoderConfig,
      *,
      v_norm: bool = True,
      rngs: nnx.Rngs,
  ):
    init = nnx.initializers.normal(config.initializer_range)
    d, pd = config.hidden_size, config.param_dtype
    self.config, self.v_norm = config, bool(v_norm)
    self.word_vd = core.param(
        init, rngs, (config.vocab_size, d), pd, (sharding.VOCAB, sharding.EMBED)
    )
    self.position_pd = core.param(
        init,
        rngs,
        (config.max_position_embeddings, d),
        pd,
        (None, sharding.EMBED),
    )
    self.dropout = nnx.Dropout(config.hidden_dropout, rngs=rngs)
    self.blocks = nnx.List(
        [Block(config, rngs=rngs) for _ in range(config.num_layers)]
    )
    self.final_norm = transformer_encoder.LayerNorm(config, rngs=rngs)

  def _pass(self, ids_bl, mask_bl, caches, weights_bc, deterministic, rng):
    """Final states [B, L, D] and every block's (keys, values)."""
    length = ids_bl.shape[1]
    if length > self.position_pd.shape[0]:
      raise ValueError(
          f"chunk length {length} exceeds the LM's "
          f"{self.position_pd.shape[0]} positions"
      )
    keys = core.dropout_keys(rng, len(self.blocks) + 1, deterministic)
    x_bld = (
        jnp.take(self.word_vd[...], ids_bl, axis=0)
        + self.position_pd[:length][None]
    ).astype(self.config.dtype)
    x_bld = core.dropout(self.dropout, x_bld, deterministic, keys[0])
    kvs = []
    for i, (block, key) in enumerate(zip(self.blocks, keys[1:])):
      cross = None if caches is None else (*caches[i], weights_bc)
      x_bld, kv = block(
          x_bld,
          mask_bl,
          cross,
          v_norm=self.v_norm,
          deterministic=deterministic,
          rng=key,
      )
      kvs.append(kv)
    return self.final_norm(x_bld), kvs

  def __call__(
      self,
      ids_bl: jax.Array,
      mask_bl: jax.Array,
      weights_bc: jax.Array | None = None,
      *,
      deterministic: bool = True,
      dropout_rng: jax.Array | None = None,
  ) -> jax.Array:
    """float32 [B, L, V] next-token logits of int [B, L] chunks.

    weights_bc: None, each chunk alone; else float32 [B, B] p(j | i) (zero
    diagonal): the in-batch pass, after each chunk's own pass.
    """
    keys = [None] * 2
    if dropout_rng is not None and not deterministic:
      keys = list(jax.random.split(dropout_rng, 2))
    x_bld, kvs = self._pass(ids_bl, mask_bl, None, None, deterministic, keys[0])
    if weights_bc is not None:
      x_bld, _ = self._pass(
          ids_bl,
          mask_bl,
          kvs,
          weights_bc.astype(jnp.float32),
          deterministic,
          keys[1],
      )
    # Tied output: logits against the word table, in float32.
    return jnp.einsum(
        "bld,vd->blv",
        x_bld.astype(jnp.float32),
        self.word_vd[...].astype(jnp.float32),
    )


class Revela(nnx.Module):
  """The retriever being trained and the in-batch LM that trains it.

  Called like an encoder, it is the retriever (token states): evaluation,
  encoding and export treat a Revela model as its bi-encoder.
  """

  def __init__(self, retriever: nnx.Module, lm: InBatchLM):
    self.retriever = retriever
    self.lm = lm

  def __call__(
      self,
      ids_bl: jax.Array,
      mask_bl: jax.Array,
      type_ids_bl: jax.Array | None = None,
      *,
      deterministic: bool = True,
      dropout_rng: jax.Array | None = None,
  ) -> jax.Array:
    """The retriever's [B, L, D] token states."""
    return self.retriever(
        ids_bl,
        mask_bl,
        type_ids_bl,
        deterministic=deterministic,
        dropout_rng=dropout_rng,
    )
