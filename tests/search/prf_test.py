"""Tests for retrieval_jax.search.prf.

Oracles: alpha = 1, beta = 0 (k = 0 for Average) returns q bit for bit;
known answers for q = (1, 0), d = (0, 1), (1, 1) and for a bottom-k negative
feedback example; missing (-1) entries are skipped; parity with a plain
NumPy loop on random lists with scattered padding; unit norm and unchanged
direction with `renormalize`; jit with traced weights; clear errors.
"""

import functools

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from retrieval_jax.search import prf
import test_util

_Q = np.array([[1.0, 0.0]], np.float32)
_DOCS = np.array([[0.0, 1.0], [1.0, 1.0], [2.0, 0.0], [0.0, 4.0]], np.float32)


def _reference(q_qd, docs_nd, feedback_qk, alpha, beta, gamma, k_top, k_bottom):
  """Rocchio by loops in float64; Average is alpha = beta = 1/(1+n)."""
  out = []
  for q_d, row in zip(q_qd.astype(np.float64), feedback_qk):
    valid = [int(i) for i in row if i >= 0]
    top = docs_nd[valid[:k_top]].astype(np.float64)
    bottom = docs_nd[valid[len(valid) - min(k_bottom, len(valid)) :]]
    new = alpha * q_d
    if len(top):
      new = new + beta * top.mean(0)
    if k_bottom and len(bottom):
      new = new - gamma * bottom.astype(np.float64).mean(0)
    out.append(new)
  return np.stack(out)


def _random_case(seed, q=5, n=20, d=6, k=7):
  rng = np.random.default_rng(seed)
  queries = rng.normal(size=(q, d)).astype(np.float32)
  docs = rng.normal(size=(n, d)).astype(np.float32)
  feedback = rng.integers(0, n, size=(q, k))
  feedback[rng.random((q, k)) < 0.3] = -1
  feedback[0] = -1  # a query with no feedback at all
  return queries, docs, feedback


class AveragePrfTest(parameterized.TestCase):

  def test_known_answer(self):
    out = prf.average_prf(_Q, _DOCS, np.array([[0, 1, 2]]), k=2)
    self.assertEqual(out.dtype, jnp.float32)
    np.testing.assert_allclose(out, [[2 / 3, 2 / 3]], rtol=1e-6)

  def test_k_zero_is_identity(self):
    queries, docs, feedback = _random_case(0)
    np.testing.assert_array_equal(
        prf.average_prf(queries, docs, feedback, k=0), queries
    )

  def test_missing_entries_are_skipped(self):
    # Trailing padding: (q + d0) / 2, not / 3.
    out = prf.average_prf(_Q, _DOCS, np.array([[0, -1]]), k=2)
    np.testing.assert_allclose(out, [[0.5, 0.5]], rtol=1e-6)
    # A gap: the first two *valid* entries are used.
    out = prf.average_prf(_Q, _DOCS, np.array([[0, -1, 1, 3]]), k=2)
    np.testing.assert_allclose(out, [[2 / 3, 2 / 3]], rtol=1e-6)
    out = prf.average_prf(_Q, _DOCS, np.array([[-1, -1]]), k=2)
    np.testing.assert_array_equal(out, _Q)

  @parameterized.parameters(1, 3, 10)
  def test_matches_reference(self, k):
    queries, docs, feedback = _random_case(k)
    out = prf.average_prf(queries, docs, feedback, k=k)
    counts = [min(k, int((row >= 0).sum())) for row in feedback]
    ref = np.concatenate([
        _reference(
            queries[i : i + 1],
            docs,
            feedback[i : i + 1],
            1 / (1 + c),
            c / (1 + c),
            0.0,
            k,
            0,
        )
        for i, c in enumerate(counts)
    ])
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


