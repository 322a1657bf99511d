"""End to end: SIGTERM/SIGINT to one process of a 2-process training run.

Two `retrieval_jax.main` processes (one CPU device each) form one
`jax.distributed` run on a free local port, as in `multihost_test.py`, and
train the smoke config with the tiny BERT of `recovery_test.py`. A save
interval longer than the run means only a stop (or the end) saves. One
uninterrupted 2-process run is the reference; the other run is stopped
twice and resumed:

1. SIGTERM to process 1 once both processes logged step 2: both processes
   finish the same step, one checkpoint of it is committed (written by
   both), and both exit 75 with one "interrupted, resumable: ..." line;
2. the same command resumes from that step; SIGINT to process 0 (the
   coordinator) two steps later stops it the same way;
3. the same command again resumes and finishes: the final parameters and
   every step's logged loss equal the reference's.

`SecondSignalTest` runs a 2-process job without training: one stop step
and reason for both processes, then a second signal ends each at once.
"""

import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from absl.testing import absltest
from absl.testing import parameterized
import jax
import numpy as np
import pytest
from jax.sharding import SingleDeviceSharding

from recovery_test import _write_tiny_model
from retrieval_jax import checkpointing
import test_util
from test_util import REPO

NUM_STEPS = 24
EXIT_INTERRUPTED = 75
_TIMEOUT_S = 300
# Variables that would make a process join some other distributed run.
_DISTRIBUTED_ENV = (
    "JAX_COORDINATOR_ADDRESS",
    "COORDINATOR_ADDRESS",
    "JAX_NUM_PROCESSES",
    "JAX_PROCESS_ID",
)
# metric_logging's log line of a step: "... metric_logging.py:193] [7] perf/..."
_STEP_LINE = re.compile(r"metric_logging\.py:\d+\] \[(\d+)\] ")
_MESSAGE = "interrupted, resumable: "
# A 2-process job without training: process 1 gets the signal in argv[1];
# both count steps until the preemption service stops them at one and print
# it; then process 0 gets the signal too, and both wait for the test's.
_TWO_SIGNALS_JOB = """
import os, signal, sys, time
from jax.experimental import multihost_utils
from retrieval_jax import checkpointing, main
main.initialize_distributed()
import jax
signum = getattr(signal, sys.argv[1])
with checkpointing.StopSignals() as signals:
  if jax.process_index() == 1:
    os.kill(os.getpid(), signum)
  step = 0
  while True:  # as the train loop, without the training
    step += 1
    time.sleep(0.05)
    signals.requested()
    if multihost_utils.reached_preemption_sync_point(step):
      break
  print(f"stop at {step}: {checkpointing.stop_reason()}", flush=True)
  if jax.process_index() == 0:
    os.kill(os.getpid(), signum)  # the test's next signal is the second
  time.sleep(60)
print("still running", flush=True)
"""


def _free_port() -> int:
  """A TCP port that was free a moment ago (the OS picks it)."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


class _Run:
  """One launch of the 2-process job: its processes and their logs."""

  def __init__(self, command: list[str], logs: list[pathlib.Path]):
    address = f"localhost:{_free_port()}"
    base = {
        k: v
        for k, v in test_util.subprocess_env().items()
        if k not in _DISTRIBUTED_ENV
    }
    self.logs = logs
    self.procs = []
    for process_id, log in enumerate(logs):
      env = dict(
          base,
          JAX_PLATFORMS="cpu",
          JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
          JAX_COORDINATOR_ADDRESS=address,
          JAX_NUM_PROCESSES=str(len(logs)),
          JAX_PROCESS_ID=str(process_id),
          # One device per process (as subprocess_env: less optimisation).
          XLA_FLAGS=(
              "--xla_force_host_platform_device_count=1"
              " --xla_backend_optimization_level=0"
          ),
      )
      with open(log, "w") as err, open(log.with_suffix(".out"), "w") as out:
        self.procs.append(
            subprocess.Popen(  # pylint: disable=consider-using-with
                command, cwd=REPO, env=env, stdout=out, stderr=err
            )
        )

  def kill(self) -> None:
    for proc in self.procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()

  def stderr(self, i: int) -> str:
    return self.logs[i].read_text(errors="replace")

  def stdout(self, i: int) -> str:
    return self.logs[i].with_suffix(".out").read_text(errors="replace")

  def last_step(self, i: int) -> int:
    """The last step process `i` logged (0: none yet)."""
    return max(
        (int(m.group(1)) for m in _STEP_LINE.finditer(self.stderr(i))),
        default=0,
    )

  def wait_for_step(self, step: int, deadline: float) -> None:
    """Returns once every process has logged `step`; fails if one ended."""
    while not all(self.last_step(i) >= step for i in range(len(self.procs))):
      for i, proc in enumerate(self.procs):
        if proc.poll() is not None:
          raise AssertionError(
              f"process {i} exited with {proc.returncode} before step"
              f" {step}:\n{self.stderr(i)[-3000:]}"
          )
      if time.monotonic() > deadline:
        raise AssertionError(f"no step {step} within {_TIMEOUT_S}s")
      time.sleep(0.05)

  def wait(self, deadline: float) -> list[int]:
    """Every process's exit status (killed at the deadline)."""
    for proc in self.procs:
      try:
        proc.wait(timeout=max(deadline - time.monotonic(), 0))
      except subprocess.TimeoutExpired:
        pass
    self.kill()  # a process that lost its peer would wait minutes
    return [proc.returncode for proc in self.procs]


