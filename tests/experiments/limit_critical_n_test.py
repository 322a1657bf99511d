"""Tests for experiments/limit_critical_n: the search, the fit, the job.

Oracles: the released search's known outcome (critical n = 9 at d = 4, seed
42: n = 5 ... 9 solved, 10 ... 14 not; slow); the replay against a
line-by-line sequential version of the released search on arbitrary outcome
tables; the paper's cubic against its quoted extrapolations; a fit that
recovers a known cubic; the smoke job end to end through its command (slow)
and a bad config value failing with one line naming the key.
"""

import json
import pathlib
import subprocess
import sys
import xml.etree.ElementTree as ET

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import pytest

from experiments.limit_critical_n import config as limit_config
from experiments.limit_critical_n import run as limit_run
from experiments.limit_critical_n import search as cn
import test_util


def _sequential_released_search(start, solved, sweep=(-4, 5)):
  """The released search, transcribed loop for loop (the test's oracle)."""
  asked = []

  def evaluate(n):
    if n not in asked:
      asked.append(n)
    return solved(n)

  n_low = n_high = None
  min_n = 1
  if evaluate(start):
    n_low, step = start, 1
    while True:
      n_test = n_low + step
      if evaluate(n_test):
        n_low = n_test
        step *= 2
      else:
        n_high = n_test
        break
  else:
    n_high, step = start, 1
    while n_high > min_n:
      n_test = max(n_high - step, min_n)
      if not evaluate(n_test):
        n_high = n_test
        step *= 2
        if n_test == min_n:
          break
      else:
        n_low = n_test
        break
  critical = n_low
  if n_low is not None and n_high is not None:
    low, high = n_low, n_high
    while low <= high:
      mid = (low + high) // 2
      if mid < min_n:
        break
      if evaluate(mid):
        critical, low = mid, mid + 1
      else:
        high = mid - 1
  if critical is not None:
    for offset in range(sweep[0], sweep[1] + 1):
      evaluate(max(critical + offset, min_n))
  return critical, asked


class SearchTest(parameterized.TestCase):

  @pytest.mark.slow
  def test_critical_n_at_d4_is_9(self):
    (result,) = cn.critical_n_search([4], log=lambda _: None).values()
    self.assertEqual(result.critical_n, 9)
    self.assertEqual(result.solved_n(), [5, 6, 7, 8, 9])
    self.assertEqual(result.failed_n(), [10, 11, 12, 13, 14])
    # The released search starting at 7 asks for these, in this order.
    self.assertEqual(result.asked, [7, 8, 10, 9, 5, 6, 11, 12, 13, 14])

  @parameterized.parameters(1, 2, 3, 9, 14, 25, 60)
  def test_replay_matches_sequential_search_on_thresholds(self, threshold):
    for start in (1, 3, 7, 20, 70):
      known = {n: n <= threshold for n in range(1, 200)}
      expected, asked = _sequential_released_search(start, known.get)
      self.assertEqual(cn._replay(start, (-4, 5), known), (True, expected))
      self.assertEqual(cn._asked_order(start, (-4, 5), known), asked)
      self.assertEqual(expected, threshold)

  def test_replay_matches_sequential_search_on_arbitrary_outcomes(self):
    # Non-monotone outcome tables (a run near the edge can fail where a
    # larger n succeeds): the replay must still make the same decisions.
    rng = np.random.default_rng(0)
    for _ in range(200):
      edge = int(rng.integers(2, 40))
      known = {
          n: bool(n <= edge) ^ bool(rng.random() < 0.2) for n in range(1, 200)
      }
      start = int(rng.integers(1, 50))
      expected, asked = _sequential_released_search(start, known.get)
      self.assertEqual(cn._replay(start, (-4, 5), known)[1], expected)
      self.assertEqual(cn._asked_order(start, (-4, 5), known), asked)

  def test_speculation_covers_both_outcomes(self):
    # From scratch at start 7 the search asks for 7, then 8 (solved) or 6.
    self.assertEqual(cn._speculate(7, (-4, 5), {}, 0), {7})
    self.assertEqual(cn._speculate(7, (-4, 5), {}, 1), {6, 7, 8})
    # Two ahead: 8 -> 10 (or the binary search, whose next step is the
    # sweep, only run once real); 6 -> 4 (gallop down by 2) or the sweep.
    self.assertEqual(cn._speculate(7, (-4, 5), {}, 2), {4, 6, 7, 8, 10})
    # Once the critical n is known, the whole sweep comes in one request.
    known = {7: True, 8: True, 10: False, 9: True}
    self.assertEqual(
        cn._speculate(7, (-4, 5), known, 1), {5, 6, 11, 12, 13, 14}
    )


