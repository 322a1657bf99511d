r"""SPLADE: sparse lexical term weights from a BERT masked-language-model head.

w_j = max_i log(1 + ReLU(h_ij)) over real tokens ("max", SPLADE v2/++, arXiv
2109.10086, 2205.04733) or the sum ("sum", v1); score = Σ_j w_j(q) w_j(d).
Sparsity comes from the FLOPS / L1 regularisers in `losses/regularizers.py`.
The MLM decoder is tied to the encoder's word table, passed in at call time:
one [V, D] parameter, no shared module references. Inference-free retrieval
(`inference_free_query`, `idf_from_corpus`) encodes only documents; a query
is its token bag weighted by IDF (SPLADE-doc: IDF ≡ 1; Geng et al. 2024,
arXiv 2411.04403: corpus IDF).

Shape letters: b batch, l token position, d model width, v vocabulary,
q queries.
"""

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from retrieval_jax import sharding
from retrieval_jax.layers import core
from retrieval_jax.models import transformer_encoder

AGGREGATIONS = ("max", "sum")
TRANSFORM_INITS = ("identity", "normal")

# HF BertForMaskedLM names of the MLM head; the tied decoder weight is unread.
_HEAD_PREFIX = "cls.predictions."
_HEAD_DENSE = "cls.predictions.transform.dense."
_HEAD_NORM = "cls.predictions.transform.LayerNorm."
_HEAD_BIAS = ("cls.predictions.bias", "cls.predictions.decoder.bias")


def splade_pool(logits_blv: jax.Array, mask_bl: jax.Array,
                aggregation: str = "max") -> jax.Array:
  """Pools MLM logits into SPLADE term weights.

  Args:
    logits_blv: [B, L, V] MLM logits, any float dtype.
    mask_bl: [B, L] bool/int, nonzero for real tokens.
    aggregation: "max" (max over real positions, SPLADE v2/++) or "sum".

  Returns:
    [B, V] float32 weights, all >= 0; 0 for a row with no real token.
  """
  if aggregation not in AGGREGATIONS:
    raise ValueError(
        f"aggregation={aggregation!r}: expected one of {AGGREGATIONS}")
  # float32 first: bf16 would quantise log1p's small values.
  w_blv = jnp.log1p(jax.nn.relu(logits_blv.astype(jnp.float32)))
  # Multiplicative masking is exact for max and sum since weights are >= 0.
  w_blv = w_blv * mask_bl.astype(jnp.float32)[:, :, None]
  if aggregation == "max":
    return jnp.max(w_blv, axis=1)
  return jnp.sum(w_blv, axis=1)


class MlmHead(nnx.Module):
  """BERT's MLM prediction head with a decoder tied to the word embeddings.

  logits = LayerNorm(act(h W + b)) E^T + bias_v, E [V, D] the word table.

  Sentence-embedding checkpoints ship no MLM head: `transform_init=
  "identity"` then scores each term by the similarity of the state to its
  input embedding (a random transform gives unrelated logits until trained).
  That head is dense on all-MiniLM-L6-v2 (~28-30k of 30,522 weights > 0);
  `bias_init=-5` leaves ~40-80 active terms per sentence, so training can
  start sparse.
  """

  def __init__(self, config: transformer_encoder.EncoderConfig,
               transform_init: str = "identity", bias_init: float = 0.0, *,
               rngs: nnx.Rngs):
    if transform_init not in TRANSFORM_INITS:
      raise ValueError(f"transform_init={transform_init!r}: expected one of "
                       f"{TRANSFORM_INITS}")
    d, pd = config.hidden_size, config.param_dtype
    if transform_init == "identity":
      dense_init = lambda key, shape, dtype: jnp.eye(*shape, dtype=dtype)
    else:
      dense_init = nnx.initializers.normal(config.initializer_range)
    self.dtype = config.dtype
    self.hidden_act = config.hidden_act
    # One mesh axis cannot shard both dimensions: the output is replicated.
    self.transform_dd = core.param(dense_init, rngs, (d, d), pd,
                                   (sharding.EMBED, None))
    self.transform_bias_d = core.param(nnx.initializers.zeros, rngs, (d,),
                                       pd, (sharding.EMBED,))
    self.norm = transformer_encoder.LayerNorm(config, rngs=rngs)
    self.bias_v = core.param(nnx.initializers.constant(bias_init), rngs,
                             (config.vocab_size,), pd, (sharding.VOCAB,))

  def __call__(self, h_bld: jax.Array, word_vd: jax.Array) -> jax.Array:
    """Token states -> MLM logits.

    Args:
      h_bld: [B, L, D] encoder states.
      word_vd: [V, D] word-embedding table (the decoder weight).

    Returns:
      [B, L, V] logits in the compute dtype.
    """
    dt = self.dtype
    t_bld = (jnp.einsum("bld,de->ble", h_bld.astype(dt),
                        self.transform_dd[...].astype(dt))
             + self.transform_bias_d[...].astype(dt))
    t_bld = self.norm(transformer_encoder.ACTIVATIONS[self.hidden_act](t_bld))
    return (jnp.einsum("bld,vd->blv", t_bld, word_vd.astype(dt))
            + self.bias_v[...].astype(dt))


