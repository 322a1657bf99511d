"""End to end: Revela pretraining through the CLI, then the evaluate mode.

`configs/train.py:pretrain_revela,smoke` (LIMIT-small chunks, 2 documents
x 2 chunks a step, a 1-block LM) trains 2 steps and evaluates before and
after; its checkpoint holds the retriever and the LM; the evaluate mode
(`--config.run`) reads the run as a dense retriever and scores exactly as
the run's retriever weights do through `api.load(run=...)`.

Marked slow (two subprocess runs, about a minute on 2 cores).
"""

import json
import pathlib
import subprocess
import sys

from absl.testing import absltest
import numpy as np
import pytest

import jax
import retrieval_jax
from retrieval_jax import sharding
from retrieval_jax.data import beir
from retrieval_jax.evaluation import trec_run
import test_util
from test_util import REPO


def _main(*args):
  return subprocess.run(
      [sys.executable, "-m", "retrieval_jax.main", *args],
      cwd=REPO,
      env=test_util.subprocess_env(),
      capture_output=True,
      text=True,
      timeout=900,
      check=True,
  )


@pytest.mark.slow
class RevelaEndToEndTest(absltest.TestCase):

  def test_smoke_trains_and_the_evaluate_mode_reads_the_retriever(self):
    root = pathlib.Path(self.create_tempdir().full_path)
    workdir = root / "revela"
    _main(
        "--config=configs/train.py:pretrain_revela,smoke",
        f"--workdir={workdir}",
    )
    results = json.loads((workdir / "results.json").read_text())
    self.assertEqual(results["steps"], 2)
    self.assertIn("eval/limit_dev/ndcg@10", results["before"])
    self.assertIn("eval/limit_dev/ndcg@10", results["after"])
    train = results["train"]
    self.assertTrue(np.isfinite(train["train/loss"]))
    # Untrained LM: about log(30522) nats per token.
    self.assertBetween(train["train/loss"], 9.0, 11.5)
    self.assertBetween(train["train/same_doc_weight"], 0.0, 1.0)
    self.assertNotEqual(
        results["before"]["eval/limit_dev/ndcg@10"],
        results["after"]["eval/limit_dev/ndcg@10"],
    )

    out = root / "eval"
    _main(
        "--mode=evaluate",
        "--config=configs/evaluate.py:smoke",
        f"--workdir={out}",
        f"--config.run={workdir}",
    )
    self.assertEqual(
        json.loads((out / "stats.json").read_text())["retriever"], "dense"
    )
    # The evaluate mode embedded with the run's retriever: the scores in
    # its run file are the API's cosines over the same run.
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    model = retrieval_jax.load(run=str(workdir), mesh=mesh, max_length=32)
    limit = str(REPO / "data" / "limit-small")
    doc_ids, titles, texts = beir.read_corpus(beir.corpus_path(limit))
    doc_emb = model.encode([beir.doc_text(*tx) for tx in zip(titles, texts)])
    queries = dict(zip(*beir.read_queries(beir.queries_path(limit))))
    run = trec_run.read_run(out / "run.trec")
    qid = next(iter(run))
    q_emb = model.encode([queries[qid]])[0]
    scored = sorted(run[qid].items(), key=lambda kv: -kv[1])[:10]
    self.assertLen(scored, 10)
    for doc, score in scored:
      want = float(doc_emb[doc_ids.index(doc)] @ q_emb)
      self.assertAlmostEqual(score, want, delta=1e-4)


if __name__ == "__main__":
  absltest.main()
