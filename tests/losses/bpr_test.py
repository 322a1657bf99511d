"""Tests for retrieval_jax.losses.bpr (BPR's two losses)."""

import math

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from retrieval_jax import losses
from retrieval_jax.layers import binary_hash
from retrieval_jax.losses import bpr
from retrieval_jax.losses import contrastive
import test_util

# Two queries, their positives on the diagonal, D = 2 codes:
# q~0 = (1, 1), q~1 = (1, -1); d~0 = (1, -1), d~1 = (-1, -1).
Q_CODES = np.array([[1.0, 1.0], [1.0, -1.0]], np.float32)
D_CODES = np.array([[1.0, -1.0], [-1.0, -1.0]], np.float32)
POSITIVE = np.eye(2, dtype=bool)
VALID = np.ones((2, 2), bool)


def _reference_candidate_loss(scores_qc, labels_q, margin):
  """The reference code: margin_ranking_loss(pos repeated, others), mean."""
  hinges = []
  for i, label in enumerate(labels_q):
    for j in range(scores_qc.shape[1]):
      if j != label:
        hinges.append(
            max(0.0, -(scores_qc[i, label] - scores_qc[i, j]) + margin)
        )
  return float(np.mean(hinges))


class BprLossTest(absltest.TestCase):

  def test_candidate_loss_by_hand(self):
    # Scores <q~, d~> = [[0, -2], [2, 0]]. Row 0: max(0, 0.1 - 0 + (-2)) = 0;
    # row 1: its positive scores 0, its negative 2: max(0, 0.1 - 0 + 2) = 2.1.
    scores_qc = Q_CODES @ D_CODES.T
    np.testing.assert_array_equal(scores_qc, [[0.0, -2.0], [2.0, 0.0]])
    loss, aux = bpr.candidate_loss(scores_qc, POSITIVE, VALID)
    self.assertAlmostEqual(float(loss), 2.1 / 2, places=6)
    self.assertEqual(float(aux["num_valid_rows"]), 2.0)
    self.assertEqual(float(aux["accuracy"]), 0.5)
    # d/ds of the mean: row 1 only, -1/2 on its positive, +1/2 on its negative.
    grad = jax.grad(lambda s: bpr.candidate_loss(s, POSITIVE, VALID)[0])(
        jnp.asarray(scores_qc)
    )
    np.testing.assert_allclose(grad, [[0.0, 0.0], [0.5, -0.5]], atol=1e-7)

  def test_rerank_loss_by_hand(self):
    # Float queries e0 = (0.5, 0), e1 = (0, 1): <e, d~> = [[0.5, -0.5],
    # [-1, -1]]; row 0: log(1 + e^-1), row 1: log 2.
    e_qd = np.array([[0.5, 0.0], [0.0, 1.0]], np.float32)
    loss, _ = bpr.rerank_loss(e_qd @ D_CODES.T, POSITIVE, VALID)
    want = (math.log(1 + math.exp(-1)) + math.log(2)) / 2
    self.assertAlmostEqual(float(loss), want, places=6)
    total, aux = bpr.loss(
        Q_CODES @ D_CODES.T, e_qd @ D_CODES.T, POSITIVE, VALID
    )
    self.assertAlmostEqual(float(total), 1.05 + want, places=6)
    self.assertAlmostEqual(float(aux["candidate_loss"]), 1.05, places=6)
    self.assertAlmostEqual(float(aux["rerank_loss"]), want, places=6)

  def test_candidate_loss_equals_reference_on_in_batch_layout(self):
    # DPR layout as the reference trains: 4 queries × (positive + 1 hard
    # negative); every other column is a negative of the row.
    rng = np.random.default_rng(0)
    q_codes = np.sign(rng.standard_normal((4, 16))).astype(np.float32)
    p_codes = np.sign(rng.standard_normal((8, 16))).astype(np.float32)
    scores_qc = q_codes @ p_codes.T
    positive_qc, valid_qc = contrastive.group_masks(np.ones(4, np.int32), 2)
    for margin in (0.1, 2.0):
      loss, _ = bpr.candidate_loss(
          scores_qc, positive_qc, valid_qc, margin=margin
      )
      want = _reference_candidate_loss(scores_qc, [0, 2, 4, 6], margin)
      self.assertAlmostEqual(float(loss), want, places=5)

  def test_masks_and_several_positives(self):
    # One row: positives scoring 1 and 3, negatives 2 and 5 (5 invalid).
    # Pairs (1,2): 1.1, (3,2): 0 -> mean 0.55.
    scores = np.array([[1.0, 3.0, 2.0, 5.0]], np.float32)
    positive = np.array([[True, True, False, False]])
    valid = np.array([[True, True, True, False]])
    loss, _ = bpr.candidate_loss(scores, positive, valid)
    self.assertAlmostEqual(float(loss), 0.55, places=6)
    grad = jax.grad(lambda s: bpr.candidate_loss(s, positive, valid)[0])(
        jnp.asarray(scores)
    )
    # The masked column gets exactly zero gradient.
    np.testing.assert_allclose(grad, [[-0.5, 0.0, 0.5, 0.0]], atol=1e-7)

  def test_trains_through_the_hash_layer(self):
    # The losses on hashed codes give finite, nonzero encoder gradients.
    rng = np.random.default_rng(1)
    q_bd = jnp.asarray(rng.standard_normal((3, 8)), jnp.float32)
    p_cd = jnp.asarray(rng.standard_normal((3, 8)), jnp.float32)
    positive, valid = contrastive.group_masks(np.ones(3, np.int32), 1)

    def objective(q_bd, p_cd):
      beta = binary_hash.hashnet_beta(5)
      qh_bd = binary_hash.hash_codes(q_bd, beta)
      ph_cd = binary_hash.hash_codes(p_cd, beta)
      return bpr.loss(qh_bd @ ph_cd.T, q_bd @ ph_cd.T, positive, valid)[0]

    grads = jax.jit(jax.grad(objective, argnums=(0, 1)))(q_bd, p_cd)
    for g in grads:
      self.assertTrue(np.all(np.isfinite(g)))
      self.assertGreater(float(jnp.abs(g).sum()), 0.0)

  def test_registered(self):
    self.assertIs(losses.HASHING_LOSSES["bpr_candidate"], bpr.candidate_loss)
    self.assertIs(losses.HASHING_LOSSES["bpr_rerank"], bpr.rerank_loss)
    # Same contract as the contrastive losses: jit on one score matrix.
    s = np.random.default_rng(2).normal(size=(3, 6)).astype(np.float32)
    pos, valid = contrastive.group_masks(np.ones(3, np.int32), 2)
    for name, fn in losses.HASHING_LOSSES.items():
      loss, aux = jax.jit(fn)(s, pos, valid)
      self.assertTrue(np.isfinite(float(loss)), name)
      self.assertEqual(float(aux["num_valid_rows"]), 3.0, name)
    np.testing.assert_allclose(
        losses.HASHING_LOSSES["bpr_rerank"](s, pos, valid)[0],
        contrastive.info_nce(s, pos, valid)[0],
        rtol=test_util.FP32_RTOL,
    )


if __name__ == "__main__":
  absltest.main()
