"""Tests for experiments/kv_memory: class_incremental.py and run.py.

Oracles: K3, the 2-D toy in which a discrete key-value bottleneck keeps
the earlier classes (all-class accuracy near the upper bounds 1/4 ... 1)
while a linear probe forgets; the data sets' structure (disjoint stages
that cover every class, a stratified, seeded split, standardisation with
training statistics); the compiled SGD loop against plain numpy SGD; and
on digits, DKVB far above the linear probe (slow).
"""

import dataclasses
import json
import pathlib
import sys
from unittest import mock

from absl.testing import absltest
import jax.numpy as jnp
from flax import nnx
import numpy as np
import optax
import pytest

from experiments.kv_memory import class_incremental as ci
from experiments.kv_memory import config as kv_config
from experiments.kv_memory import run as kv_run
from retrieval_jax import errors


class ToyTest(absltest.TestCase):

  def test_gaussian_toy_layout(self):
    data = ci.gaussian_toy(0)
    self.assertEqual(data.x_train.shape, (800, 2))
    self.assertEqual(data.x_test.shape, (800, 2))
    self.assertEqual(data.stages, ((0, 1), (2, 3), (4, 5), (6, 7)))
    np.testing.assert_array_equal(np.bincount(data.y_train), [100] * 8)
    # Class means on the radius-4 circle, spread sigma = 0.6.
    angle = 2 * np.pi * np.arange(8) / 8
    for k in range(8):
      rows = data.x_train[data.y_train == k]
      np.testing.assert_allclose(
          rows.mean(0),
          4 * np.array([np.cos(angle[k]), np.sin(angle[k])]),
          atol=0.2,
      )
      np.testing.assert_allclose(rows.std(0), 0.6, atol=0.15)
    np.testing.assert_array_equal(ci.gaussian_toy(0).x_test, data.x_test)
    self.assertFalse(np.array_equal(ci.gaussian_toy(1).x_train, data.x_train))

  def test_dkvb_keeps_earlier_classes_linear_probe_forgets(self):
    # K3 (seed 0): C = 16, M = 64, d_k = 2, 50 EMA steps, SGD 0.1 (x C),
    # 1000 steps per 2-class stage.
    results = ci.run(
        ci.gaussian_toy(0),
        dataclasses.replace(ci.TOY_SETTINGS, learners=("dkvb", "linear")),
    )
    np.testing.assert_allclose(results.upper_bound, [0.25, 0.5, 0.75, 1.0])
    dkvb, linear = results.final["dkvb"], results.final["linear"]
    self.assertGreaterEqual(dkvb, 0.9)
    self.assertLessEqual(linear, 0.6)
    self.assertGreaterEqual(dkvb - linear, 0.3)
    for got, bound in zip(results.all["dkvb"], results.upper_bound):
      self.assertBetween(got, bound - 0.03, bound)
    self.assertGreater(min(results.seen["dkvb"]), 0.95)
    # The probe learns each stage, then forgets it.
    self.assertGreater(results.seen["linear"][0], 0.95)
    table = ci.format_table(results)
    self.assertIn("| dkvb | ", table)
    self.assertIn("| upper bound | 1.000 / 0.250 |", table)


