r"""SPLADE: sparse lexical term weights from a BERT masked-language-model head.

For a text of L tokens with attention mask a and MLM logits h ∈ [L, |V|]
("SPLADE v2", Formal et al. 2021, arXiv 2109.10086; "SPLADE++", arXiv
2205.04733), the weight of vocabulary term j is

  w_j = max_{i: a_i=1} log(1 + ReLU(h_ij))     ("max", SPLADE v2 / ++)
  w_j = Σ_{i: a_i=1}   log(1 + ReLU(h_ij))     ("sum", SPLADE v1)

and a query-document score is the sparse dot product Σ_j w_j(q)·w_j(d)
(`q_bv @ d_nv.T` on dense rows). Sparsity comes from training with the
FLOPS / L1 regularisers of `retrieval_jax/losses/regularizers.py`.

The MLM head is BERT's: dense D->D, the encoder's activation, LayerNorm,
then a decoder whose weight is the encoder's word-embedding table (tied)
plus a per-term bias. `Splade` passes the encoder's one table to the head
at call time instead of storing a second reference to it, so the state
holds a single [V, D] parameter and its gradient sums the embedding and
the decoder paths (and the module stays free of shared references).

Inference-free (document-only) retrieval encodes only documents; a query
is a bag of its tokens weighted by a (possibly learned) IDF
(`inference_free_query`, `idf_from_corpus`): "SPLADE-doc" with IDF ≡ 1,
and "Towards Competitive Search Relevance For Inference-Free Learned Sparse
Retrievers" (Geng, Ru, Yang 2024; arXiv 2411.04403) with a corpus IDF.

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

# Hugging Face BertForMaskedLM names of the MLM head ("gamma"/"beta" in
# TF-ported checkpoints are accepted too). The decoder weight, when stored,
# is a copy of the word embeddings (tied), so it is not read.
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
  # float32 before the nonlinearity: bf16 logits would quantise log1p's
  # small values, and the sum over L accumulates many of them.
  w_blv = jnp.log1p(jax.nn.relu(logits_blv.astype(jnp.float32)))
  # Masking by multiplication is exact for both aggregations because
  # log(1 + ReLU(x)) >= 0: a zeroed padding position can never win the max
  # over positions whose weights are >= 0, and adds nothing to the sum. (For
  # signed values the max would need a -inf fill instead.)
  w_blv = w_blv * mask_bl.astype(jnp.float32)[:, :, None]
  if aggregation == "max":
    return jnp.max(w_blv, axis=1)
  return jnp.sum(w_blv, axis=1)


class MlmHead(nnx.Module):
  """BERT's MLM prediction head with a decoder tied to the word embeddings.

  logits = LayerNorm(act(h W + b)) E^T + bias_v, where E [V, D] is the
  encoder's word-embedding table, passed to `__call__` (not stored here).

  all-MiniLM-L6-v2 and most sentence-embedding checkpoints ship without MLM
  head weights. `transform_init="identity"` (W = I, b = 0, LayerNorm scale
  1 and offset 0, default bias_v = 0) makes the untrained head a sensible
  reading of the encoder: at step 0 the logits are LayerNorm(act(h)) · E^T,
  i.e. each term's score is the similarity of the (renormalised) contextual
  state to that term's pretrained input embedding, the same geometry a
  trained tied decoder uses. A random ("normal", BERT's init) transform
  would instead project the states onto a random basis, giving logits
  unrelated to the tokens until trained. Use `load_mlm_head` when a
  checkpoint has the head.

  That untrained head ranks sensibly but is dense: on all-MiniLM-L6-v2 the
  median term's max logit over a sentence is ~1.5, so ~28-30k of the 30,522
  weights are non-zero. `bias_init` < 0 shifts every logit down at the
  start (-5 leaves ~40-80 active terms per sentence there) so training can
  begin sparse instead of relying on the FLOPS penalty alone.
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
    # Input axis sharded like the other width-by-width matrices; the output
    # axis replicated (one mesh axis cannot shard both dimensions).
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

  Reads `cls.predictions.transform.dense.{weight,bias}` (torch Linear
  layout [out, in], transposed here), `cls.predictions.transform.LayerNorm.
  {weight,bias}` (or `{gamma,beta}`) and `cls.predictions.bias` (or
  `cls.predictions.decoder.bias`). The decoder weight, if present, is the
  tied word-embedding table and is left to the encoder import.

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
  # Check every shape before writing anything: no half-loaded head.
  for name, value in values.items():
    if value.shape != targets[name].shape:
      raise ValueError(f"MLM head weight {name} has shape {value.shape}, "
                       f"expected {targets[name].shape}")
  for name, value in values.items():
    target = targets[name]
    target.set_value(jnp.asarray(value, dtype=target.dtype))
  return True


class Splade(nnx.Module):
  """SPLADE encoder: TransformerEncoder + tied MLM head + pooling.

  Build with `Splade(encoder, rngs=nnx.Rngs(0))`; the encoder keeps its
  (pretrained) weights and the head starts as `MlmHead(config,
  transform_init, bias_init)` describes. `__call__` returns dense [B, V]
  rows; they are sparse only in value (exact zeros wherever every logit is
  <= 0).

  Memory: the MLM logits are [B, L, V] in the compute dtype, B·L·V·4 bytes
  in float32 (batch 32 × length 256 × 30,522 terms ≈ 1.0 GB), far more than
  the encoder's activations. The pooling runs inside the module so that, in
  a jitted inference step, XLA fuses the bias, ReLU, log1p, masking and the
  max into the reduction over L: at most the decoder matmul's [B, L, V]
  output is materialised (on CPU XLA fuses even that; a 1-layer model at
  B=8, L=64 needs <1 MiB of temporaries for a 60 MiB logit tensor). The
  backward pass needs the logits and the max's argmax selection: the same
  CPU measurement gives ~4 [B, L, V] float32 buffers of temporaries for a
  gradient step, so shrink the batch or length (or rematerialise the head)
  when they do not fit.

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
    # The decoder reads the encoder's own Param: one table, two uses.
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

  q_j = 1[j ∈ tokens(q)] · ReLU(idf_j): a binary bag of the query's tokens
  (a repeated token counts once; `special_ids` are zeroed) weighted by the
  IDF, so score(q, d) = Σ_{j ∈ q} ReLU(idf_j)·w_j(d). With `idf_v=None`
  (IDF ≡ 1) this is SPLADE-doc's binary bag. ReLU keeps a learned IDF that
  went negative from turning a match into a penalty.

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

  idf_j = log(1 + (N − df_j + 0.5) / (df_j + 0.5)), with N documents and
  df_j the number of documents containing term j at least once. It is
  positive for every df ≤ N (unlike Robertson–Spärck Jones' log((N − df +
  0.5)/(df + 0.5)), negative for df > N/2). A term no document contains gets
  the largest value, log(1 + (N + 0.5)/0.5); it cannot match any document,
  so that value never affects a score.

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
  # float64 so that large N and df = N - 1 keep their small differences.
  idf_v = np.log1p((n - df_v + 0.5) / (df_v + 0.5))
  return idf_v.astype(np.float32)