class FitTest(absltest.TestCase):

  def test_paper_cubic_reproduces_quoted_extrapolations(self):
    quoted = {512: 0.51e6, 768: 1.71e6, 1024: 4.03e6, 3072: 108e6, 4096: 255e6}
    for d, n in quoted.items():
      self.assertAlmostEqual(float(cn.paper_critical_n(d)) / n, 1.0, delta=0.01)
    self.assertEqual([cn.initial_n(d) for d in (4, 5, 6, 16)], [7, 11, 16, 82])

  def test_fit_recovers_a_cubic(self):
    dims = np.arange(4, 13)
    coefficients = limit_run.fit_cubic(dims, cn.paper_critical_n(dims))
    np.testing.assert_allclose(coefficients, cn.PAPER_CUBIC, atol=1e-8)
    self.assertAlmostEqual(
        limit_run.r_squared(coefficients, dims, cn.paper_critical_n(dims)), 1.0
    )
    with self.assertRaisesRegex(ValueError, "at least 4"):
      limit_run.fit_cubic([4, 5, 6], [9, 14, 19])

  def test_plot_has_both_fits_and_the_points(self):
    out = pathlib.Path(self.create_tempdir().full_path)
    dims, critical = [4, 5, 6, 7, 8], [9, 14, 19, 26, 29]
    png, svg = limit_run.write_plot(
        out / "plot", dims, critical, limit_run.fit_cubic(dims, critical)
    )
    self.assertEqual(png.read_bytes()[:4], b"\x89PNG")
    root = ET.parse(svg).getroot()
    texts = {
        "".join(t.itertext()) for t in root.iter() if t.tag.endswith("text")
    }
    self.assertContainsSubset(
        {
            "this run, cubic fit",
            "paper's cubic fit",
            "measured (largest solved n)",
        },
        texts,
    )


def _run(*args):
  return subprocess.run(
      [sys.executable, "-m", "experiments.limit_critical_n.run", *args],
      cwd=test_util.REPO,
      env=test_util.subprocess_env(),
      capture_output=True,
      text=True,
      check=False,
      timeout=600,
  )


class JobTest(absltest.TestCase):

  @pytest.mark.slow
  def test_critical_n_smoke_writes_results_fit_and_plot(self):
    workdir = pathlib.Path(self.create_tempdir())
    result = _run(
        "--config",
        "experiments/limit_critical_n/config.py:smoke",
        "--workdir",
        str(workdir),
    )
    self.assertEqual(result.returncode, 0, result.stderr[-2000:])
    table = json.loads((workdir / "critical_n.json").read_text())
    self.assertEqual(sorted(table), ["2", "3", "4", "5"])
    for d, entry in table.items():
      found = entry["by_seed"]["42"]
      self.assertEqual(found["d"], int(d))
      # The critical n is solved and the next n failed; every run listed.
      self.assertIn(entry["critical_n"], found["solved"])
      self.assertIn(entry["critical_n"] + 1, found["failed"])
      self.assertEqual(
          sorted(found["solved"] + found["failed"]),
          sorted(int(n) for n in found["runs"]),
      )
    summary = json.loads((workdir / "summary.json").read_text())
    self.assertLen(summary["cubic"], 4)
    self.assertEqual(summary["protocol"]["max_iterations"], 1000)
    self.assertEqual((workdir / "critical_n.png").read_bytes()[:4], b"\x89PNG")
    self.assertIn("paper's cubic fit", (workdir / "critical_n.svg").read_text())
    self.assertIn("critical n", result.stdout)

  def test_bad_dims_name_the_key(self):
    result = _run(
        "--config",
        "experiments/limit_critical_n/config.py:smoke",
        "--workdir",
        self.create_tempdir().full_path,
        "--config.dims=0,3",
    )
    self.assertNotEqual(result.returncode, 0)
    self.assertIn("config.dims", result.stderr)
    self.assertNotIn("Traceback", result.stderr)

  @pytest.mark.slow
  def test_evaluate_variant_reports_limit_measures(self):
    # The evaluate mode with LIMIT's measures; its full all-MiniLM-L6-v2
    # number (Recall@2 = 0.162) is checked by tests/e2e/evaluate_test.py.
    config = limit_config.get_config("evaluate,smoke")
    self.assertEqual(config.data.path, str(test_util.LIMIT_SMALL))
    metrics = limit_run.run(config, self.create_tempdir().full_path)
    self.assertEqual(list(metrics)[:3], ["recall@2", "recall@10", "recall@100"])
    # 46 documents: the top 100 holds every relevant one.
    self.assertEqual(metrics["recall@100"], 1.0)
    self.assertLessEqual(metrics["recall@2"], metrics["recall@10"])


if __name__ == "__main__":
  absltest.main()
