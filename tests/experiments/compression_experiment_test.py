"""Tests for experiments/compression/run.py.

Fast: the whole table on planted embeddings (an evaluate-mode workdir and
dense cache written by hand, so nothing is encoded): the float32 row equals
pytrec_eval on a NumPy brute-force run, faiss and JAX ADC over the same PQ
codes score alike, and every saved index reloads. Slow: the smoke config end
to end, evaluate mode included; its float32 row reproduces the evaluate
mode's own metrics.
"""

import json
import pathlib

from absl.testing import absltest
import numpy as np
import pytest
import pytrec_eval

from experiments.compression import config as compression_config
from experiments.compression import run as compression_run
from retrieval_jax import evaluate as rj_evaluate
from retrieval_jax.evaluation import evaluators


def _smoke_config(workdir: pathlib.Path):
  config = compression_config.get_config("smoke")
  config.unlock()
  config.encode.cache_dir = str(workdir / "cache_limit-small")
  return config


class PlantedEmbeddingsTest(absltest.TestCase):

  def test_table_on_planted_embeddings(self):
    workdir = pathlib.Path(self.create_tempdir().full_path)
    config = _smoke_config(workdir)
    data_config = compression_config.get_config("smoke")
    data_config.unlock()
    data_config.data.path = config.datasets[0]
    collection = rj_evaluate.load_collection(data_config)
    evaluator = evaluators.RetrievalEvaluator(
        collection, max_queries=config.data.max_queries
    )
    rng = np.random.default_rng(0)
    docs_nd = rng.standard_normal((len(collection.doc_ids), 384))
    queries_qd = rng.standard_normal((len(evaluator.query_ids), 384))
    # What an evaluate run leaves: its config, metrics and dense cache.
    eval_dir = workdir / "limit-small_dense"
    eval_dir.mkdir()
    (eval_dir / "metrics.json").write_text(json.dumps({"ndcg@10": -1.0}))
    (eval_dir / "config.json").write_text(
        json.dumps({"search": {"metric": "cosine"}})
    )
    cache = pathlib.Path(config.encode.cache_dir)
    cache.mkdir()
    np.savez(
        cache / "dense_planted.npz",
        docs_nd=docs_nd.astype(np.float32),
        queries_qd=queries_qd.astype(np.float32),
        timing="{}",
    )
    results = compression_run.run(config, workdir)["limit-small"]
    self.assertEqual(list(results)[:-1], list(config.order))
    self.assertEqual(results["evaluate_mode_reference"], {"ndcg@10": -1.0})

    # Oracle: cosine brute force in float64, scored by pytrec_eval.
    docs_nd /= np.linalg.norm(docs_nd, axis=1, keepdims=True)
    queries_qd /= np.linalg.norm(queries_qd, axis=1, keepdims=True)
    scores_qn = queries_qd @ docs_nd.T
    run = {
        q: {d: float(s) for d, s in zip(collection.doc_ids, row)}
        for q, row in zip(evaluator.query_ids, scores_qn)
    }
    per_query = pytrec_eval.RelevanceEvaluator(
        evaluator.qrels, {"ndcg_cut_10", "recall_100"}
    ).evaluate(run)
    for ours, theirs in (
        ("ndcg@10", "ndcg_cut_10"),
        ("recall@100", "recall_100"),
    ):
      want = np.mean([v[theirs] for v in per_query.values()])
      self.assertAlmostEqual(results["flat"]["metrics"][ours], want, places=6)
    self.assertEqual(results["flat"]["bytes_per_doc"], 384 * 4)
    self.assertEqual(results["sign"]["bytes_per_doc"], 384 / 8)
    # The same PQ codes through faiss and through the JAX ADC.
    for measure, value in results["pq48"]["metrics"].items():
      self.assertAlmostEqual(
          results["pq48_jax"]["metrics"][measure], value, places=6
      )
    for method in config.order:
      self.assertTrue(
          (workdir / "limit-small" / method / "index.json").is_file()
      )
    table = (workdir / "table.md").read_text()
    self.assertIn("| PQ m=8, 4 bits (jax ADC) | 4 |", table)
    self.assertIn("| sign bits + re-rank of Hamming top 20 | 48 |", table)

  def test_labels(self):
    self.assertEqual(
        compression_run.label(
            {"kind": "ivf_pq", "nlist": 72, "m": 48, "nbits": 8, "nprobe": 8}
        ),
        "IVF-PQ (faiss, nlist=72, m=48, 8 bits, nprobe=8)",
    )
    self.assertEqual(
        compression_run.label({"kind": "pca", "dims": 128}), "PCA-128"
    )


class SmokeTest(absltest.TestCase):

  @pytest.mark.slow
  def test_smoke_end_to_end(self):
    workdir = pathlib.Path(self.create_tempdir().full_path)
    results = compression_run.run(_smoke_config(workdir), workdir)
    rows = results["limit-small"]
    reference = rows["evaluate_mode_reference"]
    for measure in ("ndcg@10", "recall@100"):
      self.assertAlmostEqual(
          rows["flat"]["metrics"][measure], reference[measure], places=6
      )


if __name__ == "__main__":
  absltest.main()
