"""End to end: the M2 long-document smoke run through the real entry point.

The run builds the long-document collection, trains an M2 encoder whose
word embeddings come from all-MiniLM-L6-v2, checkpoints and evaluates; a
rerun reuses the collection and the final checkpoint; the export mode
writes towers a serving process loads.
"""

import json
import os
import subprocess
import sys
import tempfile

from absl.testing import absltest
import numpy as np
import pytest

from retrieval_jax import serving
from retrieval_jax.data import beir
from test_util import REPO


def _env():
  env = dict(os.environ, PYTHONPATH=str(REPO))
  # One CPU device per core, as a user's run gets; faster compiles.
  env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  return env


def _run(workdir, *extra):
  cmd = [sys.executable, "-m", "retrieval_jax.main",
         "--config=configs/m2_long_docs.py:smoke", f"--workdir={workdir}",
         *extra]
  return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True,
                        text=True, timeout=900, check=False)


class M2LongDocsTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.workdir = tempfile.mkdtemp(prefix="rj_m2_e2e_")
    cls.first = _run(cls.workdir)

  def test_trains_and_evaluates(self):
    self.assertEqual(self.first.returncode, 0, self.first.stderr[-3000:])
    results = json.loads(open(f"{self.workdir}/results.json").read())
    self.assertEqual(results["steps"], 4)
    after = results["after"]
    self.assertTrue(0.0 <= after["eval/long_docs/ndcg@10"] <= 1.0)
    # Real training happened: a finite loss was logged at every step.
    lines = [json.loads(x) for x in
             open(f"{self.workdir}/metrics.jsonl").read().splitlines()]
    losses = [x["train/loss"] for x in lines if "train/loss" in x]
    self.assertLen(losses, 4)
    self.assertTrue(np.all(np.isfinite(losses)))

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
        os.stat(f"{self.workdir}/long_docs/manifest.json").st_mtime, manifest)
    self.assertIn("step 4 of 4", again.stderr)
    export = _run(self.workdir, "--mode=export")
    self.assertEqual(export.returncode, 0, export.stderr[-3000:])
    model = serving.ServingModel.load(f"{self.workdir}/export")
    texts = ["a short query", "a longer passage " * 40]
    emb = np.asarray(model.encode_passages(texts))
    self.assertEqual(emb.shape, (2, 384))
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # Padding-invariant encoder: alone or next to a longer text, the same.
    alone = np.asarray(model.encode_passages(texts[:1]))
    np.testing.assert_allclose(alone[0], emb[0], atol=1e-5)


if __name__ == "__main__":
  absltest.main()
