"""Tests for retrieval_jax.evaluation.ir_metrics.

Known answers (losses.md 10.5), the array layer, and per-query equality with
pytrec_eval on synthetic runs (heavy ties, graded and negative labels) and on
real BM25 runs over Cranfield (graded) and SciFact.
"""

import json
import os
import pathlib
import re

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import pytrec_eval

from retrieval_jax.evaluation import ir_metrics
from retrieval_jax.evaluation import trec_run

_REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
_SHARED_DATA = pathlib.Path(
    os.environ.get(
        "RETRIEVAL_JAX_SHARED_DATA", _REPO_ROOT.parent / "shared" / "data"
    )
)

# Every measure form, with cut-offs below, at and above typical run depths.
_ALL_MEASURES = (
    "ndcg",
    "ndcg@1",
    "ndcg@3",
    "ndcg@10",
    "ndcg@50",
    "recall@1",
    "recall@3",
    "recall@10",
    "recall@100",
    "mrr",
    "mrr@1",
    "mrr@3",
    "mrr@10",
    "map",
    "map@3",
    "map@10",
    "p@1",
    "p@3",
    "p@10",
    "p@50",
)


def _trec_eval_top(docs, k):
  """Top k of one query as trec_eval orders it (written independently).

  Score desc, doc id desc, with scores compared as float32 (trec_eval keeps
  them in a C float).
  """
  ranked = sorted(
      docs.items(),
      key=lambda item: (np.float32(item[1]), item[0]),
      reverse=True,
  )
  return dict(ranked[:k])


def _pytrec_eval(qrels, run, measures, relevance_level=1):
  """pytrec_eval's per-query values as {our measure name: {qid: value}}.

  "mrr@K" is pytrec_eval's recip_rank on the run cut to each query's top K.
  """
  out = {}
  plain = [m for m in measures if not m.startswith("mrr@")]
  requests = {ir_metrics.to_pytrec_eval_request(m) for m in plain}
  if requests:
    result = pytrec_eval.RelevanceEvaluator(
        qrels, requests, relevance_level=relevance_level
    ).evaluate(run)
    for m in plain:
      key = ir_metrics.to_pytrec_eval_name(m)
      out[m] = {q: v[key] for q, v in result.items()}
  for m in measures:
    if m.startswith("mrr@"):
      k = ir_metrics.parse_measure(m).k
      cut = {q: _trec_eval_top(docs, k) for q, docs in run.items()}
      result = pytrec_eval.RelevanceEvaluator(
          qrels, {"recip_rank"}, relevance_level=relevance_level
      ).evaluate(cut)
      out[m] = {q: v["recip_rank"] for q, v in result.items()}
  return out


