"""M2-BERT: the Monarch Mixer encoder for long-context retrieval.

Fu et al., "Monarch Mixer" (NeurIPS 2023). Attention becomes gated long
convolutions (FFT, O(L log L), Hyena filters from `layers/long_conv`) and the
MLP a block-diagonal GLU, so one encoder reads up to 32k tokens. Per layer:
  p = ShortCausalConv(u W_in); x1, x2, v = split(p)
  m = (BiLongConv(v x1) * x2 + BiLongConv(u)) W_out    (no residual, no norm)
  h = LayerNorm(m + W_o GELU(a) * b),  [a | b] = W_g m

The reference masks nothing, so an embedding depends on its pad length.
`mask_padding=True` (default) zeroes padding before each long convolution,
making right-padded outputs independent of pad length, as the length-bucketed
encode path needs; `False` with max-length padding reproduces the reference.

Shape letters: b batch, l position, d width D, c 3D mixer channels, i GLU
width, v vocabulary.
"""

import dataclasses
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from retrieval_jax import sharding
from retrieval_jax.layers import core
from retrieval_jax.layers import long_conv
from retrieval_jax.layers import monarch
from retrieval_jax.layers import pooling as pooling_lib
from retrieval_jax.models import transformer_encoder

# Pooling kinds of M2Encoder.pool: the shared ones, plus the trained pooler
# (dense + tanh) over the first token or over the masked mean.
POOLING_KINDS = ("cls", "mean", "pooler", "mean_pooler")


@dataclasses.dataclass(frozen=True)
class M2Config:
  """Hyperparameters of an M2-BERT encoder (defaults: the 80M model)."""

  vocab_size: int = 30528  # bert-base-uncased's 30,522 rounded up to 8
  hidden_size: int = 768  # model width D
  num_layers: int = 12  # mixer + GLU blocks
  intermediate_size: int = 3072  # GLU width I
  max_position_embeddings: int = 128  # l_max: position table and filters
  type_vocab_size: int = 2  # token-type ids
  layer_norm_eps: float = 1e-12  # every LayerNorm
  hidden_dropout: float = 0.1  # embeddings and the GLU's hidden units
  initializer_range: float = 0.02  # stddev of embeddings and projections
  monarch_blocks: int = 4  # blocks of the block-diagonal GLU matrices
  short_conv_size: int = 3  # taps of the causal depthwise convolution
  filter_emb_dim: int = 5  # positional features of the implicit filters
  filter_order: int = 128  # width of the implicit filters' sine MLP
  filter_w: float = 10.0  # initial sine frequency of the filter MLP
  bidirectional: bool = True  # reverse-direction filters too
  residual_long_conv: bool = True  # second long conv on the layer input
  pooler: bool = True  # dense + tanh pooler (the reference embedding)
  mask_padding: bool = True  # padding-invariant mode (see module doc)
  # Mixers start as the identity: long filters zero (their MLPs' last layer),
  # residual skip D = 1, output projection I; other draws as the reference.
  identity_init: bool = False
  dtype: Any = jnp.float32  # compute dtype
  param_dtype: Any = jnp.float32  # storage dtype of parameters

  def __post_init__(self):
    if self.filter_emb_dim % 2 != 1 or self.filter_emb_dim < 3:
      raise ValueError(
          f"filter_emb_dim {self.filter_emb_dim} must be odd and"
          " >= 3 (time plus cosine/sine pairs)"
      )
    for name in ("hidden_size", "intermediate_size"):
      if getattr(self, name) % self.monarch_blocks:
        raise ValueError(
            f"{name} {getattr(self, name)} is not divisible by "
            f"monarch_blocks {self.monarch_blocks}"
        )

    if self.identity_init and not self.residual_long_conv:
      raise ValueError("identity_init needs residual_long_conv")

  def embedding_config(self) -> transformer_encoder.EncoderConfig:
    """The shared embedding block's config (word + position + type, LN)."""
    return transformer_encoder.EncoderConfig(
        vocab_size=self.vocab_size,
        hidden_size=self.hidden_size,
        num_layers=self.num_layers,
        num_heads=1,
        intermediate_size=self.intermediate_size,
        max_position_embeddings=self.max_position_embeddings,
        type_vocab_size=self.type_vocab_size,
        layer_norm_eps=self.layer_norm_eps,
        hidden_dropout=self.hidden_dropout,
        initializer_range=self.initializer_range,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
    )


