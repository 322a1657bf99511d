"""Fusion of two or more retrieval runs: score interpolation and RRF.

Runs are {qid: {doc id: score}} (`evaluation.trec_run`), never modified. Output
queries come in first-seen order, docs in trec_eval's order (`trec_order`).
RRF: Cormack et al., SIGIR 2009.
"""

from collections.abc import Mapping, Sequence
import math

import numpy as np

from retrieval_jax.search import trec_order

Run = Mapping[str, Mapping[str, float]]

NORMALIZATIONS = ("none", "minmax_center", "zscore")


def _check_normalization(method: str) -> None:
  if method not in NORMALIZATIONS:
    raise ValueError(
        f"normalization must be one of {NORMALIZATIONS}, got {method!r}"
    )


def normalize_scores(
    scores: Mapping[str, float], method: str
) -> dict[str, float]:
  """Normalises one query's {doc id: score} by `method`, keeping the order.

  "minmax_center": (x - (min + max) / 2) / (max - min), in [-1/2, 1/2];
  "zscore": population std; constant lists map to 0. Increasing affine maps,
  so filling missing docs before or after normalising ranks the same.
  """
  _check_normalization(method)
  ids = list(scores)
  x = np.fromiter((scores[d] for d in ids), np.float64, len(ids))
  if method == "none" or not ids:
    out = x
  elif method == "minmax_center":
    lo, hi = x.min(), x.max()
    out = (x - (lo + hi) / 2) / (hi - lo) if hi > lo else np.zeros_like(x)
  else:
    std = x.std()
    out = (x - x.mean()) / std if std > 0 else np.zeros_like(x)
  return dict(zip(ids, out.tolist()))


def _check_positive(name: str, value: int) -> None:
  if (
      isinstance(value, bool)
      or not isinstance(value, (int, np.integer))
      or (value < 1)
  ):
    raise ValueError(f"{name} must be a positive int, got {value!r}")


def _query_order(runs: Sequence[Run]) -> list[str]:
  return list(dict.fromkeys(qid for run in runs for qid in run))


def interpolate(
    dense_run: Run,
    sparse_run: Run,
    *,
    alpha: float = 0.1,
    normalization: str = "none",
    weight_on_dense: bool = False,
    k: int = 1000,
) -> dict[str, dict[str, float]]:
  """Per-query alpha * sparse + dense (alpha on dense with `weight_on_dense`).

  Each list is normalised, missing docs take the list's minimum; a query in one
  run keeps its ranking. Returns each query's top k in trec_eval's order.
  """
  _check_normalization(normalization)
  _check_positive("k", k)
  w_dense, w_sparse = (alpha, 1.0) if weight_on_dense else (1.0, alpha)
  fused = {}
  for qid in _query_order([dense_run, sparse_run]):
    dense = normalize_scores(dense_run.get(qid, {}), normalization)
    sparse = normalize_scores(sparse_run.get(qid, {}), normalization)
    if dense and sparse:
      dense_min, sparse_min = min(dense.values()), min(sparse.values())
      scores = {
          doc: (
              w_sparse * sparse.get(doc, sparse_min)
              + w_dense * dense.get(doc, dense_min)
          )
          for doc in dict.fromkeys([*dense, *sparse])
      }
    elif dense:
      scores = {doc: w_dense * s for doc, s in dense.items()}
    else:
      scores = {doc: w_sparse * s for doc, s in sparse.items()}
    fused[qid] = dict(trec_order.trec_eval_sorted(scores, k))
  return fused


def reciprocal_rank_fusion(
    runs: Sequence[Run], *, k: int = 60, depth: int = 1000
) -> dict[str, dict[str, float]]:
  """RRF: score(d) = sum_sys 1 / (k + rank_sys(d)), k = 60 in the paper.

  Ranks start at 1 in trec_eval's order over each list's first `depth` docs.
  `math.fsum` makes equal rank multisets bit-identical in any system order.
  Nothing is cut: use `ir_metrics.truncate_run`.
  """
  if not runs:
    raise ValueError("runs must hold at least one run, got none")
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
    raise ValueError(f"k must be an int >= 0, got {k!r}")
  _check_positive("depth", depth)
  fused = {}
  for qid in _query_order(runs):
    terms: dict[str, list[float]] = {}
    for run in runs:
      ranked = trec_order.trec_eval_sorted(run.get(qid, {}), depth)
      for rank, (doc, _) in enumerate(ranked, start=1):
        terms.setdefault(doc, []).append(1.0 / (k + rank))
    scores = {doc: math.fsum(t) for doc, t in terms.items()}
    fused[qid] = dict(trec_order.trec_eval_sorted(scores))
  return fused