# About 3 minutes on 2 cores: three 2-process runs plus a reference run.
@pytest.mark.slow
class MultiProcessStopTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = pathlib.Path(tempfile.mkdtemp(prefix="rj_e2e_multihost_stop_"))
    cls.addClassCleanup(shutil.rmtree, cls.root, ignore_errors=True)
    cls.model = cls.root / "tiny_model"
    _write_tiny_model(cls.model)
    cls.reference = cls.root / "uninterrupted"
    cls.workdir = cls.root / "interrupted"
    deadline = time.monotonic() + _TIMEOUT_S
    runs = []
    try:
      # The reference trains alongside the first interrupted launch.
      reference = cls._start(cls.reference, "reference")
      runs.append(reference)
      # 1. SIGTERM to process 1 once both have logged step 2.
      cls.term = cls._stopped(1, 2, signal.SIGTERM, "term", deadline, runs)
      cls.reference_status = reference.wait(deadline)
      cls.reference_stderr = reference.stderr(0)
      cls.term_steps = cls._steps(cls.workdir)
      cls.term_step_ok = cls._verified(cls.term_steps)
      # 2. Resumed; SIGINT to process 0 two steps after the resume.
      cls.int = cls._stopped(
          0,
          cls._saved(cls.term_steps) + 2,
          signal.SIGINT,
          "int",
          deadline,
          runs,
      )
      cls.int_steps = cls._steps(cls.workdir)
      cls.int_step_ok = cls._verified(cls.int_steps)
      # 3. Resumed again, to the end.
      final = cls._start(cls.workdir, "final")
      runs.append(final)
      cls.final_status = final.wait(deadline)
      cls.final_stderr = [final.stderr(i) for i in range(2)]
    finally:
      for run in runs:
        run.kill()

  @classmethod
  def _start(cls, workdir: pathlib.Path, name: str) -> _Run:
    return _Run(
        [
            sys.executable,
            "-m",
            "retrieval_jax.main",
            "--config=configs/train.py:smoke",
            f"--workdir={workdir}",
            f"--config.model.pretrained={cls.model}",
            f"--config.train.num_steps={NUM_STEPS}",
            # Longer than the run: only a stop and the end save.
            "--config.checkpoint.every_steps=100",
            "--config.checkpoint.max_to_keep=0",
            "--config.train.eval_before=False",
            "--config.train.eval_after=False",
        ],
        [cls.root / f"{name}.p{i}.log" for i in range(2)],
    )

  @classmethod
  def _stopped(cls, target, after_step, signum, name, deadline, runs):
    """Starts on the workdir, signals `target` at `after_step`; the result."""
    run = cls._start(cls.workdir, name)
    runs.append(run)
    run.wait_for_step(after_step, deadline)
    os.kill(run.procs[target].pid, signum)
    status = run.wait(deadline)
    return {
        "status": status,
        "stderr": [run.stderr(i) for i in range(2)],
        "signal": signum,
        "target": target,
    }

  @staticmethod
  def _steps(workdir: pathlib.Path) -> list[str]:
    return sorted(os.listdir(workdir / "checkpoints"))

  @classmethod
  def _saved(cls, steps: list[str]) -> int:
    return max(int(s) for s in steps if s.isdigit())

  @classmethod
  def _verified(cls, steps: list[str]) -> bool:
    """The newest step's files match its checksums (both processes wrote)."""
    return checkpointing.verify_checksums(
        cls.workdir / "checkpoints" / str(cls._saved(steps))
    )

  def _assert_stopped(self, result, steps, verified, previous):
    """Both exited 75 at one step, saved once, with one message line each."""
    stderr = result["stderr"]
    for i in range(2):
      self.assertEqual(
          result["status"][i],
          EXIT_INTERRUPTED,
          f"process {i}:\n{stderr[i][-3000:]}",
      )
      self.assertNotIn("Traceback", stderr[i])
    # Only step directories: no tmp dir of a save left behind.
    self.assertTrue(all(s.isdigit() for s in steps), steps)
    step = self._saved(steps)
    self.assertEqual(steps, sorted(previous + [str(step)]))
    self.assertLess(step, NUM_STEPS, "not stopped mid-run")
    self.assertTrue(verified, "the checkpoint has no checksums.json")
    state = self.workdir / "checkpoints" / str(step) / "state"
    # Each process wrote its part of the one checkpoint.
    self.assertEqual(
        sorted(p.name for p in state.glob("ocdbt.process_*")),
        ["ocdbt.process_0", "ocdbt.process_1"],
    )
    self.assertTrue((state.parent / "commit_success.txt").is_file())
    for i in range(2):
      lines = [l for l in stderr[i].splitlines() if l.startswith(_MESSAGE)]
      self.assertLen(lines, 1, stderr[i][-3000:])
      # The same step and reason on both: the signal and its receiver.
      self.assertEqual(
          lines[0],
          f"{_MESSAGE}{result['signal'].name} on process"
          f" {result['target']} at step {step} of {NUM_STEPS}; saved"
          f" checkpoint {step} in {self.workdir / 'checkpoints'}; rerun the"
          " same command to resume",
      )
    return step

  def test_sigterm_to_one_process_stops_both_at_one_saved_step(self):
    step = self._assert_stopped(
        self.term, self.term_steps, self.term_step_ok, []
    )
    self.assertGreaterEqual(step, 2)

  def test_sigint_to_the_coordinator_stops_both_at_one_saved_step(self):
    first = self._saved(self.term_steps)
    step = self._assert_stopped(
        self.int, self.int_steps, self.int_step_ok, [str(first)]
    )
    self.assertGreaterEqual(step, first + 2)
    for i in range(2):
      self.assertIn(f"restored checkpoint {first} from", self.int["stderr"][i])

  def test_rerun_finishes_equal_to_an_uninterrupted_run(self):
    self.assertEqual(self.reference_status, [0, 0], self.reference_stderr)
    self.assertEqual(self.final_status, [0, 0], self.final_stderr[0][-3000:])
    resumed_from = self._saved(self.int_steps)
    results = json.loads((self.workdir / "results.json").read_text())
    self.assertEqual(results["source"], f"checkpoint:{resumed_from}")

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

    step, params = final_params(self.workdir)
    ref_step, ref_params = final_params(self.reference)
    self.assertEqual(step, NUM_STEPS)
    self.assertEqual(ref_step, NUM_STEPS)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(
            a, b, rtol=test_util.FP32_RTOL, atol=test_util.FP32_ATOL
        ),
        params,
        ref_params,
    )

    # metrics.jsonl (process 0's) holds every step once, as the reference.
    def losses(run):
      rows = [
          json.loads(line)
          for line in (run / "metrics.jsonl").read_text().splitlines()
      ]
      return [r["step"] for r in rows], [r["train/loss"] for r in rows]

    steps, loss = losses(self.workdir)
    ref_steps, ref_loss = losses(self.reference)
    self.assertEqual(steps, list(range(1, NUM_STEPS + 1)))
    self.assertEqual(ref_steps, steps)
    np.testing.assert_allclose(
        loss, ref_loss, rtol=test_util.FP32_RTOL, atol=test_util.FP32_ATOL
    )


