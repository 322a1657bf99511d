"""The train mode's up-front value checks and its resume-config diff."""

import os

from absl.testing import absltest
from absl.testing import parameterized

from configs import train as train_config
from retrieval_jax import errors
from retrieval_jax import metric_logging
from retrieval_jax import train
from retrieval_jax import train_checks


def _smoke(**overrides):
  config = train_config.get_config("smoke")
  with config.unlocked():
    for key, value in overrides.items():
      section, field = key.split(".")
      config[section][field] = value
  return config


class SettingsTest(parameterized.TestCase):

  @parameterized.parameters(
      ("train.log_every", 0, "config.train.log_every=0"),
      ("checkpoint.every_steps", 0, "config.checkpoint.every_steps=0"),
      ("checkpoint.max_to_keep", -1, "config.checkpoint.max_to_keep=-1"),
      ("train.num_steps", -3, "config.train.num_steps=-3"),
      ("train.eval_every", -1, "config.train.eval_every=-1"),
      ("mesh.shape", (0, 1, 1), r"config.mesh.shape=\(0, 1, 1\)"),
      ("mesh.shape", (-1, -1, 1), r"config.mesh.shape=\(-1, -1, 1\)"),
      ("mesh.shape", (2, 1), r"config.mesh.shape=\(2, 1\)"),
      ("mesh.shape", ("abc",), r"config.mesh.shape=\('abc',\)"),
      ("mesh.cpu_devices", -2, "config.mesh.cpu_devices=-2"),
  )
  def test_bad_value_fails_before_the_workdir_exists(self, key, value, regex):
    workdir = os.path.join(self.create_tempdir().full_path, "run")
    with self.assertRaisesRegex(errors.ConfigError, regex):
      train.train_and_evaluate(_smoke(**{key: value}), workdir)
    self.assertFalse(os.path.exists(workdir))

  def test_empty_workdir(self):
    with self.assertRaisesRegex(errors.ConfigError, "workdir is empty"):
      train.train_and_evaluate(_smoke(), " ")

  def test_mesh_that_does_not_fit_the_devices(self):
    with self.assertRaisesRegex(
        errors.ConfigError, r"config.mesh.shape=\(3, 1, 1\): .*needs 3"
    ):
      train_checks.make_mesh(_smoke(**{"mesh.shape": (3, 1, 1)}))

  def test_defaults_pass(self):
    train_checks.validate_settings(_smoke())
    train_checks.validate_settings(train_config.get_config())


class DataPathsTest(absltest.TestCase):

  def _config(self, fmt, corpus_path):
    pairs = self.create_tempfile("pairs.jsonl", content="{}\n").full_path
    config = _smoke(**{"data.format": fmt, "data.negatives": "none"})
    with config.unlocked():
      config.data.path = pairs
      config.data.corpus_path = corpus_path
      config.data.group_size = 1
    return config

  def test_pairs_need_a_corpus(self):
    mesh = train_checks.make_mesh(_smoke())
    with self.assertRaisesRegex(errors.ConfigError, "config.data.corpus_path"):
      train_checks.validate(self._config("pairs", ""), mesh)

  def test_tevatron_corpus_is_optional_but_checked_when_given(self):
    mesh = train_checks.make_mesh(_smoke())
    train_checks.validate(self._config("tevatron", ""), mesh)
    missing = os.path.join(self.create_tempdir().full_path, "nowhere")
    with self.assertRaisesRegex(
        errors.ConfigError, "config.data.corpus_path=.*no such directory"
    ):
      train_checks.validate(self._config("tevatron", missing), mesh)


class _Checkpointer:
  directory = "/run/checkpoints"

  def __init__(self, latest):
    self.latest = latest

  def latest_step(self):
    return self.latest


class NonFiniteTest(absltest.TestCase):

  def test_names_the_last_good_checkpoint_or_says_there_is_none(self):
    nan = {"train/loss": float("nan")}
    with self.assertRaisesRegex(
        metric_logging.NonFiniteError,
        r"train/loss=nan; the last good checkpoint is step 4 in"
        r" /run/checkpoints$",
    ):
      train._check_finite(nan, 6, _Checkpointer(4))
    with self.assertRaisesRegex(
        metric_logging.NonFiniteError,
        "train/loss=nan; no checkpoint was saved before it",
    ) as ctx:
      train._check_finite(nan, 1, _Checkpointer(None))
    self.assertNotIn("last good", str(ctx.exception))
    self.assertEqual(ctx.exception.step, 1)
    train._check_finite({"train/loss": 1.0}, 2, _Checkpointer(None))


class ResumeConfigTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.saved = _smoke().to_dict()

  def _changed(self, **overrides):
    return _smoke(**overrides).to_dict()

  def test_unchanged(self):
    self.assertEqual(
        train_checks.check_resume_config(self.saved, self.saved, 4), {}
    )

  def test_model_and_data_order_changes_are_refused_naming_keys(self):
    current = self._changed(
        **{"model.pretrained": "other", "data.seed": 3, "train.log_every": 2}
    )
    with self.assertRaises(errors.ConfigError) as ctx:
      train_checks.check_resume_config(self.saved, current, 4)
    message = str(ctx.exception)
    self.assertIn("step 4", message)
    self.assertIn("model.pretrained: 'all-MiniLM-L6-v2' -> 'other'", message)
    self.assertIn("data.seed: 0 -> 3", message)
    self.assertNotIn("log_every", message)  # a safe change

  def test_safe_changes_are_logged(self):
    current = self._changed(**{
        "train.num_steps": 40,
        "train.eval_every": 10,
        "checkpoint.every_steps": 5,
        "mesh.shape": (1, -1, 1),
    })
    with self.assertLogs(level="INFO") as logs:
      self.assertEqual(
          train_checks.check_resume_config(self.saved, current, 4), {}
      )
    self.assertIn("train.num_steps: 4 -> 40", "\n".join(logs.output))

  def test_other_changes_are_allowed_with_a_warning(self):
    current = self._changed(**{"optim.learning_rate": 5e-5})
    with self.assertLogs(level="WARNING") as logs:
      other = train_checks.check_resume_config(self.saved, current, 4)
    self.assertEqual(other, {"optim.learning_rate": (1e-4, 5e-5)})
    self.assertIn("apply from step 5 on", "\n".join(logs.output))

  def test_added_and_removed_keys_count_as_changes(self):
    current = self._changed()
    del current["optim"]["eps"]
    self.assertEqual(
        train_checks.config_changes(self.saved, current),
        {"optim.eps": (1e-8, "<absent>")},
    )


if __name__ == "__main__":
  absltest.main()
