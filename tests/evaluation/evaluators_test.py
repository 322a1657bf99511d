"""Tests for the re-ranking evaluation (evaluators.RerankEvaluator) and the
BM25 first stage.

Oracles: an oracle scorer (the qrels labels) gives the ideal ordering of the
candidates; a constant scorer keeps the first stage's order; the metrics
equal ir_metrics on the run written by hand; short candidate lists are
scored without padding pairs.
"""

from absl.testing import absltest
import numpy as np

from retrieval_jax.data import beir
from retrieval_jax.evaluation import evaluators
from retrieval_jax.evaluation import ir_metrics

_DOCS = [
    "apples and pears",
    "tennis rackets",
    "chess openings",
    "pear trees in spring",
    "opera houses",
    "apple orchards",
]


def _collection():
  return beir.BeirCollection(
      doc_ids=[f"d{i}" for i in range(6)],
      titles=[""] * 6,
      texts=_DOCS,
      query_ids=["q0", "q1", "q2"],
      queries=["apple pear", "tennis", "zzz unknown"],
      qrels={"q0": {"d5": 2, "d0": 1}, "q1": {"d1": 1}},
  )


class RerankEvaluatorTest(absltest.TestCase):

  def test_oracle_and_constant_scorers(self):
    collection = _collection()
    candidates = {
        "q0": ["d3", "d0", "d4", "d5"],
        "q1": ["d2", "d1"],
        "q2": ["d4"],
    }
    ev = evaluators.RerankEvaluator(
        collection, candidates, depth=3, measures=["ndcg@10", "recall@10"]
    )
    # q2 has no judgments but is a candidate query: judged-only evaluation
    # is the metrics' business (trec_eval skips it).
    self.assertEqual(ev.query_ids, ["q0", "q1", "q2"])
    label = {
        (q, d): s
        for q, docs in collection.qrels.items()
        for d, s in docs.items()
    }
    calls = []

    def oracle(query_rows, doc_rows):
      calls.append(np.asarray(doc_rows).shape)
      return np.array(
          [
              [label.get((ev.query_ids[q], f"d{d}"), 0) for d in row]
              for q, row in zip(query_rows, doc_rows)
          ],
          float,
      )

    result = ev.run(oracle)
    # Grouped by list length: q0 (3), q1 (2), q2 (1); no padding pair.
    self.assertEqual(sorted(calls), [(1, 1), (1, 2), (1, 3)])
    self.assertEqual(result.indices_qk[0, :2].tolist(), [0, 3])
    # q0's depth-3 list misses d5 (its 4th candidate): recall 1/2.
    self.assertAlmostEqual(result.per_query["recall@10"]["q0"], 0.5)
    self.assertAlmostEqual(result.per_query["ndcg@10"]["q1"], 1.0)
    want, _ = ir_metrics.evaluate(
        collection.qrels, result.run, ["ndcg@10", "recall@10"]
    )
    self.assertEqual(result.metrics, want)
    constant = ev.run(lambda q, d: np.zeros(np.asarray(d).shape))
    self.assertEqual(constant.indices_qk[0].tolist(), [3, 0, 4])

  def test_bad_candidates(self):
    with self.assertRaisesRegex(ValueError, "'dx' is not in the corpus"):
      evaluators.RerankEvaluator(_collection(), {"q0": ["dx"]}, depth=2)
    with self.assertRaisesRegex(ValueError, "no candidates"):
      evaluators.RerankEvaluator(_collection(), {"qq": ["d0"]}, depth=2)
    with self.assertRaisesRegex(ValueError, "depth must be >= 1"):
      evaluators.RerankEvaluator(_collection(), {"q0": ["d0"]}, depth=0)


class FirstStageTest(absltest.TestCase):

  def test_bm25_ranks_term_matches(self):
    candidates, metrics = evaluators.first_stage(
        "bm25", _collection(), depth=5, measures=["recall@10"]
    )
    # Judged queries only; "apple pear" matches d0, d3, d5 (stemmed).
    self.assertEqual(sorted(candidates), ["q0", "q1"])
    self.assertEqual(set(candidates["q0"]), {"d0", "d3", "d5"})
    self.assertEqual(candidates["q1"], ["d1"])
    self.assertEqual(metrics["recall@10"], 1.0)
    with self.assertRaisesRegex(ValueError, "needs an encoder"):
      evaluators.first_stage(
          "dense", _collection(), depth=5, measures=["recall@10"]
      )


if __name__ == "__main__":
  absltest.main()