# The released M2-BERT-80M retrieval models differ only in l_max.
M2_CONFIGS = {
    "m2-bert-80m-128": M2Config(max_position_embeddings=128),
    "m2-bert-80m-2k": M2Config(max_position_embeddings=2048),
    "m2-bert-80m-8k": M2Config(max_position_embeddings=8192),
    "m2-bert-80m-32k": M2Config(max_position_embeddings=32768),
}


class SequenceMixer(nnx.Module):
  """Gated bidirectional long convolution with a residual long convolution."""

  def __init__(self, config: M2Config, *, rngs: nnx.Rngs):
    d, pd = config.hidden_size, config.param_dtype
    c, k = 3 * d, config.short_conv_size
    normal = nnx.initializers.normal(config.initializer_range)
    zeros = nnx.initializers.zeros
    torch_init = core.uniform(1.0 / k**0.5)  # PyTorch Conv1d default
    self.dtype = config.dtype
    self.mask_padding = config.mask_padding
    self.residual_long_conv = config.residual_long_conv
    self.in_proj_dc = core.param(
        normal, rngs, (d, c), pd, (sharding.EMBED, sharding.MLP)
    )
    self.in_bias_c = core.param(zeros, rngs, (c,), pd, (sharding.MLP,))
    self.short_conv_ck = core.param(
        torch_init, rngs, (c, k), pd, (sharding.MLP, None)
    )
    self.short_conv_bias_c = core.param(
        torch_init, rngs, (c,), pd, (sharding.MLP,)
    )
    # BERT init for the filter MLPs, as in the reference: filters start near
    # zero, so long-range mixing is learned, not imposed at random.
    filter_args = dict(
        emb_dim=config.filter_emb_dim,
        order=config.filter_order,
        w=config.filter_w,
        bidirectional=config.bidirectional,
        param_dtype=pd,
        mlp_init_std=config.initializer_range,
    )
    self.filter = long_conv.HyenaFilter(
        d, config.max_position_embeddings, rngs=rngs, **filter_args
    )
    if config.residual_long_conv:
      self.residual_filter = long_conv.HyenaFilter(
          d, config.max_position_embeddings, rngs=rngs, **filter_args
      )
    self.out_proj_dd = core.param(
        normal, rngs, (d, d), pd, (sharding.MLP, sharding.EMBED)
    )
    self.out_bias_d = core.param(zeros, rngs, (d,), pd, (sharding.EMBED,))
    if config.identity_init:
      for f in (self.filter, self.residual_filter):
        for direction in ("fwd", "rev") if config.bidirectional else ("fwd",):
          w3 = getattr(f, f"{direction}_w3_oh")
          w3[...] = jnp.zeros_like(w3[...])
      skip = self.residual_filter.bias_h
      skip[...] = jnp.ones_like(skip[...])
      self.out_proj_dd[...] = jnp.eye(d, dtype=self.out_proj_dd[...].dtype)

  def __call__(self, u_bld: jax.Array, mask_bl: jax.Array | None) -> jax.Array:
    """[B, L, D] inputs (and [B, L] mask or None) -> [B, L, D]."""
    dt = self.dtype
    length = u_bld.shape[1]
    p_blc = jnp.einsum(
        "bld,dc->blc", u_bld, self.in_proj_dc[...].astype(dt)
    ) + self.in_bias_c[...].astype(dt)
    # Convolutions run along the last axis (the FFT's), channels first.
    p_bcl = long_conv.short_causal_conv(
        jnp.swapaxes(p_blc, 1, 2),
        self.short_conv_ck[...].astype(dt),
        self.short_conv_bias_c[...].astype(dt),
    )
    x1_bdl, x2_bdl, v_bdl = jnp.split(p_bcl, 3, axis=1)
    v_bdl = v_bdl * x1_bdl
    keep_b1l = (
        None if mask_bl is None else (mask_bl[:, None, :] != 0).astype(dt)
    )
    if keep_b1l is not None:
      # Zero the padded positions the reverse filter would otherwise read.
      v_bdl = v_bdl * keep_b1l
    k_fwd_dl, k_rev_dl, d_d = self.filter(length)
    y_bdl = long_conv.bidirectional_conv(v_bdl, k_fwd_dl, k_rev_dl, d_d)
    y_bdl = y_bdl * x2_bdl
    if self.residual_long_conv:  # the only path around the gates
      u_bdl = jnp.swapaxes(u_bld, 1, 2)
      if keep_b1l is not None:
        u_bdl = u_bdl * keep_b1l
      k_fwd_dl, k_rev_dl, d_d = self.residual_filter(length)
      y_bdl = y_bdl + long_conv.bidirectional_conv(
          u_bdl, k_fwd_dl, k_rev_dl, d_d
      )
    y_bld = jnp.swapaxes(y_bdl, 1, 2).astype(dt)
    return jnp.einsum(
        "bld,de->ble", y_bld, self.out_proj_dd[...].astype(dt)
    ) + self.out_bias_d[...].astype(dt)


