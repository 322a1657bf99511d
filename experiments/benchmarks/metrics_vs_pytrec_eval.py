r"""Times `ir_metrics.evaluate` against pytrec_eval on synthetic runs.

Both sides start from the same Python dicts ({qid: {docid: score}} and
{qid: {docid: label}}) and include everything a user's call does: for
pytrec_eval, building the `RelevanceEvaluator` and calling `evaluate`. Each
timing is the best of `--repeats` runs. The per-query values of both are
compared (max absolute difference over all queries and measures).

Three rows are timed:
  * "native": measures pytrec_eval computes in one call (nDCG@10, uncut
    nDCG, Recall@10/100, uncut reciprocal rank, MAP, MAP@100, P@10);
  * "mrr@10": MRR@10 alone; pytrec_eval has no cut-off for `recip_rank`, so
    its side also cuts the run to each query's top 10 in trec_eval's order
    (`ir_metrics.truncate_run`) before evaluating;
  * "native, all tied": the native measures on the same run with every score
    equal (a model whose scores collapsed), the worst case for tie-breaking.

Command (from the repository root):

  PYTHONPATH=. python experiments/benchmarks/metrics_vs_pytrec_eval.py \
      --num_queries=10000 --docs_per_query=100 --judged_per_query=5

Result (2 CPU cores shared with other jobs, pytrec-eval-terrier 0.5.11,
`--repeats=5`; timings move with machine load, by up to ~1.5x between runs):

  | measures | queries | docs/query | ours (s) | pytrec_eval (s) | ratio |
  |---|---:|---:|---:|---:|---:|
  | native | 10000 | 100 | 0.235 | 0.771 | 3.28 |
  | mrr@10 | 10000 | 100 | 0.139 | 0.828 | 5.97 |
  | native, all tied | 10000 | 100 | 0.661 | 0.715 | 1.08 |
  | native | 1000 | 1000 | 0.364 | 0.811 | 2.23 |
  | mrr@10 | 1000 | 1000 | 0.327 | 0.526 | 1.61 |
  | native, all tied | 1000 | 1000 | 0.675 | 0.840 | 1.24 |

(the last three rows: `--num_queries=1000 --docs_per_query=1000
--judged_per_query=50`). Max abs difference of the per-query values: 2.2e-16.
"""

import argparse
import functools
import time

import numpy as np
import pytrec_eval

from retrieval_jax.evaluation import ir_metrics

NATIVE_MEASURES = (
    "ndcg@10",
    "ndcg",
    "recall@10",
    "recall@100",
    "mrr",
    "map",
    "map@100",
    "p@10",
)


def make_data(
    num_queries: int,
    docs_per_query: int,
    judged_per_query: int,
    num_docs: int,
    seed: int,
):
  """Synthetic qrels and run.

  Scores are rounded to 3 decimals so ties occur (trec_eval breaks them by
  doc id). About half of each query's judged docs are retrieved, the others
  are drawn from the whole collection; labels are graded 0-3, with a few
  negative (judged non-relevant) ones. Ids are drawn with replacement, so a
  rare repeated id within a query collapses into one dict entry.

  Returns:
    (qrels, run): {qid: {docid: int}}, {qid: {docid: float}}.
  """
  rng = np.random.default_rng(seed)
  doc_ids = np.array([f"doc{i}" for i in range(num_docs)], dtype=object)
  retrieved_qk = rng.integers(0, num_docs, (num_queries, docs_per_query))
  scores_qk = np.round(rng.normal(size=(num_queries, docs_per_query)), 3)
  judged_in_run = judged_per_query // 2 + 1
  judged_qj = np.concatenate(
      [
          np.take_along_axis(
              retrieved_qk,
              rng.integers(0, docs_per_query, (num_queries, judged_in_run)),
              axis=1,
          ),
          rng.integers(
              0, num_docs, (num_queries, judged_per_query - judged_in_run)
          ),
      ],
      axis=1,
  )
  labels_qj = rng.choice(
      [-1, 0, 1, 2, 3], size=judged_qj.shape, p=[0.05, 0.35, 0.3, 0.2, 0.1]
  )
  # At least one label >= 0 per query: trec_eval's nDCG reads stale memory
  # (and may never return) for a query whose labels are all negative.
  labels_qj[:, 0] = np.maximum(labels_qj[:, 0], 0)
  run, qrels = {}, {}
  for q in range(num_queries):
    qid = f"q{q}"
    run[qid] = dict(
        zip(doc_ids[retrieved_qk[q]].tolist(), scores_qk[q].tolist())
    )
    qrels[qid] = dict(
        zip(doc_ids[judged_qj[q]].tolist(), labels_qj[q].tolist())
    )
  return qrels, run


