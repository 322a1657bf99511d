"""The run path works where TensorFlow, TFDS, seqio, tensorflow-text and clu
are missing (accelerator images): train, evaluate, encode and export through
the real entry point, with an import blocker installed by a sitecustomize on
PYTHONPATH, give the same metrics as the unblocked run.
"""

import json
import pathlib
import shutil
import subprocess
import sys
import tempfile
import textwrap

from absl.testing import absltest
import numpy as np

import test_util
from test_util import REPO

BLOCKED = (
    "tensorflow",
    "tensorflow_datasets",
    "tensorflow_text",
    "seqio",
    "clu",
)

# A spec whose loader raises: `import tensorflow` fails like a missing
# package, while importlib.util.find_spec (which etils asks) does not raise.
_SITECUSTOMIZE = textwrap.dedent(f"""
    import importlib.abc, importlib.machinery, sys

    class _Loader(importlib.abc.Loader):
      def create_module(self, spec):
        raise ModuleNotFoundError(f"blocked: {{spec.name}}", name=spec.name)

      def exec_module(self, module):
        pass

    class _Blocker(importlib.abc.MetaPathFinder):
      def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
          return importlib.machinery.ModuleSpec(name, _Loader())
        return None

    sys.meta_path.insert(0, _Blocker())
""")

# Every library module (but the optional TFDS builders) and the experiment
# runners import; the Python API searches; no blocked module got loaded.
_IMPORT_CHECK = textwrap.dedent(f"""
    import importlib, pkgutil, sys
    import retrieval_jax
    for m in pkgutil.walk_packages(retrieval_jax.__path__, "retrieval_jax."):
      if m.name.split(".")[-1] not in ("tfds_beir", "tfds_loco", "tf_setup"):
        importlib.import_module(m.name)
    for name in ("limit_critical_n", "cur_knn", "kv_memory"):
      importlib.import_module(f"experiments.{{name}}.run")
    import experiments.m2_scaling.scaling
    ids, _ = retrieval_jax.index(["a cat", "a dog"], kind="bm25").search("cat")
    assert ids == [["0"]] or ids[0][0] == "0", ids
    loaded = [m for m in sys.modules if m.split(".")[0] in {BLOCKED!r}]
    assert not loaded, loaded
    print("ok")
""")


def _env(blocked_dir: pathlib.Path | None) -> dict[str, str]:
  env = test_util.subprocess_env()
  if blocked_dir is not None:
    env["PYTHONPATH"] = f"{blocked_dir}:{env['PYTHONPATH']}"
  return env


def _main(env, config: str, workdir: pathlib.Path, *flags: str) -> None:
  proc = subprocess.run(
      [
          sys.executable,
          "-m",
          "retrieval_jax.main",
          f"--config={config}",
          f"--workdir={workdir}",
          *flags,
      ],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=900,
  )
  if proc.returncode:
    raise AssertionError(f"{config} {flags} failed:\n{proc.stderr[-4000:]}")


class TfFreeRunPathTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = pathlib.Path(tempfile.mkdtemp(prefix="rj_tf_free_"))
    cls.addClassCleanup(shutil.rmtree, cls.tmp, ignore_errors=True)
    cls.blocker = cls.tmp / "blocker"
    cls.blocker.mkdir(parents=True, exist_ok=True)
    (cls.blocker / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    cls.blocked_env = _env(cls.blocker)

  def test_blocker_blocks(self):
    proc = subprocess.run(
        [sys.executable, "-c", "import tensorflow"],
        env=self.blocked_env,
        capture_output=True,
        text=True,
    )
    self.assertNotEqual(proc.returncode, 0)
    self.assertIn("blocked: tensorflow", proc.stderr)

  def test_imports_and_api_without_tensorflow(self):
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORT_CHECK],
        cwd=REPO,
        env=self.blocked_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    self.assertEqual(proc.returncode, 0, proc.stderr[-4000:])
    self.assertEqual(proc.stdout.strip().splitlines()[-1], "ok")

  def test_modes_without_tensorflow_match_the_normal_run(self):
    train = ("configs/train.py:smoke", "--config.train.num_steps=2")
    evaluate = ("configs/evaluate.py:smoke",)
    results = {}
    for name, env in (("normal", _env(None)), ("blocked", self.blocked_env)):
      run = self.tmp / name
      _main(env, train[0], run / "train", *train[1:])
      _main(env, evaluate[0], run / "evaluate")
      results[name] = (
          json.loads((run / "train" / "results.json").read_text()),
          json.loads((run / "evaluate" / "metrics.json").read_text()),
      )
    # Only the blocked run encodes and exports (their own tests cover the
    # values): both must work without TensorFlow.
    _main(self.blocked_env, evaluate[0], run / "encode", "--mode=encode")
    _main(self.blocked_env, train[0], run / "train", "--mode=export")

    (normal_train, normal_eval), (blocked_train, blocked_eval) = (
        results["normal"],
        results["blocked"],
    )
    self.assertEqual(blocked_eval, normal_eval)
    self.assertEqual(blocked_train["after"], normal_train["after"])
    self.assertEqual(blocked_train["before"], normal_train["before"])
    self.assertTrue(blocked_train["after"])
    embeddings = np.load(run / "encode" / "corpus_embeddings.npy")
    self.assertEqual(embeddings.shape[1], 384)
    self.assertTrue(np.isfinite(embeddings).all())
    manifest = json.loads(
        (run / "train" / "export" / "manifest.json").read_text()
    )
    self.assertTrue(manifest)
    events = list((run / "train").glob("events.out.tfevents.*"))
    self.assertLen(events, 1)  # TensorBoard summaries without TensorFlow


if __name__ == "__main__":
  absltest.main()
