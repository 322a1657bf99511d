"""Tests for retrieval_jax.analysis.embedding_dimension (the optimiser).

Oracles: the released protocol's known outcomes (seed 42, d = 4: n = 9
solved, n = 10 not); the InfoNCE floor ln k; exact stopping iterations of
the protocol's rules; padding that leaves a run's numbers unchanged. The
search, fit and plot are tested in tests/experiments/limit_critical_n_test.py.
"""

import math

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from retrieval_jax.analysis import embedding_dimension as ed
from retrieval_jax.analysis import qrel_patterns
import test_util


def _problem(n, d, seed=42, k=2):
  return ed.Problem(qrel_patterns.dense(n, k), n, d, seed)


class InitTest(parameterized.TestCase):

  @parameterized.parameters((10, 4, 42), (45, 7, 0), (1, 3, 5), (300, 12, 42))
  def test_prefix_draws_equal_the_shaped_draw(self, rows, dim, seed):
    # The batched runs slice long 1-D draws; they must be the protocol's
    # [rows, dim] draws from the same split key, bit for bit.
    for which in (0, 1):
      key = jax.random.split(jax.random.PRNGKey(seed))[which]
      expected = jax.random.normal(key, (rows, dim), jnp.float32)
      np.testing.assert_array_equal(
          ed._raw_normals(seed, which, rows, dim), np.asarray(expected)
      )

  def test_initial_embeddings_are_unit_rows(self):
    q_md, d_nd = ed.initial_embeddings(6, 4, 3, seed=1)
    self.assertEqual(q_md.shape, (6, 3))
    self.assertEqual(d_nd.shape, (4, 3))
    np.testing.assert_allclose(np.linalg.norm(q_md, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(d_nd, axis=1), 1.0, atol=1e-6)


class LossTest(absltest.TestCase):

  def test_separated_configuration_reaches_ln_k(self):
    # Each query's two positives share the softmax: the loss tends to ln 2
    # from above, never below, however large the margin.
    positive_mn = np.array([[1, 1, 0, 0], [0, 0, 1, 1]], np.float32)
    q_md = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    d_nd = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], np.float32)
    valid = np.ones(4, bool)
    for temperature, tol in ((0.1, 1e-3), (0.01, 1e-6)):
      loss = ed.infonce_loss(q_md, d_nd, positive_mn, valid, temperature)
      # float32 log(2) is 2e-9 above ln 2; allow a few ulps of rounding.
      self.assertGreaterEqual(float(loss), math.log(2) - test_util.FP32_ATOL)
      self.assertLess(float(loss) - math.log(2), tol)

  def test_loss_is_at_least_ln_k_and_matches_numpy(self):
    rng = np.random.default_rng(0)
    rel = qrel_patterns.dense(7, 3)
    positive_mn = np.zeros((len(rel), 7), np.float32)
    positive_mn[np.repeat(np.arange(len(rel)), 3), rel.ravel()] = 1
    q_md = rng.normal(size=(len(rel), 5)).astype(np.float32)
    d_nd = rng.normal(size=(7, 5)).astype(np.float32)
    loss = float(
        ed.infonce_loss(q_md, d_nd, positive_mn, np.ones(7, bool), 0.1)
    )
    logits = q_md.astype(np.float64) @ d_nd.T.astype(np.float64) / 0.1
    log_p = (
        logits
        - np.log(
            np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)
        )
        - logits.max(1, keepdims=True)
    )
    expected = -(log_p * positive_mn).sum() / positive_mn.sum()
    self.assertAlmostEqual(loss, expected, delta=1e-4 * abs(expected))
    self.assertGreater(loss, math.log(3))

  def test_padding_leaves_loss_and_hits_unchanged(self):
    rng = np.random.default_rng(1)
    rel = qrel_patterns.dense(5)
    positive_mn = np.zeros((10, 5), np.float32)
    positive_mn[np.repeat(np.arange(10), 2), rel.ravel()] = 1
    q_md = rng.normal(size=(10, 3)).astype(np.float32)
    d_nd = rng.normal(size=(5, 3)).astype(np.float32)
    # Two padded docs (masked), three padded queries (no positives) and two
    # zero dimensions; the padded doc rows would win every top-k if read.
    pad_pos = np.zeros((13, 7), np.float32)
    pad_pos[:10, :5] = positive_mn
    pad_q = np.zeros((13, 5), np.float32)
    pad_q[:10, :3] = q_md
    pad_q[10:, 0] = 1
    pad_d = np.zeros((7, 5), np.float32)
    pad_d[:5, :3] = d_nd
    pad_d[5:] = 100.0
    valid = np.arange(7) < 5
    self.assertAlmostEqual(
        float(ed.infonce_loss(pad_q, pad_d, pad_pos, valid, 0.1)),
        float(ed.infonce_loss(q_md, d_nd, positive_mn, np.ones(5, bool), 0.1)),
        places=5,
    )
    self.assertEqual(
        int(ed.top_k_hits(pad_q, pad_d, pad_pos, valid, 2)),
        int(ed.top_k_hits(q_md, d_nd, positive_mn, np.ones(5, bool), 2)),
    )

  def test_top_k_hits_known_answer(self):
    scores_mn = np.array([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 5.0, 4.0]])
    positive_mn = np.array([[1, 0, 1, 0], [0, 0, 1, 1]], np.float32)
    # Identity query vectors read the score rows directly.
    hits = ed.top_k_hits(
        np.eye(2, dtype=np.float32),
        scores_mn.T.astype(np.float32),
        positive_mn,
        np.ones(4, bool),
        2,
    )
    self.assertEqual(int(hits), 3)  # Query 0 finds 1 of 2, query 1 both.