def load_mlm_head(head: MlmHead, state_dict: Mapping[str, Any]) -> bool:
  """Copies a Hugging Face BERT MLM head's weights into `head`.

  Reads `cls.predictions.transform.{dense,LayerNorm}.*` (torch [out, in],
  transposed) and `cls.predictions.bias`; the tied decoder weight is not read.

  Args:
    head: the head to fill in place.
    state_dict: {checkpoint name: array}, e.g. `pretrained.read_state_dict`.

  Returns:
    True when the weights were copied; False when the checkpoint has no
    `cls.predictions.*` key at all (the head keeps its initialisation).

  Raises:
    ValueError: a head that is present only in part, or misshapen weights.
  """
  if not any(k.startswith(_HEAD_PREFIX) for k in state_dict):
    return False

  def pick(*names):
    for name in names:
      if name in state_dict:
        return np.asarray(state_dict[name])
    raise ValueError(f"checkpoint has an MLM head but lacks {names[0]!r}")

  values = {
      "transform_dd": pick(_HEAD_DENSE + "weight").T,
      "transform_bias_d": pick(_HEAD_DENSE + "bias"),
      "scale_d": pick(_HEAD_NORM + "weight", _HEAD_NORM + "gamma"),
      "bias_d": pick(_HEAD_NORM + "bias", _HEAD_NORM + "beta"),
      "bias_v": pick(*_HEAD_BIAS),
  }
  targets = {
      "transform_dd": head.transform_dd,
      "transform_bias_d": head.transform_bias_d,
      "scale_d": head.norm.scale_d,
      "bias_d": head.norm.bias_d,
      "bias_v": head.bias_v,
  }
  for name, value in values.items():  # all shapes first: no half-loaded head
    if value.shape != targets[name].shape:
      raise ValueError(f"MLM head weight {name} has shape {value.shape}, "
                       f"expected {targets[name].shape}")
  for name, value in values.items():
    target = targets[name]
    target.set_value(jnp.asarray(value, dtype=target.dtype))
  return True


class Splade(nnx.Module):
  """SPLADE encoder: TransformerEncoder + tied MLM head + pooling.

  Returns dense [B, V] rows, sparse only in value. The [B, L, V] logits
  (32 x 256 x 30,522 float32 ≈ 1.0 GB) dominate memory; pooling inside the
  module lets XLA fuse it into the reduction over L (on CPU, B=8, L=64 needs
  <1 MiB of temporaries for 60 MiB of logits), while a gradient step holds
  ~4 [B, L, V] float32 buffers.

  Attributes:
    encoder: the TransformerEncoder.
    head: the MlmHead (its decoder is `encoder.embeddings.word_vd`).
    aggregation: "max" or "sum".
    special_ids: vocabulary columns forced to 0 in the output (e.g. the
      tokenizer's cls/sep/pad ids); empty by default, as in SPLADE itself.
  """

  def __init__(self, encoder: transformer_encoder.TransformerEncoder, *,
               aggregation: str = "max", transform_init: str = "identity",
               bias_init: float = 0.0, special_ids: Sequence[int] = (),
               rngs: nnx.Rngs):
    if aggregation not in AGGREGATIONS:
      raise ValueError(
          f"aggregation={aggregation!r}: expected one of {AGGREGATIONS}")
    vocab_size = encoder.config.vocab_size
    special_ids = tuple(int(i) for i in special_ids)
    bad = [i for i in special_ids if not 0 <= i < vocab_size]
    if bad:
      raise ValueError(f"special_ids {bad} are outside [0, {vocab_size})")
    self.encoder = encoder
    self.head = MlmHead(encoder.config, transform_init, bias_init,
                        rngs=rngs)
    self.aggregation = aggregation
    self.special_ids = special_ids

  def mlm_logits(self, input_ids_bl: jax.Array, attention_mask_bl: jax.Array,
                 token_type_ids_bl: jax.Array | None = None, *,
                 deterministic: bool = True,
                 dropout_rng: jax.Array | None = None) -> jax.Array:
    """[B, L] ids, mask, types -> [B, L, V] MLM logits (compute dtype)."""
    h_bld = self.encoder(input_ids_bl, attention_mask_bl, token_type_ids_bl,
                         deterministic=deterministic, dropout_rng=dropout_rng)
    return self.head(h_bld, self.encoder.embeddings.word_vd[...])

  def __call__(self, input_ids_bl: jax.Array, attention_mask_bl: jax.Array,
               token_type_ids_bl: jax.Array | None = None, *,
               deterministic: bool = True,
               dropout_rng: jax.Array | None = None) -> jax.Array:
    """Encodes a batch of texts into SPLADE term weights.

    Args:
      input_ids_bl: [B, L] int token ids.
      attention_mask_bl: [B, L] bool/int, nonzero for real tokens.
      token_type_ids_bl: [B, L] int segment ids; zeros when None.
      deterministic: False turns dropout on (training).
      dropout_rng: PRNG key for dropout.

    Returns:
      [B, V] float32 term weights, >= 0.
    """
    logits_blv = self.mlm_logits(input_ids_bl, attention_mask_bl,
                                 token_type_ids_bl,
                                 deterministic=deterministic,
                                 dropout_rng=dropout_rng)
    w_bv = splade_pool(logits_blv, attention_mask_bl, self.aggregation)
    if self.special_ids:
      w_bv = w_bv.at[:, jnp.asarray(self.special_ids)].set(0.0)
    return w_bv


