"""Tests for the loss registries of retrieval_jax.losses."""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import numpy as np

from retrieval_jax import losses
from retrieval_jax.losses import contrastive as cl


class RegistryTest(parameterized.TestCase):

  def test_required_entries(self):
    want = {
        "infonce": (cl.info_nce, "one", "pair"),
        "symmetric_infonce": (cl.symmetric_info_nce, "one", "pair"),
        "rand1_lh": (cl.info_nce, "one", "query"),
        "joint_lh": (cl.joint_lh, "all", "query"),
        "sum_marg_lh": (cl.sum_marg_lh, "all", "query"),
        "lse_pair": (cl.lse_pair, "all", "query"),
    }
    for name, (fn, positives, unit) in want.items():
      spec = losses.get_loss(name)
      self.assertIs(spec.fn, fn, name)
      self.assertEqual((spec.positives, spec.unit), (positives, unit), name)
      self.assertNotIn("\n", spec.description)

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
