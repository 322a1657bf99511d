"""Multi-process start-up: which environment `main.detect_cluster` sees.

The detection is a pure function of the environment, checked here on
environments written out by hand (an explicit coordinator, an srun step, a
SLURM batch script without srun, TPU pods); `initialize_distributed` turns a
failed or mis-sized start into one ConfigError, and the entry point into one
`error:` line before the workdir is touched (slow: a subprocess).
"""

import pathlib
import subprocess
import sys
from unittest import mock

from absl.testing import absltest
import jax
import pytest

from retrieval_jax import errors
from retrieval_jax import main
import test_util

_SRUN_STEP = {
    "SLURM_JOB_ID": "4242",
    "SLURM_NTASKS": "4",
    "SLURM_PROCID": "2",
    "SLURM_LOCALID": "0",
    "SLURM_STEP_NODELIST": "node[001-004]",
}


class DetectClusterTest(absltest.TestCase):

  def test_one_process(self):
    self.assertIsNone(main.detect_cluster({}))
    self.assertIsNone(main.detect_cluster({"SLURM_NTASKS": "1"}))
    self.assertIsNone(main.detect_cluster({"TPU_WORKER_HOSTNAMES": "h0"}))
    self.assertIsNone(main.detect_cluster({"JAX_COORDINATOR_ADDRESS": ""}))

  def test_explicit_coordinator(self):
    env = {
        "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
        "JAX_NUM_PROCESSES": "2",
        "JAX_PROCESS_ID": "1",
    }
    cluster = main.detect_cluster(env)
    self.assertEqual(cluster.name, "coordinator")
    self.assertEqual(
        cluster.kwargs,
        {
            "coordinator_address": "10.0.0.1:1234",
            "num_processes": 2,
            "process_id": 1,
        },
    )
    self.assertEqual(cluster.num_processes, 2)
    self.assertTrue(cluster.required)
    # The address alone: JAX detects the rest; it also wins over SLURM.
    cluster = main.detect_cluster(dict(_SRUN_STEP, COORDINATOR_ADDRESS="h:1"))
    self.assertEqual(cluster.name, "coordinator")
    self.assertEqual(
        cluster.kwargs,
        {
            "coordinator_address": "h:1",
            "num_processes": None,
            "process_id": None,
        },
    )
    self.assertIsNone(cluster.num_processes)

  def test_srun_step(self):
    cluster = main.detect_cluster(_SRUN_STEP)
    self.assertEqual(cluster.name, "slurm")
    self.assertEqual(cluster.kwargs, {})  # JAX reads SLURM_* itself
    self.assertEqual(cluster.num_processes, 4)
    self.assertEqual(
        cluster.description,
        "SLURM job 4242, task 2 of 4 (nodes node[001-004])",
    )

  def test_slurm_batch_script_without_srun_is_refused(self):
    env = dict(_SRUN_STEP)
    del env["SLURM_STEP_NODELIST"]
    with self.assertRaisesRegex(
        errors.ConfigError,
        r"^SLURM_NTASKS=4 but SLURM_STEP_NODELIST unset: this process was not"
        r" started by srun.*same workdir.*srun python -m retrieval_jax.main",
    ):
      main.detect_cluster(env)

  def test_malformed_count_names_the_variable(self):
    with self.assertRaisesRegex(
        errors.ConfigError, "environment variable SLURM_NTASKS='four'"
    ):
      main.detect_cluster({"SLURM_NTASKS": "four"})
    with self.assertRaisesRegex(errors.ConfigError, "JAX_PROCESS_ID='x'"):
      main.detect_cluster(
          {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_PROCESS_ID": "x"}
      )

  def test_tpu_pods(self):
    cluster = main.detect_cluster(
        {"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3", "TPU_WORKER_ID": "3"}
    )
    self.assertEqual(
        (cluster.name, cluster.kwargs, cluster.num_processes),
        ("tpu_pod", {}, 4),
    )
    self.assertIn("worker 3 of 4 hosts", cluster.description)
    # Multislice: hosts per slice times slices.
    cluster = main.detect_cluster({
        "TPU_PROCESS_ADDRESSES": "a:1,b:1",
        "MEGASCALE_COORDINATOR_ADDRESS": "a",
        "MEGASCALE_NUM_SLICES": "2",
    })
    self.assertEqual((cluster.name, cluster.num_processes), ("tpu_pod", 4))
    # A Cloud TPU VM naming no hosts: JAX's detection decides, and a failed
    # start is not fatal (it may well be one host).
    cluster = main.detect_cluster({}, tpu_vm=True)
    self.assertEqual((cluster.name, cluster.required), ("tpu_vm", False))
    self.assertIsNone(cluster.num_processes)


class InitializeDistributedTest(absltest.TestCase):

  def test_nothing_detected_starts_nothing(self):
    with mock.patch.object(jax.distributed, "initialize") as init:
      self.assertFalse(main.initialize_distributed({"JAX_PLATFORMS": "cpu"}))
    init.assert_not_called()

  def test_failed_start_is_one_config_error(self):
    env = dict(_SRUN_STEP, JAX_PLATFORMS="cpu")
    failure = RuntimeError("Barrier timed out\nmore detail")
    with mock.patch.object(
        jax.distributed, "initialize", side_effect=failure
    ) as init, self.assertRaisesRegex(
        errors.ConfigError,
        r"^SLURM job 4242, task 2 of 4 \(nodes node\[001-004\]\):"
        r" jax.distributed.initialize failed \(RuntimeError: Barrier timed"
        r" out\)$",
    ):
      main.initialize_distributed(env)
    init.assert_called_once_with()

  def test_a_run_of_the_wrong_size_is_refused(self):
    # This process is alone (process_count 1), SLURM promised 4.
    env = dict(_SRUN_STEP, JAX_PLATFORMS="cpu")
    with mock.patch.object(
        jax.distributed, "initialize"
    ), self.assertRaisesRegex(
        errors.ConfigError,
        "JAX formed a run of 1 processes, the environment names 4",
    ):
      main.initialize_distributed(env)

  def test_tpu_vm_failure_runs_as_one_process(self):
    with mock.patch.object(
        main, "_on_tpu_vm", return_value=True
    ), mock.patch.object(
        jax.distributed, "initialize", side_effect=ValueError("no metadata")
    ), self.assertLogs(
        level="WARNING"
    ) as logs:
      self.assertFalse(main.initialize_distributed({}))
    self.assertIn("running as one process", "\n".join(logs.output))


# A subprocess importing the whole stack: about 15 s on a loaded 2-core box.
@pytest.mark.slow
class EntryPointTest(absltest.TestCase):

  def test_slurm_without_srun_fails_with_one_line(self):
    workdir = pathlib.Path(self.create_tempdir()) / "run"
    env = test_util.subprocess_env()
    env.update(
        {k: v for k, v in _SRUN_STEP.items() if k != "SLURM_STEP_NODELIST"}
    )
    for key in ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS"):
      env.pop(key, None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "retrieval_jax.main",
            "--config=configs/evaluate.py:smoke",
            f"--workdir={workdir}",
            "--mode=encode",
        ],
        cwd=test_util.REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    self.assertEqual(proc.returncode, main.EXIT_ERROR, proc.stderr[-3000:])
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
    self.assertLen(lines, 1, proc.stderr[-3000:])
    self.assertStartsWith(
        lines[0], "error: SLURM_NTASKS=4 but SLURM_STEP_NODELIST unset"
    )
    self.assertNotIn("Traceback", proc.stderr)
    self.assertFalse(workdir.exists())


if __name__ == "__main__":
  absltest.main()
