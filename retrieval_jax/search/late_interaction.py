r"""Late interaction (MaxSim) scoring, exact re-ranking and a two-stage search.

For query token vectors q_1..q_Lq and document token vectors d_1..d_Ld
(ColBERT, arXiv:2004.12832):

  s(q, d) = Σ_{i : q-mask(i)} max_{j : d-mask(j)} <q_i, d_j>.

Masking conventions:
  * Document rows outside the score mask (padding, punctuation) are replaced
    by `NEG` before the max, i.e. treated as −∞. Multiplying their
    similarities by 0 instead is wrong whenever every real similarity of a
    query row is negative (the max would pick the 0). `NEG` (a quarter of
    the float32 minimum, ~-8.5e37) lies below the similarity of any two
    vectors with norms under 1e18, so the rule also holds for unnormalised
    vectors, where ColBERT's −9999 needs |<q, d>| < 9999.
  * Query rows outside the score mask are dropped from the sum (contribute
    exactly 0), so a query with no scored row scores 0 against everything.
  * A document with no scored row has no maximum (max over an empty set is
    −∞): its score is `NEG` whatever the query, so it ranks below every
    real document and gets zero weight in a softmax over candidates.
  * Masked entries receive zero gradient (`where`, not an additive bias).

`maxsim` and `maxsim_all` are jitted (one compile per shape; inside an
enclosing jit they are inlined). Products are accumulated in float32
(inputs stored as float16/bfloat16 are cast first). `precision` is passed
to the einsum; "exact" re-ranking uses HIGHEST, since GPUs may otherwise
run float32 matmuls in TF32 (10-bit mantissa).

Two-stage retrieval: a cheap first stage (BM25, learned sparse) proposes K
candidates per query and MaxSim re-scores a prefix of them (`two_stage`):
  * depth: only the first `depth` candidates in first-stage order are
    re-scored; the rest follow them in first-stage order;
  * prune_ratio: before re-scoring, candidates whose first-stage score is
    below prune_ratio × (the query's top first-stage score) are pruned:
    removed from the ranking (`drop_pruned=True`) or kept below the
    re-ranked head in first-stage order.
`TwoStageResult.num_maxsim` counts the query–document MaxSim evaluations
done, so the pipeline can report its cost.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from retrieval_jax.losses.contrastive import NEG

HIGHEST = jax.lax.Precision.HIGHEST


def _reduce(sim_bnql: jax.Array, q_mask_bnq: jax.Array,
            d_mask_bnl: jax.Array) -> jax.Array:
  """Masked max over document rows, masked sum over query rows.

  Args:
    sim_bnql: [B, N, Lq, Ld] float32 similarities.
    q_mask_bnq: [B or 1, N or 1, Lq] query score mask.
    d_mask_bnl: [B or 1, N or 1, Ld] document score mask.

  Returns:
    float32 [B, N] scores (conventions in the module docstring).
  """
  d_ok_bnl = d_mask_bnl.astype(bool)
  row_max_bnq = jnp.max(jnp.where(d_ok_bnl[:, :, None, :], sim_bnql, NEG),
                        axis=-1)
  has_doc_bn = jnp.any(d_ok_bnl, axis=-1)
  # Zero the rows of empty documents too, so the sum cannot overflow
  # (L_q × NEG is -inf) before `where` replaces it.
  keep_bnq = q_mask_bnq.astype(bool) & has_doc_bn[:, :, None]
  scores_bn = jnp.sum(jnp.where(keep_bnq, row_max_bnq, 0.0), axis=-1)
  return jnp.where(has_doc_bn, scores_bn, NEG)


@functools.partial(jax.jit, static_argnames=("precision",))
def maxsim(q_bqd: jax.Array, q_mask_bq: jax.Array, d_bnld: jax.Array,
           d_mask_bnl: jax.Array, *, precision=None) -> jax.Array:
  """MaxSim of each query against its own N candidate documents.

  Args:
    q_bqd: [B, Lq, D] query token vectors, any float dtype.
    q_mask_bq: [B, Lq] bool/int, rows that enter the sum.
    d_bnld: [B, N, Ld, D] candidate document token vectors.
    d_mask_bnl: [B, N, Ld] bool/int, rows that may be the max.
    precision: einsum precision (None: the backend default).

  Returns:
    float32 [B, N] scores; `NEG` for documents with no scored row.
  """
  sim_bnql = jnp.einsum("bqd,bnld->bnql", q_bqd.astype(jnp.float32),
                        d_bnld.astype(jnp.float32), precision=precision)
  return _reduce(sim_bnql, q_mask_bq[:, None, :], d_mask_bnl)


@functools.partial(jax.jit, static_argnames=("chunk_size", "precision"))
def maxsim_all(q_bqd: jax.Array, q_mask_bq: jax.Array, d_nld: jax.Array,
               d_mask_nl: jax.Array, *, chunk_size: int | None = None,
               precision=None) -> jax.Array:
  """MaxSim of every query against every document (in-batch training).

  Args:
    q_bqd: [B, Lq, D] query token vectors.
    q_mask_bq: [B, Lq] query score mask.
    d_nld: [N, Ld, D] document token vectors.
    d_mask_nl: [N, Ld] document score mask.
    chunk_size: score this many documents at a time (None: all at once).
      The [B, N, Lq, Ld] similarity tensor is the memory peak; chunking
      bounds it by [B, chunk, Lq, Ld], and each chunk is rematerialised in
      the backward pass, so gradients do not store it either.
    precision: einsum precision.

  Returns:
    float32 [B, N] scores.
  """
  q_bqd = q_bqd.astype(jnp.float32)

  def score_chunk(d_cld, d_mask_cl):
    sim_bcql = jnp.einsum("bqd,cld->bcql", q_bqd, d_cld.astype(jnp.float32),
                          precision=precision)
    return _reduce(sim_bcql, q_mask_bq[:, None, :], d_mask_cl[None])

  if chunk_size is not None and chunk_size < 1:
    raise ValueError(f"chunk_size={chunk_size}: must be positive or None")
  n = d_nld.shape[0]
  if chunk_size is None or chunk_size >= n:
    return score_chunk(d_nld, d_mask_nl)
  num_chunks = -(-n // chunk_size)
  pad = num_chunks * chunk_size - n
  # Padding documents have an all-zero mask (score NEG) and are cut off.
  d_nld = jnp.pad(d_nld, ((0, pad), (0, 0), (0, 0)))
  d_mask_nl = jnp.pad(d_mask_nl, ((0, pad), (0, 0)))
  chunks = (d_nld.reshape(num_chunks, chunk_size, *d_nld.shape[1:]),
            d_mask_nl.reshape(num_chunks, chunk_size, -1))
  scores_mbc = jax.lax.map(
      jax.checkpoint(lambda xs: score_chunk(*xs)), chunks)
  b = q_bqd.shape[0]
  return scores_mbc.transpose(1, 0, 2).reshape(b, -1)[:, :n]


def score_candidates(queries_qld, q_masks_ql, docs_nld, d_masks_nl,
                     candidates_qk, *, batch: int = 16,
                     precision=HIGHEST) -> np.ndarray:
  """MaxSim of each query against its candidates, in candidate order.

  Documents are gathered on the host when `docs_nld` is a NumPy array (a
  corpus too large for device memory) and on the device when it is a
  jax.Array. Queries go through in fixed-size batches (one compile per K).

  Args:
    queries_qld: [Q, Lq, D] query token vectors (float16/32).
    q_masks_ql: [Q, Lq] query score masks.
    docs_nld: [N, Ld, D] corpus token vectors.
    d_masks_nl: [N, Ld] corpus score masks.
    candidates_qk: int [Q, K] corpus indices; -1 marks an empty slot.
    batch: queries per device call.
    precision: einsum precision (HIGHEST: float32 products on every
      backend).

  Returns:
    float32 [Q, K] scores; -inf at empty slots.
  """
  candidates_qk = np.asarray(candidates_qk)
  if candidates_qk.ndim != 2:
    raise ValueError(f"candidates_qk has shape {candidates_qk.shape}; "
                     "expected [Q, K]")
  num_q, k = candidates_qk.shape
  if len(queries_qld) != num_q or len(q_masks_ql) != num_q:
    raise ValueError(f"{len(queries_qld)} queries / {len(q_masks_ql)} masks "
                     f"for {num_q} candidate rows")
  n = docs_nld.shape[0]
  if candidates_qk.size and (candidates_qk.max() >= n or
                             candidates_qk.min() < -1):
    raise ValueError(f"candidates_qk holds indices outside [-1, {n}) "
                     f"(min {candidates_qk.min()}, max {candidates_qk.max()})")
  if batch < 1:
    raise ValueError(f"batch={batch}: must be positive")
  scores_qk = np.full((num_q, k), -np.inf, np.float32)
  if not (candidates_qk >= 0).any():
    return scores_qk
  on_device = isinstance(docs_nld, jax.Array)
  xp = jnp if on_device else np
  queries_qld = np.asarray(queries_qld)
  q_masks_ql = np.asarray(q_masks_ql)
  d_masks_nl = d_masks_nl if on_device else np.asarray(d_masks_nl)
  for lo in range(0, num_q, batch):
    rows = np.arange(lo, min(lo + batch, num_q))
    # Repeat the last query to fill the batch; its extra scores are cut.
    padded = np.concatenate([rows, np.full(batch - len(rows), rows[-1])])
    cand_bk = candidates_qk[padded]
    # Empty slots gather document 0 under an all-zero mask (score NEG),
    # then get -inf below.
    safe_bk = np.maximum(cand_bk, 0)
    d_mask_bkl = xp.take(d_masks_nl, safe_bk, axis=0)
    d_mask_bkl = d_mask_bkl * xp.asarray(cand_bk >= 0)[:, :, None]
    out_bk = maxsim(queries_qld[padded], q_masks_ql[padded],
                    xp.take(docs_nld, safe_bk, axis=0), d_mask_bkl,
                    precision=precision)
    scores_qk[rows] = np.asarray(out_bk)[:len(rows)]
  scores_qk[candidates_qk < 0] = -np.inf
  return scores_qk


def rerank(queries_qld, q_masks_ql, docs_nld, d_masks_nl, candidates_qk, *,
           batch: int = 16, precision=HIGHEST
           ) -> tuple[np.ndarray, np.ndarray]:
  """Re-scores candidate lists with exact MaxSim and sorts them.

  Args:
    queries_qld, q_masks_ql, docs_nld, d_masks_nl, candidates_qk, batch,
      precision: as in `score_candidates`.

  Returns:
    scores_qk: float32 [Q, K] MaxSim scores, sorted descending per row;
      -inf at empty slots.
    indices_qk: int64 [Q, K] the candidates in that order; ties keep their
      input order and empty slots (-1) come last.
  """
  scores_qk = score_candidates(queries_qld, q_masks_ql, docs_nld, d_masks_nl,
                               candidates_qk, batch=batch,
                               precision=precision)
  # Stable: equal scores keep their input order; -inf (empty) sinks last,
  # below NEG (documents with no scored row).
  order_qk = np.argsort(-scores_qk, axis=1, kind="stable")
  indices_qk = np.asarray(candidates_qk).astype(np.int64)
  return (np.take_along_axis(scores_qk, order_qk, axis=1),
          np.take_along_axis(indices_qk, order_qk, axis=1))


@dataclasses.dataclass(frozen=True)
class TwoStageResult:
  """A re-ranked candidate list.

  Attributes:
    indices_qk: int64 [Q, K] final ranking; -1 slots last.
    maxsim_qk: float32 [Q, K] MaxSim score of each entry, -inf for entries
      that were not re-scored.
    first_stage_qk: float32 [Q, K] first-stage score of each entry (-inf at
      -1 slots).
    reranked_qk: bool [Q, K] entries that were re-scored (a prefix of each
      row).
    num_maxsim: query–document MaxSim evaluations performed.
  """
  indices_qk: np.ndarray
  maxsim_qk: np.ndarray
  first_stage_qk: np.ndarray
  reranked_qk: np.ndarray
  num_maxsim: int

  def run_scores(self) -> np.ndarray:
    """float32 [Q, K] scores that decrease along each row (K - rank).

    MaxSim and first-stage scores are not comparable, so a run file (whose
    order trec_eval re-derives from the scores) gets the rank instead;
    -1 slots get -inf.
    """
    k = self.indices_qk.shape[1]
    ranks_qk = np.broadcast_to(np.arange(k, 0, -1, dtype=np.float32),
                               self.indices_qk.shape).copy()
    ranks_qk[self.indices_qk < 0] = -np.inf
    return ranks_qk


@dataclasses.dataclass
class _Rows:
  """Per-slot arrays [Q, K] that move together when a row is reordered."""
  first_stage: np.ndarray
  indices: np.ndarray
  kept: np.ndarray
  maxsim: np.ndarray
  reranked: np.ndarray

  def permute(self, order_qk: np.ndarray) -> "_Rows":
    return _Rows(*(np.take_along_axis(getattr(self, f.name), order_qk, axis=1)
                   for f in dataclasses.fields(self)))


def two_stage(first_stage_scores_qk, first_stage_indices_qk, queries_qld,
              q_masks_ql, docs_nld, d_masks_nl, *, depth: int | None = None,
              prune_ratio: float | None = None, drop_pruned: bool = True,
              batch: int = 16, precision=HIGHEST) -> TwoStageResult:
  """First-stage candidates, MaxSim re-ranking of their head.

  Each row is first put in first-stage order (score descending, ties by
  position, -1 slots last). Then:
    1. prune (optional): with t = the row's top score > 0, candidates with
       score < prune_ratio × t are pruned (a relative cut needs a positive
       scale, so rows whose top score is <= 0 keep everything). The top
       candidate is never pruned.
    2. the first `depth` surviving candidates are re-scored with MaxSim
       and sorted by it (ties by first-stage order);
    3. the other survivors follow in first-stage order; pruned candidates
       then follow too (`drop_pruned=False`) or are removed (-1).
  depth=None re-ranks every surviving candidate; depth=0 returns the first
  stage unchanged (and pruned).

  Args:
    first_stage_scores_qk: float [Q, K] first-stage scores.
    first_stage_indices_qk: int [Q, K] corpus indices, -1 for empty slots.
    queries_qld, q_masks_ql, docs_nld, d_masks_nl: as in `rerank`.
    depth: candidates re-scored per query (>= 0), None for all.
    prune_ratio: in [0, 1], or None for no pruning.
    drop_pruned: remove pruned candidates (True) or keep them at the end.
    batch: queries per device call.
    precision: einsum precision.

  Returns:
    A TwoStageResult; `num_maxsim` = number of re-scored (query, document)
    pairs (fixed-shape padding slots computed on the device not counted).
  """
  scores_qk = np.asarray(first_stage_scores_qk, np.float32)
  indices_qk = np.asarray(first_stage_indices_qk).astype(np.int64)
  if scores_qk.shape != indices_qk.shape or scores_qk.ndim != 2:
    raise ValueError(f"first-stage scores {scores_qk.shape} and indices "
                     f"{indices_qk.shape} must both be [Q, K]")
  if depth is not None and (isinstance(depth, bool) or
                            not isinstance(depth, (int, np.integer)) or
                            depth < 0):
    raise ValueError(f"depth={depth!r}: expected None or an int >= 0")
  if prune_ratio is not None and not 0.0 <= prune_ratio <= 1.0:
    raise ValueError(f"prune_ratio={prune_ratio!r}: expected None or a "
                     "value in [0, 1]")
  num_q, k = indices_qk.shape
  depth = k if depth is None else min(int(depth), k)

  # First-stage order; -1 slots sink last whatever score they carry.
  valid_qk = indices_qk >= 0
  scores_qk = np.where(valid_qk, scores_qk, -np.inf).astype(np.float32)
  order_qk = np.lexsort((-scores_qk, ~valid_qk), axis=1)
  scores_qk = np.take_along_axis(scores_qk, order_qk, axis=1)
  indices_qk = np.take_along_axis(indices_qk, order_qk, axis=1)
  valid_qk = indices_qk >= 0

  kept_qk = valid_qk.copy()
  if prune_ratio is not None and k:
    top_q1 = scores_qk[:, :1]
    cut_qk = (top_q1 > 0) & (scores_qk < prune_ratio * top_q1)
    cut_qk[:, 0] = False
    kept_qk &= ~cut_qk
  # Survivors keep first-stage order; pruned ones move behind them (stable).
  rows = _Rows(scores_qk, indices_qk, kept_qk,
               np.full((num_q, k), -np.inf, np.float32),
               np.zeros((num_q, k), bool))
  rows = rows.permute(np.argsort(~kept_qk, axis=1, kind="stable"))

  # The re-ranked head: the first `depth` survivors.
  head_qd = np.where(rows.kept[:, :depth], rows.indices[:, :depth], -1)
  if depth:
    rows.maxsim[:, :depth] = score_candidates(
        queries_qld, q_masks_ql, docs_nld, d_masks_nl, head_qd, batch=batch,
        precision=precision)
    rows.reranked[:, :depth] = head_qd >= 0
    # Sort the head by MaxSim (stable: ties and unscored slots keep their
    # first-stage order); the tail stays where it is.
    head_order_qd = np.argsort(-rows.maxsim[:, :depth], axis=1, kind="stable")
    tail_qt = np.broadcast_to(np.arange(depth, k), (num_q, k - depth))
    rows = rows.permute(np.concatenate([head_order_qd, tail_qt], axis=1))
  indices_qk = rows.indices
  if drop_pruned:
    indices_qk = np.where(rows.kept, indices_qk, -1)
  # Empty slots and dropped entries go last.
  rows = dataclasses.replace(rows, indices=indices_qk).permute(
      np.argsort(indices_qk < 0, axis=1, kind="stable"))
  valid_qk = rows.indices >= 0
  return TwoStageResult(
      indices_qk=rows.indices,
      maxsim_qk=np.where(valid_qk, rows.maxsim, -np.inf).astype(np.float32),
      first_stage_qk=np.where(valid_qk, rows.first_stage,
                              -np.inf).astype(np.float32),
      reranked_qk=rows.reranked & valid_qk,
      num_maxsim=int(rows.reranked.sum()))