def inference_free_query(ids_list: Iterable[Sequence[int]], *,
                         vocab_size: int,
                         idf_v: np.ndarray | None = None,
                         special_ids: Sequence[int] = ()) -> np.ndarray:
  """Query vectors of inference-free (document-only) sparse retrieval.

  q_j = 1[j ∈ tokens(q)] · ReLU(idf_j) (IDF ≡ 1 when `idf_v` is None); ReLU
  keeps a learned IDF gone negative from turning a match into a penalty.

  Args:
    ids_list: Q token-id sequences (with or without [CLS]/[SEP]).
    vocab_size: V.
    idf_v: optional [V] float IDF per term (e.g. `idf_from_corpus`).
    special_ids: ids whose column is always 0 (e.g. cls/sep/pad).

  Returns:
    [Q, V] float32 dense NumPy array (Q is small: 122 KB per query at
    V = 30,522; score with `q_qv @ w_nv.T`).

  Raises:
    ValueError: ids outside [0, V) or an IDF of the wrong shape.
  """
  rows = [np.unique(np.asarray(list(ids), np.int64)) for ids in ids_list]
  for q, row in enumerate(rows):
    if row.size and (row[0] < 0 or row[-1] >= vocab_size):
      raise ValueError(f"ids_list[{q}] has ids outside [0, {vocab_size}): "
                       f"{row[(row < 0) | (row >= vocab_size)].tolist()}")
  if idf_v is None:
    weight_v = np.ones(vocab_size, np.float32)
  else:
    idf_v = np.asarray(idf_v, np.float32)
    if idf_v.shape != (vocab_size,):
      raise ValueError(f"idf_v has shape {idf_v.shape}, expected "
                       f"({vocab_size},)")
    weight_v = np.maximum(idf_v, 0.0)
  q_qv = np.zeros((len(rows), vocab_size), np.float32)
  for q, row in enumerate(rows):
    q_qv[q, row] = weight_v[row]
  special = np.asarray(list(special_ids), np.int64)
  if special.size:
    q_qv[:, special] = 0.0
  return q_qv


def idf_from_corpus(token_id_lists: Iterable[Sequence[int]],
                    vocab_size: int) -> np.ndarray:
  """BM25 (Lucene) IDF of every vocabulary term over a tokenised corpus.

  idf_j = log(1 + (N − df_j + 0.5) / (df_j + 0.5)): positive for every
  df ≤ N, unlike Robertson–Spärck Jones' IDF.

  Args:
    token_id_lists: N token-id sequences, one per document.
    vocab_size: V.

  Returns:
    [V] float32 IDF.

  Raises:
    ValueError: ids outside [0, V).
  """
  df_v = np.zeros(vocab_size, np.int64)
  n = 0
  for d, ids in enumerate(token_id_lists):
    row = np.unique(np.asarray(list(ids), np.int64))
    if row.size and (row[0] < 0 or row[-1] >= vocab_size):
      raise ValueError(f"token_id_lists[{d}] has ids outside "
                       f"[0, {vocab_size})")
    df_v[row] += 1
    n += 1
  idf_v = np.log1p((n - df_v + 0.5) / (df_v + 0.5))  # float64 for large N
  return idf_v.astype(np.float32)
