"""End to end: a cross-encoder trained, evaluated as a re-ranker, then
searched with CUR, through the real entry point on the shipped LIMIT-small.

* `configs/train.py:smoke,cross_encoder` trains from all-MiniLM-L6-v2,
  checkpoints, and re-ranks BM25's top 5 on LIMIT-small dev; the metrics
  equal ir_metrics on the first stage's candidates re-scored by the
  checkpoint's model.
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
import pytest

import test_util
from test_util import REPO


def _env():
  return test_util.subprocess_env()


def _main(*args, check=True, module="retrieval_jax.main"):
  return subprocess.run([sys.executable, "-m", module, *args],
                        cwd=REPO, env=_env(), capture_output=True, text=True,
                        timeout=900, check=check)


def _cur(*args):
  return _main("--config=experiments/cur_knn/config.py:smoke", *args,
               check=False, module="experiments.cur_knn.run")


class CrossEncoderEndToEndTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = pathlib.Path(tempfile.mkdtemp(prefix="rj_e2e_ce_"))
    cls.train_dir = cls.root / "ce"
    proc = _main("--config=configs/train.py:smoke,cross_encoder",
                 f"--workdir={cls.train_dir}", check=False)
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
    self.assertEqual(set(after), {f"eval/limit_dev/{m}" for m in (
        "ndcg@10", "mrr@10", "recall@10", "recall@20")})
    first = results["first_stage"]
    # Re-ranking the top 5 cannot change recall@10 of those 5 documents.
    self.assertAlmostEqual(after["eval/limit_dev/recall@10"],
                           first["first_stage/limit_dev/recall@10"], places=6)
    cached = json.loads((self.train_dir / "first_stage_limit_dev.json")
                        .read_text())
    self.assertLen(cached["candidates"], 16)
    self.assertTrue((self.train_dir / "checkpoints" / "4").is_dir())

  @pytest.mark.slow
  def test_cur_knn_on_the_checkpoint(self):
    workdir = self.root / "cur"
    proc = _cur(f"--config.cross_encoder.workdir={self.train_dir}",
                f"--config.data.path={REPO / 'data' / 'limit-small'}",
                "--config.dual_encoder.max_length=32",
                "--config.subset.num_items=40", f"--workdir={workdir}")
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
      recalls = [r["recall@10"] for r in sorted(
          (r for r in results["rows"] if r["method"] == method),
          key=lambda r: r["budget"])]
      self.assertLen(recalls, 3)
      self.assertEqual(recalls, sorted(recalls), method)
    # At budget 40 = every item, the adaptive search and the dual encoder's
    # re-ranking score all items: exact search.
    for row in results["rows"]:
      if row["budget"] == 40 and row["method"].startswith(("adaptive",
                                                           "dual")):
        self.assertEqual(row["recall@10"], 1.0, row)
    self.assertEqual((workdir / "recall_at_10.png").read_bytes()[:4],
                     b"\x89PNG")
    self.assertIn("adaptive CUR", (workdir / "recall_at_10.svg").read_text())
    self.assertIn("| method |", (workdir / "table.md").read_text())

  @pytest.mark.slow
  def test_bad_values_name_the_key(self):
    proc = _main("--config=configs/train.py:smoke,cross_encoder",
                 "--config.model.head=pooler",
                 f"--workdir={self.root / 'bad'}", check=False)
    self.assertNotEqual(proc.returncode, 0)
    self.assertIn("config.model.head='pooler'", proc.stderr)
    proc = _cur(f"--workdir={self.root / 'bad_cur'}")
    self.assertNotEqual(proc.returncode, 0)
    self.assertIn("config.cross_encoder.workdir is empty", proc.stderr)


if __name__ == "__main__":
  absltest.main()
