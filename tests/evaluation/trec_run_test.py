"""Tests for retrieval_jax.evaluation.trec_run: format, round trips, errors."""

import json
import pathlib
import re

from absl.testing import absltest
import numpy as np

from retrieval_jax.evaluation import ir_metrics
from retrieval_jax.evaluation import trec_run

_REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
_LIMIT_SMALL = _REPO_ROOT / "data" / "limit-small"


class IdEncodingTest(absltest.TestCase):

  def test_only_whitespace_and_percent_are_escaped(self):
    self.assertEqual(trec_run.encode_id("Geneva Durben"), "Geneva%20Durben")
    self.assertEqual(trec_run.encode_id("50%"), "50%25")
    self.assertEqual(trec_run.encode_id("a\tb\nc"), "a%09b%0Ac")
    # Non-ASCII whitespace is escaped as its UTF-8 bytes.
    self.assertEqual(trec_run.encode_id("x\u3000y"), "x%E3%80%80y")
    for plain in ("doc1", "MED-10", "é/ß:#&+=?", "4983"):
      self.assertEqual(trec_run.encode_id(plain), plain)

  def test_decode_inverts_encode(self):
    for identifier in (
        "Geneva Durben",
        "50%",
        "%20",
        "a%2",
        "x\u3000y",
        " lead",
        "trail\t",
        "é ß",
        "\x1cfs",
    ):
      encoded = trec_run.encode_id(identifier)
      self.assertEmpty([c for c in encoded if c.isspace()], identifier)
      self.assertEqual(trec_run.decode_id(encoded), identifier)

  def test_empty_id_is_rejected(self):
    with self.assertRaisesRegex(ValueError, "empty"):
      trec_run.encode_id("")


