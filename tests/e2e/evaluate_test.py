"""End to end: the evaluate and encode modes on the shipped LIMIT-small.

The full LIMIT-small run is the real acceptance check (all-MiniLM-L6-v2,
max length 256, cosine: Recall@2 = 0.162 in ../shared/data/DATA.md, computed
with sentence-transformers and pytrec_eval). SciFact and Cranfield take
minutes and are marked slow.
"""

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
import pytrec_eval
from absl.testing import absltest

from configs import common
from configs import evaluate as evaluate_config
from retrieval_jax import errors
from retrieval_jax import evaluate
from retrieval_jax.evaluation import ir_metrics
from retrieval_jax.evaluation import trec_run

_SHARED = common.REPO_ROOT.parent / "shared" / "data"


def _config(**overrides):
  config = evaluate_config.get_config()
  with config.unlocked():
    for key, value in overrides.items():
      section, field = key.split(".")
      config[section][field] = value
  return config


class EvaluateModeTest(absltest.TestCase):

  def test_limit_small_matches_reference_and_pytrec_eval(self):
    workdir = pathlib.Path(self.create_tempdir())
    metrics = evaluate.evaluate(_config(), workdir)
    # Reference: 0.162 (sentence-transformers + pytrec_eval, DATA.md).
    self.assertAlmostEqual(metrics["recall@2"], 0.162, delta=0.005)
    self.assertAlmostEqual(metrics["recall@10"], 0.481, delta=0.005)
    self.assertAlmostEqual(metrics["ndcg@10"], 0.314, delta=0.005)
    # Per-query values equal pytrec_eval's on the written run file (ids with
    # spaces survive the round trip through run.trec).
    run = trec_run.read_run(workdir / "run.trec")
    self.assertLen(run, 1000)
    self.assertIn("Geneva Durben", set().union(*map(set, run.values())))
    qrels = {}
    for line in (
        (common.REPO_ROOT / "data/limit-small/qrels/test.tsv")
        .read_text()
        .splitlines()[1:]
    ):
      q, d, s = line.split("\t")
      qrels.setdefault(q, {})[d] = int(s)
    per_query = json.loads((workdir / "metrics_per_query.json").read_text())
    names = {
        m: ir_metrics.to_pytrec_eval_name(m)
        for m in ("ndcg@10", "recall@2", "recall@100", "map")
    }
    # pytrec_eval is asked for "ndcg_cut.10" and answers "ndcg_cut_10".
    requests = {
        n.rsplit("_", 1)[0] + "." + n.rsplit("_", 1)[1]
        if n[-1].isdigit()
        else n
        for n in names.values()
    }
    reference = pytrec_eval.RelevanceEvaluator(qrels, requests).evaluate(run)
    for ours, theirs in names.items():
      for qid, value in reference.items():
        self.assertAlmostEqual(
            per_query[ours][qid], value[theirs], places=6, msg=f"{ours} {qid}"
        )
    for name in ("metrics.json", "timing.json", "config.json"):
      self.assertTrue((workdir / name).exists(), name)

  def test_encode_mode_writes_rows_in_file_order(self):
    workdir = pathlib.Path(self.create_tempdir())
    corpus_dir = pathlib.Path(self.create_tempdir())
    src = common.REPO_ROOT / "data/limit-small/corpus.jsonl"
    lines = src.read_text().splitlines()[:10]
    (corpus_dir / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    config = _config(**{"data.path": str(corpus_dir), "model.max_length": 64})
    docs_nd = evaluate.encode(config, workdir)
    saved = np.load(workdir / "corpus_embeddings.npy")
    ids = json.loads((workdir / "corpus_ids.json").read_text())
    self.assertEqual(saved.shape, (10, 384))
    self.assertEqual(saved.dtype, np.float32)
    self.assertEqual(ids, [json.loads(l)["_id"] for l in lines])
    np.testing.assert_array_equal(saved, docs_nd)
    # Unit norm (cosine model) and row i is document i: re-encoding one
    # document alone gives the same row.
    np.testing.assert_allclose(np.linalg.norm(saved, axis=1), 1.0, atol=1e-5)
    encoder = evaluate.make_encoder(
        config, evaluate.sharding.make_mesh(devices=jax.devices()[:1])
    )
    one = encoder.encode(
        [
            (
                json.loads(lines[3]).get("title", "")
                + " "
                + json.loads(lines[3])["text"]
            ).strip()
        ],
        progress=False,
    )
    np.testing.assert_allclose(one[0], saved[3], atol=1e-5)

  def test_missing_data_path_names_the_key(self):
    config = _config(**{"data.path": "/nonexistent/beir"})
    with self.assertRaisesRegex(
        errors.ConfigError, r"config\.data\.path='/nonexistent/beir'"
    ):
      evaluate.evaluate(config, self.create_tempdir())

  def test_missing_split_names_the_keys(self):
    config = _config(**{"data.split": "validation"})
    with self.assertRaisesRegex(
        errors.ConfigError,
        r"config\.data\.split='validation'.*qrels/validation\.tsv",
    ):
      evaluate.evaluate(config, self.create_tempdir())

  def test_bm25_hybrid_and_prf_retrievers(self):
    # LIMIT-small's first 100 judged queries; max length 32 keeps the dense
    # side to seconds. One dense cache serves the dense, hybrid and PRF runs.
    base = pathlib.Path(self.create_tempdir())
    common_overrides = {
        "data.max_queries": 100,
        "model.max_length": 32,
        "encode.cache_dir": str(base / "cache"),
    }

    def run(kind, **overrides):
      workdir = base / kind
      config = _config(**common_overrides, **overrides)
      with config.unlocked():
        config.retriever.kind = kind
      return evaluate.evaluate(config, workdir), workdir

    bm25, workdir = run("bm25")
    # DATA.md's BM25 row on all 1,000 queries: Recall@2 0.979, @10 1.000.
    self.assertGreater(bm25["recall@2"], 0.95)
    self.assertEqual(bm25["recall@10"], 1.0)
    stats = json.loads((workdir / "stats.json").read_text())
    self.assertGreater(stats["index_bytes"], 0)
    self.assertGreater(stats["search_ms_per_query"], 0)
    dense, _ = run("dense")
    # alpha = 0 without normalisation ranks by the dense scores alone (the
    # dense list covers all 46 documents, so the union adds nothing).
    hybrid, workdir = run(
        "hybrid", **{"retriever.alpha": 0.0, "retriever.normalization": "none"}
    )
    for name, value in dense.items():
      self.assertAlmostEqual(hybrid[name], value, places=6, msg=name)
    parts = json.loads((workdir / "stats.json").read_text())["parts"]
    self.assertEqual(parts["bm25"], bm25)
    # The default hybrid differs from both parts.
    mixed, _ = run("hybrid")
    self.assertNotEqual(mixed["recall@2"], dense["recall@2"])
    # Average PRF with no feedback document is the identity.
    prf, _ = run(
        "dense_prf", **{"retriever.prf_method": "average", "retriever.prf_k": 0}
    )
    for name, value in dense.items():
      self.assertAlmostEqual(prf[name], value, places=6, msg=name)

  def test_bad_retriever_names_the_key(self):
    config = _config()
    with config.unlocked():
      config.retriever.kind = "tfidf"
    with self.assertRaisesRegex(
        errors.ConfigError, r"config\.retriever\.kind='tfidf'"
    ):
      evaluate.evaluate(config, self.create_tempdir())
    with config.unlocked():
      config.retriever.kind = "splade"
    with self.assertRaisesRegex(
        errors.ConfigError, r"config\.retriever\.splade_workdir is empty"
    ):
      evaluate.evaluate(config, self.create_tempdir())

  def test_command_line_smoke(self):
    workdir = self.create_tempdir()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "retrieval_jax.main",
            "--config",
            str(common.REPO_ROOT / "configs/evaluate.py:smoke"),
            "--workdir",
            workdir.full_path,
            "--config.eval.run_tag=smoke",
        ],
        cwd=common.REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertIn("recall@2", proc.stdout)
    metrics = json.loads(
        (pathlib.Path(workdir.full_path) / "metrics.json").read_text()
    )
    self.assertEqual(
        set(metrics), set(evaluate_config.get_config("smoke").eval.measures)
    )
    first = (
        (pathlib.Path(workdir.full_path) / "run.trec")
        .read_text()
        .splitlines()[0]
        .split()
    )
    self.assertLen(first, 6)
    self.assertEqual(first[-1], "smoke")

  def test_command_line_bad_input_is_one_clear_line(self):
    # A malformed corpus line: the error names file and line, and the
    # process exits non-zero without a traceback.
    bad = pathlib.Path(self.create_tempdir())
    (bad / "qrels").mkdir()
    src = common.REPO_ROOT / "data/limit-small"
    lines = (src / "corpus.jsonl").read_text().splitlines()[:2]
    (bad / "corpus.jsonl").write_text(
        "\n".join(lines + ['{"_id": "x", "text": "cut']) + "\n"
    )
    (bad / "queries.jsonl").write_text((src / "queries.jsonl").read_text())
    (bad / "qrels/test.tsv").write_text((src / "qrels/test.tsv").read_text())
    for flag, expected in (
        ("--config.data.path=/nonexistent", "config.data.path='/nonexistent'"),
        (f"--config.data.path={bad}", f"{bad}/corpus.jsonl:3: malformed JSON"),
    ):
      proc = subprocess.run(
          [
              sys.executable,
              "-m",
              "retrieval_jax.main",
              "--config",
              str(common.REPO_ROOT / "configs/evaluate.py:smoke"),
              "--workdir",
              self.create_tempdir().full_path,
              flag,
          ],
          cwd=common.REPO_ROOT,
          capture_output=True,
          text=True,
          timeout=600,
      )
      self.assertNotEqual(proc.returncode, 0)
      self.assertIn(expected, proc.stderr)
      self.assertNotIn("Traceback", proc.stderr)


