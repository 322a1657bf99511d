"""End to end: a cross-encoder trained, evaluated as a re-ranker, then
searched with CUR, through the real entry point on the shipped LIMIT-small.

* `configs/train.py:smoke,cross_encoder` trains from all-MiniLM-L6-v2,
  checkpoints, and re-ranks BM25's top 5 on LIMIT-small dev; its run file
  holds those candidates with the checkpoint's scores, and the metrics it
  reports equal pytrec_eval on that run.
* `python -m experiments.cur_knn.run` with `experiments/cur_knn/config.py:
  smoke` reads that checkpoint (model kind, head and pair length from its
  saved config), scores the exact matrices and reports every method at
  every budget with calls equal to the budget.
* Bad values stop the job naming the key.

Marked slow (about 2 minutes on 2 cores): run with `pytest -m slow`.
"""

import json
import pathlib
import shutil
import subprocess
import sys
import tempfile

from absl.testing import absltest
import jax
import numpy as np
import pytest
import pytrec_eval

from retrieval_jax import kinds
from retrieval_jax import sharding
from retrieval_jax.data import beir
from retrieval_jax.data import features
from retrieval_jax.evaluation import trec_run
import test_util
from test_util import REPO


def _env():
  return test_util.subprocess_env()


def _main(*args, check=True, module="retrieval_jax.main"):
  return subprocess.run(
      [sys.executable, "-m", module, *args],
      cwd=REPO,
      env=_env(),
      capture_output=True,
      text=True,
      timeout=900,
      check=check,
  )


def _cur(*args):
  return _main(
      "--config=experiments/cur_knn/config.py:smoke",
      *args,
      check=False,
      module="experiments.cur_knn.run",
  )


class CrossEncoderEndToEndTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = pathlib.Path(tempfile.mkdtemp(prefix="rj_e2e_ce_"))
    cls.train_dir = cls.root / "ce"
    proc = _main(
        "--config=configs/train.py:smoke,cross_encoder",
        f"--workdir={cls.train_dir}",
        check=False,
    )
    if proc.returncode:
      raise AssertionError(proc.stderr[-3000:])

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.root, ignore_errors=True)
    super().tearDownClass()

  @pytest.mark.slow
  def test_training_checkpoints_and_reranks(self):
    results = json.loads((self.train_dir / "results.json").read_text())
    self.assertEqual(results["steps"], 4)
    after = results["after"]
    self.assertEqual(
        set(after),
        {
            f"eval/limit_dev/{m}"
            for m in ("ndcg@10", "mrr@10", "recall@10", "recall@20")
        },
    )
    first = results["first_stage"]
    # Re-ranking the top 5 cannot change recall@10 of those 5 documents.
    self.assertAlmostEqual(
        after["eval/limit_dev/recall@10"],
        first["first_stage/limit_dev/recall@10"],
        places=6,
    )
    cached = json.loads(
        (self.train_dir / "first_stage_limit_dev.json").read_text()
    )
    self.assertLen(cached["candidates"], 16)
    self.assertTrue((self.train_dir / "checkpoints" / "4").is_dir())

    # The final evaluation's run: each query's first 5 candidates, scored
    # by the step-4 checkpoint's model (re-scored here from the pairs).
    run = trec_run.read_run(
        self.train_dir / "eval" / "step_4" / "limit_dev" / "run.trec"
    )
    self.assertEqual(
        {q: set(docs) for q, docs in run.items()},
        {q: set(docs[:5]) for q, docs in cached["candidates"].items()},
    )
    model, tokenizer, run_config, step = kinds.load_run(
        self.train_dir, sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    )
    self.assertEqual(step, 4)
    collection = beir.load_beir(str(REPO / "data" / "limit-small"), split="dev")
    queries = dict(zip(*collection.judged_queries()))
    docs = dict(zip(collection.doc_ids, collection.doc_texts()))
    pairs = [(q, d, s) for q, ranked in run.items() for d, s in ranked.items()]
    encoded = features.encode_pairs(
        tokenizer,
        [queries[q] for q, _, _ in pairs],
        [docs[d] for _, d, _ in pairs],
        run_config["data"]["pair_max_length"],
        run_config["model"]["head"],
    )
    scores = model(
        encoded["input_ids"],
        encoded["attention_mask"],
        encoded["token_type_ids"],
        encoded.get("markers"),
        deterministic=True,
    )
    np.testing.assert_allclose(
        np.asarray(scores), [s for _, _, s in pairs], atol=1e-5
    )
    # The reported metrics are pytrec_eval's on that run.
    per_query = pytrec_eval.RelevanceEvaluator(
        {q: collection.qrels[q] for q in run},
        {"ndcg_cut.10", "recip_rank", "recall.10,20"},
    ).evaluate(run)
    for ours, theirs in (
        ("ndcg@10", "ndcg_cut_10"),
        ("mrr@10", "recip_rank"),
        ("recall@10", "recall_10"),
        ("recall@20", "recall_20"),
    ):
      want = np.mean([v[theirs] for v in per_query.values()])
      self.assertAlmostEqual(
          after[f"eval/limit_dev/{ours}"], want, places=6, msg=ours
      )

  @pytest.mark.slow
  def test_cur_knn_on_the_checkpoint(self):
    workdir = self.root / "cur"
    proc = _cur(
        f"--config.cross_encoder.workdir={self.train_dir}",
        f"--config.data.path={REPO / 'data' / 'limit-small'}",
        "--config.dual_encoder.max_length=32",
        "--config.subset.num_items=40",
        f"--workdir={workdir}",
    )
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    results = json.loads((workdir / "results.json").read_text())
    self.assertEqual(results["cross_encoder"]["pair_max_length"], 48)
    self.assertEqual(results["cross_encoder"]["step"], 4)
    methods = {r["method"] for r in results["rows"]}
    self.assertLen(methods, 5)
    for row in results["rows"]:
      if "BM25" not in row["method"]:
        self.assertEqual(row["calls"], row["budget"], row)
    # Re-ranking a longer prefix of one first-stage ranking with the exact
    # scores cannot lose any of the exact top 10: recall@10 never falls as
    # the budget grows.
    for method in ("dual encoder + re-rank", "BM25 + re-rank"):
      recalls = [
          r["recall@10"]
          for r in sorted(
              (r for r in results["rows"] if r["method"] == method),
              key=lambda r: r["budget"],
          )
      ]
      self.assertLen(recalls, 3)
      self.assertEqual(recalls, sorted(recalls), method)
    # At budget 40 = every item, the adaptive search and the dual encoder's
    # re-ranking score all items: exact search.
    for row in results["rows"]:
      if row["budget"] == 40 and row["method"].startswith(("adaptive", "dual")):
        self.assertEqual(row["recall@10"], 1.0, row)
    self.assertEqual(
        (workdir / "recall_at_10.png").read_bytes()[:4], b"\x89PNG"
    )
    self.assertIn("adaptive CUR", (workdir / "recall_at_10.svg").read_text())
    self.assertIn("| method |", (workdir / "table.md").read_text())

  @pytest.mark.slow
  def test_bad_values_name_the_key(self):
    proc = _main(
        "--config=configs/train.py:smoke,cross_encoder",
        "--config.model.head=pooler",
        f"--workdir={self.root / 'bad'}",
        check=False,
    )
    self.assertNotEqual(proc.returncode, 0)
    self.assertIn("config.model.head='pooler'", proc.stderr)
    proc = _cur(f"--workdir={self.root / 'bad_cur'}")
    self.assertNotEqual(proc.returncode, 0)
    self.assertIn("config.cross_encoder.workdir is empty", proc.stderr)


if __name__ == "__main__":
  absltest.main()
