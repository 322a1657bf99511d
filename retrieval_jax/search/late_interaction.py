r"""Late interaction (MaxSim) scoring, exact re-ranking and a two-stage search.

s(q, d) = Σ_{scored i} max_{scored j} <q_i, d_j> (ColBERT, arXiv:2004.12832).
Unscored document rows become `NEG` before the max (multiplying by 0 would
pick 0 when every real similarity is negative; NEG ≈ -8.5e37 also holds for
unnormalised vectors, unlike ColBERT's −9999). Unscored query rows add 0; a
document with no scored row scores `NEG`. Masks use `where` (zero gradient
for masked entries); products accumulate in float32.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from retrieval_jax.losses.contrastive import NEG

HIGHEST = jax.lax.Precision.HIGHEST


def _reduce(
    sim_bnql: jax.Array, q_mask_bnq: jax.Array, d_mask_bnl: jax.Array
) -> jax.Array:
  """[B, N, Lq, Ld] sims, masks [B|1, N|1, L] -> float32 [B, N] scores."""
  d_ok_bnl = d_mask_bnl.astype(bool)
  row_max_bnq = jnp.max(
      jnp.where(d_ok_bnl[:, :, None, :], sim_bnql, NEG), axis=-1
  )
  has_doc_bn = jnp.any(d_ok_bnl, axis=-1)
  # Empty documents' rows are zeroed too: L_q × NEG would overflow to -inf.
  keep_bnq = q_mask_bnq.astype(bool) & has_doc_bn[:, :, None]
  scores_bn = jnp.sum(jnp.where(keep_bnq, row_max_bnq, 0.0), axis=-1)
  return jnp.where(has_doc_bn, scores_bn, NEG)


@functools.partial(jax.jit, static_argnames=("precision",))
def maxsim(
    q_bqd: jax.Array,
    q_mask_bq: jax.Array,
    d_bnld: jax.Array,
    d_mask_bnl: jax.Array,
    *,
    precision=None,
) -> jax.Array:
  """float32 [B, N] MaxSim of each query against its own N candidates.

  q_bqd [B, Lq, D], d_bnld [B, N, Ld, D] of any float dtype; masks bool/int.
  """
  sim_bnql = jnp.einsum(
      "bqd,bnld->bnql",
      q_bqd.astype(jnp.float32),
      d_bnld.astype(jnp.float32),
      precision=precision,
  )
  return _reduce(sim_bnql, q_mask_bq[:, None, :], d_mask_bnl)


@functools.partial(jax.jit, static_argnames=("chunk_size", "precision"))
def maxsim_all(
    q_bqd: jax.Array,
    q_mask_bq: jax.Array,
    d_nld: jax.Array,
    d_mask_nl: jax.Array,
    *,
    chunk_size: int | None = None,
    precision=None,
) -> jax.Array:
  """float32 [B, N] MaxSim of every query against every document (in-batch).

  d_nld: [N, Ld, D]. `chunk_size` documents at a time bound the [B, N, Lq, Ld]
  peak; chunks are rematerialised in the backward pass.
  """
  q_bqd = q_bqd.astype(jnp.float32)

  def score_chunk(d_cld, d_mask_cl):
    sim_bcql = jnp.einsum(
        "bqd,cld->bcql", q_bqd, d_cld.astype(jnp.float32), precision=precision
    )
    return _reduce(sim_bcql, q_mask_bq[:, None, :], d_mask_cl[None])

  if chunk_size is not None and chunk_size < 1:
    raise ValueError(f"chunk_size={chunk_size}: must be positive or None")
  n = d_nld.shape[0]
  if chunk_size is None or chunk_size >= n:
    return score_chunk(d_nld, d_mask_nl)
  num_chunks = -(-n // chunk_size)
  pad = num_chunks * chunk_size - n  # all-zero masks, cut off below
  d_nld = jnp.pad(d_nld, ((0, pad), (0, 0), (0, 0)))
  d_mask_nl = jnp.pad(d_mask_nl, ((0, pad), (0, 0)))
  chunks = (
      d_nld.reshape(num_chunks, chunk_size, *d_nld.shape[1:]),
      d_mask_nl.reshape(num_chunks, chunk_size, -1),
  )
  scores_mbc = jax.lax.map(jax.checkpoint(lambda xs: score_chunk(*xs)), chunks)
  b = q_bqd.shape[0]
  return scores_mbc.transpose(1, 0, 2).reshape(b, -1)[:, :n]


def score_candidates(
    queries_qld,
    q_masks_ql,
    docs_nld,
    d_masks_nl,
    candidates_qk,
    *,
    batch: int = 16,
    precision=HIGHEST,
) -> np.ndarray:
  """float32 [Q, K] MaxSim against int candidates_qk [Q, K] (-1 empty: -inf).

  Docs are gathered on the host for a NumPy `docs_nld` (a corpus too large for
  the device), else on the device; `batch` queries per fixed-shape call.
  HIGHEST: float32 products on every backend (GPUs may otherwise use TF32).
  """
  candidates_qk = np.asarray(candidates_qk)
  if candidates_qk.ndim != 2:
    raise ValueError(
        f"candidates_qk has shape {candidates_qk.shape}; expected [Q, K]"
    )
  num_q, k = candidates_qk.shape
  if len(queries_qld) != num_q or len(q_masks_ql) != num_q:
    raise ValueError(
        f"{len(queries_qld)} queries / {len(q_masks_ql)} masks "
        f"for {num_q} candidate rows"
    )
  n = docs_nld.shape[0]
  if candidates_qk.size and (
      candidates_qk.max() >= n or candidates_qk.min() < -1
  ):
    raise ValueError(
        f"candidates_qk holds indices outside [-1, {n}) "
        f"(min {candidates_qk.min()}, max {candidates_qk.max()})"
    )
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
    safe_bk = np.maximum(cand_bk, 0)  # empty slots: doc 0, all-zero mask
    d_mask_bkl = xp.take(d_masks_nl, safe_bk, axis=0)
    d_mask_bkl = d_mask_bkl * xp.asarray(cand_bk >= 0)[:, :, None]
    out_bk = maxsim(
        queries_qld[padded],
        q_masks_ql[padded],
        xp.take(docs_nld, safe_bk, axis=0),
        d_mask_bkl,
        precision=precision,
    )
    scores_qk[rows] = np.asarray(out_bk)[: len(rows)]
  scores_qk[candidates_qk < 0] = -np.inf
  return scores_qk


def rerank(
    queries_qld,
    q_masks_ql,
    docs_nld,
    d_masks_nl,
    candidates_qk,
    *,
    batch: int = 16,
    precision=HIGHEST,
) -> tuple[np.ndarray, np.ndarray]:
  """`score_candidates`, sorted: (scores_qk float32, indices_qk int64) [Q, K].

  Ties keep input order; empty slots (-1, -inf) come last.
  """
  scores_qk = score_candidates(
      queries_qld,
      q_masks_ql,
      docs_nld,
      d_masks_nl,
      candidates_qk,
      batch=batch,
      precision=precision,
  )
  # Stable; -inf (empty) sinks below NEG (documents with no scored row).
  order_qk = np.argsort(-scores_qk, axis=1, kind="stable")
  indices_qk = np.asarray(candidates_qk).astype(np.int64)
  return (
      np.take_along_axis(scores_qk, order_qk, axis=1),
      np.take_along_axis(indices_qk, order_qk, axis=1),
  )


@dataclasses.dataclass(frozen=True)
class TwoStageResult:
  """A re-ranked candidate list, arrays [Q, K] with -1 slots last.

  maxsim_qk / first_stage_qk: float32, -inf where not re-scored / at -1;
  reranked_qk: re-scored entries (a row prefix); num_maxsim: their count.
  """

  indices_qk: np.ndarray
  maxsim_qk: np.ndarray
  first_stage_qk: np.ndarray
  reranked_qk: np.ndarray
  num_maxsim: int

  def run_scores(self) -> np.ndarray:
    """float32 [Q, K] K - rank (-inf at -1): the two stages' scores differ."""
    k = self.indices_qk.shape[1]
    ranks_qk = np.broadcast_to(
        np.arange(k, 0, -1, dtype=np.float32), self.indices_qk.shape
    ).copy()
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
    return _Rows(*(
        np.take_along_axis(getattr(self, f.name), order_qk, axis=1)
        for f in dataclasses.fields(self)
    ))


