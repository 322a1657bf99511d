"""End to end: the train mode's recovery paths through the real entry point.

The smoke config with a tiny BERT (one layer of width 32, written here with
all-MiniLM-L6-v2's vocabulary) keeps each run's compute to seconds; the
paths under test do not depend on the model's size. One uninterrupted run
is the reference that the others copy or compare with:

* a truncated latest checkpoint and a bit flip in the one before are
  logged, moved aside and walked back past; the rerun ends with the
  reference's parameters and metrics.jsonl holds each step once;
* SIGTERM saves the step reached and exits 75; a second run on the busy
  workdir exits 1 naming the holder; the rerun resumes and matches;
* a resume whose config changes the state's layout is refused by name;
* `--mode=export` reads past a corrupt step, leaving the training's
  in-flight save and its checkpoints alone;
* bad values and flags fail before any work, in one `error:` line.
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from absl.testing import absltest
import jax
import numpy as np
import orbax.checkpoint as ocp
import safetensors.numpy
from jax.sharding import SingleDeviceSharding

from retrieval_jax import checkpointing
from retrieval_jax import pretrained
import test_util
from test_util import REPO

NUM_STEPS = 12
EVERY = 2
_TIMEOUT_S = 600


def _write_tiny_model(out: pathlib.Path) -> None:
  """all-MiniLM-L6-v2's files with one random layer of width 32."""
  source = pretrained.resolve_model_dir("all-MiniLM-L6-v2")
  shutil.copytree(
      source, out, ignore=shutil.ignore_patterns("model.safetensors", "*.md")
  )
  config = json.loads((source / "config.json").read_text())
  config.update(
      hidden_size=32,
      intermediate_size=64,
      num_attention_heads=2,
      num_hidden_layers=1,
  )
  (out / "config.json").write_text(json.dumps(config))
  sizes = {384: 32, 1536: 64}
  rng = np.random.default_rng(0)
  weights = {}
  for name, value in safetensors.numpy.load_file(
      source / "model.safetensors"
  ).items():
    if ".layer." in name and ".layer.0." not in name:
      continue
    shape = tuple(sizes.get(d, d) for d in value.shape)
    weights[name] = (
        np.ones(shape, np.float32)
        if "LayerNorm.weight" in name
        else 0.05 * rng.standard_normal(shape).astype(np.float32)
    )
  safetensors.numpy.save_file(weights, out / "model.safetensors")


class RecoveryEndToEndTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = pathlib.Path(tempfile.mkdtemp(prefix="rj_e2e_recovery_"))
    cls.model = cls.root / "tiny_model"
    _write_tiny_model(cls.model)
    cls.reference = cls.root / "uninterrupted"
    cls._run(cls.reference)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.root, ignore_errors=True)
    super().tearDownClass()

  @classmethod
  def _command(cls, workdir, *extra):
    return [
        sys.executable,
        "-m",
        "retrieval_jax.main",
        "--config=configs/train.py:smoke",
        f"--workdir={workdir}",
        f"--config.model.pretrained={cls.model}",
        f"--config.train.num_steps={NUM_STEPS}",
        f"--config.checkpoint.every_steps={EVERY}",
        "--config.checkpoint.max_to_keep=0",
        "--config.train.eval_before=False",
        "--config.train.eval_after=False",
        *extra,
    ]

  @classmethod
  def _run(cls, workdir, *extra, check=True):
    proc = subprocess.run(
        cls._command(workdir, *extra),
        cwd=REPO,
        env=test_util.subprocess_env(),
        capture_output=True,
        text=True,
        timeout=_TIMEOUT_S,
        check=False,
    )
    if check and proc.returncode:
      raise AssertionError(f"exit {proc.returncode}:\n{proc.stderr[-5000:]}")
    return proc

  def _copy_of_reference(self, name):
    workdir = self.root / name
    shutil.copytree(self.reference, workdir)
    return workdir

  def _assert_one_error_line(self, proc, *fragments):
    """Exactly one `error:` line holding each fragment; no traceback."""
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
    self.assertLen(lines, 1, proc.stderr[-5000:])
    for fragment in fragments:
      self.assertIn(fragment, lines[0])
    self.assertNotIn("Traceback", proc.stderr)

  def _assert_equals_reference(self, workdir):
    """The newest checkpoint's params equal the uninterrupted run's."""

    def final_params(run):
      directory = run / "checkpoints"
      manager = checkpointing.open_read_only(directory)
      try:
        step = manager.latest_step()
        saved = manager.item_metadata(step)["state"].tree["params"]
      finally:
        manager.close()
      device = SingleDeviceSharding(jax.devices()[0])
      target = jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
          saved,
      )
      params = checkpointing.restore_params_from(directory, target)
      return step, jax.device_get(params)

    step, params = final_params(workdir)
    ref_step, ref_params = final_params(self.reference)
    self.assertEqual(step, ref_step)
    diffs = jax.tree.leaves(
        jax.tree.map(
            lambda a, b: float(np.max(np.abs(a - b))), params, ref_params
        )
    )
    self.assertEqual(max(diffs), 0.0)

  def _assert_metrics_once_per_step(self, workdir):
    rows = [
        json.loads(line)
        for line in (workdir / "metrics.jsonl").read_text().splitlines()
    ]
    # The smoke config logs every step, and evaluation is off.
    self.assertEqual([r["step"] for r in rows], list(range(1, NUM_STEPS + 1)))

  def _steps(self, workdir):
    return sorted(os.listdir(workdir / "checkpoints"))

  def test_corrupt_latest_checkpoints_are_walked_back(self):
    workdir = self._copy_of_reference("corrupt")
    largest = lambda step: max(
        (
            p
            for p in (workdir / "checkpoints" / str(step) / "state").rglob("*")
            if p.is_file()
        ),
        key=lambda p: p.stat().st_size,
    )
    # The newest step loses half its largest file; the one before, one bit.
    truncated = largest(NUM_STEPS)
    os.truncate(truncated, truncated.stat().st_size // 2)
    flipped = largest(NUM_STEPS - EVERY)
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x01
    flipped.write_bytes(bytes(data))

    proc = self._run(workdir)
    self.assertRegex(
        proc.stderr,
        rf"checkpoint {NUM_STEPS} in \S+ cannot be restored: \S+ has \d+"
        r" bytes, \d+ when saved",
    )
    self.assertRegex(
        proc.stderr,
        rf"checkpoint {NUM_STEPS - EVERY} in \S+ cannot be restored: \S+"
        " does not match its saved sha256",
    )
    self.assertNotIn("Traceback", proc.stderr)
    results = json.loads((workdir / "results.json").read_text())
    self.assertEqual(results["source"], f"checkpoint:{NUM_STEPS - 2 * EVERY}")
    self.assertEqual(
        self._steps(workdir),
        sorted(
            [str(s) for s in range(EVERY, NUM_STEPS + 1, EVERY)]
            + [f"{NUM_STEPS}.corrupt", f"{NUM_STEPS - EVERY}.corrupt"]
        ),
    )
    self._assert_equals_reference(workdir)
    self._assert_metrics_once_per_step(workdir)

  def test_sigterm_saves_and_a_second_run_is_locked_out(self):
    workdir = self.root / "sigterm"
    log = (self.root / "sigterm.log").open("w+")
    # Saves only at the end unless stopped.
    first = subprocess.Popen(
        self._command(workdir, "--config.checkpoint.every_steps=100"),
        cwd=REPO,
        env=test_util.subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=log,
        text=True,
    )
    self.addCleanup(first.kill)
    metrics = workdir / "metrics.jsonl"
    deadline = time.monotonic() + _TIMEOUT_S
    while not (metrics.is_file() and metrics.read_text()):
      self.assertIsNone(first.poll(), "ended before its first step")
      self.assertLess(time.monotonic(), deadline)
      time.sleep(0.02)
    # Frozen mid-training, holding the lock, for as long as this takes.
    os.kill(first.pid, signal.SIGSTOP)

    second = self._run(workdir, check=False)
    self.assertEqual(second.returncode, 1)
    self._assert_one_error_line(
        second, f"workdir {workdir} is in use by pid {first.pid} on host"
    )

    os.kill(first.pid, signal.SIGTERM)  # delivered on SIGCONT
    os.kill(first.pid, signal.SIGCONT)
    self.assertEqual(first.wait(timeout=_TIMEOUT_S), 75)
    log.seek(0)
    stderr = log.read()
    saved = [int(s) for s in self._steps(workdir) if s.isdigit()]
    self.assertLen(saved, 1, stderr[-3000:])
    self.assertLess(saved[0], NUM_STEPS, "not stopped mid-run")
    self.assertIn(
        f"interrupted, resumable: SIGTERM at step {saved[0]} of {NUM_STEPS};"
        f" saved checkpoint {saved[0]}",
        stderr,
    )
    self.assertNotIn("Traceback", stderr)

    # The rerun (a save interval change is allowed, and logged) resumes.
    resumed = self._run(workdir, f"--config.checkpoint.every_steps={EVERY}")
    self.assertIn(
        f"resuming from step {saved[0]} with checkpoint.every_steps: 100 ->"
        f" {EVERY}",
        resumed.stderr,
    )
    results = json.loads((workdir / "results.json").read_text())
    self.assertEqual(results["source"], f"checkpoint:{saved[0]}")
    self._assert_equals_reference(workdir)
    self._assert_metrics_once_per_step(workdir)

  def test_resume_with_an_incompatible_config_is_refused(self):
    workdir = self._copy_of_reference("changed_config")
    before = self._steps(workdir)
    proc = self._run(workdir, "--config.optim.clip_norm=0.0", check=False)
    self.assertEqual(proc.returncode, 1)
    self._assert_one_error_line(
        proc,
        f"checkpoint {NUM_STEPS} in",
        "does not fit this run's train state",
        "optim.clip_norm: 1.0 -> 0.0",
    )
    self.assertEqual(self._steps(workdir), before)  # nothing moved aside

  def test_export_reads_past_a_corrupt_step_and_leaves_the_training_alone(
      self,
  ):
    workdir = self._copy_of_reference("export")
    checkpoints = workdir / "checkpoints"
    # What a run saving its next step right now has on disk.
    in_flight = (
        checkpoints
        / f"{NUM_STEPS + EVERY}{ocp.path.atomicity.TMP_DIR_SUFFIX}"
        / "state"
    )
    in_flight.mkdir(parents=True)
    (in_flight / "part").write_bytes(b"being written")
    latest = checkpoints / str(NUM_STEPS) / "state" / "_METADATA"
    latest.write_bytes(latest.read_bytes()[:10])
    before = self._steps(workdir)

    proc = subprocess.run(
        self._command(workdir, "--mode=export"),
        cwd=REPO,
        env=test_util.subprocess_env(),
        capture_output=True,
        text=True,
        timeout=_TIMEOUT_S,
        check=True,
    )
    self.assertIn(f"checkpoint {NUM_STEPS} in", proc.stderr)
    manifest = json.loads((workdir / "export" / "manifest.json").read_text())
    self.assertEqual(manifest["metadata"]["step"], NUM_STEPS - EVERY)
    self.assertEqual(self._steps(workdir), before)  # nothing renamed
    self.assertEqual((in_flight / "part").read_bytes(), b"being written")

  def test_bad_values_fail_before_any_work_in_one_line(self):
    a_file = self.root / "a_file"
    a_file.write_text("")
    empty = self.root / "empty"
    empty.mkdir()
    fresh = self.root / "never_created"
    # (arguments, exit status, fragments of the error line)
    cases = [
        (["--config.train.log_every=0"], 1, ["config.train.log_every=0"]),
        (
            ["--config.checkpoint.every_steps=0"],
            1,
            ["config.checkpoint.every_steps=0"],
        ),
        (["--config.mesh.shape=(0,1,1)"], 1, ["config.mesh.shape=(0, 1, 1)"]),
        (
            ["--config.mesh.shape=(4096,1,1)"],
            1,
            ["config.mesh.shape=(4096, 1, 1)", "needs 4096 devices"],
        ),
        (["--config.nope=1"], 2, ["--config.nope: the config has no key"]),
        (["--config=configs/nope.py"], 2, ["configs/nope.py: no such file"]),
        (["--workdir="], 2, ["--workdir is empty"]),
        ([f"--workdir={a_file}/run"], 1, ["Not a directory"]),
        (["--mode=export"], 1, ["does not exist: nothing to export"]),
        ([f"--workdir={empty}", "--mode=export"], 1, ["no checkpoint"]),
    ]
    procs = [
        subprocess.Popen(
            self._command(fresh, *args),
            cwd=REPO,
            env=test_util.subprocess_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args, _, _ in cases
    ]
    for (args, status, fragments), proc in zip(cases, procs):
      with self.subTest(" ".join(args)):
        _, stderr = proc.communicate(timeout=_TIMEOUT_S)
        self.assertEqual(proc.returncode, status, stderr[-3000:])
        self._assert_one_error_line(
            subprocess.CompletedProcess(args, status, "", stderr), *fragments
        )
    self.assertFalse(fresh.exists())
    self.assertEqual(os.listdir(empty), [".lock"])  # no checkpoints/


if __name__ == "__main__":
  absltest.main()
