"""An FSDP run trains and evaluates like the data-parallel run.

Two smoke runs of all-MiniLM-L6-v2 on the suite's 8 CPU devices: mesh
(8, 1, 1) (data parallel) and (1, 8, 1) (parameters sharded over `fsdp`
by config.mesh's rules). Both train 2 steps, evaluate during training and
through the evaluate mode (`--config.run`, with the run's own mesh), and
must agree within 1e-5; the FSDP run's params really are sharded.
"""

from absl.testing import absltest
import jax
import numpy as np

from retrieval_jax import evaluate
from retrieval_jax import kinds
from retrieval_jax import sharding
from retrieval_jax import train


def _train_then_evaluate(root, mesh_shape):
  from configs import evaluate as evaluate_config  # pylint: disable=g-import-not-at-top
  from configs import train as train_config  # pylint: disable=g-import-not-at-top

  config = train_config.get_config("smoke")
  with config.unlocked():
    config.train.num_steps = 2
    config.train.eval_before = False
    config.mesh.shape = mesh_shape
  workdir = f"{root}/train_{'x'.join(map(str, mesh_shape))}"
  trained = train.train_and_evaluate(config, workdir)
  config = evaluate_config.get_config("smoke")
  with config.unlocked():
    config.run = workdir
    config.mesh.shape = mesh_shape
    config.data.split = "dev"
    config.data.max_queries = 16
  evaluated = evaluate.evaluate(config, f"{workdir}_eval")
  return workdir, trained, evaluated


class FsdpTest(absltest.TestCase):

  def test_fsdp_trains_and_evaluates_like_data_parallel(self):
    root = self.create_tempdir().full_path
    _, dp, dp_eval = _train_then_evaluate(root, (8, 1, 1))
    fsdp_dir, fsdp, fsdp_eval = _train_then_evaluate(root, (1, 8, 1))
    for key, value in dp["after"].items():
      self.assertAlmostEqual(fsdp["after"][key], value, delta=1e-5, msg=key)
    self.assertAlmostEqual(
        fsdp["train"]["train/loss"], dp["train"]["train/loss"], delta=1e-5
    )
    for key, value in dp_eval.items():
      self.assertAlmostEqual(fsdp_eval[key], value, delta=1e-5, msg=key)
    # The metrics are real: not all zero, not all one.
    self.assertTrue(0 < dp_eval["ndcg@10"] < 1)
    # Restored under the default rules on the FSDP mesh, the word table is
    # split along its width over fsdp.
    model, *_ = kinds.load_run(fsdp_dir, sharding.make_mesh((1, 8, 1)))
    word = model.embeddings.word_vd[...]
    self.assertEqual(word.sharding.spec[1], sharding.FSDP)
    self.assertEqual(
        word.addressable_shards[0].data.shape[1], word.shape[1] // 8
    )
    self.assertEqual(jax.device_count(), 8)
    self.assertGreater(np.abs(np.asarray(word)).max(), 0)


if __name__ == "__main__":
  absltest.main()
