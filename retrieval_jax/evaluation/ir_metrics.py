"""IR metrics with trec_eval's exact conventions, vectorised over queries.

Values equal trec_eval / pytrec_eval's up to summation order; documents rank
in `trec_order`. Unjudged = gain 0; negative labels are judged non-relevant
and not in R. nDCG: linear gains, 1/log2(rank + 1), ideal DCG from all
positive qrels. p@k divides by k; recall / map by R (0 when R = 0); mrr@k is
`recip_rank` on `truncate_run`'s run. Queries: those in the run with
non-empty qrels. Only judged documents are ranked (1 + #above + #tied with a
larger id), so the run is never sorted.
"""

from collections.abc import Mapping, Sequence
import bisect
import dataclasses
import itertools
import re

import numpy as np

from retrieval_jax.search import trec_order

DEFAULT_MEASURES = (
    "ndcg@10",
    "recall@10",
    "recall@100",
    "mrr@10",
    "map",
    "p@10",
)

_OPTIONAL_CUT = ("ndcg", "mrr", "map")  # recall and p need a cut-off
_MEASURE_RE = re.compile(r"^(ndcg|recall|mrr|map|p)(?:@([0-9]+))?$")
_ACCEPTED_FORMS = (
    "'ndcg', 'ndcg@K', 'recall@K', 'mrr', 'mrr@K', 'map', "
    "'map@K', 'p@K' (K a positive integer)"
)
DocScores = trec_order.DocScores
trec_eval_sorted = trec_order.trec_eval_sorted
# Elements of one [chunk, K] comparison block: ~16 MB of float32 scores.
_COMPARE_BLOCK = 1 << 22


@dataclasses.dataclass(frozen=True)
class Measure:
  """A parsed measure: family ("ndcg", "recall", ...) and k (None: uncut)."""

  family: str
  k: int | None


def parse_measure(name: str) -> Measure:
  """The Measure of a name such as "ndcg@10" (case-insensitive)."""
  match = _MEASURE_RE.match(name.strip().lower())
  if match is not None:
    family, k = match.group(1), match.group(2)
    k = None if k is None else int(k)
    if (k is None and family in _OPTIONAL_CUT) or (k is not None and k >= 1):
      return Measure(family, k)
  raise ValueError(
      f"Unknown measure {name!r}; accepted forms: {_ACCEPTED_FORMS}."
  )


def to_pytrec_eval_name(name: str) -> str:
  """pytrec_eval's key of a name: "ndcg@10" -> "ndcg_cut_10", "p@10" -> "P_10".

  "mrr" / "mrr@K" -> "recip_rank" (for "mrr@K" give it `truncate_run`'s run).
  """
  measure = parse_measure(name)
  if measure.family == "mrr":
    return "recip_rank"
  base = {"ndcg": "ndcg_cut", "recall": "recall", "map": "map_cut", "p": "P"}[
      measure.family
  ]
  if measure.k is None:
    return measure.family  # "ndcg" or "map"
  return f"{base}_{measure.k}"


def to_pytrec_eval_request(name: str) -> str:
  """pytrec_eval's request string, e.g. "ndcg@10" -> "ndcg_cut.10"."""
  key = to_pytrec_eval_name(name)
  head, _, tail = key.rpartition("_")
  return f"{head}.{tail}" if tail.isdigit() else key


def truncate_run(
    run: Mapping[str, Mapping[str, float]], k: int
) -> dict[str, dict[str, float]]:
  """Cuts every query of a {qid: {doc: score}} run to its top k (`-M k`)."""
  return {qid: dict(trec_eval_sorted(docs, k)) for qid, docs in run.items()}


# Array layer: [Q, K] matrices, column j is rank j + 1, padded with 0 / False.


def _discounts(num_ranks: int) -> np.ndarray:
  return np.log2(np.arange(2, num_ranks + 2, dtype=np.float64))


def dcg_at_k(gains_qk: np.ndarray, k: int | None = None) -> np.ndarray:
  """float64 [Q] DCG, Σ_{r <= k} gain_r / log2(r + 1), of gains_qk [Q, K]."""
  gains_qk = np.asarray(gains_qk, np.float64)[:, :k]
  # Dividing (not multiplying by a reciprocal) mirrors trec_eval's arithmetic.
  return (gains_qk / _discounts(gains_qk.shape[1])).sum(axis=-1)


