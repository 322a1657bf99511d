"""End to end: configs/limit.py through the entry point.

The critical_n smoke run writes the per-d JSON, the summary with the cubic
fit and the SVG plot; a bad dimension list fails with one line naming
`config.dims`; the evaluate variant is the evaluation mode with LIMIT's
measures (its full all-MiniLM-L6-v2 number, Recall@2 = 0.162, is checked by
tests/e2e/evaluate_test.py on the same collection and config).
"""

import json
import os
import pathlib
import subprocess
import sys

from absl.testing import absltest
import pytest

from configs import common
from configs import limit as limit_config
from retrieval_jax import evaluate


def _main(*args):
  env = dict(os.environ, PYTHONPATH=str(common.REPO_ROOT))
  return subprocess.run(
      [sys.executable, "-m", "retrieval_jax.main", *args],
      cwd=common.REPO_ROOT, env=env, capture_output=True, text=True,
      check=False, timeout=600)


class LimitConfigTest(absltest.TestCase):

  @pytest.mark.slow
  def test_critical_n_smoke_writes_results_fit_and_plot(self):
    workdir = pathlib.Path(self.create_tempdir())
    result = _main("--config", "configs/limit.py:smoke", "--workdir",
                   str(workdir))
    self.assertEqual(result.returncode, 0, result.stderr[-2000:])
    table = json.loads((workdir / "critical_n.json").read_text())
    self.assertEqual(sorted(table), ["2", "3", "4", "5"])
    for d, entry in table.items():
      search = entry["by_seed"]["42"]
      self.assertEqual(search["d"], int(d))
      # The critical n is solved and the next n failed; every run listed.
      self.assertIn(entry["critical_n"], search["solved"])
      self.assertIn(entry["critical_n"] + 1, search["failed"])
      self.assertEqual(sorted(search["solved"] + search["failed"]),
                       sorted(int(n) for n in search["runs"]))
    summary = json.loads((workdir / "summary.json").read_text())
    self.assertLen(summary["cubic"], 4)
    self.assertEqual(summary["protocol"]["max_iterations"], 1000)
    self.assertTrue((workdir / "critical_n.svg").read_text().startswith(
        "<svg"))
    self.assertIn("critical n", result.stdout)

  def test_bad_dims_name_the_key(self):
    result = _main("--config", "configs/limit.py:smoke", "--workdir",
                   self.create_tempdir().full_path, "--config.dims=0,3")
    self.assertNotEqual(result.returncode, 0)
    self.assertIn("config.dims", result.stderr)
    self.assertNotIn("Traceback", result.stderr)

  @pytest.mark.slow
  def test_evaluate_variant_reports_limit_measures(self):
    config = limit_config.get_config("evaluate,smoke")
    self.assertEqual(config.data.path,
                     str(common.REPO_ROOT / "data" / "limit-small"))
    metrics = evaluate.evaluate(config, self.create_tempdir().full_path)
    self.assertEqual(list(metrics)[:3],
                     ["recall@2", "recall@10", "recall@100"])
    # 46 documents: the top 100 holds every relevant one.
    self.assertEqual(metrics["recall@100"], 1.0)
    self.assertLessEqual(metrics["recall@2"], metrics["recall@10"])


if __name__ == "__main__":
  absltest.main()