class RocchioPrfTest(parameterized.TestCase):

  def test_known_answer(self):
    out = prf.rocchio_prf(
        _Q, _DOCS, np.array([[0, 1, 2]]), alpha=0.9, beta=0.1, k_top=2
    )
    self.assertEqual(out.dtype, jnp.float32)
    np.testing.assert_allclose(out, [[0.95, 0.1]], rtol=1e-6)

  def test_alpha_one_beta_zero_is_identity(self):
    queries, docs, feedback = _random_case(1)
    np.testing.assert_array_equal(
        prf.rocchio_prf(queries, docs, feedback, alpha=1.0, beta=0.0), queries
    )

  def test_bottom_k_negative_feedback_known_answer(self):
    # top: d0 = (0, 1); bottom: last two valid = d2, d3, mean (1, 2).
    # q' = (1, 0) + 0.5 (0, 1) - 0.5 (1, 2) = (0.5, -0.5).
    out = prf.rocchio_prf(
        _Q,
        _DOCS,
        np.array([[0, 1, 2, 3, -1]]),
        alpha=1.0,
        beta=0.5,
        gamma=0.5,
        k_top=1,
        k_bottom=2,
    )
    np.testing.assert_allclose(out, [[0.5, -0.5]], rtol=1e-6)

  @parameterized.parameters((3, 0), (2, 2), (10, 4))
  def test_matches_reference(self, k_top, k_bottom):
    queries, docs, feedback = _random_case(k_top + k_bottom)
    out = prf.rocchio_prf(
        queries,
        docs,
        feedback,
        alpha=0.8,
        beta=0.3,
        gamma=0.2,
        k_top=k_top,
        k_bottom=k_bottom,
    )
    ref = _reference(queries, docs, feedback, 0.8, 0.3, 0.2, k_top, k_bottom)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)

  def test_jit_with_traced_weights_matches_eager(self):
    queries, docs, feedback = _random_case(2)
    fn = jax.jit(functools.partial(prf.rocchio_prf, k_top=2, k_bottom=1))
    jitted = fn(queries, docs, feedback, alpha=0.7, beta=0.2, gamma=0.1)
    eager = prf.rocchio_prf(
        queries,
        docs,
        feedback,
        alpha=0.7,
        beta=0.2,
        gamma=0.1,
        k_top=2,
        k_bottom=1,
    )
    # float32; jit may fuse / reorder the sums, and entries can be near 0.
    np.testing.assert_allclose(jitted, eager, rtol=1e-6, atol=1e-6)


class CommonTest(parameterized.TestCase):

  @parameterized.parameters("average", "rocchio")
  def test_renormalize_gives_unit_norm_same_direction(self, method):
    queries, docs, feedback = _random_case(3)
    fn = (
        functools.partial(prf.average_prf, k=3)
        if method == "average"
        else prf.rocchio_prf
    )
    raw = np.asarray(fn(queries, docs, feedback))
    unit = np.asarray(fn(queries, docs, feedback, renormalize=True))
    np.testing.assert_allclose(
        np.linalg.norm(unit, axis=1), 1.0, rtol=test_util.FP32_RTOL
    )
    np.testing.assert_allclose(
        unit, raw / np.linalg.norm(raw, axis=1, keepdims=True), rtol=1e-5
    )

  def test_float32_out_for_other_float_inputs(self):
    out = prf.rocchio_prf(
        _Q.astype(np.float64),
        jnp.asarray(_DOCS, jnp.bfloat16),
        np.array([[0, 1]], np.int32),
        k_top=2,
    )
    self.assertEqual(out.dtype, jnp.float32)
    np.testing.assert_allclose(out, [[0.95, 0.1]], rtol=1e-6)

  def test_bad_inputs_raise(self):
    fb = np.array([[0, 1]])
    with self.assertRaisesRegex(ValueError, "queries_qd"):
      prf.average_prf(_Q[0], _DOCS, fb, k=1)
    with self.assertRaisesRegex(ValueError, "dimension 3"):
      prf.average_prf(_Q, np.zeros((4, 3), np.float32), fb, k=1)
    with self.assertRaisesRegex(ValueError, "feedback_qk"):
      prf.rocchio_prf(_Q, _DOCS, np.array([[0], [1]]))
    with self.assertRaisesRegex(ValueError, "integer"):
      prf.rocchio_prf(_Q, _DOCS, fb.astype(np.float32))
    with self.assertRaisesRegex(ValueError, "index 4"):
      prf.average_prf(_Q, _DOCS, np.array([[0, 4]]), k=2)
    with self.assertRaisesRegex(ValueError, "k must"):
      prf.average_prf(_Q, _DOCS, fb, k=-1)
    with self.assertRaisesRegex(ValueError, "k_bottom must"):
      prf.rocchio_prf(_Q, _DOCS, fb, k_bottom=-2)


if __name__ == "__main__":
  absltest.main()