def two_stage(
    first_stage_scores_qk,
    first_stage_indices_qk,
    queries_qld,
    q_masks_ql,
    docs_nld,
    d_masks_nl,
    *,
    depth: int | None = None,
    prune_ratio: float | None = None,
    drop_pruned: bool = True,
    batch: int = 16,
    precision=HIGHEST,
) -> TwoStageResult:
  """MaxSim re-ranking of the head of [Q, K] first-stage candidates (-1 empty).

  Rows go in first-stage order (ties by position, -1 last). Candidates below
  prune_ratio × the row's top score (when it is > 0) are pruned, never the
  top one; the first `depth` (None: all) survivors are re-scored and sorted by
  MaxSim; the other survivors follow, then the pruned ones (unless
  `drop_pruned`) or -1. Other arguments as in `score_candidates`.
  """
  scores_qk = np.asarray(first_stage_scores_qk, np.float32)
  indices_qk = np.asarray(first_stage_indices_qk).astype(np.int64)
  if scores_qk.shape != indices_qk.shape or scores_qk.ndim != 2:
    raise ValueError(
        f"first-stage scores {scores_qk.shape} and indices "
        f"{indices_qk.shape} must both be [Q, K]"
    )
  if depth is not None and (
      isinstance(depth, bool)
      or not isinstance(depth, (int, np.integer))
      or depth < 0
  ):
    raise ValueError(f"depth={depth!r}: expected None or an int >= 0")
  if prune_ratio is not None and not 0.0 <= prune_ratio <= 1.0:
    raise ValueError(
        f"prune_ratio={prune_ratio!r}: expected None or a value in [0, 1]"
    )
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
  rows = _Rows(
      scores_qk,
      indices_qk,
      kept_qk,
      np.full((num_q, k), -np.inf, np.float32),
      np.zeros((num_q, k), bool),
  )
  rows = rows.permute(np.argsort(~kept_qk, axis=1, kind="stable"))

  # The re-ranked head: the first `depth` survivors.
  head_qd = np.where(rows.kept[:, :depth], rows.indices[:, :depth], -1)
  if depth:
    rows.maxsim[:, :depth] = score_candidates(
        queries_qld,
        q_masks_ql,
        docs_nld,
        d_masks_nl,
        head_qd,
        batch=batch,
        precision=precision,
    )
    rows.reranked[:, :depth] = head_qd >= 0
    # Stable: ties and unscored slots keep their first-stage order.
    head_order_qd = np.argsort(-rows.maxsim[:, :depth], axis=1, kind="stable")
    tail_qt = np.broadcast_to(np.arange(depth, k), (num_q, k - depth))
    rows = rows.permute(np.concatenate([head_order_qd, tail_qt], axis=1))
  indices_qk = rows.indices
  if drop_pruned:
    indices_qk = np.where(rows.kept, indices_qk, -1)
  rows = dataclasses.replace(rows, indices=indices_qk).permute(  # -1 last
      np.argsort(indices_qk < 0, axis=1, kind="stable")
  )
  valid_qk = rows.indices >= 0
  return TwoStageResult(
      indices_qk=rows.indices,
      maxsim_qk=np.where(valid_qk, rows.maxsim, -np.inf).astype(np.float32),
      first_stage_qk=np.where(valid_qk, rows.first_stage, -np.inf).astype(
          np.float32
      ),
      reranked_qk=rows.reranked & valid_qk,
      num_maxsim=int(rows.reranked.sum()),
  )
