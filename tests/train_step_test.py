"""The sharded train step equals the single-device step; GradCache equals it.

A small random BERT-style encoder (2 layers, width 32) keeps each compile
to a few seconds. With plain SGD at learning rate 1 the parameter update
*is* the gradient, so comparing updated parameters compares gradients.
"""

import os

if "xla_force_host_platform_device_count" not in os.environ.get(
    "XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8")

from absl.testing import absltest
from absl.testing import parameterized
import jax
import numpy as np
import optax
from flax import nnx

from retrieval_jax import losses
from retrieval_jax import sharding
from retrieval_jax import steps
from retrieval_jax import train_state
from retrieval_jax.models import transformer_encoder

B, G, LQ, LP, VOCAB = 8, 2, 8, 12, 100


def _model():
  config = transformer_encoder.EncoderConfig(
      vocab_size=VOCAB, hidden_size=16, num_layers=1, num_heads=2,
      intermediate_size=32, max_position_embeddings=32)
  return transformer_encoder.TransformerEncoder(config, rngs=nnx.Rngs(0))


def _batch(seed=0):
  rng = np.random.default_rng(seed)

  def tokens(n, length):
    lengths = rng.integers(3, length + 1, n)
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    ids = rng.integers(5, VOCAB, (n, length)).astype(np.int32) * mask
    return ids, mask

  q_ids, q_mask = tokens(B, LQ)
  p_ids, p_mask = tokens(B * G, LP)
  # Query 3's positive is also query 5's hard negative (same document):
  # the duplicate must be masked for query 3 only.
  passage_doc = np.arange(B * G, dtype=np.int32)
  passage_doc[5 * G + 1] = passage_doc[3 * G]
  p_ids[5 * G + 1], p_mask[5 * G + 1] = p_ids[3 * G], p_mask[3 * G]
  relevant = np.full((B, 2), -1, np.int32)
  relevant[:, 0] = passage_doc[::G]
  positive_counts = np.ones(B, np.int32)
  positive_counts[1] = 2  # Two positives for the multi-positive losses.
  relevant[1, 1] = passage_doc[1 * G + 1]
  return {"query_ids": q_ids, "query_mask": q_mask, "passage_ids": p_ids,
          "passage_mask": p_mask, "positive_counts": positive_counts,
          "passage_doc": passage_doc, "relevant_doc": relevant}


def _run_step(mesh, loss_name, grad_cache_chunks=None, batch=None):
  model_def, params = train_state.split_model(_model())
  tx = optax.sgd(1.0)
  layout = train_state.state_layout(model_def, params, tx, mesh)
  state = train_state.create(params, tx, layout)
  batch = _batch() if batch is None else batch
  spec = {k: v.shape for k, v in batch.items()}
  step = steps.make_train_step(
      mesh, layout.shardings, spec, model_def=model_def, tx=tx,
      loss_fn=losses.get_loss(loss_name).fn, temperature=0.1,
      pooling="mean", normalize=True, dropout=False,
      grad_cache_chunks=grad_cache_chunks)
  rng = jax.random.PRNGKey(0)
  new_state, metrics = step(
      state, steps.put_batch(batch, steps.batch_shardings(mesh, spec)), rng)
  return jax.device_get(new_state), jax.device_get(metrics), new_state


def _max_diff(a, b):
  return max(jax.tree.leaves(jax.tree.map(
      lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))),
      a, b)))


class TrainStepShardingTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.one = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    cls.reference = {
        name: _run_step(cls.one, name)
        for name in ("infonce", "joint_lh", "lse_pair")}

  @parameterized.parameters(
      ((8, 1, 1), "infonce"),   # data parallel
      ((1, 8, 1), "joint_lh"),  # fully sharded parameters
      ((2, 4, 1), "lse_pair"),  # both
  )
  def test_sharded_step_equals_single_device(self, mesh_shape, loss_name):
    self.assertGreaterEqual(jax.device_count(), 8)
    mesh = sharding.make_mesh(mesh_shape)
    ref_state, ref_metrics, _ = self.reference[loss_name]
    state, metrics, placed = _run_step(mesh, loss_name)
    self.assertAlmostEqual(metrics["loss"], ref_metrics["loss"], delta=1e-5)
    self.assertAlmostEqual(metrics["grad_norm"], ref_metrics["grad_norm"],
                           delta=1e-5)
    self.assertLess(_max_diff(state["params"], ref_state["params"]), 1e-5)
    # The gradient is not trivially zero, so the comparison means something.
    self.assertGreater(ref_metrics["grad_norm"], 1e-3)
    if mesh_shape[1] > 1:
      # FSDP really shards the parameters: the word-embedding table is split
      # along its width over the fsdp axis.
      word = placed["params"]["embeddings"]["word_vd"]
      self.assertEqual(word.sharding.spec[1], sharding.FSDP)
      self.assertEqual(word.addressable_shards[0].data.shape[1],
                       word.shape[1] // mesh_shape[1])

  def test_duplicate_masking_changes_the_loss(self):
    # Same batch without the duplicate document id: the loss differs, so the
    # masking is in effect in the step.
    batch = _batch()
    batch["passage_doc"] = np.arange(B * G, dtype=np.int32)
    _, masked, _ = self.reference["infonce"]
    _, unmasked, _ = _run_step(self.one, "infonce", batch=batch)
    self.assertGreater(unmasked["loss"], masked["loss"] + 1e-4)


class GradCacheTest(parameterized.TestCase):

  @parameterized.parameters(
      ((1, 1, 1), (2, 4), "infonce"),
      ((2, 4, 1), (1, 2), "joint_lh"),
  )
  def test_grad_cache_equals_full_batch(self, mesh_shape, chunks, loss_name):
    devices = jax.devices()[:int(np.prod(mesh_shape))]
    mesh = sharding.make_mesh(mesh_shape, devices=devices)
    full_state, full_metrics, _ = _run_step(mesh, loss_name)
    gc_state, gc_metrics, _ = _run_step(mesh, loss_name,
                                        grad_cache_chunks=chunks)
    self.assertAlmostEqual(gc_metrics["loss"], full_metrics["loss"],
                           delta=1e-5)
    self.assertLess(_max_diff(gc_state["params"], full_state["params"]),
                    1e-5)
    self.assertGreater(full_metrics["grad_norm"], 1e-3)


if __name__ == "__main__":
  absltest.main()
