"""Tests for retrieval_jax.layers.binary_hash (BPR's hash layer)."""

import math

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from retrieval_jax.layers import binary_hash
import test_util


class BinaryHashTest(absltest.TestCase):

  def test_sign_maps_zero_to_plus_one(self):
    x = jnp.array([-2.0, -0.0, 0.0, 1e-30, 3.0], jnp.float32)
    np.testing.assert_array_equal(
        binary_hash.sign_codes(x), [-1.0, 1.0, 1.0, 1.0, 1.0]
    )
    self.assertEqual(
        binary_hash.sign_codes(x.astype(jnp.bfloat16)).dtype, jnp.bfloat16
    )

  def test_straight_through_value_and_gradient_by_hand(self):
    # beta = 2 at x = -1, 0, 0.5: values sign(x); gradients
    # 2 (1 - tanh^2(2x)) = 2 (1 - tanh(2)^2), 2, 2 (1 - tanh(1)^2).
    x = jnp.array([-1.0, 0.0, 0.5], jnp.float32)
    beta = 2.0
    np.testing.assert_array_equal(
        binary_hash.hash_codes(x, beta), [-1.0, 1.0, 1.0]
    )
    want = [
        2 * (1 - math.tanh(2.0) ** 2),  # 0.14130...
        2.0,
        2 * (1 - math.tanh(1.0) ** 2),  # 0.83994...
    ]
    grad = jax.grad(lambda x: jnp.sum(binary_hash.hash_codes(x, beta)))(x)
    np.testing.assert_allclose(grad, want, rtol=test_util.FP32_RTOL)
    # The chain rule passes an upstream gradient through unchanged.
    w = jnp.array([3.0, -1.0, 0.5])
    grad_w = jax.grad(lambda x: jnp.sum(w * binary_hash.hash_codes(x, beta)))(x)
    np.testing.assert_allclose(
        grad_w, w * np.array(want), rtol=test_util.FP32_RTOL
    )

  def test_relaxed_mode_is_tanh(self):
    x = jnp.linspace(-2.0, 2.0, 9)
    relaxed = binary_hash.hash_codes(x, 1.5, straight_through=False)
    np.testing.assert_allclose(relaxed, np.tanh(1.5 * np.asarray(x)), rtol=1e-6)
    ste_grad = jax.grad(lambda x: jnp.sum(binary_hash.hash_codes(x, 1.5)))(x)
    tanh_grad = jax.grad(
        lambda x: jnp.sum(
            binary_hash.hash_codes(x, 1.5, straight_through=False)
        )
    )(x)
    # Same backward pass; only the forward value differs.
    np.testing.assert_allclose(ste_grad, tanh_grad, rtol=test_util.FP32_RTOL)

  def test_beta_schedule_under_jit(self):
    self.assertAlmostEqual(float(binary_hash.hashnet_beta(0)), 1.0)
    self.assertAlmostEqual(
        float(binary_hash.hashnet_beta(10)), math.sqrt(2.0), places=6
    )

    @jax.jit
    def grad_at(step, x):
      beta = binary_hash.hashnet_beta(step)
      return jax.grad(lambda x: jnp.sum(binary_hash.hash_codes(x, beta)))(x)

    x = jnp.array([0.0, 0.25])
    for step in (0, 30):
      beta = math.sqrt(1 + 0.1 * step)
      want = [beta, beta * (1 - math.tanh(beta * 0.25) ** 2)]
      np.testing.assert_allclose(
          grad_at(step, x), want, rtol=test_util.FP32_RTOL
      )


if __name__ == "__main__":
  absltest.main()
