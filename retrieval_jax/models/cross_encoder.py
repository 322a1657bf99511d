r"""Cross-encoders: one BERT-family pass over a (query, item) pair -> a score.

Two heads on the same encoder:

* "cls": score = w · h[CLS] + b, the usual re-ranker (rows are
  [CLS] query [SEP] item [SEP]);
* "emb": the [EMB]-style head of "Efficient Nearest Neighbor Search for
  Cross-Encoder Models using Matrix Factorization" (Yadav et al., 2022):
  marker tokens sit in front of the query and of the item,

    [CLS] [Q] query [SEP] [I] item [SEP],

  and the score is the dot product of the two markers' contextualised
  states. It has no parameters beyond the encoder's, and its score matrix
  over queries × items has a lower effective rank than the [CLS] head's,
  which is what CUR approximation (`search/cur_knn.py`) relies on.

The markers are two of BERT's reserved vocabulary entries ("[unused0]",
"[unused1]" by default), so checkpoints with the bert-base-uncased
vocabulary (all-MiniLM-L6-v2) need no new embedding rows; fine-tuning
teaches the model what they mean.
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
  """A pair scorer on a `TransformerEncoder`.

  Build with `CrossEncoder(encoder, head, rngs=nnx.Rngs(0))`; the encoder
  keeps its (pretrained) weights, the "cls" head starts at BERT's init
  (normal, std initializer_range) with a zero bias.
  """

  def __init__(self, encoder: transformer_encoder.TransformerEncoder,
               head: str = "cls", *, rngs: nnx.Rngs):
    if head not in HEADS:
      raise ValueError(f"head={head!r}: expected one of {HEADS}")
    config = encoder.config
    self.encoder = encoder
    self.head = head
    if head == "cls":
      self.score_d = core.param(
          nnx.initializers.normal(config.initializer_range), rngs,
          (config.hidden_size,), config.param_dtype, (sharding.EMBED,))
      self.bias = core.param(nnx.initializers.zeros, rngs, (),
                             config.param_dtype, ())

  def __call__(self, input_ids_bl: jax.Array, attention_mask_bl: jax.Array,
               token_type_ids_bl: jax.Array,
               markers_b2: jax.Array | None = None, *,
               deterministic: bool = True,
               dropout_rng: jax.Array | None = None) -> jax.Array:
    """Scores a batch of encoded pairs.

    Args:
      input_ids_bl, attention_mask_bl, token_type_ids_bl: [B, L] int, from
        `data.features.encode_pairs`.
      markers_b2: [B, 2] int positions of the query and item markers (the
        "emb" head only).
      deterministic: False turns dropout on.
      dropout_rng: PRNG key for dropout.

    Returns:
      [B] float32 scores.
    """
    h_bld = self.encoder(input_ids_bl, attention_mask_bl, token_type_ids_bl,
                         deterministic=deterministic, dropout_rng=dropout_rng)
    h_bld = h_bld.astype(jnp.float32)
    if self.head == "cls":
      return h_bld[:, 0] @ self.score_d[...].astype(jnp.float32) + \
          self.bias[...].astype(jnp.float32)
    if markers_b2 is None:
      raise ValueError("the emb head needs the marker positions markers_b2")
    picked_b2d = jnp.take_along_axis(h_bld, markers_b2[:, :, None], axis=1)
    return jnp.einsum("bd,bd->b", picked_b2d[:, 0], picked_b2d[:, 1])
