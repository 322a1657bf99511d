"""End to end: the smoke training config through the real entry point.

* A run killed with SIGKILL mid-training and rerun with the same command
  resumes from its last checkpoint and ends with exactly the parameters of
  an uninterrupted run (same batches, same dropout keys).
* `--mode=export` writes towers that a serving process loads, giving the
  trained encoder's embeddings.
* Bad config values stop the job at start-up with a message naming the key.

Marked slow (about 4 minutes on 2 cores; the default suite must stay under
15): run with `pytest -m slow`.
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
import pytest
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from retrieval_jax import checkpointing
from retrieval_jax import pretrained
from retrieval_jax import sharding
from retrieval_jax import train_state
import test_util
from test_util import REPO

NUM_STEPS = 12
EVERY = 2


def _command(workdir, *extra):
  return [
      sys.executable,
      "-m",
      "retrieval_jax.main",
      "--config=configs/train.py:smoke",
      f"--workdir={workdir}",
      f"--config.train.num_steps={NUM_STEPS}",
      f"--config.checkpoint.every_steps={EVERY}",
      "--config.train.eval_before=False",
      "--config.train.eval_after=False",
      *extra,
  ]


def _env():
  return test_util.subprocess_env()


def _run(workdir, *extra, check=True):
  return subprocess.run(
      _command(workdir, *extra),
      cwd=REPO,
      env=_env(),
      capture_output=True,
      text=True,
      timeout=900,
      check=check,
  )


def _final_params(workdir: pathlib.Path):
  loaded = pretrained.load_pretrained("all-MiniLM-L6-v2")
  _, params = train_state.split_model(loaded.model)
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(
          x.shape, x.dtype, sharding=NamedSharding(mesh, PartitionSpec())
      ),
      params,
  )
  restored = checkpointing.restore_params_from(workdir / "checkpoints", target)
  return jax.device_get(restored), jax.device_get(params)


class TrainEndToEndTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = pathlib.Path(tempfile.mkdtemp(prefix="rj_e2e_train_"))
    cls.reference = cls.root / "uninterrupted"
    _run(cls.reference)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.root, ignore_errors=True)
    super().tearDownClass()

  @pytest.mark.slow
  def test_sigkill_then_resume_equals_uninterrupted_run(self):
    workdir = self.root / "killed"
    ckpts = workdir / "checkpoints"
    proc = subprocess.Popen(
        _command(workdir),
        cwd=REPO,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # Kill as soon as a checkpoint is committed (Orbax renames the finished
    # tmp directory to "<step>"), well before step NUM_STEPS.
    deadline = time.monotonic() + 600

    def committed():
      if not ckpts.is_dir():
        return []
      return sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())

    while not committed():
      self.assertIsNone(proc.poll(), "the run ended before its checkpoint")
      self.assertLess(time.monotonic(), deadline)
      time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    self.assertLess(max(committed()), NUM_STEPS, "not killed mid-run")

    resumed = _run(workdir)
    results = json.loads((workdir / "results.json").read_text())
    self.assertTrue(
        results["source"].startswith("checkpoint:"), results["source"]
    )
    self.assertLess(int(results["source"].split(":")[1]), NUM_STEPS)
    self.assertNotIn("before", results)
    del resumed

    final, initial = _final_params(workdir)
    reference, _ = _final_params(self.reference)
    diffs = jax.tree.leaves(
        jax.tree.map(
            lambda a, b: float(np.max(np.abs(a - b))), final, reference
        )
    )
    self.assertLess(max(diffs), 1e-6)
    # Training moved the weights, so equality is not the trivial kind.
    moved = jax.tree.leaves(
        jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), final, initial)
    )
    self.assertGreater(max(moved), 1e-5)

    # The logged metrics of the resumed run continue the killed run's steps.
    steps = [
        json.loads(l)["step"]
        for l in (workdir / "metrics.jsonl").read_text().splitlines()
    ]
    self.assertIn(NUM_STEPS, steps)

  @pytest.mark.slow
  def test_export_mode_serves_the_trained_encoder(self):
    out = self.reference / "export"
    _run(self.reference, "--mode=export")
    manifest = json.loads((out / "manifest.json").read_text())
    self.assertEqual(manifest["metadata"]["step"], NUM_STEPS)
    texts = ["Who likes Quokkas?", "Geneva Durben likes Quokkas, Tapirs."]
    # A separate process, without the training code, serves the export.
    script = (
        "import sys, numpy as np\n"
        "from retrieval_jax import serving\n"
        "m = serving.ServingModel.load(sys.argv[1])\n"
        f"np.save(sys.argv[2], m.encode_passages({texts!r}))\n"
        "bad = [k for k in ('optax', 'orbax', 'tensorflow') "
        "if k in sys.modules]\n"
        "assert not bad, bad\n"
    )
    emb_path = self.root / "served.npy"
    subprocess.run(
        [sys.executable, "-c", script, str(out), str(emb_path)],
        cwd=REPO,
        env=_env(),
        check=True,
        timeout=300,
    )
    served = np.load(emb_path)

    # The trained params through the training-time encode step.
    from retrieval_jax import encoding  # pylint: disable=g-import-not-at-top
    from flax import nnx  # pylint: disable=g-import-not-at-top
    from retrieval_jax.data import tokenizers  # pylint: disable=g-import-not-at-top

    loaded = pretrained.load_pretrained("all-MiniLM-L6-v2")
    model_def, _ = train_state.split_model(loaded.model)
    final, initial = _final_params(self.reference)
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    encoder = encoding.TextEncoder(
        model_def.merge(final),
        tokenizers.WordPieceTokenizer.from_pretrained_dir(loaded.model_dir),
        mesh,
        pooling="mean",
        normalize=True,
        max_length=manifest["towers"]["passage"]["max_length"],
    )
    expected = encoder.encode(texts, progress=False)
    np.testing.assert_allclose(served, expected, atol=1e-5)
    # ... and not the pretrained model's.
    encoder.set_module(model_def.merge(initial))
    self.assertGreater(
        np.abs(encoder.encode(texts, progress=False) - served).max(), 1e-4
    )

  @pytest.mark.slow
  def test_bad_config_values_name_the_key(self):
    from configs import train as train_config  # pylint: disable=g-import-not-at-top
    from retrieval_jax import errors  # pylint: disable=g-import-not-at-top
    from retrieval_jax import train  # pylint: disable=g-import-not-at-top

    cases = {
        ("loss.name", "no_such_loss"): "config.loss.name='no_such_loss'",
        # 8 test devices: an odd batch cannot split over the data axis.
        ("train.batch_size", 7): "config.train.batch_size=7",
        ("data.path", "/no/such/dir"): "config.data.path='/no/such/dir'",
    }
    for (key, value), expected in cases.items():
      with self.subTest(key):
        config = train_config.get_config("smoke")
        with config.unlocked():
          section, field = key.split(".")
          config[section][field] = value
        # Fails in validation, before any model or data is loaded.
        with self.assertRaisesRegex(errors.ConfigError, expected):
          train.train_and_evaluate(config, self.root / "bad")
    # Through the command line: one line naming the key, no traceback.
    proc = _run(
        self.root / "bad", "--config.loss.name=no_such_loss", check=False
    )
    self.assertNotEqual(proc.returncode, 0)
    self.assertIn("config.loss.name='no_such_loss'", proc.stderr)
    self.assertNotIn("Traceback", proc.stderr)


if __name__ == "__main__":
  absltest.main()
