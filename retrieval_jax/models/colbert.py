r"""ColBERT: one L2-normalised vector per token, E = normalize(H W).

Khattab & Zaharia, arXiv:2004.12832. Queries and documents share the encoder;
their token layouts ([Q]/[D] markers, [MASK] augmentation) are built in
`data/features.py`, MaxSim scores in `search/late_interaction.py`, corpora
embedded by `encoding.MultiVectorEncoder`.
"""

import math

from flax import nnx
import jax
import jax.numpy as jnp

from retrieval_jax import sharding
from retrieval_jax.layers import core
from retrieval_jax.layers import pooling
from retrieval_jax.models import transformer_encoder

# W inits: "bert" normal(0, initializer_range) (ColBERT's); "torch"
# U(±1/sqrt(hidden)). After the L2 norm they differ only in effective LR.
PROJECTION_INITS = ("bert", "torch")


class ColBERT(nnx.Module):
  """Token-level multi-vector encoder; the projection `linear_hd` is new."""

  def __init__(
      self,
      encoder: transformer_encoder.TransformerEncoder,
      dim: int = 128,
      *,
      rngs: nnx.Rngs,
      projection_init: str = "bert",
  ):
    if dim < 1:
      raise ValueError(f"dim={dim}: must be positive")
    if projection_init not in PROJECTION_INITS:
      raise ValueError(
          f"projection_init={projection_init!r}: expected one "
          f"of {PROJECTION_INITS}"
      )
    config = encoder.config
    hidden = config.hidden_size
    if projection_init == "bert":
      init = nnx.initializers.normal(config.initializer_range)
    else:
      init = core.uniform(1.0 / math.sqrt(hidden))
    self.encoder = encoder
    self.dim = dim
    # No bias, as in ColBERT.
    self.linear_hd = core.param(
        init, rngs, (hidden, dim), config.param_dtype, (sharding.EMBED, None)
    )

  def __call__(
      self,
      ids_bl: jax.Array,
      mask_bl: jax.Array,
      type_ids_bl: jax.Array | None = None,
      *,
      deterministic: bool = True,
      dropout_rng: jax.Array | None = None,
  ) -> jax.Array:
    """Embeds every token of [B, L] int rows: float32 [B, L, dim], L2-normed.

    `mask_bl` is the attention mask, NOT the score mask, which travels
    separately (padding rows are normalised too).
    """
    h_blh = self.encoder(
        ids_bl,
        mask_bl,
        type_ids_bl,
        deterministic=deterministic,
        dropout_rng=dropout_rng,
    )
    # float32 even under bf16: a bf16 norm is good to ~3 digits.
    e_bld = jnp.einsum(
        "blh,hd->bld",
        h_blh.astype(jnp.float32),
        self.linear_hd[...].astype(jnp.float32),
    )
    return pooling.l2_normalize(e_bld)
