"""The sharded train step equals the single-device step; GradCache equals it.

A small random BERT-style encoder (2 layers, width 32) keeps each compile
to a few seconds. With plain SGD at learning rate 1 the parameter update
*is* the gradient, so comparing updated parameters compares gradients.
"""

import functools

from absl.testing import absltest
from absl.testing import parameterized
import jax
import numpy as np
import optax
import pytest
from flax import nnx

from retrieval_jax import losses
from retrieval_jax import sharding
from retrieval_jax import steps
from retrieval_jax import train_state
from retrieval_jax.data import features
from retrieval_jax.kinds import bi_encoder
from retrieval_jax.kinds import colbert as colbert_kind
from retrieval_jax.kinds import cross_encoder as ce_kind
from retrieval_jax.kinds import splade as splade_kind
import test_util

B, G, LQ, LP, VOCAB = 8, 2, 8, 12, 100
# One SGD(1.0) step through the encoder: gradient entries up to ~3.5 (norm
# ~12), summed in another order on each mesh or chunking. They differ by up
# to 4e-6 (about 10 ulps); a lost or doubled reduction moves them by O(1).
# A long float32 chain in test_util's policy: 1e-4 on O(1) values.
_STEP_ATOL = test_util.FP32_LONG_RTOL


def _model():
  return test_util.tiny_encoder(VOCAB)


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
  return {
      "query_ids": q_ids,
      "query_mask": q_mask,
      "passage_ids": p_ids,
      "passage_mask": p_mask,
      "positive_counts": positive_counts,
      "passage_doc": passage_doc,
      "relevant_doc": relevant,
  }


def _run_step(
    mesh, loss_name, grad_cache_chunks=None, batch=None, sharded_loss=False
):
  model_def, params = train_state.split_model(_model())
  tx = optax.sgd(1.0)
  layout = train_state.state_layout(model_def, params, tx, mesh)
  state = train_state.create(params, tx, layout)
  batch = _batch() if batch is None else batch
  spec = {k: v.shape for k, v in batch.items()}
  kwargs = dict(
      loss_fn=losses.get_loss(loss_name).fn,
      temperature=0.1,
      pooling="mean",
      normalize=True,
      sharded_mesh=mesh if sharded_loss else None,
  )
  value_and_grad = None
  if grad_cache_chunks:
    value_and_grad = functools.partial(
        bi_encoder.grad_cache_value_and_grad,
        query_chunks=grad_cache_chunks[0],
        passage_chunks=grad_cache_chunks[1],
        **kwargs
    )
  step = steps.make_train_step(
      mesh,
      layout.shardings,
      spec,
      model_def=model_def,
      tx=tx,
      loss_fn=functools.partial(bi_encoder.loss, **kwargs),
      value_and_grad_fn=value_and_grad,
      dropout=False,
  )
  rng = jax.random.PRNGKey(0)
  new_state, metrics = step(
      state, steps.put_batch(batch, steps.batch_shardings(mesh, spec)), rng
  )
  return jax.device_get(new_state), jax.device_get(metrics), new_state


def _max_diff(a, b):
  return max(
      jax.tree.leaves(
          jax.tree.map(
              lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))),
              a,
              b,
          )
      )
  )


class TrainStepShardingTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.one = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    cls.reference = {
        name: _run_step(cls.one, name)
        for name in ("infonce", "joint_lh", "lse_pair")
    }

  @parameterized.parameters(
      ((8, 1, 1), "infonce"),  # data parallel
      ((1, 8, 1), "joint_lh"),  # fully sharded parameters
      ((2, 4, 1), "lse_pair"),  # both
      ((1, 4, 2), "infonce"),  # FSDP and tensor parallel (heads, MLP)
  )
  def test_sharded_step_equals_single_device(self, mesh_shape, loss_name):
    self.assertGreaterEqual(jax.device_count(), 8)
    mesh = sharding.make_mesh(mesh_shape)
    ref_state, ref_metrics, _ = self.reference[loss_name]
    state, metrics, placed = _run_step(mesh, loss_name)
    self.assertAlmostEqual(metrics["loss"], ref_metrics["loss"], delta=1e-5)
    self.assertAlmostEqual(
        metrics["grad_norm"], ref_metrics["grad_norm"], delta=_STEP_ATOL
    )
    self.assertLess(_max_diff(state["params"], ref_state["params"]), _STEP_ATOL)
    # The gradient is not trivially zero, so the comparison means something.
    self.assertGreater(ref_metrics["grad_norm"], 1e-3)
    if mesh_shape[1] > 1:
      # FSDP really shards the parameters: the word-embedding table is split
      # along its width over the fsdp axis.
      word = placed["params"]["embeddings"]["word_vd"]
      self.assertEqual(word.sharding.spec[1], sharding.FSDP)
      self.assertEqual(
          word.addressable_shards[0].data.shape[1],
          word.shape[1] // mesh_shape[1],
      )

  def test_model_axis_and_sharded_loss(self):
    # (data 1, fsdp 4, model 2): the MLP's hidden units really split over
    # `model`; and config.loss.sharded's shard_map loss (its score matrix
    # split over the batch axes) gives the dense loss's step.
    mesh = sharding.make_mesh((1, 4, 2))
    _, _, placed = _run_step(mesh, "infonce")
    specs = {str(x.sharding.spec) for x in jax.tree.leaves(placed["params"])}
    self.assertTrue(any("model" in s and "fsdp" in s for s in specs), specs)
    ref_state, ref_metrics, _ = self.reference["lse_pair"]
    state, metrics, _ = _run_step(
        sharding.make_mesh((2, 4, 1)), "lse_pair", sharded_loss=True
    )
    self.assertAlmostEqual(metrics["loss"], ref_metrics["loss"], delta=1e-5)
    self.assertLess(_max_diff(state["params"], ref_state["params"]), _STEP_ATOL)

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
    devices = jax.devices()[: int(np.prod(mesh_shape))]
    mesh = sharding.make_mesh(mesh_shape, devices=devices)
    full_state, full_metrics, _ = _run_step(mesh, loss_name)
    gc_state, gc_metrics, _ = _run_step(
        mesh, loss_name, grad_cache_chunks=chunks
    )
    self.assertAlmostEqual(gc_metrics["loss"], full_metrics["loss"], delta=1e-5)
    self.assertLess(
        _max_diff(gc_state["params"], full_state["params"]), _STEP_ATOL
    )
    self.assertGreater(full_metrics["grad_norm"], 1e-3)


def _pair_batch(seed=0):
  """B groups of G (query, passage) rows; group 2's second row is padding."""
  rng = np.random.default_rng(seed)
  length = LQ + LP
  lengths = rng.integers(4, length + 1, B * G)
  mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
  ids = rng.integers(5, VOCAB, (B * G, length)).astype(np.int32) * mask
  types = (np.arange(length)[None] >= lengths[:, None] // 2).astype(
      np.int32
  ) * mask
  passage_doc = np.arange(B * G, dtype=np.int32)
  passage_doc[2 * G + 1] = -1
  return {
      "pair_ids": ids,
      "pair_mask": mask,
      "pair_types": types,
      "pair_markers": np.zeros((B * G, 2), np.int32),
      "positive_counts": np.ones(B, np.int32),
      "passage_doc": passage_doc,
  }


def _cross_encoder(head="cls"):
  from retrieval_jax.models import cross_encoder  # pylint: disable=g-import-not-at-top

  return cross_encoder.CrossEncoder(_model(), head, rngs=nnx.Rngs(1))