class DigitsTest(absltest.TestCase):

  def test_stages_split_and_standardisation(self):
    data = ci.digits_stages(0)
    self.assertEqual(data.stages, ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9)))
    flat = [c for stage in data.stages for c in stage]
    self.assertEqual(sorted(flat), list(range(10)))
    self.assertLen(set(flat), 10)
    self.assertEqual(len(data.y_train) + len(data.y_test), 1797)
    self.assertEqual(data.x_train.shape[1], 64)
    # Stratified: each class's test share is 30% up to rounding.
    train_n = np.bincount(data.y_train, minlength=10)
    test_n = np.bincount(data.y_test, minlength=10)
    share = test_n / (train_n + test_n)
    self.assertLess(np.abs(share - 0.3).max(), 0.01)
    # Standardised with the training rows' statistics.
    std = data.x_train.std(0)
    live = std > 0
    np.testing.assert_allclose(data.x_train.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(std[live], 1, atol=1e-4)
    self.assertGreater(np.abs(data.x_test.mean(0)[live]).max(), 1e-3)
    # Deterministic per seed.
    again = ci.digits_stages(0)
    np.testing.assert_array_equal(again.x_test, data.x_test)
    np.testing.assert_array_equal(again.y_train, data.y_train)
    other = ci.digits_stages(1)
    self.assertFalse(np.array_equal(other.y_test, data.y_test))
    with self.assertRaisesRegex(ValueError, "test_fraction=1.5"):
      ci.digits_stages(0, test_fraction=1.5)

  @pytest.mark.slow
  def test_dkvb_far_above_linear_probe(self):
    # A lighter DKVB than DIGITS_SETTINGS: C = M = 64, 300 steps per stage.
    settings = dataclasses.replace(
        ci.DIGITS_SETTINGS,
        steps_per_stage=300,
        num_heads=64,
        num_keys=64,
        ema_steps=20,
        learners=("dkvb", "linear"),
    )
    results = ci.run(ci.digits_stages(0), settings)
    self.assertGreaterEqual(results.final["dkvb"], 0.88)
    self.assertGreaterEqual(
        results.final["dkvb"] - results.final["linear"], 0.1
    )


class TrainingTest(absltest.TestCase):

  def test_train_stage_is_plain_sgd(self):
    # A linear probe after 3 steps equals numpy softmax-regression SGD.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 3)).astype(np.float32)
    y = rng.integers(0, 4, 20).astype(np.int32)
    batches = rng.integers(0, 20, (3, 5)).astype(np.int32)
    data = ci.Stages(x, y, x, y, ((0, 1, 2, 3),), 4)
    model, lr = ci.make_learner("linear", data, ci.TOY_SETTINGS)
    w = np.asarray(model.linear.kernel[...], np.float64)
    b = np.asarray(model.linear.bias[...], np.float64)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.sgd(lr)
    params, _, loss = ci.train_stage(
        graphdef,
        tx,
        params,
        rest,
        tx.init(params),
        jnp.asarray(x),
        jnp.asarray(y),
        jnp.asarray(batches),
    )
    losses = []
    for rows in batches:
      logits = x[rows] @ w + b
      p = np.exp(logits - logits.max(1, keepdims=True))
      p /= p.sum(1, keepdims=True)
      losses.append(-np.log(p[np.arange(5), y[rows]]).mean())
      g = (p - np.eye(4)[y[rows]]) / 5
      w, b = w - lr * x[rows].T @ g, b - lr * g.sum(0)
    np.testing.assert_allclose(
        np.asarray(params["linear"]["kernel"][...]), w, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        np.asarray(params["linear"]["bias"][...]), b, rtol=1e-5, atol=1e-6
    )
    self.assertAlmostEqual(float(loss), np.mean(losses), places=5)

  def test_format_table_and_errors(self):
    results = ci.Results(
        stages=((0, 1), (2, 3)),
        upper_bound=(0.5, 1.0),
        seen={"dkvb": (1.0, 0.9)},
        all={"dkvb": (0.5, 0.9)},
        seconds={"dkvb": 1.0},
    )
    self.assertEqual(
        ci.format_table(results),
        "\n".join([
            "| learner | stage 1 (0-1) | stage 2 (2-3) | final (all) |",
            "|---|---:|---:|---:|",
            "| upper bound | 1.000 / 0.500 | 1.000 / 1.000 | 1.000 |",
            "| dkvb | 1.000 / 0.500 | 0.900 / 0.900 | 0.900 |",
        ]),
    )
    with self.assertRaisesRegex(ValueError, "learner='knn'"):
      ci.run(
          ci.gaussian_toy(0),
          dataclasses.replace(ci.TOY_SETTINGS, learners=("knn",)),
      )


class ExperimentTest(absltest.TestCase):

  def test_run_dispatches_toy_and_writes_table_plot_and_json(self):
    config = kv_config.get_config("toy,smoke")
    workdir = pathlib.Path(self.create_tempdir().full_path)
    results = kv_run.run(config, workdir)
    saved = json.loads((workdir / "results.json").read_text())
    self.assertEqual(saved["experiment"], "toy")
    self.assertEqual(saved["settings"]["steps_per_stage"], 100)
    self.assertEqual(saved["settings"]["key_dim"], 2)  # The toy's DKVB.
    self.assertEqual(saved["final"], results.final)
    self.assertEqual(
        (workdir / "table.md").read_text(), ci.format_table(results) + "\n"
    )
    self.assertEqual((workdir / "accuracy.png").read_bytes()[:4], b"\x89PNG")
    svg = (workdir / "accuracy.svg").read_text()
    # The upper bound and one legend entry per learner.
    for label in ["upper bound", *results.all]:
      self.assertIn(f">{label}<", svg)

  def test_unknown_experiment_names_the_key(self):
    config = kv_config.get_config("smoke")
    config.experiment = "cifar"
    with self.assertRaisesRegex(
        errors.ConfigError, "config.experiment='cifar'"
    ):
      kv_run.run(config, self.create_tempdir().full_path)

  def test_digits_without_scikit_learn_says_what_to_install(self):
    with mock.patch.dict(sys.modules, {"sklearn": None}):
      with self.assertRaisesRegex(ImportError, r"\.\[experiments\]"):
        ci.digits_stages(0)


if __name__ == "__main__":
  absltest.main()
