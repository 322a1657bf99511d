"""The Revela kind's loss and train step (tiny retriever and LM).

Oracles: the next-token loss by hand; the retriever's gradient, which
reaches it only through p(j | i), is non-zero and matches a central finite
difference of the loss along it; "same_doc_weight" by hand from the
weights; the 8-device train step (chunks split over devices, cross-chunk
attention over the global batch) equals the 1-device step (slow); bad
configs name their key.
"""

import functools

from absl.testing import absltest
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import train as train_config
from retrieval_jax import sharding
from retrieval_jax import steps
from retrieval_jax import train_state
from retrieval_jax.errors import ConfigError
from retrieval_jax.kinds import revela as revela_kind
from retrieval_jax.losses import language_modeling
from retrieval_jax.models import revela as revela_model
from retrieval_jax.models import transformer_encoder
import test_util

B, L, VOCAB, TAU = 8, 8, 100, 0.1


def _model(seed=0):
  lm = revela_model.InBatchLM(
      transformer_encoder.EncoderConfig(
          vocab_size=VOCAB,
          hidden_size=16,
          num_layers=1,
          num_heads=2,
          intermediate_size=32,
          max_position_embeddings=L,
      ),
      rngs=nnx.Rngs(seed + 1),
  )
  return revela_model.Revela(test_util.tiny_encoder(VOCAB, seed), lm)


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(4, L + 1, B)
  mask = (np.arange(L)[None] < lengths[:, None]).astype(np.int32)
  ids = rng.integers(5, VOCAB, (B, L)).astype(np.int32) * mask
  return {
      "chunk_ids": ids,
      "chunk_mask": mask,
      "chunk_doc": np.repeat(np.arange(B // 2, dtype=np.int32), 2),
  }


_LOSS = functools.partial(
    revela_kind.loss, temperature=TAU, pooling="mean", normalize=True
)


class NextTokenLossTest(absltest.TestCase):

  def test_by_hand(self):
    logits = np.log(
        np.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3] * 3]])
    )
    ids = np.array([[0, 1, 2]])
    loss, aux = language_modeling.next_token_loss(
        logits, ids, np.array([[1, 1, 1]])
    )
    # Targets 1 (p 0.25, not the argmax) and 2 (p 0.1).
    np.testing.assert_allclose(loss, -(np.log(0.25) + np.log(0.1)) / 2)
    self.assertEqual(float(aux["token_accuracy"]), 0.0)
    loss, aux = language_modeling.next_token_loss(
        logits, ids, np.array([[1, 1, 0]])
    )
    np.testing.assert_allclose(loss, -np.log(0.25), rtol=1e-6)
    self.assertEqual(float(aux["tokens"]), 1.0)


class RevelaLossTest(absltest.TestCase):

  @pytest.mark.slow
  def test_retriever_gradient_through_the_weights(self):
    model_def, params = train_state.split_model(_model())
    batch = jax.tree.map(jnp.asarray, _batch())

    # One compiled program gives the gradient and the shifted losses.
    value_and_grad = jax.jit(
        jax.value_and_grad(
            lambda prm: _LOSS(model_def.merge(prm), batch, None, 0)[0]
        )
    )
    value = lambda prm: value_and_grad(prm)[0]
    _, grads = value_and_grad(params)
    g_ret = grads["retriever"]
    norm = float(optax.tree.norm(g_ret))
    self.assertGreater(norm, 1e-4)
    # The LM learns too.
    self.assertGreater(float(optax.tree.norm(grads["lm"])), 0.0)
    # Central difference along the retriever's gradient direction.
    eps = 1e-2
    shift = lambda s: dict(
        params,
        retriever=jax.tree.map(
            lambda p, g: p + s * eps * g / norm, params["retriever"], g_ret
        ),
    )
    slope = (value(shift(1.0)) - value(shift(-1.0))) / (2 * eps)
    np.testing.assert_allclose(float(slope), norm, rtol=0.02)

  def test_same_doc_weight_by_hand(self):
    graphdef, state = nnx.split(_model())
    batch = jax.tree.map(jnp.asarray, _batch())

    @jax.jit
    def run(st):
      model = nnx.merge(graphdef, st)
      emb_bd = revela_kind.bi_encoder.encode(
          model.retriever,
          batch["chunk_ids"],
          batch["chunk_mask"],
          None,
          pooling="mean",
          normalize=True,
      )
      return _LOSS(model, batch, None, 0)[1], emb_bd

    aux, emb = run(state)
    emb = np.asarray(emb, np.float64)
    s = emb @ emb.T / TAU
    np.fill_diagonal(s, -np.inf)
    w = np.exp(s - s.max(1, keepdims=True))
    w /= w.sum(1, keepdims=True)
    # Chunks 2k and 2k + 1 share a document: row i's mass on its partner.
    want = np.mean([w[i, i ^ 1] for i in range(B)])
    np.testing.assert_allclose(
        float(aux["same_doc_weight"]), want, rtol=test_util.FP32_LONG_RTOL
    )


def _train(mesh, num_steps=2):
  model_def, params = train_state.split_model(_model())
  tx = optax.sgd(0.5)
  layout = train_state.state_layout(model_def, params, tx, mesh)
  state = train_state.create(params, tx, layout)
  spec = {k: v.shape for k, v in _batch().items()}
  step = steps.make_train_step(
      mesh,
      layout.shardings,
      spec,
      model_def=model_def,
      tx=tx,
      loss_fn=_LOSS,
      dropout=False,
  )
  losses = []
  for t in range(num_steps):
    batch = steps.put_batch(_batch(t), steps.batch_shardings(mesh, spec))
    state, metrics = step(state, batch, jax.random.PRNGKey(0))
    losses.append(float(metrics["loss"]))
  return jax.device_get(state["params"]), losses


class RevelaTrainStepTest(absltest.TestCase):

  # Two train-step compilations: ~15 s of CPU, so in the slow set.
  @pytest.mark.slow
  def test_sharded_equals_single_device(self):
    if len(jax.devices()) < 8:
      self.skipTest("needs 8 (fake) devices")
    one = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    eight = sharding.make_mesh((8, 1, 1), devices=jax.devices()[:8])
    (p1, l1), (p8, l8) = _train(one), _train(eight)
    np.testing.assert_allclose(l8, l1, rtol=test_util.FP32_LONG_RTOL)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(
            a, b, rtol=test_util.FP32_LONG_RTOL, atol=test_util.FP32_LONG_ATOL
        ),
        p8,
        p1,
    )


class RevelaConfigTest(absltest.TestCase):

  def _refused(self, message, **changes):
    config = train_config.get_config("pretrain_revela,smoke")
    with config.unlocked():
      for key, value in changes.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
          node = node[p]
        node[leaf] = value
    with self.assertRaisesRegex(ConfigError, message):
      revela_kind.KIND.validate(config)

  def test_bad_configs_name_the_key(self):
    revela_kind.KIND.validate(train_config.get_config("pretrain_revela,smoke"))
    self._refused(r"config.loss.name='infonce'", **{"loss.name": "infonce"})
    self._refused(r"config.data.spans.task", **{"data.spans.task": "crop"})
    self._refused(r"config.loss.temperature", **{"loss.temperature": 0.0})
    self._refused(
        r"config.model.revela_lm: .*not divisible",
        **{"model.revela_lm.num_heads": 3},
    )
    self._refused(
        r"config.data.passage_max_length=64 \(the chunk width\) exceeds"
        r" .*max_length=32",
        **{"data.passage_max_length": 64},
    )


if __name__ == "__main__":
  absltest.main()
