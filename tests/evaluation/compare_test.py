"""Paired significance tests: known answers, exact enumeration, scipy."""

import json

from absl.testing import absltest
import numpy as np

from retrieval_jax.evaluation import compare


class CompareTest(absltest.TestCase):

  def test_randomization_exact_known_answer(self):
    # diffs (1, 1, 1): only the two all-same-sign patterns of 8 reach
    # |mean| = 1, so p = 2 / 8.
    self.assertAlmostEqual(compare.randomization_p(np.ones(3)), 0.25)
    # A zero difference cannot move: half of (1, 0): p = 1 ... every sign
    # pattern gives |mean| = 0.5 >= 0.5.
    self.assertAlmostEqual(compare.randomization_p(np.array([1.0, 0.0])), 1.0)

  def test_monte_carlo_agrees_with_exact(self):
    diff = np.random.default_rng(0).normal(0.3, 1.0, 16)
    exact = compare.randomization_p(diff)
    # 17 values: Monte Carlo; compare against the exact p of the first 16
    # plus a zero difference, which leaves the statistic's law unchanged up
    # to the 16/17 scale of every pattern.
    mc = compare.randomization_p(np.append(diff, 0.0), samples=200_000)
    self.assertAlmostEqual(mc, exact, delta=0.01)

  def test_ttest_matches_the_formula(self):
    rng = np.random.default_rng(1)
    a = {f"q{i}": float(v) for i, v in enumerate(rng.random(30))}
    b = {q: v + 0.05 + 0.1 * rng.normal() for q, v in a.items()}
    b["only_b"] = 1.0  # Unpaired queries are left out.
    out = compare.compare(a, b, samples=20_000)
    d = np.array([b[q] - a[q] for q in a])
    t = d.mean() / (d.std(ddof=1) / np.sqrt(len(d)))
    from scipy import stats  # pylint: disable=g-import-not-at-top

    self.assertAlmostEqual(
        out["p_ttest"], 2 * stats.t.sf(abs(t), len(d) - 1), places=10
    )
    self.assertEqual(out["queries"], 30)
    self.assertAlmostEqual(out["delta"], d.mean())
    self.assertLess(out["p_randomization"], 0.05)

  def test_identical_runs_and_cli(self):
    a = {"q1": 0.5, "q2": 1.0}
    out = compare.compare(a, dict(a))
    self.assertEqual(
        (out["delta"], out["p_ttest"], out["p_randomization"]), (0.0, 1.0, 1.0)
    )
    d = self.create_tempdir()
    d.create_file("metrics_per_query.json", json.dumps({"ndcg@10": a}))
    path_b = d.create_file("b.json", json.dumps({"ndcg@10": {"q1": 0.0}}))
    self.assertEqual(compare.main([d.full_path, path_b.full_path]), 0)
    self.assertEqual(
        compare.main([d.full_path, path_b.full_path, "--measure=map"]), 2
    )
    with self.assertRaisesRegex(ValueError, "share no query"):
      compare.compare({"a": 1.0}, {"b": 1.0})


if __name__ == "__main__":
  absltest.main()
