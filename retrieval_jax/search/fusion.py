"""Fusion of two or more retrieval runs: score interpolation and RRF.

Runs are {query id: {doc id: score}} dicts (`evaluation.trec_run`); inputs are
never modified. Each output query lists its documents in trec_eval's order
(`trec_order`), so "top k" is the top k trec_eval evaluates; queries appear
in first-seen order. `interpolate` is the dense + sparse hybrid (per-query
normalisation, missing documents filled with the list's minimum, weighted
sum); `reciprocal_rank_fusion` is Cormack et al., SIGIR 2009.
"""

from collections.abc import Mapping, Sequence
import math

import numpy as np

from retrieval_jax.search import trec_order

Run = Mapping[str, Mapping[str, float]]

NORMALIZATIONS = ("none", "minmax_center", "zscore")


def _check_normalization(method: str) -> None:
  if method not in NORMALIZATIONS:
    raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got "
                     f"{method!r}")


def normalize_scores(scores: Mapping[str, float],
                     method: str) -> dict[str, float]:
  """Normalises one query's scores.

  "none" keeps the scores; "minmax_center" maps to [-1/2, 1/2] by
  (x - (min + max) / 2) / (max - min); "zscore" uses the population std.
  Constant lists map to 0. Both are increasing affine maps, so filling a
  missing document before or after normalising gives the same ranking.

  Args:
    scores: {doc id: score}; may be empty.
    method: one of `NORMALIZATIONS`.

  Returns:
    {doc id: normalised score}, in the input's iteration order.

  Raises:
    ValueError: unknown method.
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
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or (
      value < 1):
    raise ValueError(f"{name} must be a positive int, got {value!r}")


def _query_order(runs: Sequence[Run]) -> list[str]:
  """Query ids in first-seen order over the runs."""
  return list(dict.fromkeys(qid for run in runs for qid in run))


def interpolate(dense_run: Run,
                sparse_run: Run,
                *,
                alpha: float = 0.1,
                normalization: str = "none",
                weight_on_dense: bool = False,
                k: int = 1000) -> dict[str, dict[str, float]]:
  """Hybrid run: per-query linear interpolation of dense and sparse scores.

  Each list is normalised, the union scored with missing documents at the
  list's minimum, and score = alpha * sparse + dense (or sparse + alpha *
  dense with `weight_on_dense`). A query in only one run keeps its ranking.

  Args:
    dense_run: {query id: {doc id: score}} of the dense system.
    sparse_run: {query id: {doc id: score}} of the sparse system.
    alpha: weight of the sparse scores (of the dense ones with
      `weight_on_dense`).
    normalization: "none", "minmax_center" or "zscore" (`normalize_scores`),
      applied to each system's list per query before filling and mixing.
    weight_on_dense: put alpha on the dense instead of the sparse scores.
    k: documents kept per query, >= 1.

  Returns:
    {query id: {doc id: fused score}}, each query's top k in trec_eval's
    order.

  Raises:
    ValueError: unknown normalization, or k < 1.
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
          doc: (w_sparse * sparse.get(doc, sparse_min) +
                w_dense * dense.get(doc, dense_min))
          for doc in dict.fromkeys([*dense, *sparse])
      }
    elif dense:
      scores = {doc: w_dense * s for doc, s in dense.items()}
    else:
      scores = {doc: w_sparse * s for doc, s in sparse.items()}
    fused[qid] = dict(trec_order.trec_eval_sorted(scores, k))
  return fused


def reciprocal_rank_fusion(runs: Sequence[Run],
                           *,
                           k: int = 60,
                           depth: int = 1000) -> dict[str, dict[str, float]]:
  """Reciprocal rank fusion: score(d) = sum_sys 1 / (k + rank_sys(d)).

  Ranks start at 1 in trec_eval's order, over each list's first `depth`
  documents. `math.fsum` makes equal rank multisets bit-identical whatever
  the system order. Nothing is cut: use `ir_metrics.truncate_run`.

  Args:
    runs: one or more {query id: {doc id: score}} runs.
    k: the RRF constant, an int >= 0 (60 in the original paper).
    depth: documents of each system's list used per query, >= 1.

  Returns:
    {query id: {doc id: RRF score}} in trec_eval's order; a query present in
    any run appears.

  Raises:
    ValueError: no runs, k < 0 or depth < 1.
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
