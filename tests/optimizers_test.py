"""Schedules, weight-decay masks and clipping built from the optim block."""

from absl.testing import absltest
from absl.testing import parameterized
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from configs import train as train_config
from retrieval_jax import optimizers


def _optim(**overrides) -> ml_collections.ConfigDict:
  optim = ml_collections.ConfigDict(train_config.get_config().optim.to_dict())
  optim.update(overrides)
  return optim


class ScheduleTest(parameterized.TestCase):

  def test_linear_warmup_then_linear_decay(self):
    schedule = optimizers.make_schedule(
        _optim(
            learning_rate=1.0, warmup_steps=10, decay="linear", end_factor=0.0
        ),
        total_steps=110,
    )
    # 0 at step 0, the peak at the end of warm-up, half-way down at 60.
    np.testing.assert_allclose(
        [schedule(s) for s in (0, 5, 10, 60, 110)],
        [0.0, 0.5, 1.0, 0.5, 0.0],
        atol=1e-6,
    )

  def test_warmup_fraction_and_cosine_end_factor(self):
    optim = _optim(
        learning_rate=2.0,
        warmup_steps=0,
        warmup_fraction=0.25,
        decay="cosine",
        end_factor=0.1,
    )
    self.assertEqual(optimizers.warmup_steps(optim, 40), 10)
    schedule = optimizers.make_schedule(optim, total_steps=40)
    np.testing.assert_allclose(schedule(10), 2.0, rtol=1e-6)
    # Cosine half-way: peak * (alpha + (1 - alpha) / 2).
    np.testing.assert_allclose(schedule(25), 2.0 * (0.1 + 0.45), rtol=1e-5)
    np.testing.assert_allclose(schedule(40), 0.2, rtol=1e-5)

  @parameterized.parameters(
      ({"decay": "step"}, "config.optim.decay='step'"),
      ({"learning_rate": 0.0}, "config.optim.learning_rate=0.0"),
      ({"name": "lion"}, "config.optim.name='lion'"),
      ({"clip_norm": -1.0}, "config.optim.clip_norm=-1.0"),
  )
  def test_bad_values_name_the_key(self, overrides, message):
    with self.assertRaisesRegex(optimizers.OptimizerConfigError, message):
      optimizers.make_optimizer(_optim(**overrides), 10)


class AdamWTest(absltest.TestCase):

  def test_weight_decay_skips_biases_and_norms(self):
    # With zero gradients, Adam's update is 0 and only the decay moves the
    # weights: matrices shrink by lr * wd * w, vectors stay put.
    optim = _optim(
        learning_rate=0.1,
        warmup_steps=0,
        warmup_fraction=0.0,
        decay="constant",
        weight_decay=0.5,
        clip_norm=0.0,
    )
    tx, _ = optimizers.make_optimizer(optim, 10)
    params = {
        "dense": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)},
        "norm": {"scale": jnp.ones(3)},
    }
    updates, _ = tx.update(jax_zeros(params), tx.init(params), params)
    new = optax.apply_updates(params, updates)
    # float32 decay step (fused or not): a few ulps, not numpy's 1e-7.
    np.testing.assert_allclose(new["dense"]["kernel"], 1 - 0.1 * 0.5, rtol=1e-6)
    np.testing.assert_allclose(new["dense"]["bias"], 1.0)
    np.testing.assert_allclose(new["norm"]["scale"], 1.0)

  def test_clipping_bounds_the_gradient_norm(self):
    optim = _optim(
        name="sgd",
        learning_rate=1.0,
        warmup_steps=0,
        warmup_fraction=0.0,
        decay="constant",
        clip_norm=1.0,
    )
    tx, _ = optimizers.make_optimizer(optim, 10)
    params = {"w": jnp.zeros(4)}
    grads = {"w": jnp.full(4, 10.0)}  # norm 20
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(optax.tree.norm(updates), 1.0, rtol=1e-6)


def jax_zeros(tree):
  return {
      k: jax_zeros(v) if isinstance(v, dict) else jnp.zeros_like(v)
      for k, v in tree.items()
  }


if __name__ == "__main__":
  absltest.main()