class ProtocolTest(absltest.TestCase):

  def test_patience_stops_after_exactly_patience_plus_one_updates(self):
    # With an unreachable min_delta only the first update improves (on an
    # infinite best), so the counter reaches `patience` at update P + 1.
    protocol = ed.Protocol(patience=37, min_delta=10.0, log_interval=1000)
    (result,) = ed.optimize_free_embeddings([_problem(12, 2)], protocol)
    self.assertEqual(result.stop, "patience")
    self.assertEqual(result.iterations, 38)
    self.assertFalse(result.solved)

  def test_max_iterations_and_check_schedule(self):
    # Checks run at i = 0 and at the last allowed iteration only.
    protocol = ed.Protocol(max_iterations=7)
    (result,) = ed.optimize_free_embeddings([_problem(12, 2)], protocol)
    self.assertEqual(result.stop, "max_iterations")
    self.assertEqual(result.iterations, 7)
    self.assertLess(result.max_accuracy, 1.0)

  def test_solved_runs_stop_at_a_check(self):
    (result,) = ed.optimize_free_embeddings([_problem(6, 4)])
    self.assertTrue(result.solved)
    self.assertEqual(result.stop, "accuracy")
    self.assertEqual(result.iterations % 50, 1)  # Checked after update 50j.
    self.assertEqual(result.final_accuracy, 1.0)
    self.assertGreater(result.best_loss, math.log(2))

  def test_a_run_does_not_depend_on_its_batch(self):
    # The same run alone and padded beside larger n, d and another seed.
    protocol = ed.Protocol(max_iterations=400)
    alone = ed.optimize_free_embeddings([_problem(7, 3)], protocol)[0]
    batch = ed.optimize_free_embeddings(
        [_problem(11, 6, seed=3), _problem(7, 3), _problem(9, 2, seed=0)],
        protocol,
    )
    self.assertEqual(batch[1].n, 7)
    self.assertEqual(batch[1].iterations, alone.iterations)
    self.assertEqual(batch[1].stop, alone.stop)
    self.assertAlmostEqual(batch[1].best_loss, alone.best_loss, places=4)
    self.assertAlmostEqual(batch[1].max_accuracy, alone.max_accuracy)
    self.assertNotEqual(batch[0].best_loss, batch[1].best_loss)

  def test_bad_problems_are_rejected(self):
    with self.assertRaisesRegex(ValueError, "must exceed k"):
      ed.optimize_free_embeddings([ed.Problem(np.array([[0, 1]]), 2, 3)])
    with self.assertRaisesRegex(ValueError, "outside"):
      ed.optimize_free_embeddings([ed.Problem(np.array([[0, 5]]), 4, 3)])
    with self.assertRaisesRegex(ValueError, "mix k"):
      ed.optimize_free_embeddings([_problem(5, 2), _problem(5, 2, k=3)])

  def test_released_outcomes_at_d4(self):
    # The released protocol, seed 42: n = 9 is solved, n = 10 is not.
    r9, r10 = ed.optimize_free_embeddings([_problem(9, 4), _problem(10, 4)])
    self.assertTrue(r9.solved)
    self.assertEqual(r9.stop, "accuracy")
    self.assertFalse(r10.solved)
    self.assertEqual(r10.stop, "patience")
    self.assertLess(r10.max_accuracy, 1.0)


if __name__ == "__main__":
  absltest.main()
