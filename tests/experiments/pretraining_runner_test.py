"""Tests for experiments/pretraining/run.py's step runner.

A step runs once and is skipped when its done-file exists; a finished step
asked again with other arguments (another step count, say) is an error
rather than a stale row; the arguments are compared with the workdir
abstracted, so a copied workdir still matches. The "command" is a tiny
Python program instead of retrieval_jax.main.
"""

import json
import pathlib
import sys

from absl.testing import absltest

from experiments.pretraining import run as pretraining_run
from retrieval_jax import errors

# Writes argv[1] (the done-file) and appends a line to argv[2] (a log).
_WRITER = (
    "import pathlib, sys;"
    "pathlib.Path(sys.argv[1]).write_text('{}');"
    "log = pathlib.Path(sys.argv[2]);"
    "log.write_text(log.read_text() + 'ran\\n' if log.exists() else 'ran\\n')"
)


class RunnerTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.workdir = pathlib.Path(self.create_tempdir().full_path)
    self.runner = pretraining_run.Runner(
        self.workdir, main=(sys.executable, "-c", _WRITER)
    )
    self.done = self.workdir / "train" / "a" / "results.json"
    self.done.parent.mkdir(parents=True)
    self.log = self.workdir / "log.txt"

  def _args(self, steps):
    return [str(self.done), str(self.log), f"--config.train.num_steps={steps}"]

  def _runs(self):
    return self.log.read_text().count("ran")

  def test_a_finished_step_is_skipped(self):
    self.runner.step("train/a", self._args(200), self.done)
    self.runner.step("train/a", self._args(200), self.done)
    self.assertEqual(self._runs(), 1)
    times = json.loads(self.runner.times_path.read_text())
    self.assertGreater(times["train/a"]["wall_s"], 0)
    recorded = json.loads(self.runner.commands_path.read_text())["train/a"]
    self.assertEqual(recorded[0], "<workdir>/train/a/results.json")

  def test_other_arguments_for_a_finished_step_are_an_error(self):
    self.runner.step("train/a", self._args(200), self.done)
    with self.assertRaisesRegex(
        errors.ConfigError, r"train/a .*num_steps=800.*another --workdir"
    ):
      self.runner.step("train/a", self._args(800), self.done)
    self.assertEqual(self._runs(), 1)

  def test_a_failing_step_says_which_and_records_nothing(self):
    failing = pretraining_run.Runner(
        self.workdir, main=(sys.executable, "-c", "raise SystemExit(3)")
    )
    with self.assertRaisesRegex(errors.ConfigError, r"train/b failed \(exit 3"):
      failing.step("train/b", [], self.workdir / "b.json")
    self.assertFalse(failing.commands_path.exists())
    self.assertIn("train/b", failing.times())


if __name__ == "__main__":
  absltest.main()