class SecondSignalTest(parameterized.TestCase):
  """With several processes too, a second signal ends a process at once."""

  @parameterized.parameters("SIGTERM", "SIGINT")
  def test_one_stop_step_for_all_then_a_second_signal_exits(self, name):
    root = pathlib.Path(tempfile.mkdtemp(prefix="rj_e2e_two_signals_"))
    self.addCleanup(shutil.rmtree, root, ignore_errors=True)
    run = _Run(
        [sys.executable, "-c", _TWO_SIGNALS_JOB, name],
        [root / f"p{i}.log" for i in range(2)],
    )
    self.addCleanup(run.kill)
    deadline = time.monotonic() + _TIMEOUT_S
    while not all(run.stdout(i) for i in range(2)):
      for i, proc in enumerate(run.procs):
        self.assertIsNone(proc.poll(), f"process {i}:\n{run.stderr(i)}")
      self.assertLess(time.monotonic(), deadline)
      time.sleep(0.05)
    # Back to back: a process that outlives its peer by long fails on its
    # lost connection (SIGABRT) instead.
    for proc in reversed(run.procs):
      os.kill(proc.pid, getattr(signal, name))
    status = run.wait(deadline)
    lines = [run.stdout(i).strip() for i in range(2)]
    # The step and the reason that process 1 announced, on both.
    self.assertRegex(lines[0], rf"^stop at \d+: {name} on process 1$")
    self.assertEqual(lines[1], lines[0])
    for i in range(2):
      self.assertIn(f"{name} again: exiting now", run.stderr(i))
      self.assertEqual(status[i], -getattr(signal, name), run.stderr(i)[-3000:])


if __name__ == "__main__":
  absltest.main()
