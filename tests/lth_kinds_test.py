"""The learning-to-hash kinds (bpr, jpq) and their frozen teacher.

A tiny random encoder (1 layer, width 16), B = 8 queries x G = 2 passages.
Oracles: JPQ's ADC scores equal the float64 dot product with the decoded
documents; a JPQ step changes the centroids and the query encoder, never
the codes or the k-means centroids, and its loss does not read the
passages' tokens (no document tower); the teacher's params never change;
BPR's loss equals `losses.bpr` on sign codes computed by hand; margin-MSE's
hand case (losses.md: 1.44); a few steps on a fixed batch lower each
kind's loss; the indexes `build_index` makes return what brute force does.
"""

import functools

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import train as train_config
from retrieval_jax import losses
from retrieval_jax import sharding
from retrieval_jax import steps
from retrieval_jax import train_state
from retrieval_jax.errors import ConfigError
from retrieval_jax.kinds import bi_encoder
from retrieval_jax.kinds import bpr
from retrieval_jax.kinds import frozen_teacher
from retrieval_jax.kinds import jpq
from retrieval_jax.models import jpq as jpq_model
from retrieval_jax.search import hamming
from retrieval_jax.search import product_quantization
import test_util

B, G, LQ, LP, VOCAB = 8, 2, 8, 12, 100
M, NBITS, DIM, NUM_DOCS = 4, 2, 16, 24  # 4 sub-spaces of 4 dims, 4 centroids


def _batch(seed=0):
  rng = np.random.default_rng(seed)

  def tokens(n, length):
    lengths = rng.integers(3, length + 1, n)
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    return rng.integers(5, VOCAB, (n, length)).astype(np.int32) * mask, mask

  q_ids, q_mask = tokens(B, LQ)
  p_ids, p_mask = tokens(B * G, LP)
  passage_doc = rng.permutation(NUM_DOCS)[: B * G].astype(np.int32)
  passage_doc[-1] = -1  # the last query has no hard negative
  p_ids[-1], p_mask[-1] = 0, 0
  return {
      "query_ids": q_ids,
      "query_mask": q_mask,
      "passage_ids": p_ids,
      "passage_mask": p_mask,
      "positive_counts": np.ones(B, np.int32),
      "passage_doc": passage_doc,
      "relevant_doc": passage_doc[::G, None].copy(),
  }