class CrossEncoderStepTest(parameterized.TestCase):

  def test_group_labels(self):
    positive, valid = ce_kind.group_labels(
        np.array([1, 2]), np.array([4, 5, 6, 7, -1, 3])
    )
    np.testing.assert_array_equal(valid, [[1, 1, 1], [1, 0, 1]])
    np.testing.assert_array_equal(positive, [[1, 0, 0], [1, 0, 0]])

  def test_group_loss_known_answers(self):
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(3, 4)).astype(np.float32)
    positive, valid = ce_kind.group_labels(
        np.array([1, 1, 2]), np.array([0, 1, 2, 3, 4, 5, -1, 7, 8, 9, 10, 11])
    )
    y = np.asarray(positive, np.float32)
    v = np.asarray(valid)
    s = scores.astype(np.float64)
    # InfoNCE by hand: per row, sum over its positives of LSE(valid) - s_p
    # (row 2 has two positives), averaged over the 3 rows.
    lse = np.log(np.where(v, np.exp(s), 0.0).sum(axis=1))
    manual = np.mean([(y[i] * (lse[i] - s[i])).sum() for i in range(3)])
    got, _ = ce_kind.group_loss(scores, positive, valid, loss_name="infonce")
    self.assertAlmostEqual(float(got), manual, places=5)
    # Pointwise BCE by hand over the 11 valid pairs.
    manual = (np.log1p(np.exp(s)) - y * s)[v].mean()
    got, _ = ce_kind.group_loss(scores, positive, valid, loss_name="bce")
    self.assertAlmostEqual(float(got), manual, places=5)

  def test_sharded_step_equals_one_device_and_learns(self):
    batch, loss_name = _pair_batch(), "infonce"
    results = {}
    for shape in ((1, 1, 1), (8, 1, 1)):
      mesh = (
          sharding.make_mesh(shape, devices=jax.devices()[:1])
          if shape[0] == 1
          else sharding.make_mesh(shape)
      )
      model_def, params = train_state.split_model(_cross_encoder())
      tx = optax.adam(1e-2)
      layout = train_state.state_layout(model_def, params, tx, mesh)
      state = train_state.create(params, tx, layout)
      spec = {k: v.shape for k, v in batch.items()}
      step = steps.make_train_step(
          mesh,
          layout.shardings,
          spec,
          model_def=model_def,
          tx=tx,
          loss_fn=functools.partial(ce_kind.loss, loss_name=loss_name),
          dropout=False,
      )
      placed = steps.put_batch(batch, steps.batch_shardings(mesh, spec))
      curve = []
      for _ in range(10):
        state, metrics = step(state, placed, jax.random.PRNGKey(0))
        curve.append(float(metrics["loss"]))
      results[shape] = curve
    one, eight = results[(1, 1, 1)], results[(8, 1, 1)]
    np.testing.assert_allclose(eight, one, rtol=1e-4, atol=1e-5)
    # A fixed batch is fitted: the loss falls well below its start.
    self.assertLess(one[-1], 0.5 * one[0])

  def test_teacher_scores_are_the_list_loss_targets(self):
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(3, 4)).astype(np.float32)
    teacher = rng.normal(size=(3, 4)).astype(np.float32) * 3
    positive, valid = ce_kind.group_labels(
        np.array([1, 1, 2]), np.array([0, 1, 2, 3, 4, 5, -1, 7, 8, 9, 10, 11])
    )
    got, _ = ce_kind.group_loss(
        scores, positive, valid, loss_name="kl_distillation", teacher_bg=teacher
    )
    # The teacher's scores, not the 1/0 labels, are the targets:
    # KL(p_t || p_s) by hand over the valid slots.
    v = np.asarray(valid)
    kl = []
    for s_row, t_row, v_row in zip(scores, teacher, v):
      p_t = np.exp(t_row[v_row] - t_row[v_row].max())
      p_t /= p_t.sum()
      log_p_s = s_row[v_row] - np.log(np.exp(s_row[v_row]).sum())
      kl.append(np.sum(p_t * (np.log(p_t) - log_p_s)))
    self.assertAlmostEqual(float(got), float(np.mean(kl)), places=5)
    with self.assertRaisesRegex(ValueError, "no teacher"):
      ce_kind.group_loss(
          scores, positive, valid, loss_name="infonce", teacher_bg=teacher
      )

  @pytest.mark.slow
  def test_distillation_step_fits_the_teacher(self):
    batch = _pair_batch()
    # A teacher ranking that is not the 1/0 labels: the last row first.
    batch["teacher_scores"] = np.tile(np.arange(G, dtype=np.float32), B) * 2.0
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    model_def, params = train_state.split_model(_cross_encoder())
    tx = optax.adam(1e-2)
    layout = train_state.state_layout(model_def, params, tx, mesh)
    state = train_state.create(params, tx, layout)
    spec = {k: v.shape for k, v in batch.items()}
    step = steps.make_train_step(
        mesh,
        layout.shardings,
        spec,
        model_def=model_def,
        tx=tx,
        loss_fn=functools.partial(ce_kind.loss, loss_name="kl_distillation"),
        dropout=False,
    )
    placed = steps.put_batch(batch, steps.batch_shardings(mesh, spec))
    curve = []
    for _ in range(12):
      state, metrics = step(state, placed, jax.random.PRNGKey(0))
      curve.append(float(metrics["loss"]))
    self.assertLess(curve[-1], 0.3 * curve[0])
    model = model_def.merge(state["params"])
    scores = np.asarray(
        model(batch["pair_ids"], batch["pair_mask"], batch["pair_types"])
    ).reshape(B, G)
    # Each full group is now ordered as the teacher orders it.
    for row in range(B):
      if row != 2:
        np.testing.assert_array_equal(np.argsort(scores[row]), np.arange(G))


