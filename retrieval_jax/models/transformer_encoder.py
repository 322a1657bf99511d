"""BERT-family transformer encoder (post-LayerNorm), as a Flax NNX module.

Hugging Face `BertModel` without the pooler, so BERT / MiniLM checkpoints
load unchanged (`pretrained.py` maps the names). `TransformerEncoder` inits
at random (BERT's init); `build_with_params` wraps given weights without
running the initialisers.

Parameters live in `param_dtype` and are cast to the compute `dtype` at use;
LayerNorm statistics, the mask and the softmax are float32 whatever `dtype`
(where bf16 loses most). For bit parity with float32 references on
accelerators run under `jax.default_matmul_precision("float32")`.

Shape letters: b batch, l position, q / k attention query / key position,
d width, n heads, h head width, f feed-forward width, v vocabulary,
p position rows, t token types.
"""

from collections.abc import Mapping
import dataclasses
import functools
import math
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from retrieval_jax import sharding
from retrieval_jax.layers import core

# Padding-key logit bias: finite so an all-padding row gives no NaN, large
# enough that exp() underflows to exactly 0 in float32.
_MASK_BIAS = -0.5 * float(jnp.finfo(jnp.float32).max)

# Feed-forward activations by their Hugging Face `hidden_act` names. BERT's
# "gelu" is the exact erf form; "gelu_new" & co. are the tanh approximation.
ACTIVATIONS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_fast": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """Hyperparameters of a BERT-style encoder (`from_hf_config` maps HF's)."""

  vocab_size: int = 30522  # rows of the word-embedding table
  hidden_size: int = 768  # model width D
  num_layers: int = 12  # transformer blocks
  num_heads: int = 12  # attention heads N; must divide hidden_size
  intermediate_size: int = 3072  # feed-forward width F
  max_position_embeddings: int = 512  # longest input the model accepts
  type_vocab_size: int = 2  # token-type (segment) ids
  layer_norm_eps: float = 1e-12  # added to the variance in every LayerNorm
  hidden_act: str = "gelu"  # key of ACTIVATIONS
  hidden_dropout: float = 0.1  # on embeddings and each residual branch
  attention_dropout: float = 0.1  # on the attention probabilities
  initializer_range: float = 0.02  # stddev of the normal weight init
  dtype: Any = jnp.float32  # compute dtype of activations
  param_dtype: Any = jnp.float32  # storage dtype of parameters

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(
          f"hidden_size {self.hidden_size} is not divisible by num_heads "
          f"{self.num_heads}"
      )
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(
          f"hidden_act {self.hidden_act!r} is not one of {sorted(ACTIVATIONS)}"
      )

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @classmethod
  def from_hf_config(cls, hf_config: dict[str, Any], **overrides):
    """A config from a parsed HF BERT `config.json`, `overrides` (dtype) on top.

    Relative position embeddings and decoder mode are a ValueError.
    """
    position_type = hf_config.get("position_embedding_type", "absolute")
    if position_type != "absolute":
      raise ValueError(
          f"position_embedding_type {position_type!r} is not supported; "
          "only 'absolute' position embeddings are implemented"
      )
    if hf_config.get("is_decoder", False):
      raise ValueError(
          "decoder checkpoints (is_decoder=true) are not "
          "supported; this is a bidirectional encoder"
      )
    fields = dict(
        vocab_size=hf_config["vocab_size"],
        hidden_size=hf_config["hidden_size"],
        num_layers=hf_config["num_hidden_layers"],
        num_heads=hf_config["num_attention_heads"],
        intermediate_size=hf_config["intermediate_size"],
        max_position_embeddings=hf_config["max_position_embeddings"],
        type_vocab_size=hf_config.get("type_vocab_size", 2),
        layer_norm_eps=hf_config.get("layer_norm_eps", 1e-12),
        hidden_act=hf_config.get("hidden_act", "gelu"),
        hidden_dropout=hf_config.get("hidden_dropout_prob", 0.1),
        attention_dropout=hf_config.get("attention_probs_dropout_prob", 0.1),
        initializer_range=hf_config.get("initializer_range", 0.02),
    )
    fields.update(overrides)
    return cls(**fields)


class LayerNorm(core.LayerNorm):
  """LayerNorm with scale and bias over the model width."""

  def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
    super().__init__(
        config.hidden_size, config.layer_norm_eps, config.param_dtype, rngs=rngs
    )


class Embeddings(nnx.Module):
  """Word + absolute position + token-type embeddings, LayerNorm, dropout."""

  def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
    init = nnx.initializers.normal(config.initializer_range)
    d = config.hidden_size
    self.dtype = config.dtype
    self.word_vd = core.param(
        init,
        rngs,
        (config.vocab_size, d),
        config.param_dtype,
        (sharding.VOCAB, sharding.EMBED),
    )
    # Position and type tables are small (<= 512 rows): rows replicated.
    self.position_pd = core.param(
        init,
        rngs,
        (config.max_position_embeddings, d),
        config.param_dtype,
        (None, sharding.EMBED),
    )
    self.type_td = core.param(
        init,
        rngs,
        (config.type_vocab_size, d),
        config.param_dtype,
        (None, sharding.EMBED),
    )
    self.norm = LayerNorm(config, rngs=rngs)
    self.dropout = nnx.Dropout(config.hidden_dropout, rngs=rngs)

  def __call__(
      self,
      input_ids_bl: jax.Array,
      token_type_ids_bl: jax.Array,
      *,
      deterministic: bool,
      rng: jax.Array | None,
  ) -> jax.Array:
    """int [B, L] ids and types -> [B, L, D] in the compute dtype."""
    length = input_ids_bl.shape[1]
    max_length = self.position_pd.shape[0]
    if length > max_length:
      raise ValueError(
          f"input length {length} exceeds max_position_embeddings {max_length}"
      )
    # Sum in the parameter dtype before the LayerNorm, as the reference does.
    x_bld = (
        jnp.take(self.word_vd[...], input_ids_bl, axis=0)
        + self.position_pd[:length][None, :, :]
        + jnp.take(self.type_td[...], token_type_ids_bl, axis=0)
    )
    x_bld = self.norm(x_bld).astype(self.dtype)
    return core.dropout(self.dropout, x_bld, deterministic, rng)


class SelfAttention(nnx.Module):
  """Multi-head self-attention with separate q/k/v/out projections."""

  def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
    init = nnx.initializers.normal(config.initializer_range)
    zeros = nnx.initializers.zeros
    d, n, h = config.hidden_size, config.num_heads, config.head_dim
    pd = config.param_dtype
    self.dtype = config.dtype
    in_axes = (sharding.EMBED, sharding.HEADS, sharding.HEAD_DIM)
    bias_axes = (sharding.HEADS, sharding.HEAD_DIM)
    self.query_dnh = core.param(init, rngs, (d, n, h), pd, in_axes)
    self.query_bias_nh = core.param(zeros, rngs, (n, h), pd, bias_axes)
    self.key_dnh = core.param(init, rngs, (d, n, h), pd, in_axes)
    self.key_bias_nh = core.param(zeros, rngs, (n, h), pd, bias_axes)
    self.value_dnh = core.param(init, rngs, (d, n, h), pd, in_axes)
    self.value_bias_nh = core.param(zeros, rngs, (n, h), pd, bias_axes)
    self.out_nhd = core.param(
        init,
        rngs,
        (n, h, d),
        pd,
        (sharding.HEADS, sharding.HEAD_DIM, sharding.EMBED),
    )
    self.out_bias_d = core.param(zeros, rngs, (d,), pd, (sharding.EMBED,))
    self.dropout = nnx.Dropout(config.attention_dropout, rngs=rngs)

  def __call__(
      self,
      x_bld: jax.Array,
      mask_bl: jax.Array,
      *,
      deterministic: bool,
      rng: jax.Array | None,
  ) -> jax.Array:
    """[B, L, D] states and [B, L] mask -> [B, L, D] attention output."""
    dt = self.dtype

    # Heads-major [B, N, L, H] projections: the two attention einsums then
    # have their batch dims (b, n) leading, which XLA's CPU dot runs about
    # 2x faster at 256 tokens than the [B, L, N, H] layout (whole forward
    # 1.24x; experiments/benchmarks/ab_attention_layout.py).
    def heads(w_dnh, bias_nh):
      return (
          jnp.einsum("bld,dnh->bnlh", x_bld, w_dnh[...].astype(dt))
          + bias_nh[...].astype(dt)[:, None, :]
      )

    q_bnlh = heads(self.query_dnh, self.query_bias_nh)
    k_bnlh = heads(self.key_dnh, self.key_bias_nh)
    v_bnlh = heads(self.value_dnh, self.value_bias_nh)
    # Scale the queries rather than the [B, N, L, L] logits: fewer multiplies.
    q_bnlh = q_bnlh * jnp.asarray(1.0 / math.sqrt(q_bnlh.shape[-1]), dt)
    logits_bnqk = jnp.einsum("bnqh,bnkh->bnqk", q_bnlh, k_bnlh)
    # Mask and softmax in float32: the normaliser needs the extra bits.
    bias_bk = jnp.where(mask_bl.astype(bool), 0.0, _MASK_BIAS)
    logits_bnqk = logits_bnqk.astype(jnp.float32) + bias_bk[
        :, None, None, :
    ].astype(jnp.float32)
    probs_bnqk = jax.nn.softmax(logits_bnqk, axis=-1).astype(dt)
    probs_bnqk = core.dropout(self.dropout, probs_bnqk, deterministic, rng)
    context_bnqh = jnp.einsum("bnqk,bnkh->bnqh", probs_bnqk, v_bnlh)
    return jnp.einsum(
        "bnqh,nhd->bqd", context_bnqh, self.out_nhd[...].astype(dt)
    ) + self.out_bias_d[...].astype(dt)


class FeedForward(nnx.Module):
  """Position-wise two-layer MLP: W_o act(W_i x + b_i) + b_o."""

  def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
    init = nnx.initializers.normal(config.initializer_range)
    zeros = nnx.initializers.zeros
    d, f, pd = config.hidden_size, config.intermediate_size, config.param_dtype
    self.dtype = config.dtype
    self.hidden_act = config.hidden_act
    self.wi_df = core.param(
        init, rngs, (d, f), pd, (sharding.EMBED, sharding.MLP)
    )
    self.bi_f = core.param(zeros, rngs, (f,), pd, (sharding.MLP,))
    self.wo_fd = core.param(
        init, rngs, (f, d), pd, (sharding.MLP, sharding.EMBED)
    )
    self.bo_d = core.param(zeros, rngs, (d,), pd, (sharding.EMBED,))

  def __call__(self, x_bld: jax.Array) -> jax.Array:
    """[B, L, D] -> [B, L, D] in the compute dtype."""
    dt = self.dtype
    h_blf = jnp.einsum(
        "bld,df->blf", x_bld, self.wi_df[...].astype(dt)
    ) + self.bi_f[...].astype(dt)
    h_blf = ACTIVATIONS[self.hidden_act](h_blf)
    return jnp.einsum(
        "blf,fd->bld", h_blf, self.wo_fd[...].astype(dt)
    ) + self.bo_d[...].astype(dt)


class EncoderLayer(nnx.Module):
  """One post-LN block: attention, add & norm, feed-forward, add & norm."""

  def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
    self.attention = SelfAttention(config, rngs=rngs)
    self.attention_dropout = nnx.Dropout(config.hidden_dropout, rngs=rngs)
    self.attention_norm = LayerNorm(config, rngs=rngs)
    self.mlp = FeedForward(config, rngs=rngs)
    self.mlp_dropout = nnx.Dropout(config.hidden_dropout, rngs=rngs)
    self.mlp_norm = LayerNorm(config, rngs=rngs)

  def __call__(
      self,
      x_bld: jax.Array,
      mask_bl: jax.Array,
      *,
      deterministic: bool,
      rng: jax.Array | None,
  ) -> jax.Array:
    """[B, L, D] states and [B, L] mask -> [B, L, D] states."""
    rngs = [None] * 3 if rng is None else list(jax.random.split(rng, 3))
    y_bld = self.attention(
        x_bld, mask_bl, deterministic=deterministic, rng=rngs[0]
    )
    y_bld = core.dropout(self.attention_dropout, y_bld, deterministic, rngs[1])
    x_bld = self.attention_norm(x_bld + y_bld)
    y_bld = core.dropout(
        self.mlp_dropout, self.mlp(x_bld), deterministic, rngs[2]
    )
    return self.mlp_norm(x_bld + y_bld)


class TransformerEncoder(nnx.Module):
  """BERT-style encoder: token ids -> contextual token states."""

  def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.embeddings = Embeddings(config, rngs=rngs)
    self.layers = nnx.List(
        [EncoderLayer(config, rngs=rngs) for _ in range(config.num_layers)]
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
    """[B, L] int ids (L <= max positions) -> [B, L, D] states in `dtype`.

    `attention_mask_bl` is nonzero for real tokens; padding is never attended
    to and its own states are meaningless. `dropout_rng` None: NNX streams.
    """
    if token_type_ids_bl is None:
      token_type_ids_bl = jnp.zeros_like(input_ids_bl)
    keys = core.dropout_keys(dropout_rng, len(self.layers) + 1, deterministic)
    x_bld = self.embeddings(
        input_ids_bl,
        token_type_ids_bl,
        deterministic=deterministic,
        rng=keys[0],
    )
    for layer, key in zip(self.layers, keys[1:]):
      x_bld = layer(
          x_bld, attention_mask_bl, deterministic=deterministic, rng=key
      )
    return x_bld


def build_with_params(
    config: EncoderConfig,
    params: Mapping[tuple[str | int, ...], Any],
    *,
    seed: int | jax.Array = 0,
) -> TransformerEncoder:
  """An encoder holding `params`, cast to `config.param_dtype`.

  Structure from `nnx.eval_shape`: on CPU, compiling the random initialisers
  costs far more than a small model's forward pass. Only the dropout RNG state
  is computed, under jit (XLA drops the weight draws).

  Args:
    params: {path: array} naming every parameter once, paths as in
      `nnx.to_flat_state(nnx.state(model, nnx.Param))`, e.g.
      ("layers", 0, "mlp", "wi_df").
    seed: the dropout streams' int or PRNG key (its impl, e.g. "rbg", kept).
  """

  def make_model():
    return TransformerEncoder(config, rngs=nnx.Rngs(seed))

  graphdef, abstract_params, _ = nnx.split(
      nnx.eval_shape(make_model), nnx.Param, ...
  )
  rng_state = jax.jit(lambda: nnx.split(make_model(), nnx.Param, ...)[2])()
  flat = dict(nnx.to_flat_state(abstract_params))
  name = lambda path: ".".join(map(str, path))
  missing = sorted(name(p) for p in set(flat) - set(params))
  unknown = sorted(name(p) for p in set(params) - set(flat))
  if missing or unknown:
    raise ValueError(f"parameters missing: {missing}; unknown: {unknown}")
  for path, variable in flat.items():
    value = params[path]
    if tuple(value.shape) != tuple(variable.shape):
      raise ValueError(
          f"parameter {name(path)} has shape "
          f"{tuple(value.shape)}, expected {variable.shape}"
      )
    variable.set_value(jnp.asarray(value, dtype=config.param_dtype))
  return nnx.merge(graphdef, abstract_params, rng_state)
