"""Evaluate-mode caches are keyed by content, and a corrupt one is rebuilt.

Oracles: after `model.safetensors` is replaced in place, a rerun on the same
workdir encodes with the new weights (embeddings and metrics equal a fresh
workdir's, embeddings differ from the old cache's); a garbled cache file is moved to
`<name>.corrupt` and the rerun's metrics equal the first run's.
"""

import pathlib
import shutil
import tempfile

from absl.testing import absltest
import numpy as np
import safetensors.numpy

from configs import evaluate as evaluate_config
from retrieval_jax import evaluate
from retrieval_jax import pretrained

_REPO = pathlib.Path(__file__).resolve().parents[2]
TINY_BEIR = _REPO / "tests" / "fixtures" / "tiny_beir"


class ContentKeyedCacheTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = pathlib.Path(tempfile.mkdtemp(prefix="rj_cache_"))
    cls.addClassCleanup(shutil.rmtree, cls.tmp, ignore_errors=True)
    source = pretrained.resolve_model_dir(pretrained.DEFAULT_MODEL)
    cls.model_dir = cls.tmp / "model"
    shutil.copytree(source, cls.model_dir)

  def _evaluate(self, workdir: pathlib.Path) -> dict[str, float]:
    config = evaluate_config.get_config("smoke")
    with config.unlocked():
      config.data.path = str(TINY_BEIR)
      config.model.pretrained = str(self.model_dir)
    return evaluate.evaluate(config, workdir)

  def test_replaced_weights_and_corrupt_cache(self):
    workdir = self.tmp / "eval"
    old = self._evaluate(workdir)
    (cache,) = workdir.glob("dense_*.npz")

    # Corrupt cache: moved aside, rebuilt, same metrics.
    cache.write_bytes(b"not an npz")
    with self.assertLogs(level="WARNING") as logs:
      again = self._evaluate(workdir)
    self.assertIn("unreadable cache", "\n".join(logs.output))
    self.assertTrue(cache.with_name(cache.name + ".corrupt").is_file())
    self.assertEqual(again, old)

    # New weights at the same path: a new cache entry, the new metrics.
    weights = self.model_dir / "model.safetensors"
    state = safetensors.numpy.load_file(weights)
    rng = np.random.default_rng(0)
    state = {
        k: (v + 0.5 * v.std() * rng.standard_normal(v.shape)).astype(v.dtype)
        for k, v in state.items()
    }
    safetensors.numpy.save_file(state, weights)
    new = self._evaluate(workdir)
    fresh = self._evaluate(self.tmp / "fresh")
    self.assertEqual(new, fresh)
    (new_cache,) = set(workdir.glob("dense_*.npz")) - {cache}
    (fresh_cache,) = (self.tmp / "fresh").glob("dense_*.npz")
    with np.load(cache) as a, np.load(new_cache) as b, np.load(
        fresh_cache
    ) as c:
      # The rerun encoded with the new weights, not the old cache.
      np.testing.assert_array_equal(b["docs_nd"], c["docs_nd"])
      self.assertGreater(np.abs(a["docs_nd"] - b["docs_nd"]).max(), 1e-2)


if __name__ == "__main__":
  absltest.main()