@pytest.mark.slow
class ReferenceCollectionsTest(absltest.TestCase):
  """Full zero-shot runs against DATA.md's reference numbers (minutes)."""

  def _run(self, name, retriever="dense"):
    if not (_SHARED / name).is_dir():
      self.skipTest(f"{_SHARED / name} not present")
    config = _config(**{"data.path": str(_SHARED / name)})
    with config.unlocked():
      config.retriever.kind = retriever
    return evaluate.evaluate(config, self.create_tempdir())

  def test_scifact_bm25(self):
    # DATA.md: bm25s Lucene BM25 (k1 0.9, b 0.4), nDCG@10 0.671, R@100
    # 0.919, MRR@10 0.636.
    metrics = self._run("scifact", "bm25")
    self.assertAlmostEqual(metrics["ndcg@10"], 0.671, delta=0.01)
    self.assertAlmostEqual(metrics["recall@100"], 0.919, delta=0.01)
    self.assertAlmostEqual(metrics["mrr@10"], 0.636, delta=0.01)

  def test_cranfield_bm25(self):
    # DATA.md: nDCG@10 0.353.
    metrics = self._run("cranfield", "bm25")
    self.assertAlmostEqual(metrics["ndcg@10"], 0.353, delta=0.01)

  def test_scifact(self):
    metrics = self._run("scifact")
    self.assertAlmostEqual(metrics["ndcg@10"], 0.645, delta=0.002)

  def test_cranfield(self):
    metrics = self._run("cranfield")
    self.assertAlmostEqual(metrics["ndcg@10"], 0.382, delta=0.003)


