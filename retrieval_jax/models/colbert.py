r"""ColBERT: one L2-normalised vector per token, scored by late interaction.

"ColBERT: Efficient and Effective Passage Search via Contextualized Late
Interaction over BERT" (Khattab & Zaharia, arXiv:2004.12832). A BERT-family
encoder's token states are projected to `dim` (128) by a bias-free linear
map and each row is L2-normalised:

  E = normalize(H W),  H: [L, hidden], W: [hidden, dim].

Queries and documents share the encoder; their token layouts ([Q]/[D]
markers, [MASK] query augmentation scored but not attended, punctuation
left out of scoring) are built in `data/features.py`, the MaxSim scores in
`search/late_interaction.py`, and corpora are embedded by
`encoding.MultiVectorEncoder`.
"""

import math

from flax import nnx
import jax
import jax.numpy as jnp

from retrieval_jax import sharding
from retrieval_jax.layers import core
from retrieval_jax.layers import pooling
from retrieval_jax.models import transformer_encoder

# Initialisers of the projection W [hidden, dim]:
#   "bert": normal(0, initializer_range), what a BERT checkpoint's own
#     `_init_weights` gives every nn.Linear (ColBERT's projection is built
#     inside such a model, so this is its init);
#   "torch": U(±1/sqrt(hidden)), a stand-alone torch.nn.Linear's default.
# Only the directions of W's columns matter after the L2 normalisation,
# so the two differ in scale, which changes the effective learning rate.
PROJECTION_INITS = ("bert", "torch")


class ColBERT(nnx.Module):
  """Token-level multi-vector encoder on a `TransformerEncoder`.

  Build with `ColBERT(encoder, dim=128, rngs=nnx.Rngs(0))`; the encoder
  keeps its (pretrained) weights and the projection `linear_hd` starts at
  random (see `PROJECTION_INITS`).
  """

  def __init__(self, encoder: transformer_encoder.TransformerEncoder,
               dim: int = 128, *, rngs: nnx.Rngs,
               projection_init: str = "bert"):
    if dim < 1:
      raise ValueError(f"dim={dim}: must be positive")
    if projection_init not in PROJECTION_INITS:
      raise ValueError(f"projection_init={projection_init!r}: expected one "
                       f"of {PROJECTION_INITS}")
    config = encoder.config
    hidden = config.hidden_size
    if projection_init == "bert":
      init = nnx.initializers.normal(config.initializer_range)
    else:
      init = core.uniform(1.0 / math.sqrt(hidden))
    self.encoder = encoder
    self.dim = dim
    # No bias, as in ColBERT: a shared offset would add the same component
    # to every token vector before normalisation.
    self.linear_hd = core.param(init, rngs, (hidden, dim), config.param_dtype,
                                (sharding.EMBED, None))

  def __call__(self, ids_bl: jax.Array, mask_bl: jax.Array,
               type_ids_bl: jax.Array | None = None, *,
               deterministic: bool = True,
               dropout_rng: jax.Array | None = None) -> jax.Array:
    """Embeds every token.

    Args:
      ids_bl: [B, L] int token ids (from `encode_queries` / `encode_docs`).
      mask_bl: [B, L] int attention mask (keys that may be attended to; NOT
        the score mask).
      type_ids_bl: [B, L] int segment ids; zeros when None.
      deterministic: False turns dropout on.
      dropout_rng: PRNG key for dropout.

    Returns:
      float32 [B, L, dim], every row L2-normalised (rows at padding are
      normalised too but meaningless; the score mask travels separately).
    """
    h_blh = self.encoder(ids_bl, mask_bl, type_ids_bl,
                         deterministic=deterministic, dropout_rng=dropout_rng)
    # Project and normalise in float32 even under a bfloat16 encoder: the
    # norm of a 128-wide bf16 vector is only good to ~3 digits.
    e_bld = jnp.einsum("blh,hd->bld", h_blh.astype(jnp.float32),
                       self.linear_hd[...].astype(jnp.float32))
    return pooling.l2_normalize(e_bld)