def ndcg_at_k(
    gains_qk: np.ndarray, ideal_gains_qr: np.ndarray, k: int | None = None
) -> np.ndarray:
  """float64 [Q] nDCG@k = DCG@k / ideal DCG@k, 0 where the ideal is 0.

  ideal_gains_qr [Q, R]: all positive qrels labels, descending, 0-padded.
  """
  dcg_q = dcg_at_k(gains_qk, k)
  ideal_q = dcg_at_k(ideal_gains_qr, k)
  safe_q = np.where(ideal_q > 0, ideal_q, 1.0)
  return np.where(ideal_q > 0, dcg_q / safe_q, 0.0)


def precision_at_k(relevant_qk: np.ndarray, k: int) -> np.ndarray:
  """float64 [Q] P@k = |relevant in the top k| / k (k even if fewer)."""
  return np.asarray(relevant_qk)[:, :k].sum(axis=-1) / float(k)


def recall_at_k(
    relevant_qk: np.ndarray, num_relevant_q: np.ndarray, k: int | None = None
) -> np.ndarray:
  """float64 [Q] recall@k = |relevant in the top k| / R, 0 where R = 0."""
  hits_q = np.asarray(relevant_qk)[:, :k].sum(axis=-1)
  num_relevant_q = np.asarray(num_relevant_q)
  return np.where(
      num_relevant_q > 0, hits_q / np.maximum(num_relevant_q, 1), 0.0
  )


def reciprocal_rank(
    relevant_qk: np.ndarray, k: int | None = None
) -> np.ndarray:
  """float64 [Q] 1 / rank of the first relevant doc in the top k, else 0."""
  relevant_qk = np.asarray(relevant_qk, bool)[:, :k]
  if relevant_qk.shape[1] == 0:
    return np.zeros(relevant_qk.shape[0])
  first_q = relevant_qk.argmax(axis=-1)
  return np.where(relevant_qk.any(axis=-1), 1.0 / (first_q + 1.0), 0.0)


def average_precision(
    relevant_qk: np.ndarray, num_relevant_q: np.ndarray, k: int | None = None
) -> np.ndarray:
  """float64 [Q] AP@k = (1/R) Σ_{relevant r <= k} P@r, 0 where R = 0.

  Relevant documents not in the top k still count in R (trec_eval's).
  """
  relevant_qk = np.asarray(relevant_qk, bool)[:, :k]
  ranks_k = np.arange(1, relevant_qk.shape[1] + 1, dtype=np.float64)
  precision_qk = np.cumsum(relevant_qk, axis=-1) / ranks_k
  sum_q = np.where(relevant_qk, precision_qk, 0.0).sum(axis=-1)
  num_relevant_q = np.asarray(num_relevant_q)
  return np.where(
      num_relevant_q > 0, sum_q / np.maximum(num_relevant_q, 1), 0.0
  )


