"""End to end: listwise distillation with negatives the student re-mines.

`configs/train.py:smoke,distill` (bi-encoder, hybrid teacher, dense
candidates re-mined every 2 steps) killed with SIGKILL mid-round and rerun
resumes from its checkpoint, reads its round's cached candidates and teacher
scores, and ends with exactly the parameters of an uninterrupted run.

Marked slow (about 8 minutes on 2 cores): run with `pytest -m slow`.
"""

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
import pytest

from retrieval_jax import checkpointing
from retrieval_jax import pretrained
from retrieval_jax import sharding
from retrieval_jax import train_state
import test_util
from test_util import REPO

NUM_STEPS = 6
EVERY = 3  # checkpoints; negatives are re-mined every 2 steps


def _command(workdir):
  return [
      sys.executable,
      "-m",
      "retrieval_jax.main",
      "--config=configs/train.py:smoke,distill",
      f"--workdir={workdir}",
      f"--config.train.num_steps={NUM_STEPS}",
      f"--config.checkpoint.every_steps={EVERY}",
      "--config.train.eval_before=False",
      "--config.train.eval_after=False",
  ]


def _run(workdir):
  return subprocess.run(
      _command(workdir),
      cwd=REPO,
      env=test_util.subprocess_env(),
      capture_output=True,
      text=True,
      timeout=900,
      check=True,
  )


def _final_params(workdir: pathlib.Path):
  loaded = pretrained.load_pretrained("all-MiniLM-L6-v2")
  _, params = train_state.split_model(loaded.model)
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  replicated = sharding.replicated(mesh)
  target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
      params,
  )
  restored = checkpointing.restore_params_from(workdir / "checkpoints", target)
  return jax.device_get(restored), jax.device_get(params)


class DistillEndToEndTest(absltest.TestCase):

  @pytest.mark.slow
  def test_sigkill_mid_round_then_resume_equals_uninterrupted_run(self):
    root = pathlib.Path(tempfile.mkdtemp(prefix="rj_e2e_distill_"))
    self.addCleanup(shutil.rmtree, root, ignore_errors=True)
    reference, workdir = root / "uninterrupted", root / "killed"
    _run(reference)
    # Rounds 1 (steps 2-3) and 2 (steps 4-5) were mined by the student.
    for r in (1, 2):
      self.assertTrue(
          (reference / f"negatives/refresh_{r}/dense.json").is_file()
      )

    ckpts = workdir / "checkpoints"
    proc = subprocess.Popen(
        _command(workdir),
        cwd=REPO,
        env=test_util.subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 600

    def committed():
      if not ckpts.is_dir():
        return []
      return [int(p.name) for p in ckpts.iterdir() if p.name.isdigit()]

    # Checkpoint 3 is in round 1: its candidates were mined at step 2.
    while EVERY not in committed():
      self.assertIsNone(proc.poll(), "the run ended before its checkpoint")
      self.assertLess(time.monotonic(), deadline)
      time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    self.assertNotIn(NUM_STEPS, committed(), "not killed mid-run")

    resumed = _run(workdir)
    self.assertIn("checkpoint:3", (workdir / "results.json").read_text())
    # Round 1 came from the cache, not from the step 3 parameters.
    self.assertNotIn("are not cached", resumed.stderr)
    self.assertIn(
        "refresh_1/dense.json: reusing mined negatives", resumed.stderr
    )

    final, initial = _final_params(workdir)
    want, _ = _final_params(reference)
    diffs = jax.tree.leaves(
        jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), final, want)
    )
    self.assertLess(max(diffs), 1e-6)
    moved = jax.tree.leaves(
        jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), final, initial)
    )
    self.assertGreater(max(moved), 1e-5)


if __name__ == "__main__":
  absltest.main()