def best_of(repeats: int, fn):
  """Returns (best wall time in seconds, last result) of `repeats` calls."""
  best, result = float("inf"), None
  for _ in range(repeats):
    start = time.perf_counter()
    result = fn()
    best = min(best, time.perf_counter() - start)
  return best, result


def run_pytrec_eval(qrels, run, measures, cut_k=None):
  """The user's full pytrec_eval call: {qid: {pytrec_eval name: value}}."""
  if cut_k is not None:
    # No cut-off for recip_rank in pytrec_eval: the run itself is cut.
    run = ir_metrics.truncate_run(run, cut_k)
  requests = {ir_metrics.to_pytrec_eval_request(m) for m in measures}
  return pytrec_eval.RelevanceEvaluator(qrels, requests).evaluate(run)


def by_our_names(result, measures):
  """Re-keys pytrec_eval's answer as {our measure name: {qid: value}}."""
  return {
      m: {q: v[ir_metrics.to_pytrec_eval_name(m)] for q, v in result.items()}
      for m in measures
  }


def max_abs_diff(ours, theirs) -> float:
  """Largest per-query difference; the query sets must be the same."""
  worst = 0.0
  for name, values in theirs.items():
    if set(values) != set(ours[name]):
      raise AssertionError(f"{name}: query sets differ")
    worst = max(worst, max(abs(ours[name][q] - v) for q, v in values.items()))
  return worst


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--num_queries", type=int, default=10_000)
  parser.add_argument("--docs_per_query", type=int, default=100)
  parser.add_argument("--judged_per_query", type=int, default=5)
  parser.add_argument(
      "--num_docs",
      type=int,
      default=1_000_000,
      help="collection size the doc ids are drawn from",
  )
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()

  qrels, run = make_data(
      args.num_queries,
      args.docs_per_query,
      args.judged_per_query,
      args.num_docs,
      args.seed,
  )
  collapsed = {qid: dict.fromkeys(docs, 0.5) for qid, docs in run.items()}
  rows = []
  for label, scored, measures, cut_k in (
      ("native", run, NATIVE_MEASURES, None),
      ("mrr@10", run, ("mrr@10",), 10),
      ("native, all tied", collapsed, NATIVE_MEASURES, None),
  ):
    ours_s, (_, ours) = best_of(
        args.repeats,
        functools.partial(ir_metrics.evaluate, qrels, scored, measures),
    )
    theirs_s, theirs = best_of(
        args.repeats,
        functools.partial(run_pytrec_eval, qrels, scored, measures, cut_k),
    )
    theirs = by_our_names(theirs, measures)
    rows.append((label, ours_s, theirs_s, max_abs_diff(ours, theirs)))

  print(
      "| measures | queries | docs/query | ours (s) | pytrec_eval (s) | "
      "ratio (pytrec_eval / ours) | max abs diff |"
  )
  print("|---|---:|---:|---:|---:|---:|---:|")
  for label, ours_s, theirs_s, diff in rows:
    print(
        f"| {label} | {args.num_queries} | {args.docs_per_query} | "
        f"{ours_s:.3f} | {theirs_s:.3f} | {theirs_s / ours_s:.2f} | "
        f"{diff:.1e} |"
    )


if __name__ == "__main__":
  main()
