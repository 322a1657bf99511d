"""Tests for retrieval_jax.losses.regularizers: FLOPS, L1, IDF-FLOPS, λ(t)."""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import numpy as np

from retrieval_jax.losses import regularizers as rg

# Jitted once per shape; eager dispatch would compile every primitive.
flops = jax.jit(rg.flops)
l1 = jax.jit(rg.l1)
idf_flops = jax.jit(rg.idf_flops)
quadratic_warmup = jax.jit(rg.quadratic_warmup, static_argnames="total_steps")


class SparsityTest(parameterized.TestCase):

  def test_hand_case(self):
    w = np.array([[1.0, 0.0, 2.0], [0.0, 0.0, 2.0]], np.float32)
    # FLOPS = 0.5² + 0 + 2², L1 = (3 + 2) / 2.
    self.assertAlmostEqual(float(flops(w)), 4.25, places=6)
    self.assertAlmostEqual(float(l1(w)), 2.5, places=6)

  @parameterized.parameters(2, 4, 7)
  def test_one_hots(self, n):
    # N texts on N distinct terms: 1/N; all on the same term: 1.
    distinct = np.eye(n, 8, dtype=np.float32)
    self.assertAlmostEqual(float(flops(distinct)), 1 / n, places=6)
    self.assertAlmostEqual(float(l1(distinct)), 1.0, places=6)
    same = np.zeros((n, 8), np.float32)
    same[:, 3] = 1.0
    self.assertAlmostEqual(float(flops(same)), 1.0, places=6)
    self.assertAlmostEqual(float(l1(same)), 1.0, places=6)

  def test_padded_rows_and_signs(self):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(5, 7)).astype(np.float32)
    valid = np.array([True, True, False, True, False])
    w_pad = np.where(valid[:, None], w, 1e3)
    kept = np.abs(w[valid])
    self.assertAlmostEqual(
        float(flops(w_pad, valid)), float((kept.mean(0) ** 2).sum()), places=5
    )
    self.assertAlmostEqual(
        float(l1(w_pad, valid)), float(kept.sum(1).mean()), places=5
    )
    # No valid row: zero, not NaN.
    none = np.zeros(5, bool)
    self.assertEqual(float(flops(w, none)), 0.0)
    self.assertEqual(float(l1(w, none)), 0.0)

  def test_flops_gradient(self):
    rng = np.random.default_rng(1)
    w = np.abs(rng.normal(size=(4, 6))).astype(np.float32) + 0.1
    g = jax.jit(jax.grad(rg.flops))(w)
    # d/dw_ij Σ_j (mean_i w_ij)² = 2 mean_j / N for positive weights.
    np.testing.assert_allclose(
        g, np.broadcast_to(2 * w.mean(0) / 4, w.shape), rtol=1e-5
    )


class IdfFlopsTest(parameterized.TestCase):

  def test_unit_idf_is_flops(self):
    rng = np.random.default_rng(2)
    u = np.abs(rng.normal(size=(6, 9))).astype(np.float32)
    valid = np.array([1, 1, 0, 1, 1, 1], bool)
    # Values ~6.5 in float32 (ulp 5e-7) from two different programs.
    self.assertAlmostEqual(
        float(idf_flops(u, np.ones(9, np.float32), valid)),
        float(flops(u, valid)),
        places=5,
    )

  def test_equals_flops_on_raw_weights(self):
    rng = np.random.default_rng(3)
    w = np.abs(rng.normal(size=(6, 9))).astype(np.float32)
    idf = rng.uniform(0.5, 8.0, size=9).astype(np.float32)
    u = w * idf  # the contributions a query's idf weighting produces
    self.assertAlmostEqual(float(idf_flops(u, idf)), float(flops(w)), places=5)
    # Per term the penalty on u is ∝ 1/idf²: a frequent (low-idf) term
    # costs more than a rare one with the same contribution.
    one_term = np.zeros((2, 9), np.float32)
    one_term[:, 0] = 1.0
    rare = one_term[:, ::-1].copy()
    idf_sorted = np.linspace(1.0, 9.0, 9).astype(np.float32)
    self.assertAlmostEqual(
        float(idf_flops(one_term, idf_sorted)), 1.0, places=6
    )
    self.assertAlmostEqual(float(idf_flops(rare, idf_sorted)), 1 / 81, places=6)

  def test_nonpositive_idf_terms_are_ignored(self):
    u = np.ones((3, 4), np.float32)
    idf = np.array([0.0, -1.0, 2.0, 1.0], np.float32)
    self.assertAlmostEqual(float(idf_flops(u, idf)), 0.25 + 1.0, places=6)
    g = jax.jit(jax.grad(rg.idf_flops))(u, idf)
    self.assertTrue(np.all(np.isfinite(g)))
    np.testing.assert_array_equal(g[:, :2], 0.0)


class WarmupTest(parameterized.TestCase):

  @parameterized.parameters(
      (0, 0.0), (25, 0.0625), (50, 0.25), (100, 1.0), (250, 1.0), (-5, 0.0)
  )
  def test_schedule(self, step, want):
    self.assertAlmostEqual(
        float(quadratic_warmup(step, total_steps=100)), want, places=6
    )

  def test_no_warmup(self):
    self.assertEqual(float(quadratic_warmup(0, total_steps=0)), 1.0)


if __name__ == "__main__":
  absltest.main()
