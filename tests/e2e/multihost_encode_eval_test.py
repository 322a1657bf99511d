"""End to end: encoding and evaluation with two processes equal one process.

Two `retrieval_jax.main` processes form one `jax.distributed` run (CPU
collectives over gloo, a coordinator on a free local port, as in
`multihost_test.py`); a third process runs the same command alone with the
same device count, as the reference. Both jobs use the tiny BERT of
`recovery_test.py`.

* `--mode=encode` of LIMIT-small in 6 shards: each process encodes the shards
  i % 2 on its own two devices, process 0 writes the manifest and
  corpus_embeddings.npy; every file equals the 1-process run's byte for byte.
* `configs/train.py:smoke` (4 steps, evaluation before and after): the
  evaluation encodes on a mesh spanning both processes, so every batch
  comes back gathered from both; the metrics and every ranked score equal
  the 1-process run's (within 1e-5; they train alike, multihost_test.py).

Six processes on a loaded 2-core machine take minutes: `pytest -m slow`.
"""

import json
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

from absl.testing import absltest
import numpy as np
import pytest

from multihost_test import _env
from multihost_test import _free_port
from recovery_test import _write_tiny_model
from retrieval_jax.data import embedding_shards
from test_util import REPO

_TIMEOUT_S = 600
SHARD_SIZE = 8  # LIMIT-small's 46 documents: 6 shards


def _run_job(
    args: list[str], root: pathlib.Path, name: str, devices: int, single: int
):
  """Runs `main` as one 2-process run (`devices` local devices each) and
  alone (`single` devices), all three at once.

  Returns {"process0" | "process1" | "single": (exit status, stderr)}.
  """
  address = f"localhost:{_free_port()}"
  envs = {
      f"process{i}": _env(
          devices,
          JAX_COORDINATOR_ADDRESS=address,
          JAX_NUM_PROCESSES="2",
          JAX_PROCESS_ID=str(i),
      )
      for i in range(2)
  }
  envs["single"] = _env(single)
  workdirs = {"process0": "multi", "process1": "multi", "single": "single"}
  procs, logs = {}, {}
  try:
    for run, env in envs.items():
      logs[run] = root / f"{name}.{run}.log"
      with open(logs[run], "w") as log:
        procs[run] = subprocess.Popen(  # pylint: disable=consider-using-with
            [
                sys.executable,
                "-m",
                "retrieval_jax.main",
                f"--workdir={root / name / workdirs[run]}",
                *args,
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    deadline = time.monotonic() + _TIMEOUT_S
    for proc in procs.values():
      try:
        proc.wait(timeout=max(deadline - time.monotonic(), 0))
      except subprocess.TimeoutExpired:
        pass
  finally:
    for proc in procs.values():
      if proc.poll() is None:  # a process that lost its peer waits long
        proc.kill()
        proc.wait()
  return {
      run: (proc.returncode, logs[run].read_text(errors="replace"))
      for run, proc in procs.items()
  }


@pytest.mark.slow
class MultiProcessEncodeAndEvaluateTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = pathlib.Path(tempfile.mkdtemp(prefix="rj_e2e_multihost_enc_"))
    cls.addClassCleanup(shutil.rmtree, cls.root, ignore_errors=True)
    model = cls.root / "tiny_model"
    _write_tiny_model(model)
    cls.encode = _run_job(
        [
            "--config=configs/evaluate.py:smoke",
            "--mode=encode",
            f"--config.model.pretrained={model}",
            f"--config.encode.shard_size={SHARD_SIZE}",
        ],
        cls.root,
        "encode",
        devices=2,
        single=2,
    )
    # One device per process against one process with two: the same
    # 2-device mesh for training and evaluation.
    cls.train = _run_job(
        [
            "--config=configs/train.py:smoke",
            f"--config.model.pretrained={model}",
        ],
        cls.root,
        "train",
        devices=1,
        single=2,
    )

  def _assert_succeeded(self, job):
    for run, (status, stderr) in job.items():
      self.assertEqual(status, 0, f"{run}:\n{stderr[-3000:]}")

  def test_encode_splits_shards_and_equals_one_process(self):
    self._assert_succeeded(self.encode)
    # Shard i (1-based i + 1) by process i % 2, each on its local mesh.
    for run, wanted in (("process0", (1, 3, 5)), ("process1", (2, 4, 6))):
      stderr = self.encode[run][1]
      done = sorted(
          int(line.split("shard ")[1].split("/")[0])
          for line in stderr.splitlines()
          if ": encoded in" in line
      )
      self.assertEqual(tuple(done), wanted, stderr[-3000:])
      self.assertIn(f"process {run[-1]} of 2", stderr)
    multi = self.root / "encode" / "multi"
    single = self.root / "encode" / "single"
    shards = sorted(
        p.name for p in (single / embedding_shards.DEFAULT_DIR).glob("*.npy")
    )
    self.assertLen(shards, 6)
    for name in shards:
      self.assertEqual(
          (multi / embedding_shards.DEFAULT_DIR / name).read_bytes(),
          (single / embedding_shards.DEFAULT_DIR / name).read_bytes(),
          name,
      )
    for name in ("corpus_embeddings.npy", "corpus_ids.json"):
      self.assertEqual(
          (multi / name).read_bytes(), (single / name).read_bytes(), name
      )
    manifest = embedding_shards.read_manifest(
        multi / embedding_shards.DEFAULT_DIR
    )
    self.assertEqual(manifest["num_docs"], 46)

  def test_train_and_evaluate_metrics_equal_one_process(self):
    self._assert_succeeded(self.train)
    self.assertIn("process 1 of 2", self.train["process1"][1])
    multi = self.root / "train" / "multi"
    single = self.root / "train" / "single"
    got = json.loads((multi / "results.json").read_text())
    want = json.loads((single / "results.json").read_text())
    self.assertEqual(got["steps"], 4)
    for when in ("before", "after"):
      self.assertEqual(sorted(got[when]), sorted(want[when]))
      self.assertLen(got[when], 4)
      for k, v in want[when].items():
        self.assertAlmostEqual(got[when][k], v, delta=1e-5, msg=f"{when} {k}")
    # Training moved the vectors: the two evaluations differ.
    self.assertNotEqual(got["before"], got["after"])
    for step in (0, 4):
      rows = []
      for run in (multi, single):
        lines = (
            (run / "eval" / f"step_{step}" / "limit_dev" / "run.trec")
            .read_text()
            .splitlines()
        )
        rows.append([l.split() for l in lines])
      self.assertLen(rows[0], 16 * 46)  # 16 queries, every document
      self.assertEqual(
          [r[:4] for r in rows[0]], [r[:4] for r in rows[1]], f"step {step}"
      )
      np.testing.assert_allclose(
          [float(r[4]) for r in rows[0]],
          [float(r[4]) for r in rows[1]],
          atol=1e-5,
          rtol=0,
      )


if __name__ == "__main__":
  absltest.main()
