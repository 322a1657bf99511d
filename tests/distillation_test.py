"""Distillation from a teacher into the bi-encoder, SPLADE and inference-free.

Oracles on a fixed batch with a fixed teacher and a tiny encoder
(tests/test_util.py): the loss is the KL (or Margin-MSE) of the student's
group scores computed by hand, one train step lowers it, InfoNCE adds with
its weight; the train spec scales the teacher and, when configured, uses
`regularizers.idf_flops` as the document regulariser; bad combinations fail
validation naming config.loss.name / config.loss.teacher.
"""

import functools
import types

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import train as train_config
from retrieval_jax import kinds
from retrieval_jax import losses
from retrieval_jax import sharding
from retrieval_jax import steps
from retrieval_jax import train_state
from retrieval_jax.data import features
from retrieval_jax.data import tokenizers
from retrieval_jax.errors import ConfigError
from retrieval_jax.kinds import bi_encoder
from retrieval_jax.kinds import splade as splade_kind
from retrieval_jax.losses import regularizers
from retrieval_jax.models import splade as splade_model
import test_util

B, G, LQ, LP, VOCAB = 4, 4, 8, 12, 100
SPECIAL = (0, 2, 3)  # [PAD], [CLS], [SEP] of `_tokenizer`
TEMPERATURE = 0.05


def _tokenizer():
  words = [f"w{i}" for i in range(5, VOCAB)]
  return tokenizers.WordPieceTokenizer(
      ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
  )


def _batch(seed=0):
  """B queries, groups of G (positive first), one padding row in group 2."""
  rng = np.random.default_rng(seed)

  def tokens(n, length):
    lengths = rng.integers(3, length + 1, n)
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    ids = rng.integers(5, VOCAB, (n, length)).astype(np.int32) * mask
    return ids, mask

  q_ids, q_mask = tokens(B, LQ)
  p_ids, p_mask = tokens(B * G, LP)
  passage_doc = np.arange(B * G, dtype=np.int32)
  pad = 2 * G + 3
  passage_doc[pad] = -1
  p_ids[pad], p_mask[pad] = 0, 0
  teacher = (rng.normal(size=B * G) * 3).astype(np.float32)
  teacher[pad] = 0.0
  return {
      "query_ids": q_ids,
      "query_mask": q_mask,
      "passage_ids": p_ids,
      "passage_mask": p_mask,
      "positive_counts": np.ones(B, np.int32),
      "passage_doc": passage_doc,
      "relevant_doc": passage_doc[::G, None].copy(),
      "teacher_scores": teacher,
  }


def _valid_bg(batch):
  return (batch["passage_doc"] >= 0).reshape(B, G)


def _kl_by_hand(s_bg, t_bg, valid_bg):
  """Mean over rows of KL(softmax(t) || softmax(s)) over valid slots."""
  kls = []
  for s, t, v in zip(
      s_bg.astype(np.float64), t_bg.astype(np.float64), valid_bg
  ):
    log_p_t = t[v] - np.log(np.exp(t[v]).sum())
    log_p_s = s[v] - np.log(np.exp(s[v]).sum())
    kls.append(np.sum(np.exp(log_p_t) * (log_p_t - log_p_s)))
  return float(np.mean(kls))


def _margin_mse_by_hand(s_bg, t_bg, valid_bg):
  sq = [
      ((s[0] - s[j]) - (t[0] - t[j])) ** 2
      for s, t, v in zip(s_bg.astype(np.float64), t_bg, valid_bg)
      for j in range(1, G)
      if v[j]
  ]
  return float(np.mean(sq))


def _dense_scores(model, batch):
  enc = functools.partial(
      bi_encoder.encode, rng=None, pooling="mean", normalize=True
  )
  q_bd = np.asarray(enc(model, batch["query_ids"], batch["query_mask"]))
  p_cd = np.asarray(enc(model, batch["passage_ids"], batch["passage_mask"]))
  return np.einsum("bd,bgd->bg", q_bd, p_cd.reshape(B, G, -1)) / TEMPERATURE


def _sparse_scores(model, batch, idf_v=None):
  p_cv = np.asarray(model(batch["passage_ids"], batch["passage_mask"]))
  if idf_v is None:
    q_bv = np.asarray(model(batch["query_ids"], batch["query_mask"]))
  else:
    q_bv = np.asarray(
        splade_kind.bag_of_tokens(
            batch["query_ids"], batch["query_mask"], idf_v, SPECIAL
        )
    )
  return np.einsum("bv,bgv->bg", q_bv, p_cv.reshape(B, G, -1))


def _splade():
  return splade_model.Splade(
      test_util.tiny_encoder(VOCAB), bias_init=0.0, rngs=nnx.Rngs(1)
  )


def _idf():
  return np.random.default_rng(7).uniform(0.5, 4.0, VOCAB).astype(np.float32)


