"""Two processes with two CPU devices each train like one with four devices.

`multihost_worker.py` runs the sharded train step (3 AdamW steps, dropout
on) under two mesh layouts. The test starts it three times at once: twice as
the processes of one `jax.distributed` run (CPU collectives over gloo, the
coordinator on a free local port), and once alone with four local devices.
The final parameters must agree: the mesh, the global batch and the random
keys are the same, only the processes that own the devices differ.

Three compiling processes take 1-2 minutes on a busy 2-core machine, so the
test is marked slow: `pytest -m slow tests/multihost_test.py`.
"""

import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import pytest

_REPO = pathlib.Path(__file__).resolve().parent.parent
_WORKER = pathlib.Path(__file__).resolve().parent / "multihost_worker.py"
# Generous for a loaded 2-core machine; a worker that lost its peer would
# otherwise wait for the coordinator's own (longer) timeouts.
_TIMEOUT_S = 300
_LAYOUTS = ("data", "fsdp")
# Variables that would make a worker join some other distributed run.
_DISTRIBUTED_ENV = (
    "JAX_COORDINATOR_ADDRESS",
    "COORDINATOR_ADDRESS",
    "JAX_NUM_PROCESSES",
    "JAX_PROCESS_ID",
)


def _free_port() -> int:
  """A TCP port that was free a moment ago (the OS picks it)."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(num_devices: int, **extra: str) -> dict[str, str]:
  """The worker's environment: CPU only, `num_devices` local devices."""
  env = {k: v for k, v in os.environ.items() if k not in _DISTRIBUTED_ENV}
  env.update(
      PYTHONPATH=str(_REPO),
      JAX_PLATFORMS="cpu",
      JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
      TF_CPP_MIN_LOG_LEVEL="2",
      # LLVM at -O0 compiles the step about three times faster; both sides
      # use it, and the sharding and collectives under test are HLO-level.
      XLA_FLAGS=(
          f"--xla_force_host_platform_device_count={num_devices} "
          "--xla_backend_optimization_level=0"
      ),
      **extra,
  )
  return env


# The attention key bias adds the same q.b term to a query's score for every
# key, which the softmax cancels: its gradient is zero in exact arithmetic
# and rounding noise in practice. AdamW scales that noise up to real-sized
# updates, which then depend on the order of the gradient sums (and that
# order differs between an in-process and a cross-process all-reduce).
_NOISE_ONLY_PARAMS = ("key_bias_nh",)


def _max_abs_diff(a: dict, b: dict) -> float:
  """Largest |a - b| over the arrays of `a` (`b` has at least its keys)."""
  return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


@pytest.mark.slow
class MultiProcessTrainStepTest(parameterized.TestCase):
  """A 2-process x 2-device run against a 1-process x 4-device run."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    tmp = tempfile.TemporaryDirectory()
    cls.addClassCleanup(tmp.cleanup)
    tmp_dir = pathlib.Path(tmp.name)
    address = f"localhost:{_free_port()}"
    runs = {
        "process0": _env(
            2,
            JAX_COORDINATOR_ADDRESS=address,
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID="0",
        ),
        "process1": _env(
            2,
            JAX_COORDINATOR_ADDRESS=address,
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID="1",
        ),
        "single": _env(4),
    }
    procs = {}
    try:
      # All three at once: the distributed pair needs to run concurrently,
      # and the reference keeps the otherwise idle core busy meanwhile.
      for name, env in runs.items():
        with open(tmp_dir / f"{name}.log", "w") as log:
          procs[name] = subprocess.Popen(  # pylint: disable=consider-using-with
              [sys.executable, str(_WORKER), str(tmp_dir / f"{name}.npz")],
              env=env,
              cwd=_REPO,
              stdout=log,
              stderr=subprocess.STDOUT,
          )
      deadline = time.monotonic() + _TIMEOUT_S
      for proc in procs.values():
        try:
          proc.wait(timeout=max(deadline - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
          pass
    finally:
      for proc in procs.values():
        if proc.poll() is None:
          proc.kill()
          proc.wait()
    failures = [
        f"{name} exited with {proc.returncode} (negative: killed by a signal,"
        " as after"
        f" {_TIMEOUT_S}s):\n{(tmp_dir / f'{name}.log').read_text()[-3000:]}"
        for name, proc in procs.items()
        if proc.returncode != 0
    ]
    if failures:
      raise AssertionError("\n\n".join(failures))
    # Process 0 writes the distributed run's result; process 1 writes none.
    cls.multi = dict(np.load(tmp_dir / "process0.npz"))
    cls.single = dict(np.load(tmp_dir / "single.npz"))
    cls.process1_wrote = (tmp_dir / "process1.npz").exists()

  def test_workers_form_one_distributed_run(self):
    self.assertEqual(int(self.multi["process_count"]), 2)
    self.assertEqual(int(self.multi["device_count"]), 4)
    self.assertEqual(int(self.multi["local_device_count"]), 2)
    np.testing.assert_array_equal(self.multi["process_indices"], [0, 1])
    self.assertFalse(self.process1_wrote)
    self.assertEqual(int(self.single["process_count"]), 1)
    self.assertEqual(int(self.single["device_count"]), 4)

  @parameterized.parameters(*_LAYOUTS)
  def test_params_equal_single_process(self, layout):
    prefix = f"{layout}/"
    extras = tuple(
        prefix + k for k in ("loss", "word_shard_shape", "word_held_locally")
    )
    all_names = sorted(
        k for k in self.single if k.startswith(prefix) and k not in extras
    )
    self.assertEqual(
        all_names,
        sorted(
            k for k in self.multi if k.startswith(prefix) and k not in extras
        ),
    )
    names = [k for k in all_names if not k.endswith(_NOISE_ONLY_PARAMS)]
    self.assertLen(names, len(all_names) - 1)
    multi = {k: self.multi[k] for k in names}
    single = {k: self.single[k] for k in names}
    init = {k: self.single["init/" + k[len(prefix) :]] for k in names}
    self.assertIn(prefix + "embeddings/word_vd", names)
    self.assertLess(_max_abs_diff(multi, single), 1e-5)
    # Training moved the parameters, so equality is not trivially true.
    self.assertGreater(_max_abs_diff(single, init), 1e-3)
    np.testing.assert_allclose(
        self.multi[prefix + "loss"], self.single[prefix + "loss"], atol=1e-5
    )

  def test_fsdp_layout_shards_the_parameters_over_processes(self):
    # fsdp 4: each device holds a quarter of the word table's width, and in
    # the distributed run neither process holds the whole table, so the
    # parameters compared above were gathered across processes.
    for run in (self.multi, self.single):
      np.testing.assert_array_equal(run["fsdp/word_shard_shape"], [100, 4])
      np.testing.assert_array_equal(run["data/word_shard_shape"], [100, 16])
      self.assertTrue(run["data/word_held_locally"])
    self.assertFalse(self.multi["fsdp/word_held_locally"])
    self.assertTrue(self.single["fsdp/word_held_locally"])


if __name__ == "__main__":
  absltest.main()