class WriteReadTest(absltest.TestCase):

  def _path(self):
    return pathlib.Path(self.create_tempdir()) / "run.trec"

  def test_round_trip_with_awkward_ids_and_exact_scores(self):
    float32_scores = np.array([0.1, 1 / 3, -2.5e-8], np.float32)
    run = {
        "q 1": {
            "Geneva Durben": float(float32_scores[0]),
            "50% off": 0.1,
            "%20": float(float32_scores[1]),
            "tab\there": -0.0,
        },
        "q%2": {
            "plain": float(float32_scores[2]),
            "é ß": 1e-300,
            "x\u3000y": 123456789.123456789,
        },
        "q3": {"d": float("inf")},
    }
    path = self._path()
    trec_run.write_run(path, run, tag="bm25")
    read = trec_run.read_run(path)
    self.assertEqual(read, run)
    for qid, docs in run.items():
      for doc, score in docs.items():
        # Bit-exact, including the sign of zero.
        self.assertEqual(
            np.float64(read[qid][doc]).tobytes(),
            np.float64(score).tobytes(),
            (qid, doc),
        )
    text = path.read_text(encoding="utf-8")
    self.assertIn("q%201 Q0 Geneva%20Durben ", text)
    self.assertIn("q%252 Q0 plain ", text)
    for line in text.splitlines():
      self.assertLen(line.split(), 6)
      self.assertTrue(line.endswith(" bm25"))

  def test_rank_column_follows_trec_eval_order(self):
    run = {"q": {"a": 1.0, "b": 2.0, "c": 1.0, "d": 0.5}}
    path = self._path()
    trec_run.write_run(path, run)
    rows = [line.split() for line in path.read_text().splitlines()]
    # Ties (a, c) go by doc id descending; ranks start at 1.
    self.assertEqual(
        [(r[2], r[3]) for r in rows],
        [("b", "1"), ("c", "2"), ("a", "3"), ("d", "4")],
    )
    self.assertEqual([r[1] for r in rows], ["Q0"] * 4)

  def test_accepts_sequences_of_pairs(self):
    path = self._path()
    trec_run.write_run(path, {"q": [("a", 0.5), ("b", 0.25)]})
    self.assertEqual(trec_run.read_run(path), {"q": {"a": 0.5, "b": 0.25}})

  def test_write_errors(self):
    with self.assertRaisesRegex(ValueError, "tag"):
      trec_run.write_run(self._path(), {"q": {"a": 1.0}}, tag="my run")
    with self.assertRaisesRegex(ValueError, "more than once"):
      trec_run.write_run(self._path(), {"q": [("a", 1.0), ("a", 0.5)]})
    with self.assertRaisesRegex(ValueError, "empty"):
      trec_run.write_run(self._path(), {"q": {"": 1.0}})

  def test_malformed_line_names_file_and_line(self):
    path = self._path()
    path.write_text("q Q0 a 1 0.5 t\n\nq Q0 b 2 0.25\n", encoding="utf-8")
    with self.assertRaisesRegex(
        ValueError, re.escape(f"{path}:3: expected 6 fields") + ".*got 5"
    ):
      trec_run.read_run(path)
    path.write_text("q Q0 a 1 high t\n", encoding="utf-8")
    with self.assertRaisesRegex(
        ValueError, re.escape(f"{path}:1: ") + ".*score"
    ):
      trec_run.read_run(path)
    path.write_text("q Q0 a 1 0.5 t\nq Q0 a 2 0.4 t\n", encoding="utf-8")
    with self.assertRaisesRegex(
        ValueError, re.escape(f"{path}:2: ") + ".*repeats"
    ):
      trec_run.read_run(path)

  def test_limit_small_ids_round_trip_and_metrics_survive(self):
    with open(_LIMIT_SMALL / "corpus.jsonl", encoding="utf-8") as f:
      doc_ids = [json.loads(line)["_id"] for line in f]
    self.assertTrue(any(" " in d for d in doc_ids))
    qrels = {}
    with open(_LIMIT_SMALL / "qrels" / "test.tsv", encoding="utf-8") as f:
      next(f)
      for line in f:
        qid, doc_id, label = line.rstrip("\n").split("\t")
        qrels.setdefault(qid, {})[doc_id] = int(label)
    rng = np.random.default_rng(0)
    query_ids = list(qrels)[:200]
    # Random float32 scores over all 46 docs, with some exact ties.
    scores_qk = np.round(
        rng.normal(size=(len(query_ids), len(doc_ids))), 1
    ).astype(np.float32)
    indices_qk = np.argsort(-scores_qk, axis=1)
    scores_qk = np.take_along_axis(scores_qk, indices_qk, axis=1)
    run = trec_run.run_from_topk(query_ids, doc_ids, scores_qk, indices_qk)
    path = self._path()
    trec_run.write_run(path, run)
    read = trec_run.read_run(path)
    self.assertEqual(read, run)
    measures = ("ndcg@10", "recall@2", "mrr@10", "map")
    self.assertEqual(
        ir_metrics.evaluate(qrels, read, measures),
        ir_metrics.evaluate(qrels, run, measures),
    )


class RunFromTopkTest(absltest.TestCase):

  def test_padding_is_skipped_and_scores_are_exact(self):
    scores_qk = np.array([[0.7, 0.1], [0.3, -np.inf]], np.float32)
    indices_qk = np.array([[2, 0], [1, -1]])
    run = trec_run.run_from_topk(
        ["q1", "q2"], ["d0", "d 1", "d2"], scores_qk, indices_qk
    )
    self.assertEqual(
        run,
        {
            "q1": {"d2": float(np.float32(0.7)), "d0": float(np.float32(0.1))},
            "q2": {"d 1": float(np.float32(0.3))},
        },
    )
    self.assertEqual(
        trec_run.run_from_topk(
            ["q"], ["d"], np.zeros((1, 1)), np.full((1, 1), -1)
        ),
        {"q": {}},
    )

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, "more than once"):
      trec_run.run_from_topk(
          ["q"], ["a", "b"], np.ones((1, 2)), np.array([[1, 1]])
      )
    with self.assertRaisesRegex(ValueError, "out of range"):
      trec_run.run_from_topk(["q"], ["a"], np.ones((1, 1)), np.array([[1]]))
    with self.assertRaisesRegex(ValueError, "must both be"):
      trec_run.run_from_topk(["q"], ["a"], np.ones((1, 2)), np.array([[0]]))
    with self.assertRaisesRegex(ValueError, "query ids"):
      trec_run.run_from_topk(
          ["q", "r"], ["a"], np.ones((1, 1)), np.array([[0]])
      )


if __name__ == "__main__":
  absltest.main()
