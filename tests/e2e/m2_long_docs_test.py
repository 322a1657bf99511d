"""End to end: the M2 long-document smoke run through the real entry point.

The run builds the long-document collection, trains an M2 encoder whose
word embeddings come from all-MiniLM-L6-v2, checkpoints and evaluates (the
metrics it reports equal pytrec_eval on the run file it wrote); a rerun
reuses the collection and the final checkpoint; the export mode writes
towers a serving process loads, which reproduce that run's scores.
"""

import json
import os
import subprocess
import sys
import tempfile

from absl.testing import absltest
import numpy as np
import pytest
import pytrec_eval

from retrieval_jax import serving
from retrieval_jax.data import beir
from retrieval_jax.evaluation import trec_run
import test_util
from test_util import REPO


def _run(workdir, *extra, variant="smoke"):
  cmd = [
      sys.executable,
      "-m",
      "retrieval_jax.main",
      f"--config=configs/m2_long_docs.py:{variant}",
      f"--workdir={workdir}",
      *extra,
  ]
  return subprocess.run(
      cmd,
      cwd=REPO,
      env=test_util.subprocess_env(),
      capture_output=True,
      text=True,
      timeout=900,
      check=False,
  )


class M2LongDocsTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.workdir = tempfile.mkdtemp(prefix="rj_m2_e2e_")
    cls.first = _run(cls.workdir)
    # Read now: the slow test's rerun rewrites results.json.
    path = f"{cls.workdir}/results.json"
    cls.results = (
        json.loads(open(path).read()) if os.path.exists(path) else None
    )

  def test_trains_and_evaluates(self):
    self.assertEqual(self.first.returncode, 0, self.first.stderr[-3000:])
    results = self.results
    self.assertEqual(results["steps"], 4)
    # The reported metrics are pytrec_eval's on the run file the final
    # evaluation wrote, against the built collection's dev qrels.
    run = trec_run.read_run(self._run_file())
    self.assertLen(run, 16)  # evals.long_docs.max_queries
    qrels = beir.load_beir(f"{self.workdir}/long_docs", split="dev").qrels
    per_query = pytrec_eval.RelevanceEvaluator(
        {q: qrels[q] for q in run}, {"ndcg_cut.10", "recall.1,10"}
    ).evaluate(run)
    after = results["after"]
    for ours, theirs in (
        ("ndcg@10", "ndcg_cut_10"),
        ("recall@1", "recall_1"),
        ("recall@10", "recall_10"),
    ):
      want = np.mean([v[theirs] for v in per_query.values()])
      self.assertAlmostEqual(
          after[f"eval/long_docs/{ours}"], want, places=6, msg=ours
      )
    # Real training happened: a finite loss was logged at every step.
    lines = [
        json.loads(x)
        for x in open(f"{self.workdir}/metrics.jsonl").read().splitlines()
    ]
    losses = [x["train/loss"] for x in lines if "train/loss" in x]
    self.assertLen(losses, 4)
    self.assertTrue(np.all(np.isfinite(losses)))

  def _run_file(self):
    return f"{self.workdir}/eval/step_4/long_docs/run.trec"

  def test_collection_is_long_documents_of_the_source(self):
    self.assertEqual(self.first.returncode, 0, self.first.stderr[-3000:])
    built = beir.load_beir(f"{self.workdir}/long_docs", split="dev")
    source = beir.load_beir(str(REPO / "data" / "limit-small"), split="dev")
    # Fewer, longer documents holding every source passage.
    self.assertLess(len(built.doc_ids), len(source.doc_ids))
    joined = "\n".join(built.texts)
    for text in source.doc_texts():
      self.assertIn(text, joined)
    self.assertEqual(set(built.qrels), set(source.qrels))

  # Two more runs of the job (about 90 s); resume and export are covered
  # for the BERT encoder by tests/e2e/train_test.py in the default run.
  @pytest.mark.slow
  def test_rerun_resumes_and_export_serves(self):
    self.assertEqual(self.first.returncode, 0, self.first.stderr[-3000:])
    manifest = os.stat(f"{self.workdir}/long_docs/manifest.json").st_mtime
    again = _run(self.workdir, "--config.train.eval_after=False")
    self.assertEqual(again.returncode, 0, again.stderr[-3000:])
    # Same settings: the collection was reused, not rebuilt.
    self.assertEqual(
        os.stat(f"{self.workdir}/long_docs/manifest.json").st_mtime, manifest
    )
    self.assertIn("step 4 of 4", again.stderr)
    export = _run(self.workdir, "--mode=export")
    self.assertEqual(export.returncode, 0, export.stderr[-3000:])
    model = serving.ServingModel.load(f"{self.workdir}/export")
    # The exported towers give the scores the training run's evaluation
    # ranked by: every (query, document) score of its run file.
    run = trec_run.read_run(self._run_file())
    collection = beir.load_beir(f"{self.workdir}/long_docs", split="dev")
    queries = dict(zip(*collection.judged_queries()))
    scores = (
        np.asarray(model.encode_queries([queries[q] for q in run]))
        @ np.asarray(model.encode_passages(collection.doc_texts())).T
    )
    column = {d: j for j, d in enumerate(collection.doc_ids)}
    for i, ranked in enumerate(run.values()):
      docs = list(ranked)
      np.testing.assert_allclose(
          scores[i, [column[d] for d in docs]],
          [ranked[d] for d in docs],
          atol=1e-5,
      )
    texts = ["a short query", "a longer passage " * 40]
    emb = np.asarray(model.encode_passages(texts))
    self.assertEqual(emb.shape, (2, 384))
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # Padding-invariant encoder: alone or next to a longer text, the same.
    alone = np.asarray(model.encode_passages(texts[:1]))
    np.testing.assert_allclose(alone[0], emb[0], atol=1e-5)


class M2PretrainCropTest(absltest.TestCase):

  @pytest.mark.slow
  def test_crop_moco_on_the_long_documents(self):
    workdir = tempfile.mkdtemp(prefix="rj_m2_crop_e2e_")
    run = _run(workdir, variant="smoke,pretrain=crop")
    self.assertEqual(run.returncode, 0, run.stderr[-3000:])
    with open(f"{workdir}/results.json") as f:
      results = json.load(f)
    self.assertEqual(results["steps"], 4)
    for when in ("before", "after"):
      self.assertBetween(results[when]["eval/long_docs/ndcg@10"], 0.0, 1.0)
    # The MoCo kind: step 1 has the batch's other 3 keys as negatives, and
    # every later step more, from the queue of past keys.
    with open(f"{workdir}/metrics.jsonl") as f:
      rows = [json.loads(line) for line in f]
    negatives = [
        r["train/num_negatives"] for r in rows if "train/num_negatives" in r
    ]
    self.assertLen(negatives, 4)
    self.assertEqual(negatives[0], 3)
    self.assertEqual(negatives, sorted(set(negatives)))


if __name__ == "__main__":
  absltest.main()