def _jpq_constants(seed=0):
  rng = np.random.default_rng(seed)
  centroids_mks = 0.3 * rng.standard_normal((M, 1 << NBITS, DIM // M))
  codes_nm = rng.integers(0, 1 << NBITS, (NUM_DOCS, M))
  return centroids_mks.astype(np.float32), codes_nm.astype(np.int32)


_COMMON = dict(
    pooling="mean",
    normalize=True,
    share_hard_negatives=True,
    ranking_weight=1.0,
    margin_mse_weight=0.0,
    teacher_scale=1.0,
)


def _jpq_setup(*, margin_mse_weight=0.0, lr=1e-2):
  model = jpq_model.JpqQueryEncoder(
      test_util.tiny_encoder(VOCAB),
      num_subspaces=M,
      num_centroids=1 << NBITS,
      sub_dim=DIM // M,
      centroid_scale=2.0,
  )
  centroids_mks, codes_nm = _jpq_constants()
  extra = train_state.ExtraState(
      init=functools.partial(
          jpq.init_extra,
          centroids_mks=centroids_mks,
          codes_nm=codes_nm,
          teacher=bool(margin_mse_weight),
      ),
      shardings=frozen_teacher.extra_shardings,
  )
  loss_fn = functools.partial(
      jpq.loss,
      loss_fn=losses.contrastive.info_nce,
      temperature=0.1,
      **dict(_COMMON, margin_mse_weight=margin_mse_weight),
  )
  return _setup(model, loss_fn, extra, lr)


def _bpr_setup(*, margin_mse_weight=0.0, lr=1e-2, straight_through=True):
  extra = None
  if margin_mse_weight:
    extra = train_state.ExtraState(
        init=frozen_teacher.init_extra,
        shardings=frozen_teacher.extra_shardings,
    )
  loss_fn = functools.partial(
      bpr.loss,
      hashnet_gamma=0.1,
      straight_through=straight_through,
      **dict(_COMMON, margin_mse_weight=margin_mse_weight, teacher_scale=16.0),
  )
  return _setup(test_util.tiny_encoder(VOCAB), loss_fn, extra, lr)


def _setup(model, loss_fn, extra, lr):
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  model_def, params = train_state.split_model(model)
  tx = optax.adam(lr)
  layout = train_state.state_layout(model_def, params, tx, mesh, extra=extra)
  state = train_state.create(params, tx, layout)
  spec = {k: v.shape for k, v in _batch().items()}
  step = steps.make_train_step(
      mesh,
      layout.shardings,
      spec,
      model_def=model_def,
      tx=tx,
      loss_fn=loss_fn,
      dropout=False,
  )
  shardings = steps.batch_shardings(mesh, spec)
  return model_def, state, step, shardings, loss_fn


def _run(step, state, shardings, batch, num_steps):
  losses_ = []
  for _ in range(num_steps):
    state, metrics = step(
        state, steps.put_batch(batch, shardings), jax.random.PRNGKey(0)
    )
    losses_.append(float(metrics["loss"]))
  return state, losses_


def _tree_equal(a, b):
  return all(
      np.array_equal(x, y)
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


class JpqTest(absltest.TestCase):

  def test_adc_scores_equal_dot_with_decoded_documents(self):
    centroids_mks, codes_nm = _jpq_constants()
    q_bd = np.random.default_rng(1).standard_normal((B, DIM))
    got = jpq.adc_candidate_scores(
        jnp.asarray(q_bd, jnp.float32), centroids_mks, codes_nm
    )
    decoded_nd = np.stack([
        np.concatenate([centroids_mks[m, codes_nm[n, m]] for m in range(M)])
        for n in range(NUM_DOCS)
    ]).astype(np.float64)
    np.testing.assert_allclose(
        got, q_bd @ decoded_nd.T, rtol=test_util.FP32_RTOL, atol=1e-5
    )
    np.testing.assert_array_equal(
        product_quantization.decode(centroids_mks, codes_nm), decoded_nd
    )

  def test_steps_train_centroids_and_query_encoder_not_codes(self):
    _, state0, step, shardings, _ = _jpq_setup()
    state0 = jax.device_get(state0)
    state1, values = _run(step, state0, shardings, _batch(), 1)
    state1 = jax.device_get(state1)
    centroids_mks, codes_nm = _jpq_constants()
    np.testing.assert_array_equal(state1["extra"][jpq.CODES], codes_nm)
    np.testing.assert_array_equal(state1["extra"][jpq.CENTROIDS], centroids_mks)
    offset0 = state0["params"]["centroid_offset_mks"]
    offset1 = state1["params"]["centroid_offset_mks"]
    np.testing.assert_array_equal(offset0, 0.0)
    # Adam's first step moves every entry with a gradient by ~lr.
    self.assertGreater(np.abs(offset1).max(), 5e-3)
    self.assertFalse(
        _tree_equal(state0["params"]["encoder"], state1["params"]["encoder"])
    )
    # More steps on the same batch lower the loss.
    _, more = _run(step, state1, shardings, _batch(), 7)
    values += more
    self.assertLess(values[-1], 0.8 * values[0], values)

  def test_loss_reads_no_passage_tokens(self):
    model_def, state, _, _, loss_fn = _jpq_setup()
    batch = _batch()
    other = dict(batch)
    rng = np.random.default_rng(7)
    other["passage_ids"] = rng.integers(5, VOCAB, batch["passage_ids"].shape)
    other["passage_mask"] = np.ones_like(batch["passage_mask"])

    @jax.jit
    def value_and_grad(b):
      def f(params):
        return loss_fn(
            model_def.merge(params), b, None, state["step"], state["extra"]
        )

      (value, _), grads = jax.value_and_grad(f, has_aux=True)(state["params"])
      return value, grads

    v1, g1 = value_and_grad(batch)
    v2, g2 = value_and_grad(other)
    self.assertEqual(float(v1), float(v2))
    self.assertTrue(_tree_equal(g1, g2))

  @pytest.mark.slow
  def test_distillation_steps_keep_the_teacher_frozen(self):
    _, state0, step, shardings, _ = _jpq_setup(margin_mse_weight=1.0)
    state0 = jax.device_get(state0)
    state1, values = _run(step, state0, shardings, _batch(), 8)
    state1 = jax.device_get(state1)
    teacher = state1["extra"][frozen_teacher.TEACHER]
    self.assertTrue(_tree_equal(teacher, state0["params"]))
    self.assertFalse(_tree_equal(teacher, state1["params"]))
    self.assertLess(values[-1], 0.8 * values[0], values)

  def test_pq_index_round_trip_and_search(self):
    centroids_mks, codes_nm = _jpq_constants()
    decoded_nd = np.asarray(
        product_quantization.decode(centroids_mks, codes_nm), np.float64
    )
    q_qd = np.random.default_rng(2).standard_normal((5, DIM))
    for engine in ("faiss", "jax"):
      index = jpq.pq_index(centroids_mks, codes_nm=codes_nm, engine=engine)
      got_c, got_codes = product_quantization.faiss_pq_arrays(
          index.faiss_index()
      )
      np.testing.assert_array_equal(got_codes, codes_nm)
      np.testing.assert_array_equal(got_c, centroids_mks)
      scores_qk, ids_qk = index.search(q_qd, 6)
      want_qn = q_qd @ decoded_nd.T
      test_util.assert_same_topk(
          ids_qk,
          np.argsort(-want_qn, axis=1, kind="stable")[:, :6],
          want_qn,
          atol=1e-5,
      )
      np.testing.assert_allclose(
          scores_qk, np.take_along_axis(want_qn, ids_qk, 1), atol=1e-5
      )
    # Documents given as vectors: each sub-vector takes its nearest centroid.
    noisy_nd = decoded_nd + 1e-3
    index = jpq.pq_index(centroids_mks, docs_nd=noisy_nd)
    _, got_codes = product_quantization.faiss_pq_arrays(index.faiss_index())
    np.testing.assert_array_equal(got_codes, codes_nm)


class BprTest(absltest.TestCase):

  def test_loss_is_bpr_on_sign_codes(self):
    model = test_util.tiny_encoder(VOCAB)
    batch = jax.tree.map(jnp.asarray, _batch())
    step = 30
    model_def, params = train_state.split_model(model)
    value, aux = jax.jit(
        lambda prm: bpr.loss(
            model_def.merge(prm),
            batch,
            None,
            jnp.int32(step),
            hashnet_gamma=0.1,
            straight_through=True,
            **_COMMON,
        )
    )(params)
    enc = jax.jit(
        functools.partial(
            bi_encoder.encode, model, rng=None, pooling="mean", normalize=True
        )
    )
    q_bd = np.asarray(enc(batch["query_ids"], batch["query_mask"]))
    p_cd = np.asarray(enc(batch["passage_ids"], batch["passage_mask"]))
    sq, sp = np.where(q_bd < 0, -1.0, 1.0), np.where(p_cd < 0, -1.0, 1.0)
    positive_qc, valid_qc = losses.contrastive.group_masks(
        batch["positive_counts"], G, batch["passage_doc"], batch["relevant_doc"]
    )
    want, _ = losses.bpr.loss(
        jnp.asarray(sq @ sp.T, jnp.float32),
        jnp.asarray(q_bd @ sp.T, jnp.float32),
        positive_qc,
        valid_qc,
    )
    np.testing.assert_allclose(
        value, want, rtol=test_util.FP32_LONG_RTOL, atol=1e-5
    )
    self.assertAlmostEqual(float(aux["hash_beta"]), np.sqrt(1 + 0.1 * step), 6)

  @pytest.mark.slow
  def test_steps_lower_the_loss(self):
    # Straight-through codes without a teacher; with the teacher, the tanh
    # relaxation (its hinge on discrete codes and margin-MSE pull apart, so
    # 8 straight-through steps do not fall steadily on a random encoder).
    for weight, lr, straight in ((0.0, 1e-3, True), (1.0, 1e-2, False)):
      _, state0, step, shardings, _ = _bpr_setup(
          margin_mse_weight=weight, lr=lr, straight_through=straight
      )
      state0 = jax.device_get(state0)
      state, values = _run(step, state0, shardings, _batch(), 8)
      self.assertLess(values[-1], 0.8 * values[0], (weight, values))
      if weight:  # the teacher is the step-0 encoder, unchanged
        self.assertTrue(
            _tree_equal(
                jax.device_get(state["extra"][frozen_teacher.TEACHER]),
                state0["params"],
            )
        )

  def test_build_index_is_sign_rerank(self):
    rng = np.random.default_rng(3)
    docs_nd, q_qd = rng.standard_normal((40, DIM)), rng.standard_normal(
        (3, DIM)
    )
    index = bpr.KIND.build_index(None, None, docs_nd, rerank_depth=40)
    self.assertEqual(index.config["kind"], "sign")
    scores_qk, ids_qk = index.search(q_qd, 5)
    want_qn = q_qd @ hamming.unpack_signs(hamming.pack_signs(docs_nd), DIM).T
    test_util.assert_same_topk(
        ids_qk,
        np.argsort(-want_qn, axis=1, kind="stable")[:, :5],
        want_qn,
        atol=1e-5,
    )


class TeacherAndConfigTest(absltest.TestCase):

  def test_margin_mse_hand_case(self):
    student_bg = jnp.asarray([[1.0, 0.2], [0.0, 9.0]])
    teacher_bg = jnp.asarray([[5.0, 3.0], [1.0, 1.0]])
    doc = jnp.asarray([0, 1, 2, -1])  # the second group has no negative
    value, aux = frozen_teacher.margin_mse(
        student_bg, teacher_bg, doc, teacher_scale=1.0
    )
    self.assertAlmostEqual(float(value), 1.44, 6)
    self.assertEqual(float(aux["num_pairs"]), 1.0)
    value, _ = frozen_teacher.margin_mse(
        student_bg + 3.0, teacher_bg, doc, teacher_scale=2.0
    )
    self.assertAlmostEqual(float(value), (0.8 - 4.0) ** 2, 5)
    scores_qc = jnp.arange(2 * 4.0).reshape(2, 4)
    np.testing.assert_array_equal(
        frozen_teacher.own_groups(scores_qc), [[0, 1], [6, 7]]
    )

  def test_config_errors_name_the_key(self):
    cases = {
        ("bpr,smoke", "loss.temperature", 0.05): "temperature",
        ("jpq,smoke", "checkpoint.init_from", "/x"): "init_from",
        ("jpq,smoke", "model.jpq_nbits", 0): "jpq_nbits",
        ("bpr,adapt,smoke", None, None): "pseudo_queries=FILE",
        ("jpq,smoke", "loss.ranking_weight", 0.0): "nothing to train",
    }
    for (arg, key, value), message in cases.items():
      config = train_config.get_config(arg)
      config.unlock()
      if key:
        section, name = key.split(".")
        config[section][name] = value
      kind = {"bpr": bpr.KIND, "jpq": jpq.KIND}[config.model.kind]
      with self.assertRaisesRegex(ConfigError, message):
        kind.validate(config)

  def test_shipped_variants_validate(self):
    for arg in ("scifact,bpr", "scifact,jpq", "bpr,smoke", "jpq,smoke"):
      config = train_config.get_config(arg)
      kind = {"bpr": bpr.KIND, "jpq": jpq.KIND}[config.model.kind]
      kind.validate(config)
    config = train_config.get_config("jpq,adapt,pseudo_queries=/some/file")
    jpq.KIND.validate(config)
    self.assertEqual(
        frozen_teacher.check_settings(config, jpq.KIND)[:2], (0, 1)
    )


if __name__ == "__main__":
  absltest.main()
