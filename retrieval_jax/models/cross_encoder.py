r"""Cross-encoders: one BERT-family pass over a (query, item) pair -> a score.

Heads: "cls", w · h[CLS] + b (the usual re-ranker), or with `pooler=True`
w · tanh(h[CLS] P + p) + b, BertForSequenceClassification's head (HF and
sentence-transformers cross-encoder checkpoints); "emb", Yadav et al. 2022
("Efficient Nearest Neighbor Search for Cross-Encoder Models using Matrix
Factorization"): rows [CLS] [Q] query [SEP] [I] item [SEP], score = dot of the
two markers' states (reserved "[unused0]", "[unused1]"). Its score matrix has
a lower effective rank, which CUR (`search/cur_knn.py`) relies on.
"""

from flax import nnx
import jax
import jax.numpy as jnp

from retrieval_jax import sharding
from retrieval_jax.layers import core
from retrieval_jax.models import transformer_encoder

# Same names as `data.features.PAIR_HEADS`, whose layouts they read.
HEADS = ("cls", "emb")


class CrossEncoder(nnx.Module):
  """A pair scorer on a `TransformerEncoder`; the "cls" head has BERT's init.

  pooler: the "cls" head reads tanh(h[CLS] P + p) (BERT's pooler, P [D, D]
  in x W layout) instead of h[CLS].
  """

  def __init__(
      self,
      encoder: transformer_encoder.TransformerEncoder,
      head: str = "cls",
      *,
      rngs: nnx.Rngs,
      pooler: bool = False,
  ):
    if head not in HEADS:
      raise ValueError(f"head={head!r}: expected one of {HEADS}")
    if pooler and head != "cls":
      raise ValueError(f"pooler=True is for the 'cls' head, not {head!r}")
    config = encoder.config
    self.encoder = encoder
    self.head = head
    self.pooler = pooler
    if pooler:
      init = nnx.initializers.normal(config.initializer_range)
      d = config.hidden_size
      # Replicated output dimension, as in the SPLADE head's transform.
      self.pooler_dd = core.param(
          init, rngs, (d, d), config.param_dtype, (sharding.EMBED, None)
      )
      self.pooler_bias_d = core.param(
          nnx.initializers.zeros, rngs, (d,), config.param_dtype, (None,)
      )
    if head == "cls":
      self.score_d = core.param(
          nnx.initializers.normal(config.initializer_range),
          rngs,
          (config.hidden_size,),
          config.param_dtype,
          (sharding.EMBED,),
      )
      self.bias = core.param(
          nnx.initializers.zeros, rngs, (), config.param_dtype, ()
      )

  def __call__(
      self,
      input_ids_bl: jax.Array,
      attention_mask_bl: jax.Array,
      token_type_ids_bl: jax.Array,
      markers_b2: jax.Array | None = None,
      *,
      deterministic: bool = True,
      dropout_rng: jax.Array | None = None,
  ) -> jax.Array:
    """[B] float32 scores of [B, L] int pairs from `features.encode_pairs`.

    `markers_b2`: [B, 2] int query and item marker positions ("emb" only).
    """
    h_bld = self.encoder(
        input_ids_bl,
        attention_mask_bl,
        token_type_ids_bl,
        deterministic=deterministic,
        dropout_rng=dropout_rng,
    )
    h_bld = h_bld.astype(jnp.float32)
    if self.head == "cls":
      x_bd = h_bld[:, 0]
      if self.pooler:
        x_bd = jnp.tanh(
            x_bd @ self.pooler_dd[...].astype(jnp.float32)
            + self.pooler_bias_d[...].astype(jnp.float32)
        )
      return x_bd @ self.score_d[...].astype(jnp.float32) + self.bias[
          ...
      ].astype(jnp.float32)
    if markers_b2 is None:
      raise ValueError("the emb head needs the marker positions markers_b2")
    picked_b2d = jnp.take_along_axis(h_bld, markers_b2[:, :, None], axis=1)
    return jnp.einsum("bd,bd->b", picked_b2d[:, 0], picked_b2d[:, 1])