class HandOracleTest(absltest.TestCase):
  """The worked examples of losses.md 10.5."""

  def test_graded_example(self):
    qrels = {"q1": {"d1": 2, "d2": 1, "d3": 0, "d4": 1}}
    run = {"q1": {"d3": 0.9, "d1": 0.8, "d2": 0.7, "d5": 0.6}}
    means, _ = ir_metrics.evaluate(
        qrels, run, ("ndcg@3", "ndcg", "recall@3", "p@3", "mrr", "map")
    )
    # (2/log2(3) + 1/2) / (2 + 1/log2(3) + 1/2): linear gains, ideal from
    # all judged docs (d4 is not retrieved but is in the ideal).
    self.assertAlmostEqual(means["ndcg@3"], 0.56273, places=5)
    self.assertAlmostEqual(means["ndcg"], 0.56273, places=5)
    self.assertAlmostEqual(means["recall@3"], 2 / 3)
    self.assertAlmostEqual(means["p@3"], 2 / 3)
    self.assertAlmostEqual(means["mrr"], 0.5)
    self.assertAlmostEqual(means["map"], (1 / 2 + 2 / 3) / 3)
    self.assertAlmostEqual(means["map"], 0.38889, places=5)

  def test_ties_broken_by_doc_id_descending(self):
    # All scores tie: d3 sorts first because "d3" > "d2" > "d1".
    means, _ = ir_metrics.evaluate(
        {"q": {"d3": 1}},
        {"q": {"d1": 1.0, "d2": 1.0, "d3": 1.0}},
        ("mrr", "ndcg", "mrr@1", "p@1"),
    )
    self.assertEqual(means, {"mrr": 1.0, "ndcg": 1.0, "mrr@1": 1.0, "p@1": 1.0})
    # ... and d1 last.
    means, _ = ir_metrics.evaluate(
        {"q": {"d1": 1}}, {"q": {"d1": 1.0, "d2": 1.0, "d3": 1.0}}, ("mrr",)
    )
    self.assertAlmostEqual(means["mrr"], 1 / 3)

  def test_tie_break_is_code_point_order_not_numeric_or_casefolded(self):
    # "a" (97) > "B" (66), "9" > "10" as strings, "é" > "z".
    for relevant, other in (("a", "B"), ("9", "10"), ("é", "z")):
      _, per_query = ir_metrics.evaluate(
          {"q": {relevant: 1}}, {"q": {relevant: 0.5, other: 0.5}}, ("mrr",)
      )
      self.assertEqual(per_query["mrr"]["q"], 1.0, (relevant, other))

  def test_scores_tie_at_float32_precision(self):
    # 1 + 1e-12 rounds to 1.0 in float32, so trec_eval sees a tie and "b"
    # (the larger id) comes first although "a" has the larger float64 score.
    qrels = {"q": {"a": 1}}
    run = {"q": {"a": 1.0 + 1e-12, "b": 1.0}}
    _, per_query = ir_metrics.evaluate(qrels, run, ("mrr",))
    self.assertEqual(per_query["mrr"]["q"], 0.5)
    self.assertEqual(_pytrec_eval(qrels, run, ("mrr",))["mrr"]["q"], 0.5)
    self.assertEqual(
        ir_metrics.trec_eval_sorted(run["q"]), [("b", 1.0), ("a", 1.0 + 1e-12)]
    )
    # A difference float32 can hold is not a tie.
    _, per_query = ir_metrics.evaluate(
        qrels, {"q": {"a": 1.001, "b": 1.0}}, ("mrr",)
    )
    self.assertEqual(per_query["mrr"]["q"], 1.0)

  def test_relevance_level_only_changes_binary_measures(self):
    qrels = {"q": {"a": 1, "b": 2}}
    run = {"q": {"a": 2.0, "b": 1.0}}
    means, _ = ir_metrics.evaluate(
        qrels, run, ("mrr", "ndcg@2", "recall@1"), relevance_level=2
    )
    self.assertAlmostEqual(means["mrr"], 0.5)
    self.assertAlmostEqual(means["recall@1"], 0.0)
    # "a" keeps its gain of 1: (1 + 2/log2(3)) / (2 + 1/log2(3)).
    self.assertAlmostEqual(means["ndcg@2"], 0.85972, places=5)

  def test_query_set_is_run_intersect_qrels(self):
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}, "q3": {"c": 0}}
    run = {"q1": {"a": 1.0}, "q3": {"c": 1.0}, "q4": {"a": 1.0}}
    means, per_query = ir_metrics.evaluate(qrels, run, ("ndcg@10", "mrr"))
    self.assertEqual(per_query["ndcg@10"], {"q1": 1.0, "q3": 0.0})
    # q3 (no relevant doc) stays in the mean; q2 and q4 are not evaluated.
    self.assertAlmostEqual(means["mrr"], 0.5)


class MeasureNameTest(parameterized.TestCase):

  @parameterized.parameters(
      ("ndcg@10", "ndcg_cut_10", "ndcg_cut.10"),
      ("ndcg", "ndcg", "ndcg"),
      ("recall@100", "recall_100", "recall.100"),
      ("mrr@10", "recip_rank", "recip_rank"),
      ("mrr", "recip_rank", "recip_rank"),
      ("map", "map", "map"),
      ("map@5", "map_cut_5", "map_cut.5"),
      ("p@10", "P_10", "P.10"),
      ("P@10", "P_10", "P.10"),
  )
  def test_pytrec_eval_names(self, ours, key, request):
    self.assertEqual(ir_metrics.to_pytrec_eval_name(ours), key)
    self.assertEqual(ir_metrics.to_pytrec_eval_request(ours), request)

  @parameterized.parameters(
      "recall", "p", "ndcg@0", "ndcg@", "ndcg@k", "dcg@10", "mrr@10x", "R@10"
  )
  def test_unknown_measure_names_the_measure_and_the_forms(self, name):
    with self.assertRaisesRegex(
        ValueError, re.escape(repr(name)) + ".*accepted forms.*recall@K"
    ):
      ir_metrics.evaluate({"q": {"d": 1}}, {"q": {"d": 1.0}}, (name,))

  def test_default_measures(self):
    means, per_query = ir_metrics.evaluate({"q": {"d": 1}}, {"q": {"d": 1.0}})
    self.assertEqual(tuple(means), ir_metrics.DEFAULT_MEASURES)
    self.assertEqual(set(per_query), set(ir_metrics.DEFAULT_MEASURES))


