r"""ColBERT: one L2-normalised vector per token, scored by late interaction.

"ColBERT: Efficient and Effective Passage Search via Contextualized Late
Interaction over BERT" (Khattab & Zaharia, arXiv:2004.12832). A BERT-family
encoder's token states are projected to `dim` (128) by a bias-free linear
map and each row is L2-normalised:

  E = normalize(H W),  H: [L, hidden], W: [hidden, dim].

Queries and documents share the encoder; a marker after [CLS] tells them
apart:

  query:    [CLS] [Q] tokens [SEP] [MASK] ... [MASK]   (width query_maxlen)
  document: [CLS] [D] tokens [SEP] [PAD] ...            (width <= doc_maxlen)

[Q] and [D] are BERT's reserved entries "[unused0]" and "[unused1]", so a
bert-base-uncased vocabulary (all-MiniLM-L6-v2's) needs no new rows.

Query augmentation: queries are filled up to `query_maxlen` with [MASK].
Those positions are not attended to as keys (attention mask 0), so the real
tokens' states are exactly those of the unpadded query, but their own
outputs (which attend to the real tokens) are scored: they act as learned,
query-dependent soft expansion terms. Every call therefore carries two
masks: `attention_mask` (keys the encoder may attend to) and `score_mask`
(rows that take part in MaxSim). Documents score every real token except,
by default, punctuation.

The scores themselves are computed in
`retrieval_jax/search/late_interaction.py`.
`MultiVectorEncoder` turns texts into padded token-embedding arrays.
"""

import dataclasses
import functools
import math
import string
import time
from collections.abc import Sequence

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np
import tqdm

from retrieval_jax import pretrained
from retrieval_jax import sharding
from retrieval_jax.data import tokenizers
from retrieval_jax.layers import core
from retrieval_jax.layers import pooling
from retrieval_jax.models import transformer_encoder

QUERY_MARKER = "[unused0]"
DOC_MARKER = "[unused1]"

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


# ---------------------------------------------------------------------------
# Tokenisation.


def _marker_id(tokenizer, marker: str) -> int:
  marker_id = tokenizer.token_to_id(marker)
  if marker_id is None:
    raise ValueError(f"the vocabulary lacks the marker token {marker!r}")
  return marker_id


def punctuation_ids(tokenizer) -> np.ndarray:
  """Ids of the single-character tokens in `string.punctuation`.

  BERT's pre-tokenizer splits every punctuation character into a word of
  its own, so these are the only ids punctuation ever becomes.

  Returns:
    int32 [P] sorted ids (characters missing from the vocabulary skipped).
  """
  ids = {tokenizer.token_to_id(c) for c in string.punctuation}
  ids.discard(None)
  return np.asarray(sorted(ids), np.int32)


def _with_marker(tokenizer, text: str, marker_id: int,
                 max_length: int) -> list[int]:
  """[CLS] marker content [SEP], at most `max_length` ids."""
  ids = tokenizer.encode(text, max_length - 1)
  return [ids[0], marker_id, *ids[1:]]


def _check_maxlen(name: str, value: int) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 3:
    raise ValueError(f"{name}={value!r}: need an int >= 3 ([CLS], the "
                     "marker and [SEP])")


def query_rows(tokenizer, texts: Sequence[str], query_maxlen: int
               ) -> list[list[int]]:
  """Unpadded query ids, [CLS] [Q] tokens [SEP], <= query_maxlen each."""
  _check_maxlen("query_maxlen", query_maxlen)
  marker = _marker_id(tokenizer, QUERY_MARKER)
  return [_with_marker(tokenizer, t, marker, query_maxlen) for t in texts]


def doc_rows(tokenizer, texts: Sequence[str], doc_maxlen: int
             ) -> list[list[int]]:
  """Unpadded document ids, [CLS] [D] tokens [SEP], <= doc_maxlen each."""
  _check_maxlen("doc_maxlen", doc_maxlen)
  marker = _marker_id(tokenizer, DOC_MARKER)
  return [_with_marker(tokenizer, t, marker, doc_maxlen) for t in texts]


