"""Tests for the loss registries of retrieval_jax.losses."""

import math

from absl.testing import absltest
from absl.testing import parameterized
import jax
import numpy as np

from retrieval_jax import losses
from retrieval_jax.losses import contrastive as cl


class RegistryTest(parameterized.TestCase):

  def test_each_name_gives_its_objective(self):
    # One row, two positives at ln 2 and two negatives at 0: the softmax
    # denominator is 2 + 2 + 1 + 1 = 6, so by hand
    #   InfoNCE (= JointLH, undivided): 2 (ln 6 - ln 2) = 2 ln 3
    #   SumMargLH: -ln(4 / 6) = ln 1.5
    #   LSEPair: ln(1 + 4 e^(0 - ln 2)) = ln 3
    #   symmetric: (2 ln 3 + 0) / 2, the one-query reverse term being 0
    #   orthogonal projection (cosines): (1 - ln 2) + |0|.
    ln2, ln3 = math.log(2), math.log(3)
    want = {
        "infonce": 2 * ln3,
        "rand1_lh": 2 * ln3,
        "joint_lh": 2 * ln3,
        "sum_marg_lh": math.log(1.5),
        "lse_pair": ln3,
        "symmetric_infonce": ln3,
        "orthogonal_projection": 1 - ln2,
    }
    self.assertEqual(set(losses.LOSSES), set(want))
    s = np.array([[ln2, ln2, 0.0, 0.0]], np.float32)
    pos = np.array([[True, True, False, False]])
    valid = np.ones((1, 4), bool)
    for name, value in want.items():
      loss, _ = losses.get_loss(name).fn(s, pos, valid)
      self.assertAlmostEqual(float(loss), value, places=5, msg=name)
      # One line in logs and docs.
      self.assertNotIn("\n", losses.get_loss(name).description, name)

  def test_unknown_name_lists_known(self):
    with self.assertRaisesRegex(ValueError, "infonce.*lse_pair"):
      losses.get_loss("info-nce")

  def test_spec_validates_fields(self):
    with self.assertRaises(ValueError):
      losses.LossSpec(cl.info_nce, "some", "pair", "x")
    with self.assertRaises(ValueError):
      losses.LossSpec(cl.info_nce, "one", "batch", "x")

  def test_every_loss_runs_on_one_batch(self):
    # One score matrix through every registered function: uniform contract.
    rng = np.random.default_rng(0)
    s = rng.normal(size=(3, 6)).astype(np.float32)
    pos, valid = cl.group_masks(np.array([1, 1, 1]), 2)
    for name, spec in losses.LOSSES.items():
      loss, aux = jax.jit(spec.fn)(s, pos, valid)
      self.assertEqual(loss.shape, (), name)
      self.assertTrue(np.isfinite(float(loss)), name)
      self.assertEqual(float(aux["num_valid_rows"]), 3.0, name)
    labels = np.zeros((3, 6), np.float32)
    for name, fn in losses.LISTWISE_LOSSES.items():
      loss, aux = jax.jit(fn)(s, labels + np.eye(3, 6), valid)
      self.assertTrue(np.isfinite(float(loss)), name)
      self.assertIn("num_valid_rows", aux)


if __name__ == "__main__":
  absltest.main()