def _colbert_batch():
  batch = _batch()
  # ColBERT's layout: separate score masks; query rows padded with
  # scored, unattended [MASK]s (id 4 here) up to the full width.
  q_score = np.ones_like(batch["query_mask"])
  q_ids = np.where(batch["query_mask"] == 1, batch["query_ids"], 4)
  return dict(
      batch,
      query_ids=q_ids.astype(np.int32),
      query_score_mask=q_score.astype(np.int32),
      passage_score_mask=batch["passage_mask"].copy(),
  )


def _representation_curve(mesh, kind, batch, num_steps=6, **kwargs):
  from retrieval_jax.models import colbert  # pylint: disable=g-import-not-at-top
  from retrieval_jax.models import splade  # pylint: disable=g-import-not-at-top

  if kind == "colbert":
    model = colbert.ColBERT(_model(), 8, rngs=nnx.Rngs(1))
  else:
    model = splade.Splade(_model(), bias_init=0.0, rngs=nnx.Rngs(1))
  model_def, params = train_state.split_model(model)
  tx = optax.adam(1e-2)
  layout = train_state.state_layout(model_def, params, tx, mesh)
  state = train_state.create(params, tx, layout)
  spec = {k: v.shape for k, v in batch.items()}
  loss_fn = functools.partial(
      colbert_kind.loss if kind == "colbert" else splade_kind.loss,
      loss_fn=losses.get_loss("infonce").fn,
      **kwargs
  )
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
  curve = []
  for _ in range(num_steps):
    state, metrics = step(state, placed, jax.random.PRNGKey(0))
    curve.append(jax.device_get(metrics))
  return curve


class RepresentationStepTest(parameterized.TestCase):

  def test_bag_of_tokens_is_the_inference_free_query(self):
    batch = _batch()
    idf = np.random.default_rng(0).normal(size=VOCAB).astype(np.float32)
    special = (0, 7, 9)
    got = splade_kind.bag_of_tokens(
        batch["query_ids"], batch["query_mask"], idf, special
    )
    rows = [
        ids[mask == 1].tolist()
        for ids, mask in zip(batch["query_ids"], batch["query_mask"])
    ]
    want = features.inference_free_query(
        rows, vocab_size=VOCAB, idf_v=idf, special_ids=special
    )
    np.testing.assert_allclose(got, want, rtol=1e-6)

  def _check_sharded_and_learns(self, kind, **kwargs):
    batch = _colbert_batch() if kind == "colbert" else _batch()
    one = _representation_curve(
        sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1]),
        kind,
        batch,
        **kwargs
    )
    eight = _representation_curve(
        sharding.make_mesh((8, 1, 1)), kind, batch, **kwargs
    )
    for a, b in zip(one, eight):
      for key in a:
        np.testing.assert_allclose(
            b[key], a[key], rtol=2e-4, atol=1e-5, err_msg=key
        )
    # A fixed batch is fitted: the ranking loss falls.
    self.assertLess(one[-1]["ranking_loss"], 0.7 * one[0]["ranking_loss"])
    if kind != "colbert":
      self.assertGreater(one[0]["flops_d"], 0.0)
      # The regulariser enters the loss (after warm-up, at full weight).
      total = (
          one[-1]["ranking_loss"]
          + kwargs["flops_d"] * one[-1]["flops_d"]
          + kwargs.get("flops_q", 0.0) * one[-1]["flops_q"]
      )
      self.assertAlmostEqual(float(one[-1]["loss"]), float(total), places=4)

  @pytest.mark.slow
  def test_splade_sharded_step_equals_one_device_and_learns(self):
    self._check_sharded_and_learns(
        "splade", flops_q=1e-2, flops_d=1e-2, flops_warmup_steps=3
    )

  @pytest.mark.slow
  def test_inference_free_sharded_step_equals_one_device_and_learns(self):
    self._check_sharded_and_learns(
        "inference_free",
        flops_d=1e-2,
        idf_v=np.linspace(0.5, 3.0, VOCAB).astype(np.float32),
        special=(0,),
    )

  @pytest.mark.slow
  def test_colbert_sharded_step_equals_one_device_and_learns(self):
    self._check_sharded_and_learns("colbert")


if __name__ == "__main__":
  absltest.main()