@pytest.mark.slow
class TrainedRetrieversTest(absltest.TestCase):
  """SPLADE, inference-free SPLADE and ColBERT: the smoke training runs,
  then the evaluate mode reads their checkpoints (minutes)."""

  def test_train_then_evaluate(self):
    base = pathlib.Path(self.create_tempdir())
    for kind in ("splade", "inference_free", "colbert"):
      proc = subprocess.run(
          [
              sys.executable,
              "-m",
              "retrieval_jax.main",
              "--config",
              str(common.REPO_ROOT / f"configs/train.py:smoke,{kind}"),
              "--workdir",
              str(base / f"train_{kind}"),
          ],
          cwd=common.REPO_ROOT,
          capture_output=True,
          text=True,
          timeout=900,
      )
      self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    results = {}
    for kind, first_stage in (
        ("splade", "bm25"),
        ("inference_free", "bm25"),
        ("colbert", "bm25"),
        ("colbert", "splade"),
    ):
      config = _config(**{
          "data.max_queries": 64,
          "model.max_length": 32,
          "encode.cache_dir": str(base / "cache"),
      })
      with config.unlocked():
        config.retriever.kind = kind
        config.retriever.first_stage = first_stage
        config.retriever.rerank_depth = 20
        for k in ("splade", "inference_free", "colbert"):
          config.retriever[f"{k}_workdir"] = str(base / f"train_{k}")
      workdir = base / f"eval_{kind}_{first_stage}"
      results[kind, first_stage] = evaluate.evaluate(config, workdir)
      stats = json.loads((workdir / "stats.json").read_text())
      self.assertEqual(stats["checkpoint_step"], 4)
      if kind != "colbert":
        # A sparse index: far fewer terms per document than the vocabulary.
        self.assertLess(stats["terms_per_doc"], 30522 / 4)
        self.assertGreater(stats["terms_per_doc"], 1)
      else:
        self.assertLessEqual(stats["maxsim_per_query"], 20)
      # Sparse runs return only documents sharing a term with the query
      # (fewer than 46 here); every run finds some relevant documents.
      metrics = results[kind, first_stage]
      self.assertGreater(metrics["recall@10"], 0.0)
      self.assertGreaterEqual(metrics["recall@100"], metrics["recall@10"])
    # A re-ranking re-orders the first stage's top 20 and nothing else.
    config = _config(**{"data.max_queries": 64})
    with config.unlocked():
      config.retriever.kind = "bm25"
    evaluate.evaluate(config, base / "eval_bm25")
    first = trec_run.read_run(base / "eval_bm25/run.trec")
    reranked = trec_run.read_run(base / "eval_colbert_bm25/run.trec")
    for query, docs in first.items():
      ranked = ir_metrics.trec_eval_sorted(docs)
      if len(ranked) <= 20:
        self.assertEqual(set(reranked[query]), set(docs), query)
        continue
      # Ties at the cut may be broken either way.
      cut = ranked[19][1]
      self.assertLen(reranked[query], 20)
      self.assertTrue(
          {d for d, s in ranked if s > cut}
          <= set(reranked[query])
          <= {d for d, s in ranked if s >= cut},
          query,
      )


if __name__ == "__main__":
  absltest.main()
