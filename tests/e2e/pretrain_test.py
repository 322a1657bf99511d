"""End to end: self-supervised pretraining (spans + MoCo) through the CLI.

* `configs/train.py:pretrain_crop,smoke` (cropping, MoCo queue of 8 keys,
  4 pairs a step) trains 2 steps on LIMIT-small's texts alone, evaluates
  before and after, and its checkpoint holds the queue (full, pointer
  wrapped to 0, unit-norm keys of real documents) and the EMA key params;
  the evaluate mode reads the run as a dense retriever.
* `pretrain_ict,smoke` (ICT, in-batch negatives) trains and evaluates.
* A MoCo run killed with SIGKILL after a checkpoint and rerun ends with the
  params and the whole MoCo state (queue, pointer, key params) of an
  uninterrupted run, bit for bit.

Marked slow (subprocess runs, about 4 minutes on 2 cores): `pytest -m slow`.
"""

import functools
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
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np
import pytest

from retrieval_jax import checkpointing
from retrieval_jax import pretrained
from retrieval_jax import sharding
from retrieval_jax import train_state
from retrieval_jax.kinds import moco
import test_util
from test_util import REPO

NUM_STEPS = 6
EVERY = 2
QUEUE = 8


def _command(workdir, arg="pretrain_crop,smoke", *extra):
  return [
      sys.executable,
      "-m",
      "retrieval_jax.main",
      f"--config=configs/train.py:{arg}",
      f"--workdir={workdir}",
      *extra,
  ]


def _run(workdir, arg="pretrain_crop,smoke", *extra):
  return subprocess.run(
      _command(workdir, arg, *extra),
      cwd=REPO,
      env=test_util.subprocess_env(),
      capture_output=True,
      text=True,
      timeout=900,
      check=True,
  )


_RESUME_FLAGS = (
    f"--config.train.num_steps={NUM_STEPS}",
    f"--config.checkpoint.every_steps={EVERY}",
    "--config.train.eval_before=False",
    "--config.train.eval_after=False",
)


@functools.cache
def _targets():
  """Abstract (params, extra) of the smoke run, on one device."""
  model_def, params = train_state.split_model(
      pretrained.load_pretrained("all-MiniLM-L6-v2").model
  )
  extra = jax.eval_shape(
      functools.partial(
          moco.init_extra,
          model_def,
          queue_size=QUEUE,
          pooling="mean",
          normalize=True,
      ),
      params,
  )
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  replicated = NamedSharding(mesh, PartitionSpec())

  def abstract(tree):
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
        tree,
    )

  return abstract(params), abstract(extra), jax.device_get(params)


def _final_state(workdir: pathlib.Path):
  """(params, extra) of the newest checkpoint, on the host."""
  params, extra, _ = _targets()
  ckpts = workdir / "checkpoints"
  return (
      jax.device_get(checkpointing.restore_params_from(ckpts, params)),
      jax.device_get(
          checkpointing.restore_params_from(ckpts, extra, params_key="extra")
      ),
  )


class PretrainEndToEndTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = pathlib.Path(tempfile.mkdtemp(prefix="rj_e2e_pretrain_"))

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.root, ignore_errors=True)
    super().tearDownClass()

  @pytest.mark.slow
  def test_crop_moco_smoke_trains_checkpoints_the_queue_and_evaluates(self):
    workdir = self.root / "crop"
    _run(workdir)
    results = json.loads((workdir / "results.json").read_text())
    self.assertEqual(results["steps"], 2)
    self.assertIn("eval/limit_dev/ndcg@10", results["before"])
    self.assertIn("eval/limit_dev/ndcg@10", results["after"])
    self.assertTrue(np.isfinite(results["train"]["train/loss"]))
    # Step 2 saw its 4 in-batch keys (3 negatives) plus step 1's 4 keys.
    self.assertEqual(results["train"]["train/num_negatives"], 7.0)

    params, extra = _final_state(workdir)
    _, _, initial = _targets()
    queue = extra["queue"]
    self.assertEqual(int(queue["ptr"]), 0)  # 8 keys through 8 slots
    self.assertTrue(np.all(queue["queue_doc_k"] >= 0))
    self.assertLess(int(queue["queue_doc_k"].max()), 46)
    np.testing.assert_allclose(
        np.linalg.norm(queue["queue_kd"], axis=1), 1.0, rtol=1e-5
    )

    def gap(a, b):
      return max(
          jax.tree.leaves(
              jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b)
          )
      )

    # Key params moved by EMA (τ = 0.999): 1e-3 of the query's steps.
    self.assertGreater(gap(extra["key_params"], initial), 0.0)
    self.assertLess(
        gap(extra["key_params"], initial), 0.01 * gap(params, initial)
    )

    # The evaluate mode reads the MoCo run as a dense retriever.
    out = self.root / "crop_eval"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "retrieval_jax.main",
            "--mode=evaluate",
            "--config=configs/evaluate.py:smoke",
            f"--workdir={out}",
            f"--config.run={workdir}",
        ],
        cwd=REPO,
        env=test_util.subprocess_env(),
        capture_output=True,
        text=True,
        timeout=900,
        check=True,
    )
    self.assertEqual(
        json.loads((out / "stats.json").read_text())["retriever"], "dense"
    )

  @pytest.mark.slow
  def test_ict_smoke_trains_and_evaluates(self):
    workdir = self.root / "ict"
    _run(workdir, "pretrain_ict,smoke", "--config.train.eval_before=False")
    results = json.loads((workdir / "results.json").read_text())
    self.assertEqual(results["steps"], 2)
    self.assertIn("eval/limit_dev/ndcg@10", results["after"])
    self.assertTrue(np.isfinite(results["train"]["train/loss"]))

  @pytest.mark.slow
  def test_sigkill_then_resume_equals_uninterrupted_run(self):
    reference = self.root / "uninterrupted"
    _run(reference, "pretrain_crop,smoke", *_RESUME_FLAGS)
    workdir = self.root / "killed"
    ckpts = workdir / "checkpoints"
    proc = subprocess.Popen(
        _command(workdir, "pretrain_crop,smoke", *_RESUME_FLAGS),
        cwd=REPO,
        env=test_util.subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 600

    def committed():
      if not ckpts.is_dir():
        return []
      return sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())

    # Killed as soon as a checkpoint is committed, before step NUM_STEPS.
    while not committed():
      self.assertIsNone(proc.poll(), "the run ended before its checkpoint")
      self.assertLess(time.monotonic(), deadline)
      time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    self.assertLess(max(committed()), NUM_STEPS, "not killed mid-run")

    _run(workdir, "pretrain_crop,smoke", *_RESUME_FLAGS)
    results = json.loads((workdir / "results.json").read_text())
    self.assertTrue(results["source"].startswith("checkpoint:"))
    self.assertLess(int(results["source"].split(":")[1]), NUM_STEPS)

    got, want = _final_state(workdir), _final_state(reference)
    # The same jitted programs on the same batches and keys: bit for bit.
    jax.tree.map(np.testing.assert_array_equal, got, want)
    _, _, initial = _targets()
    self.assertFalse(
        all(
            np.array_equal(a, b)
            for a, b in zip(jax.tree.leaves(got[0]), jax.tree.leaves(initial))
        )
    )
    # 24 keys through 8 slots: the queue wrapped around twice.
    self.assertEqual(int(got[1]["queue"]["ptr"]), (NUM_STEPS * 4) % QUEUE)


if __name__ == "__main__":
  absltest.main()