class ArrayFunctionTest(absltest.TestCase):
  """The pure functions on rank-ordered [Q, K] matrices."""

  def test_dcg_and_ndcg(self):
    gains_qk = np.array([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]])
    ideal_qr = np.array([[2.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    expected_dcg = 2 / np.log2(3) + 1 / 2
    np.testing.assert_allclose(
        ir_metrics.dcg_at_k(gains_qk), [expected_dcg, 3.0]
    )
    # Query 2 has no positive label: ideal DCG 0 gives nDCG 0, not NaN.
    np.testing.assert_allclose(
        ir_metrics.ndcg_at_k(gains_qk, ideal_qr, 3),
        [expected_dcg / (2 + 1 / np.log2(3) + 1 / 2), 0.0],
    )
    np.testing.assert_allclose(
        ir_metrics.ndcg_at_k(gains_qk, ideal_qr, 1), [0.0, 0.0]
    )

  def test_precision_divides_by_k_even_beyond_the_list(self):
    relevant_qk = np.array([[True, False]])
    np.testing.assert_allclose(ir_metrics.precision_at_k(relevant_qk, 5), [0.2])

  def test_recall_and_average_precision_keep_unretrieved_relevant_in_r(self):
    relevant_qk = np.array([[True, False, True], [False, False, False]])
    num_relevant_q = np.array([3, 0])
    np.testing.assert_allclose(
        ir_metrics.recall_at_k(relevant_qk, num_relevant_q, 2), [1 / 3, 0.0]
    )
    np.testing.assert_allclose(
        ir_metrics.average_precision(relevant_qk, num_relevant_q),
        [(1 + 2 / 3) / 3, 0.0],
    )
    # map@2 truncates the sum but keeps R = 3.
    np.testing.assert_allclose(
        ir_metrics.average_precision(relevant_qk, num_relevant_q, 2),
        [1 / 3, 0.0],
    )

  def test_reciprocal_rank(self):
    relevant_qk = np.array([[False, False, True], [False, False, False]])
    np.testing.assert_allclose(
        ir_metrics.reciprocal_rank(relevant_qk), [1 / 3, 0.0]
    )
    np.testing.assert_allclose(
        ir_metrics.reciprocal_rank(relevant_qk, 2), [0.0, 0.0]
    )
    np.testing.assert_allclose(
        ir_metrics.reciprocal_rank(np.zeros((2, 0), bool)), [0.0, 0.0]
    )

  def test_ranked_judgments_and_ideal_gains(self):
    rows_j = np.array([0, 0, 0, 1, 1])
    ranks_j = np.array([2, 0, 1, 3, 1])
    labels_j = np.array([2, 3, -1, 1, 0])
    gains_qk, relevant_qk = ir_metrics.ranked_judgments(
        rows_j, ranks_j, labels_j, num_queries=2, depth=3, relevance_level=2
    )
    np.testing.assert_array_equal(gains_qk, [[0, 2, 0], [0, 0, 1]])
    np.testing.assert_array_equal(
        relevant_qk, [[False, True, False], [False] * 3]
    )
    np.testing.assert_array_equal(
        ir_metrics.ideal_gains(rows_j, labels_j, 2), [[3, 2], [1, 0]]
    )
    np.testing.assert_array_equal(
        ir_metrics.num_relevant(rows_j, labels_j, 2, 1), [2, 1]
    )


class EdgeCaseTest(absltest.TestCase):

  def test_negative_labels_are_judged_nonrelevant_and_not_in_r(self):
    qrels = {"q": {"a": -1, "b": 2, "c": 0}}
    run = {"q": {"a": 3.0, "c": 2.0, "b": 1.0}}
    means, _ = ir_metrics.evaluate(
        qrels, run, ("mrr", "recall@3", "ndcg", "map")
    )
    self.assertEqual(
        means, {"mrr": 1 / 3, "recall@3": 1.0, "ndcg": 0.5, "map": 1 / 3}
    )

  def test_query_with_only_negative_labels_scores_zero_in_the_mean(self):
    # (pytrec_eval reads stale memory for such a query, so this is checked
    # against the definition: no positive gain and R = 0.)
    qrels = {"q1": {"a": -1}, "q2": {"b": 1}}
    run = {"q1": {"a": 1.0}, "q2": {"b": 1.0}}
    means, per_query = ir_metrics.evaluate(qrels, run, _ALL_MEASURES)
    for name in _ALL_MEASURES:
      self.assertEqual(per_query[name]["q1"], 0.0, name)
    self.assertAlmostEqual(means["ndcg"], 0.5)

  def test_empty_run_for_a_query_scores_zero(self):
    means, per_query = ir_metrics.evaluate(
        {"q1": {"a": 1}, "q2": {"b": 1}},
        {"q1": {}, "q2": {"b": 1.0}},
        ("ndcg@10", "map"),
    )
    self.assertEqual(per_query["map"], {"q1": 0.0, "q2": 1.0})
    self.assertEqual(means["ndcg@10"], 0.5)

  def test_empty_qrels_dict_is_not_a_judged_query(self):
    _, per_query = ir_metrics.evaluate(
        {"q1": {}, "q2": {"b": 1}},
        {"q1": {"a": 1.0}, "q2": {"b": 1.0}},
        ("map",),
    )
    self.assertEqual(per_query["map"], {"q2": 1.0})

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, "relevance_level"):
      ir_metrics.evaluate({"q": {"d": 1}}, {"q": {"d": 1.0}}, relevance_level=0)
    with self.assertRaisesRegex(ValueError, "NaN"):
      ir_metrics.evaluate({"q": {"d": 1}}, {"q": {"d": float("nan")}})
    with self.assertRaisesRegex(ValueError, "no query"):
      ir_metrics.evaluate({"q": {"d": 1}}, {"other": {"d": 1.0}})

  def test_truncate_run_keeps_trec_eval_top_k(self):
    run = {"q": {"a": 1.0, "b": 2.0, "c": 1.0, "d": 0.0}}
    self.assertEqual(
        list(ir_metrics.truncate_run(run, 3)["q"]), ["b", "c", "a"]
    )
    self.assertEqual(
        ir_metrics.trec_eval_sorted(run["q"]),
        [("b", 2.0), ("c", 1.0), ("a", 1.0), ("d", 0.0)],
    )


def _synthetic(seed, num_queries=60):
  """Random qrels/run with many ties, graded and negative labels.

  Doc ids mix cases, digits of different lengths, spaces and non-ASCII
  letters so the code-point tie-break is exercised; scores come from a small
  set (including both 0.0 and -0.0, which compare equal).
  """
  rng = np.random.default_rng(seed)
  vocab = [f"d{i}" for i in range(25)] + [
      "D3",
      "d03",
      "é",
      "z",
      "Z a",
      "10",
      "9",
      "ß",
      "a b c",
  ]
  score_set = [0.0, -0.0, 0.5, 1.0, 1.0 + 1e-12, 2.0, -1.0]
  qrels, run = {}, {}
  for q in range(num_queries):
    qid = f"q{q}"
    size = int(rng.integers(0, 40))
    docs = rng.choice(len(vocab), size=min(size, len(vocab)), replace=False)
    if rng.random() < 0.9:
      run[qid] = {
          vocab[d]: score_set[rng.integers(len(score_set))] for d in docs
      }
    if rng.random() < 0.9:
      judged = rng.choice(
          len(vocab), size=int(rng.integers(1, 12)), replace=False
      )
      labels = rng.integers(-1, 5, size=len(judged))
      # At least one label >= 0: pytrec_eval's nDCG reads stale memory (and
      # can loop forever) on a query whose labels are all negative.
      labels[0] = max(labels[0], 0)
      qrels[qid] = {vocab[d]: int(l) for d, l in zip(judged, labels)}
  return qrels, run


class PytrecEvalParityTest(parameterized.TestCase):

  @parameterized.product(seed=[0, 1, 2, 3], relevance_level=[1, 2, 3])
  def test_synthetic_runs(self, seed, relevance_level):
    qrels, run = _synthetic(seed)
    _, ours = ir_metrics.evaluate(qrels, run, _ALL_MEASURES, relevance_level)
    theirs = _pytrec_eval(qrels, run, _ALL_MEASURES, relevance_level)
    for name in _ALL_MEASURES:
      self.assertEqual(set(ours[name]), set(theirs[name]), name)
      for qid, value in theirs[name].items():
        self.assertAlmostEqual(
            ours[name][qid], value, delta=1e-6, msg=f"{name} {qid}"
        )

  def test_collapsed_scores(self):
    # Every score ties (as from a model whose embeddings collapsed): the
    # order is the doc ids' alone, several judged docs share one tie group.
    rng = np.random.default_rng(7)
    vocab = [f"doc{i}" for i in range(300)] + ["Doc 1", "é", "z9", "z10"]
    qrels, run = {}, {}
    for q in range(20):
      docs = rng.choice(len(vocab), size=120, replace=False)
      run[f"q{q}"] = {
          vocab[d]: 0.0 if i % 2 else -0.0 for i, d in enumerate(docs)
      }
      judged = np.concatenate([docs[:15], rng.choice(len(vocab), 5)])
      qrels[f"q{q}"] = {vocab[d]: int(rng.integers(0, 4)) for d in judged}
    _, ours = ir_metrics.evaluate(qrels, run, _ALL_MEASURES)
    theirs = _pytrec_eval(qrels, run, _ALL_MEASURES)
    for name in _ALL_MEASURES:
      for qid, value in theirs[name].items():
        self.assertAlmostEqual(
            ours[name][qid], value, delta=1e-6, msg=f"{name} {qid}"
        )


def _read_beir(name):
  """(corpus ids, corpus texts, {qid: text}, test qrels) of a BEIR dir."""
  root = _SHARED_DATA / name
  doc_ids, texts = [], []
  with open(root / "corpus.jsonl", encoding="utf-8") as f:
    for line in f:
      doc = json.loads(line)
      doc_ids.append(doc["_id"])
      texts.append(doc["title"] + " " + doc["text"])
  with open(root / "queries.jsonl", encoding="utf-8") as f:
    queries = {q["_id"]: q["text"] for q in map(json.loads, f)}
  qrels = {}
  with open(root / "qrels" / "test.tsv", encoding="utf-8") as f:
    next(f)  # header
    for line in f:
      qid, doc_id, label = line.rstrip("\n").split("\t")
      qrels.setdefault(qid, {})[doc_id] = int(label)
  return doc_ids, texts, queries, qrels


def _bm25_run(name):
  """BM25 top-1000 run with the settings of DATA.md (bm25s, Lucene BM25)."""
  import bm25s  # pylint: disable=g-import-not-at-top
  import Stemmer  # pylint: disable=g-import-not-at-top

  doc_ids, texts, queries, qrels = _read_beir(name)
  stemmer = Stemmer.Stemmer("porter")
  retriever = bm25s.BM25(method="lucene", k1=0.9, b=0.4)
  retriever.index(
      bm25s.tokenize(
          texts, stopwords="en", stemmer=stemmer, show_progress=False
      ),
      show_progress=False,
  )
  query_ids = list(qrels)
  indices_qk, scores_qk = retriever.retrieve(
      bm25s.tokenize(
          [queries[q] for q in query_ids],
          stopwords="en",
          stemmer=stemmer,
          show_progress=False,
      ),
      k=1000,
      show_progress=False,
      n_threads=1,
  )
  return qrels, trec_run.run_from_topk(
      query_ids, doc_ids, scores_qk, indices_qk
  )


class RealRunParityTest(parameterized.TestCase):
  """BM25 runs on real collections: float32 scores, ties at score 0."""

  _runs = {}

  def _get(self, name):
    if not (_SHARED_DATA / name / "corpus.jsonl").exists():
      self.skipTest(f"{_SHARED_DATA / name} is not available")
    if name not in self._runs:
      self._runs[name] = _bm25_run(name)
    return self._runs[name]

  @parameterized.parameters(("cranfield", 1), ("cranfield", 3), ("scifact", 1))
  def test_per_query_values_equal_pytrec_eval(self, name, relevance_level):
    qrels, run = self._get(name)
    _, ours = ir_metrics.evaluate(qrels, run, _ALL_MEASURES, relevance_level)
    theirs = _pytrec_eval(qrels, run, _ALL_MEASURES, relevance_level)
    for measure in _ALL_MEASURES:
      self.assertEqual(set(ours[measure]), set(theirs[measure]))
      diffs = [abs(ours[measure][q] - v) for q, v in theirs[measure].items()]
      self.assertLess(max(diffs), 1e-6, measure)

  @parameterized.parameters(
      ("cranfield", 0.353, 0.725, 0.511, 0.385),
      ("scifact", 0.671, 0.919, 0.636, 0.795),
  )
  def test_means_match_the_published_baselines(
      self, name, ndcg10, recall100, mrr10, recall10
  ):
    # DATA.md's BM25 table, printed to 3 decimals.
    qrels, run = self._get(name)
    means, _ = ir_metrics.evaluate(
        qrels, run, ("ndcg@10", "recall@100", "mrr@10", "recall@10")
    )
    self.assertAlmostEqual(means["ndcg@10"], ndcg10, delta=5e-4)
    self.assertAlmostEqual(means["recall@100"], recall100, delta=5e-4)
    self.assertAlmostEqual(means["mrr@10"], mrr10, delta=5e-4)
    self.assertAlmostEqual(means["recall@10"], recall10, delta=5e-4)


if __name__ == "__main__":
  absltest.main()
