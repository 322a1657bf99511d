"""The MoCo kind's train step: state["extra"] by hand, sharded = 1 device.

A tiny random encoder (1 layer, width 16), B = 8 pairs, a queue of 16.
Oracles: after step 1 the queue's first 8 rows are the key encoder's own
embeddings of the passages (`steps.encode_step`), their documents recorded,
the pointer at 8; after step 2 the key params are τ·key + (1-τ)·params of
step 1, worked out in NumPy; the 8-device step (queue rows split on the
batch axes) equals the 1-device step.
"""

import functools

from absl.testing import absltest
import jax
import numpy as np
import optax
from flax import nnx

from retrieval_jax import losses
from retrieval_jax import sharding
from retrieval_jax import steps
from retrieval_jax import train_state
from retrieval_jax.kinds import moco
import test_util

B, L, VOCAB, QUEUE, TAU = 8, 8, 100, 16, 0.9


def _model():
  return test_util.tiny_encoder(VOCAB)


def _batch(seed):
  rng = np.random.default_rng(seed)
  out = {}
  for name in ("query", "passage"):
    lengths = rng.integers(3, L + 1, B)
    mask = (np.arange(L)[None] < lengths[:, None]).astype(np.int32)
    out[f"{name}_ids"] = rng.integers(5, VOCAB, (B, L)).astype(np.int32) * mask
    out[f"{name}_mask"] = mask
  out["positive_counts"] = np.ones(B, np.int32)
  out["passage_doc"] = np.arange(B, dtype=np.int32) + 10 * seed
  out["relevant_doc"] = out["passage_doc"][:, None].copy()
  return out


def _train(mesh, num_steps=2):
  model_def, params = train_state.split_model(_model())
  tx = optax.sgd(0.5)
  extra = train_state.ExtraState(
      init=functools.partial(
          moco.init_extra, queue_size=QUEUE, pooling="mean", normalize=True
      ),
      shardings=moco.extra_shardings,
  )
  layout = train_state.state_layout(model_def, params, tx, mesh, extra=extra)
  state = train_state.create(params, tx, layout)
  spec = {k: v.shape for k, v in _batch(0).items()}
  step = steps.make_train_step(
      mesh,
      layout.shardings,
      spec,
      model_def=model_def,
      tx=tx,
      loss_fn=functools.partial(
          moco.loss,
          loss_fn=losses.contrastive.info_nce,
          momentum=TAU,
          temperature=0.1,
          pooling="mean",
          normalize=True,
          in_batch=True,
      ),
      dropout=False,
  )
  states = [jax.device_get(state)]
  for t in range(num_steps):
    batch = steps.put_batch(_batch(t), steps.batch_shardings(mesh, spec))
    state, _ = step(state, batch, jax.random.PRNGKey(0))
    states.append(jax.device_get(state))
  return model_def, states, layout


class MocoTrainStepTest(absltest.TestCase):

  def test_extra_state_by_hand(self):
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    model_def, states, _ = _train(mesh)
    s0, s1, s2 = states
    # Step 1: key = τ·p0 + (1-τ)·p0, then the keys of batch 0 enqueued.
    key1 = s1["extra"]["key_params"]
    jax.tree.map(
        lambda k, p: np.testing.assert_allclose(
            k, p, rtol=test_util.FP32_RTOL, atol=test_util.FP32_ATOL
        ),
        key1,
        s0["params"],
    )
    batch = _batch(0)
    want_keys = steps.encode_step(
        *nnx.split(model_def.merge(key1)),
        {
            "input_ids": batch["passage_ids"],
            "attention_mask": batch["passage_mask"],
        },
        pooling="mean",
        normalize=True,
    )
    queue = s1["extra"]["queue"]
    np.testing.assert_allclose(
        queue["queue_kd"][:B],
        want_keys,
        rtol=test_util.FP32_LONG_RTOL,
        atol=test_util.FP32_LONG_ATOL,
    )
    np.testing.assert_array_equal(queue["queue_kd"][B:], 0.0)
    np.testing.assert_array_equal(
        queue["queue_doc_k"], list(range(B)) + [-1] * B
    )
    self.assertEqual(int(queue["ptr"]), B)
    # Step 2: EMA with the params step 1 produced; queue full, ptr wraps.
    jax.tree.map(
        lambda k2, k1, p1: np.testing.assert_allclose(
            k2,
            TAU * np.asarray(k1, np.float64) + (1 - TAU) * p1,
            rtol=test_util.FP32_RTOL,
            atol=test_util.FP32_ATOL,
        ),
        s2["extra"]["key_params"],
        key1,
        s1["params"],
    )
    self.assertEqual(int(s2["extra"]["queue"]["ptr"]), 0)
    np.testing.assert_array_equal(
        s2["extra"]["queue"]["queue_doc_k"][B:], np.arange(B) + 10
    )

  def test_sharded_equals_single_device(self):
    if len(jax.devices()) < 8:
      self.skipTest("needs 8 (fake) devices")
    one = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    eight = sharding.make_mesh((8, 1, 1), devices=jax.devices()[:8])
    _, want, _ = _train(one)
    _, got, layout = _train(eight)
    # The queue's K rows are split over the 8 data shards.
    spec = layout.shardings["extra"]["queue"]["queue_kd"].spec
    self.assertEqual(spec[0], sharding.logical_to_spec((sharding.BATCH,))[0])
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(
            a,
            b,
            rtol=test_util.FP32_LONG_RTOL,
            atol=test_util.FP32_LONG_RTOL,
        ),
        got[-1],
        want[-1],
    )


if __name__ == "__main__":
  absltest.main()