def pad_queries(tokenizer, rows: Sequence[Sequence[int]], query_maxlen: int,
                augment: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Pads query rows to `query_maxlen`; see `encode_queries`."""
  fill = tokenizer.mask_id if augment else tokenizer.pad_id
  ids_bl = np.full((len(rows), query_maxlen), fill, np.int32)
  attention_bl = np.zeros((len(rows), query_maxlen), np.int32)
  for b, row in enumerate(rows):
    ids_bl[b, :len(row)] = row
    attention_bl[b, :len(row)] = 1
  # With augmentation every position is scored, the [MASK] fill included.
  score_bl = np.ones_like(attention_bl) if augment else attention_bl.copy()
  return ids_bl, attention_bl, score_bl


def pad_docs(tokenizer, rows: Sequence[Sequence[int]], *,
             mask_punctuation: bool, width: int | None = None,
             pad_multiple: int | None = None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Pads document rows; see `encode_docs`. `width` fixes L (>= longest)."""
  longest = max((len(r) for r in rows), default=0)
  width = longest if width is None else width
  if width < longest:
    raise ValueError(f"width={width} < longest document ({longest} ids)")
  if pad_multiple:
    width = -(-width // pad_multiple) * pad_multiple
  ids_bl = np.full((len(rows), width), tokenizer.pad_id, np.int32)
  attention_bl = np.zeros((len(rows), width), np.int32)
  for b, row in enumerate(rows):
    ids_bl[b, :len(row)] = row
    attention_bl[b, :len(row)] = 1
  score_bl = attention_bl.copy()
  if mask_punctuation:
    # Punctuation is attended to (it shapes its neighbours' states) but its
    # own vectors are not matched: they would match every query's "?".
    score_bl[np.isin(ids_bl, punctuation_ids(tokenizer))] = 0
  return ids_bl, attention_bl, score_bl


def encode_queries(tokenizer, texts: Sequence[str], *, query_maxlen: int = 32,
                   augment: bool = True
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Tokenises queries as [CLS] [Q] tokens [SEP], width `query_maxlen`.

  Args:
    tokenizer: a `data.tokenizers.WordPieceTokenizer`.
    texts: B queries; longer ones keep their first query_maxlen - 3 tokens.
    query_maxlen: ids per row, specials included (>= 3).
    augment: fill with [MASK] (attention 0, score 1: query augmentation);
      False fills with [PAD] and scores only the real tokens.

  Returns:
    int32 [B, query_maxlen] arrays: ids_bl, attention_mask_bl (1 on the
    real tokens) and score_mask_bl (rows that enter MaxSim).
  """
  return pad_queries(tokenizer, query_rows(tokenizer, texts, query_maxlen),
                     query_maxlen, augment)


def encode_docs(tokenizer, texts: Sequence[str], *, doc_maxlen: int = 220,
                mask_punctuation: bool = True,
                pad_multiple: int | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Tokenises documents as [CLS] [D] tokens [SEP], padded with [PAD].

  Args:
    tokenizer: a `data.tokenizers.WordPieceTokenizer`.
    texts: B documents; longer ones keep their first doc_maxlen - 3 tokens.
    doc_maxlen: most ids per row, specials included (>= 3).
    mask_punctuation: exclude single-character punctuation tokens (those in
      `string.punctuation`) from scoring.
    pad_multiple: round the width (the longest row) up to a multiple of this.

  Returns:
    int32 [B, L] arrays: ids_bl, attention_mask_bl (1 on real tokens) and
    score_mask_bl (real tokens, minus punctuation if `mask_punctuation`).
  """
  return pad_docs(tokenizer, doc_rows(tokenizer, texts, doc_maxlen),
                  mask_punctuation=mask_punctuation, pad_multiple=pad_multiple)


# ---------------------------------------------------------------------------
# Corpus / query encoding.


def embed_step(graphdef: nnx.GraphDef, state: nnx.State, ids_bl: jax.Array,
               attention_bl: jax.Array, score_bl: jax.Array, *,
               out_dtype) -> jax.Array:
  """One batch through `ColBERT`; rows outside the score mask set to 0.

  Returns:
    [B, L, dim] in `out_dtype`. Zeroing unscored rows makes stored arrays
    deterministic (padding states depend on the batch's width otherwise).
  """
  model = nnx.merge(graphdef, state)
  e_bld = model(ids_bl, attention_bl, jnp.zeros_like(ids_bl))
  return (e_bld * score_bl[:, :, None].astype(e_bld.dtype)).astype(out_dtype)


@dataclasses.dataclass
class MultiVectorEncoder:
  """A `ColBERT` model ready to embed queries and corpora on a mesh.

  Storage precision: corpora are returned as float16 by default, half of
  float32's memory (N × L × dim × 2 bytes: 5k documents of 220 tokens at
  dim 128 take 280 MB). Components of unit vectors are in [-1, 1], where
  float16's relative step is 2^-11, so each stored vector is off by at
  most ~2^-11 in norm, one similarity by at most ~2^-10 (query and document
  both rounded) and a MaxSim sum of L_q rows by at most L_q × 2^-10 (~0.03
  for 32 rows; errors of random sign make the typical error far smaller).
  `search.late_interaction` casts to float32 before any product.

  Attributes:
    graphdef: static graph of the ColBERT model.
    state: its parameters, replicated on `mesh`.
    tokenizer: the model's WordPiece tokenizer.
    mesh: devices the batch is split over.
    query_maxlen: query width (specials included).
    doc_maxlen: most ids per document (specials included).
    augment: pad queries with [MASK] (scored, not attended).
    mask_punctuation: leave punctuation out of document scoring.
  """
  graphdef: nnx.GraphDef
  state: nnx.State
  tokenizer: tokenizers.WordPieceTokenizer
  mesh: Mesh
  query_maxlen: int = 32
  doc_maxlen: int = 220
  augment: bool = True
  mask_punctuation: bool = True

  def __post_init__(self):
    _check_maxlen("query_maxlen", self.query_maxlen)
    _check_maxlen("doc_maxlen", self.doc_maxlen)
    replicated = NamedSharding(self.mesh, PartitionSpec())
    rows = sharding.named_sharding(self.mesh, (sharding.BATCH, None))
    out = sharding.named_sharding(self.mesh, (sharding.BATCH, None, None))
    self._steps = {}
    for dtype in (np.float16, np.float32):
      self._steps[np.dtype(dtype)] = jax.jit(
          functools.partial(embed_step, self.graphdef, out_dtype=dtype),
          in_shardings=(replicated, rows, rows, rows), out_shardings=out)

  @property
  def dim(self) -> int:
    """Width of the token vectors."""
    return int(self.state["linear_hd"].shape[-1])

  @classmethod
  def from_model(cls, model: ColBERT, tokenizer, mesh: Mesh | None = None,
                 **options) -> "MultiVectorEncoder":
    """Wraps a model; `options` are the dataclass fields after `mesh`."""
    mesh = sharding.make_mesh() if mesh is None else mesh
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
    return cls(graphdef=graphdef, state=state, tokenizer=tokenizer, mesh=mesh,
               **options)

  @classmethod
  def from_pretrained(cls, name_or_path: str, mesh: Mesh | None = None, *,
                      dim: int = 128, rngs: nnx.Rngs,
                      projection_init: str = "bert", dtype: str = "float32",
                      **options) -> "MultiVectorEncoder":
    """A pretrained encoder (e.g. "all-MiniLM-L6-v2") plus a new projection.

    The projection starts at random (`projection_init`, default "bert":
    normal with the checkpoint's initializer_range), so the result needs
    training before its scores mean anything.

    Args:
      name_or_path: packaged model name or checkpoint directory.
      mesh: device mesh; all devices on the data axis when None.
      dim: token-vector width.
      rngs: draws the projection's initial values.
      projection_init: see `PROJECTION_INITS`.
      dtype: compute dtype of the encoder, "float32" or "bfloat16".
      **options: query_maxlen, doc_maxlen, augment, mask_punctuation.
    """
    loaded = pretrained.load_pretrained(name_or_path, dtype=jnp.dtype(dtype))
    model = ColBERT(loaded.model, dim, rngs=rngs,
                    projection_init=projection_init)
    tokenizer = tokenizers.WordPieceTokenizer.from_pretrained_dir(
        loaded.model_dir)
    return cls.from_model(model, tokenizer, mesh, **options)

  def _embed(self, rows, pad, *, width_cap, batch_size, pad_multiple, dtype,
             desc, progress) -> tuple[np.ndarray, np.ndarray]:
    """Embeds tokenised rows longest first; see `embed_docs`."""
    n = len(rows)
    if not n:
      raise ValueError(f"{desc}: nothing to encode (0 texts)")
    dtype = np.dtype(dtype)
    if dtype not in self._steps:
      raise ValueError(f"dtype={dtype}: expected float16 or float32")
    shards = sharding.data_size(self.mesh)
    batch_size = -(-batch_size // shards) * shards
    lengths = np.fromiter(map(len, rows), np.int64, count=n)
    # Longest first, so the largest shapes (and any memory error) come first.
    order = np.argsort(-lengths, kind="stable")
    width_n = int(lengths.max()) if width_cap is None else width_cap
    emb_nld = np.zeros((n, width_n, self.dim), dtype)
    mask_nl = np.zeros((n, width_n), np.int32)
    bar = tqdm.tqdm(total=n, desc=desc, unit="text", disable=not progress,
                    mininterval=1.0)
    start_time, pending = time.perf_counter(), None

    def finish(batch_rows, score_bl, out_bld):
      out_bld = np.asarray(out_bld)  # Waits for this batch only.
      w = min(out_bld.shape[1], width_n)
      emb_nld[batch_rows, :w] = out_bld[:len(batch_rows), :w]
      mask_nl[batch_rows, :w] = score_bl[:len(batch_rows), :w]
      bar.update(len(batch_rows))

    for start in range(0, n, batch_size):
      batch_rows = order[start:start + batch_size]
      # The last batch is filled with empty rows so every step has the same
      # batch size (one compile per padded width only).
      padded = [rows[i] for i in batch_rows]
      padded += [[]] * (batch_size - len(batch_rows))
      ids_bl, attention_bl, score_bl = pad(padded, pad_multiple)
      out_bld = self._steps[dtype](self.state, ids_bl, attention_bl, score_bl)
      # Dispatch is asynchronous: the devices run this batch while the host
      # stores the previous one.
      if pending is not None:
        finish(*pending)
      pending = (batch_rows, score_bl, out_bld)
    finish(*pending)
    bar.close()
    elapsed = time.perf_counter() - start_time
    logging.info("%s: %d texts in %.1f s (%.1f texts/s)", desc, n, elapsed,
                 n / max(elapsed, 1e-9))
    return emb_nld, mask_nl

  def embed_docs(self, texts: Sequence[str], *, batch_size: int = 32,
                 pad_multiple: int = 16, dtype=np.float16,
                 desc: str = "colbert docs", progress: bool = True
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Embeds a corpus token by token.

    Args:
      texts: N documents.
      batch_size: documents per step; rounded up to a multiple of the data
        axes.
      pad_multiple: each batch's width is rounded up to this (fewer distinct
        shapes, so fewer compiles).
      dtype: storage dtype, float16 (default; see the class docstring) or
        float32.
      desc: progress-bar label.
      progress: show a progress bar.

    Returns:
      emb_nld: [N, Lmax, dim] token vectors in input order, Lmax the longest
        tokenised document; rows outside the score mask are 0.
      score_mask_nl: int32 [N, Lmax], 1 on the rows MaxSim uses.
    """
    rows = doc_rows(self.tokenizer, texts, self.doc_maxlen)

    def pad(batch_rows, multiple):
      width = max(map(len, batch_rows))
      width = min(-(-width // multiple) * multiple, max(self.doc_maxlen, width))
      return pad_docs(self.tokenizer, batch_rows, width=width,
                      mask_punctuation=self.mask_punctuation)

    return self._embed(rows, pad, width_cap=None, batch_size=batch_size,
                       pad_multiple=pad_multiple, dtype=dtype, desc=desc,
                       progress=progress)

  def embed_queries(self, texts: Sequence[str], *, batch_size: int = 64,
                    dtype=np.float32, desc: str = "colbert queries",
                    progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Embeds queries at the fixed width `query_maxlen`.

    Returns:
      emb_qld: [Q, query_maxlen, dim] token vectors ([MASK] rows included
        when `augment`); rows outside the score mask are 0.
      score_mask_ql: int32 [Q, query_maxlen].
    """
    rows = query_rows(self.tokenizer, texts, self.query_maxlen)

    def pad(batch_rows, multiple):
      del multiple  # Queries always have the width query_maxlen.
      return pad_queries(self.tokenizer, batch_rows, self.query_maxlen,
                         self.augment)

    return self._embed(rows, pad, width_cap=self.query_maxlen,
                       batch_size=batch_size, pad_multiple=1, dtype=dtype,
                       desc=desc, progress=progress)