class MonarchGLU(nnx.Module):
  """GLU with block-diagonal matrices and a post-LayerNorm residual."""

  def __init__(self, config: M2Config, *, rngs: nnx.Rngs):
    d, i, g = (
        config.hidden_size,
        config.intermediate_size,
        config.monarch_blocks,
    )
    pd, dt = config.param_dtype, config.dtype
    self.intermediate_size = i
    self.gate = monarch.BlockDiagLinear(
        d,
        2 * i,
        g,
        use_bias=False,
        dtype=dt,
        param_dtype=pd,
        rngs=rngs,
        in_axis=sharding.EMBED,
        out_axis=sharding.MLP,
    )
    self.out = monarch.BlockDiagLinear(
        i,
        d,
        g,
        use_bias=True,
        dtype=dt,
        param_dtype=pd,
        rngs=rngs,
        in_axis=sharding.MLP,
        out_axis=sharding.EMBED,
    )
    self.dropout = nnx.Dropout(config.hidden_dropout, rngs=rngs)
    self.norm = core.LayerNorm(d, config.layer_norm_eps, pd, rngs=rngs)

  def __call__(
      self, x_bld: jax.Array, *, deterministic: bool, rng: jax.Array | None
  ) -> jax.Array:
    """[B, L, D] -> [B, L, D]."""
    z_bli = self.gate(x_bld)
    a_bli, b_bli = jnp.split(z_bli, 2, axis=-1)
    h_bli = jax.nn.gelu(a_bli, approximate=False) * b_bli
    h_bli = core.dropout(self.dropout, h_bli, deterministic, rng)
    return self.norm(x_bld + self.out(h_bli))


class M2Layer(nnx.Module):
  """One M2-BERT block: sequence mixer, then the Monarch GLU."""

  def __init__(self, config: M2Config, *, rngs: nnx.Rngs):
    self.mixer = SequenceMixer(config, rngs=rngs)
    self.mlp = MonarchGLU(config, rngs=rngs)

  def __call__(
      self,
      x_bld: jax.Array,
      mask_bl: jax.Array | None,
      *,
      deterministic: bool,
      rng: jax.Array | None,
  ) -> jax.Array:
    """[B, L, D] states -> [B, L, D] states (the GLU's residual is the skip)."""
    return self.mlp(
        self.mixer(x_bld, mask_bl), deterministic=deterministic, rng=rng
    )