def _one_step(model, loss_fn, batch, learning_rate=1e-2):
  """(params before, params after one Adam step, the step's metrics)."""
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  model_def, params = train_state.split_model(model)
  tx = optax.adam(learning_rate)
  layout = train_state.state_layout(model_def, params, tx, mesh)
  state = train_state.create(params, tx, layout)
  spec = {k: v.shape for k, v in batch.items()}
  step = steps.make_train_step(
      mesh,
      layout.shardings,
      spec,
      model_def=model_def,
      tx=tx,
      loss_fn=loss_fn,
      dropout=False,
  )
  placed = steps.put_batch(batch, steps.batch_shardings(mesh, spec))
  before = model_def.merge(jax.device_get(state["params"]))
  state, metrics = step(state, placed, jax.random.PRNGKey(0))
  after = model_def.merge(jax.device_get(state["params"]))
  return before, after, jax.device_get(metrics)


class StepLowersKlTest(parameterized.TestCase):
  """One step on a fixed batch lowers the KL to a fixed teacher."""

  def _check(self, model, loss_fn, scores_fn, batch):
    before, after, metrics = _one_step(model, loss_fn, batch)
    t_bg, valid = batch["teacher_scores"].reshape(B, G), _valid_bg(batch)
    kl_before = _kl_by_hand(scores_fn(before), t_bg, valid)
    kl_after = _kl_by_hand(scores_fn(after), t_bg, valid)
    # The step's loss is the KL of the group scores (a forward pass apart).
    self.assertAlmostEqual(float(metrics["loss"]), kl_before, delta=1e-4)
    self.assertLess(kl_after, kl_before - 1e-3)
    self.assertEqual(float(metrics["num_valid_rows"]), B)

  def test_bi_encoder(self):
    batch = _batch()
    loss_fn = functools.partial(
        bi_encoder.loss,
        loss_fn=losses.get_loss("infonce").fn,
        temperature=TEMPERATURE,
        pooling="mean",
        normalize=True,
        distill_loss="kl_distillation",
    )
    self._check(
        test_util.tiny_encoder(VOCAB),
        loss_fn,
        lambda m: _dense_scores(m, batch),
        batch,
    )

  @pytest.mark.slow
  def test_splade(self):
    batch = _batch(1)
    loss_fn = functools.partial(
        splade_kind.loss,
        loss_fn=losses.get_loss("infonce").fn,
        distill_loss="kl_distillation",
    )
    self._check(_splade(), loss_fn, lambda m: _sparse_scores(m, batch), batch)

  @pytest.mark.slow
  def test_inference_free(self):
    batch, idf = _batch(2), _idf()
    loss_fn = functools.partial(
        splade_kind.loss,
        loss_fn=losses.get_loss("infonce").fn,
        idf_v=idf,
        special=SPECIAL,
        distill_loss="kl_distillation",
    )
    self._check(
        _splade(), loss_fn, lambda m: _sparse_scores(m, batch, idf), batch
    )


class BiEncoderLossTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.model, self.batch = test_util.tiny_encoder(VOCAB), _batch(3)
    self.scores_bg = _dense_scores(self.model, self.batch)
    self.kwargs = dict(
        loss_fn=losses.get_loss("infonce").fn,
        temperature=TEMPERATURE,
        pooling="mean",
        normalize=True,
    )

  def _loss(self, **kw):
    loss, aux = bi_encoder.loss(
        self.model, self.batch, None, 0, **self.kwargs, **kw
    )
    return float(loss), jax.device_get(aux)

  def test_margin_mse_by_hand(self):
    got, _ = self._loss(distill_loss="margin_mse")
    want = _margin_mse_by_hand(
        self.scores_bg,
        self.batch["teacher_scores"].reshape(B, G),
        _valid_bg(self.batch),
    )
    self.assertAlmostEqual(got, want, delta=1e-3 * max(1.0, want))

  def test_infonce_weight_adds_infonce(self):
    plain, _ = self._loss(distill_loss="kl_distillation")
    infonce, _ = self._loss()  # the in-batch loss alone
    mixed, aux = self._loss(distill_loss="kl_distillation", infonce_weight=0.5)
    self.assertAlmostEqual(mixed, plain + 0.5 * infonce, places=4)
    self.assertAlmostEqual(float(aux["infonce_loss"]), infonce, places=4)
    self.assertAlmostEqual(float(aux["distillation_loss"]), plain, places=4)


def _spec_batch(kind, config, model, tokenizer, doc_texts):
  """The train spec's loss aux on `_batch()` (featurized as in training)."""
  loader = types.SimpleNamespace(
      data=types.SimpleNamespace(doc_texts=doc_texts)
  )
  spec = kind.train_spec(
      config,
      loader=loader,
      tokenizer=tokenizer,
      loss_spec=kind.loss_spec(config),
      mesh=None,
  )
  host = _batch(4)
  batch = spec.featurize(0, host)
  _, aux = spec.loss(model, batch, None, 0)
  return host, batch, jax.device_get(aux)


class TrainSpecTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.tokenizer = _tokenizer()
    self.docs = ["w5 w6 w7", "w5 w8", "w5 w9 w10 w11", "w12"]
    self.idf = features.idf_from_corpus(
        [self.tokenizer.tokenize_to_ids(t) for t in self.docs], VOCAB
    )

  def _config(self, arg, **loss):
    config = train_config.get_config(arg)
    with config.unlocked():
      config.loss.update(loss)
    return config

  def _weights(self, model, batch):
    return (
        np.asarray(model(batch["passage_ids"], batch["passage_mask"])),
        batch["passage_doc"] >= 0,
    )

  def test_inference_free_uses_idf_flops_when_configured(self):
    config = self._config("smoke,inference_free,distill")
    self.assertEqual(config.loss.doc_regularizer, "idf_flops")
    model = _splade()
    host, batch, aux = _spec_batch(
        kinds.KINDS["inference_free"], config, model, self.tokenizer, self.docs
    )
    # The teacher arrives scaled.
    np.testing.assert_array_equal(
        batch["teacher_scores"], 30.0 * host["teacher_scores"]
    )
    w_cv, valid = self._weights(model, batch)
    u_cv = w_cv * self.idf[None, :]  # what the idf-weighted query scores
    want = regularizers.idf_flops(jnp.asarray(u_cv), self.idf, valid)
    np.testing.assert_allclose(aux["flops_d"], want, rtol=1e-5)
    # The identity behind the paper's loss: FLOPS of the raw weights.
    np.testing.assert_allclose(
        aux["flops_d"], regularizers.flops(w_cv, valid), rtol=1e-4
    )
    plain = self._config(
        "smoke,inference_free,distill", doc_regularizer="flops"
    )
    *_, aux = _spec_batch(
        kinds.KINDS["inference_free"], plain, model, self.tokenizer, self.docs
    )
    np.testing.assert_allclose(
        aux["flops_d"], regularizers.flops(w_cv, valid), rtol=1e-5
    )

  def test_splade_idf_flops_weighs_terms_by_idf(self):
    config = self._config("smoke,splade", doc_regularizer="idf_flops")
    model = _splade()
    _, batch, aux = _spec_batch(
        kinds.KINDS["splade"], config, model, self.tokenizer, self.docs
    )
    w_cv, valid = self._weights(model, batch)
    want = float(regularizers.idf_flops(jnp.asarray(w_cv), self.idf, valid))
    np.testing.assert_allclose(aux["flops_d"], want, rtol=1e-5)
    self.assertNotAlmostEqual(
        want, float(regularizers.flops(w_cv, valid)), delta=1e-3 * want
    )


class ValidateTest(parameterized.TestCase):

  @parameterized.parameters(
      ("smoke", dict(teacher="bm25"), r"config.loss.name='infonce'"),
      (
          "smoke",
          dict(name="kl_distillation"),
          r"config.loss.name='kl_distillation'.*set config.loss.teacher",
      ),
      (
          "smoke",
          dict(name="kl_distillation", teacher="bm25", sharded=True),
          r"config.loss.sharded",
      ),
      (
          "smoke,distill",
          dict(teacher="dense"),
          r"config.loss.teacher='dense' needs config.loss.teacher_workdir",
      ),
      ("smoke,distill", dict(teacher="file"), r"config.data.format='tevatron'"),
      ("smoke,distill", dict(teacher="llm"), r"config.loss.teacher='llm'"),
      ("smoke", dict(infonce_weight=1.0), r"config.loss.infonce_weight"),
      (
          "smoke,colbert",
          dict(name="infonce", teacher="bm25"),
          r"config.loss.teacher='bm25': a 'colbert' model",
      ),
      (
          "smoke,splade,distill",
          dict(doc_regularizer="l1"),
          r"config.loss.doc_regularizer='l1'",
      ),
      (
          "smoke,cross_encoder",
          dict(name="margin_mse"),
          r"config.loss.name='margin_mse'.*set config.loss.teacher",
      ),
  )
  def test_bad_combinations_name_the_keys(self, arg, loss, message):
    config = train_config.get_config(arg)
    with config.unlocked():
      config.loss.update(loss)
    with self.assertRaisesRegex(ConfigError, message):
      kinds.get(config.model).validate(config)

  @parameterized.parameters(
      "smoke,distill",
      "smoke,splade,distill",
      "smoke,inference_free,distill",
      "smoke,tevatron",
      "smoke,cross_encoder,loss=kl_distillation,teacher=bm25",
      "scifact,distill",
  )
  def test_shipped_variants_validate(self, arg):
    config = train_config.get_config(arg)
    kinds.get(config.model).validate(config)

  def test_cross_encoder_keeps_label_losses_and_takes_margin_mse(self):
    for loss in (
        dict(name="kl_distillation"),  # on 1/0 labels
        dict(name="bce"),
        dict(name="margin_mse", teacher="bm25"),
    ):
      config = train_config.get_config("smoke,cross_encoder")
      with config.unlocked():
        config.loss.update(loss)
      kinds.get(config.model).validate(config)
      spec = kinds.get(config.model).loss_spec(config)
      self.assertEqual((spec.positives, spec.unit), ("one", "pair"))


if __name__ == "__main__":
  absltest.main()