def ranked_judgments(
    rows_j: np.ndarray,
    ranks_j: np.ndarray,
    labels_j: np.ndarray,
    num_queries: int,
    depth: int,
    relevance_level: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
  """(gains_qk float64, relevant_qk bool) [Q, K = depth] from judgments [J].

  ranks_j: 1-based rank in the run, 0 if not retrieved; gains max(label, 0).
  """
  keep_j = (ranks_j > 0) & (ranks_j <= depth)
  rows_j, cols_j, labels_j = (
      rows_j[keep_j],
      ranks_j[keep_j] - 1,
      labels_j[keep_j],
  )
  gains_qk = np.zeros((num_queries, depth), np.float64)
  relevant_qk = np.zeros((num_queries, depth), bool)
  gains_qk[rows_j, cols_j] = np.maximum(labels_j, 0)
  relevant_qk[rows_j, cols_j] = labels_j >= relevance_level
  return gains_qk, relevant_qk


def ideal_gains(
    rows_j: np.ndarray, labels_j: np.ndarray, num_queries: int
) -> np.ndarray:
  """float64 [Q, R]: each query's positive labels, descending, 0-padded."""
  positive_j = labels_j > 0
  rows_p, labels_p = rows_j[positive_j], labels_j[positive_j]
  counts_q = np.bincount(rows_p, minlength=num_queries)
  ideal_qr = np.zeros((num_queries, max(int(counts_q.max(initial=0)), 1)))
  # Group by row, largest label first; the column is the rank within a row.
  order = np.lexsort((-labels_p, rows_p))
  rows_p, labels_p = rows_p[order], labels_p[order]
  starts_q = np.cumsum(counts_q) - counts_q
  cols_p = np.arange(len(rows_p)) - starts_q[rows_p]
  ideal_qr[rows_p, cols_p] = labels_p
  return ideal_qr


def num_relevant(
    rows_j: np.ndarray,
    labels_j: np.ndarray,
    num_queries: int,
    relevance_level: int = 1,
) -> np.ndarray:
  """int64 [Q] R: judgments with label >= relevance_level."""
  return np.bincount(
      rows_j[labels_j >= relevance_level], minlength=num_queries
  ).astype(np.int64)


def _measure_values(
    measure: Measure,
    gains_qk: np.ndarray,
    relevant_qk: np.ndarray,
    ideal_qr: np.ndarray,
    num_relevant_q: np.ndarray,
) -> np.ndarray:
  k = measure.k
  if measure.family == "ndcg":
    return ndcg_at_k(gains_qk, ideal_qr, k)
  if measure.family == "recall":
    return recall_at_k(relevant_qk, num_relevant_q, k)
  if measure.family == "mrr":
    return reciprocal_rank(relevant_qk, k)
  if measure.family == "map":
    return average_precision(relevant_qk, num_relevant_q, k)
  return precision_at_k(relevant_qk, k)


# Dict layer: {qid: {docid: ...}} mappings to the arrays above.


def _tie_offsets(
    run: Mapping[str, Mapping[str, float]],
    qids: Sequence[str],
    scores_qk: np.ndarray,
    rows_t: np.ndarray,
    docs_t: Sequence[str],
    scores_t: np.ndarray,
) -> np.ndarray:
  """int64 [T]: per tied judged doc, the equal-score docs with a larger id.

  Each tie group (row, score) is found once, its ids sorted and members
  located by binary search: fast even when a whole run ties (a collapsed
  model), where comparing pairs would be quadratic.
  """
  # Tie groups: distinct (row, float32 bits) keys. Adding +0 turns -0.0 into
  # 0.0, which trec_eval's float comparison treats as equal.
  bits_t = (scores_t + np.float32(0)).view(np.uint32).astype(np.int64)
  _, first_g, group_t = np.unique(
      rows_t.astype(np.int64) << 32 | bits_t,
      return_index=True,
      return_inverse=True,
  )
  rows_g, scores_g = rows_t[first_g], scores_t[first_g]
  sorted_ids_g = []
  row_ids = {}  # row -> its doc ids in column order
  chunk = max(_COMPARE_BLOCK // scores_qk.shape[1], 1)
  for start in range(0, len(rows_g), chunk):
    part = slice(start, start + chunk)
    # NaN padding is never equal, so every member is a real document.
    equal_ck = scores_qk[rows_g[part]] == scores_g[part, None]
    sizes_c = equal_ck.sum(axis=-1).tolist()
    cols = np.nonzero(equal_ck)[1].tolist()
    offset = 0
    for row, size in zip(rows_g[part].tolist(), sizes_c):
      ids = row_ids.get(row)
      if ids is None:
        ids = row_ids[row] = list(run[qids[row]])
      sorted_ids_g.append(
          sorted([ids[k] for k in cols[offset : offset + size]])
      )
      offset += size
  return np.fromiter(
      (
          len(sorted_ids_g[g]) - bisect.bisect_right(sorted_ids_g[g], doc)
          for g, doc in zip(group_t.tolist(), docs_t)
      ),
      np.int64,
      len(docs_t),
  )


def _judged_ranks(
    qrels: Mapping[str, Mapping[str, int]],
    run: Mapping[str, Mapping[str, float]],
    qids: Sequence[str],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """int64 [J] (rows_j, labels_j, ranks_j) of the judgments of `qids`.

  ranks_j is the 1-based trec_eval rank in the run, 0 if not retrieved.
  """
  num_queries = len(qids)
  lengths_q = np.fromiter((len(run[q]) for q in qids), np.int64, num_queries)
  depth = max(int(lengths_q.max(initial=0)), 1)
  # NaN padding is neither above nor equal to any score: never ranked.
  scores_qk = np.full((num_queries, depth), np.nan, np.float32)
  scores_qk[np.arange(depth) < lengths_q[:, None]] = trec_order.as_float32(
      np.fromiter(
          itertools.chain.from_iterable(run[q].values() for q in qids),
          np.float64,
          int(lengths_q.sum()),
      )
  )
  if np.isnan(scores_qk).sum() != scores_qk.size - lengths_q.sum():
    raise ValueError("run scores must not be NaN (trec_eval cannot order them)")

  # Judgments flattened in qrels order; only J entries are looked up by id.
  judged = [(qrels[q], run[q]) for q in qids]
  counts_q = np.fromiter((len(j) for j, _ in judged), np.int64, num_queries)
  rows_j = np.repeat(np.arange(num_queries), counts_q)
  docs_j = list(itertools.chain.from_iterable(j for j, _ in judged))
  labels_j = np.fromiter(
      itertools.chain.from_iterable(j.values() for j, _ in judged),
      np.int64,
      len(docs_j),
  )
  # Score of each judged document in its query's run (NaN: not retrieved).
  nan = float("nan")
  judged_scores_j = trec_order.as_float32(
      np.fromiter(
          itertools.chain.from_iterable(
              map(r.get, j, itertools.repeat(nan)) for j, r in judged
          ),
          np.float64,
          len(docs_j),
      )
  )

  ranks_j = np.zeros(len(docs_j), np.int64)
  retrieved = np.flatnonzero(~np.isnan(judged_scores_j))
  tied = []
  chunk = max(_COMPARE_BLOCK // depth, 1)
  for start in range(0, len(retrieved), chunk):
    idx = retrieved[start : start + chunk]
    row_scores_ck = scores_qk[rows_j[idx]]
    score_c = judged_scores_j[idx, None]
    ranks_j[idx] = 1 + (row_scores_ck > score_c).sum(axis=-1)
    # The document ties with itself; more than one equal score is a tie.
    num_equal_c = (row_scores_ck == score_c).sum(axis=-1)
    tied.append(idx[num_equal_c > 1])
  tied = np.concatenate(tied) if tied else np.zeros(0, np.int64)
  if len(tied):
    ranks_j[tied] += _tie_offsets(
        run,
        qids,
        scores_qk,
        rows_j[tied],
        [docs_j[j] for j in tied],
        judged_scores_j[tied],
    )
  return rows_j, labels_j, ranks_j


def evaluate(
    qrels: Mapping[str, Mapping[str, int]],
    run: Mapping[str, Mapping[str, float]],
    measures: Sequence[str] = DEFAULT_MEASURES,
    relevance_level: int = 1,
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
  """Evaluates a run {qid: {doc: score}} against qrels {qid: {doc: int label}}.

  Returns (means, per_query): means[name] over the queries in run ∩ qrels,
  per_query[name] = {qid: value}. Scores compare as float32, like trec_eval;
  relevance_level >= 1 is the threshold of the binary measures.
  """
  if isinstance(measures, str):
    raise TypeError(f"measures must be a sequence of names, got {measures!r}")
  parsed = {name: parse_measure(name) for name in measures}
  if relevance_level < 1:  # unjudged documents would count as relevant
    raise ValueError(f"relevance_level must be >= 1, got {relevance_level}")
  # Empty qrels: trec_eval does not know the query; an empty run scores 0.
  qids = [q for q in run if qrels.get(q)]
  if not qids:
    raise ValueError("no query is in both the run and the qrels")
  num_queries = len(qids)
  rows_j, labels_j, ranks_j = _judged_ranks(qrels, run, qids)

  depth = max(int(ranks_j.max(initial=0)), 1)  # deeper columns are all 0
  gains_qk, relevant_qk = ranked_judgments(
      rows_j, ranks_j, labels_j, num_queries, depth, relevance_level
  )
  num_relevant_q = num_relevant(rows_j, labels_j, num_queries, relevance_level)
  ideal_qr = (
      ideal_gains(rows_j, labels_j, num_queries)
      if any(m.family == "ndcg" for m in parsed.values())
      else None
  )
  means, per_query = {}, {}
  for name, measure in parsed.items():
    values_q = _measure_values(
        measure, gains_qk, relevant_qk, ideal_qr, num_relevant_q
    )
    means[name] = float(values_q.mean())
    per_query[name] = dict(zip(qids, values_q.tolist()))
  return means, per_query