class M2Encoder(nnx.Module):
  """M2-BERT: token ids -> token states; `TransformerEncoder`'s signature."""

  def __init__(self, config: M2Config, *, rngs: nnx.Rngs):
    self.config = config
    self.embeddings = transformer_encoder.Embeddings(
        config.embedding_config(), rngs=rngs
    )
    self.layers = nnx.List(
        [M2Layer(config, rngs=rngs) for _ in range(config.num_layers)]
    )
    if config.pooler:
      d = config.hidden_size
      self.pooler_dd = core.param(
          nnx.initializers.normal(config.initializer_range),
          rngs,
          (d, d),
          config.param_dtype,
          (sharding.EMBED, None),
      )
      self.pooler_bias_d = core.param(
          nnx.initializers.zeros, rngs, (d,), config.param_dtype, (None,)
      )

  def __call__(
      self,
      input_ids_bl: jax.Array,
      attention_mask_bl: jax.Array,
      token_type_ids_bl: jax.Array | None = None,
      *,
      deterministic: bool = True,
      dropout_rng: jax.Array | None = None,
  ) -> jax.Array:
    """[B, L, D] states in `config.dtype` of right-padded [B, L] int ids.

    `attention_mask_bl` (nonzero for real tokens, first in each row) is used
    only with `mask_padding`; L <= max_position_embeddings; `dropout_rng`
    None: the modules' NNX streams.
    """
    if token_type_ids_bl is None:
      token_type_ids_bl = jnp.zeros_like(input_ids_bl)
    mask_bl = attention_mask_bl if self.config.mask_padding else None
    keys = core.dropout_keys(dropout_rng, len(self.layers) + 1, deterministic)
    x_bld = self.embeddings(
        input_ids_bl,
        token_type_ids_bl,
        deterministic=deterministic,
        rng=keys[0],
    )
    for layer, key in zip(self.layers, keys[1:]):
      x_bld = layer(x_bld, mask_bl, deterministic=deterministic, rng=key)
    return x_bld

  def pool(
      self, hidden_bld: jax.Array, mask_bl: jax.Array, kind: str
  ) -> jax.Array:
    """[B, L, D] states -> float32 [B, D] by `kind` (see POOLING_KINDS).

    "pooler" is the reference embedding: tanh(W h[:, 0] + b).
    "mean_pooler" applies the same dense + tanh to the masked mean.
    """
    if kind in ("pooler", "mean_pooler"):
      if not self.config.pooler:
        raise ValueError(
            f"pooling {kind!r} needs a model built with pooler=True"
        )
      base = pooling_lib.pool(
          hidden_bld, mask_bl, "cls" if kind == "pooler" else "mean"
      )
      return jnp.tanh(
          jnp.einsum(
              "bd,de->be",
              base,
              self.pooler_dd[...].astype(jnp.float32),
              preferred_element_type=jnp.float32,
          )
          + self.pooler_bias_d[...].astype(jnp.float32)
      )
    return pooling_lib.pool(hidden_bld, mask_bl, kind)


def config_from_block(block, *, dtype: Any = jnp.float32) -> M2Config:
  """An M2Config from a `config.model.m2` block: a preset plus overrides.

  `block`: `preset` (a key of M2_CONFIGS) and optional nonzero overrides
  `num_layers`, `hidden_size`, `intermediate_size`, `max_position_embeddings`,
  `filter_order`, and the flags `mask_padding` and `identity_init`.
  """
  if block["preset"] not in M2_CONFIGS:
    raise ValueError(
        f"unknown M2 preset {block['preset']!r}; known: {sorted(M2_CONFIGS)}"
    )
  base = M2_CONFIGS[block["preset"]]
  overrides = {
      k: block[k]
      for k in (
          "num_layers",
          "hidden_size",
          "intermediate_size",
          "max_position_embeddings",
          "filter_order",
      )
      if block.get(k)
  }
  overrides["mask_padding"] = bool(block.get("mask_padding", True))
  overrides["identity_init"] = bool(block.get("identity_init", False))
  return dataclasses.replace(base, dtype=dtype, **overrides)


def copy_embeddings(model: M2Encoder, source) -> int:
  """Copies word/type embeddings and their LayerNorm from a BERT encoder.

  `source`: a same-width `TransformerEncoder` with the same tokenizer. Copies
  word rows up to the smaller vocabulary (returns how many), no positions (the
  source covers only 512).
  """
  ours, theirs = model.embeddings, source.embeddings
  if ours.word_vd.shape[1] != theirs.word_vd.shape[1]:
    raise ValueError(
        "cannot copy embeddings of width "
        f"{theirs.word_vd.shape[1]} into an M2 encoder of width "
        f"{ours.word_vd.shape[1]}"
    )
  rows = min(ours.word_vd.shape[0], theirs.word_vd.shape[0])
  dtype = ours.word_vd[...].dtype
  ours.word_vd[...] = (
      ours.word_vd[...].at[:rows].set(theirs.word_vd[:rows].astype(dtype))
  )
  ours.type_td[...] = theirs.type_td[...].astype(dtype)
  ours.norm.scale_d[...] = theirs.norm.scale_d[...].astype(dtype)
  ours.norm.bias_d[...] = theirs.norm.bias_d[...].astype(dtype)
  return rows
