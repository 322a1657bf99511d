"""The AR2 kind: its two losses, its negatives, its alternating optimizer.

Oracles: the ranker step's and the retriever step's losses written out in
numpy (float64) from the two models' scores on a fixed batch with a padded
slot; the groups the ranker trains on against a brute-force ranking of a
tiny corpus by the retriever (a document repeating the query's text must
come first, the query's positives never); the train step with AdamW and
weight decay leaving the idle model's params and optimizer state bitwise
unchanged in each phase (which plain AdamW on a zero gradient would not);
the phase schedule by hand; bad configs name their key.
"""

import functools
import pathlib

from absl.testing import absltest
from flax import nnx
import jax
import ml_collections
import numpy as np
import optax

from configs import train as train_config
from retrieval_jax import checkpointing
from retrieval_jax import losses
from retrieval_jax import metric_logging
from retrieval_jax import pretrained
from retrieval_jax import sharding
from retrieval_jax import steps
from retrieval_jax import train
from retrieval_jax import train_checks
from retrieval_jax import train_state
from retrieval_jax.data import features
from retrieval_jax.data import negatives
from retrieval_jax.data import pipeline
from retrieval_jax.data import tokenizers
from retrieval_jax.errors import ConfigError
from retrieval_jax.kinds import ar2
from retrieval_jax.kinds import bi_encoder
from retrieval_jax.models import cross_encoder as cross_encoder_model
import test_util

B, G, LQ, LP, LPAIR, VOCAB, TAU, T_D = 2, 3, 6, 8, 12, 100, 0.1, 0.25
WEIGHTS = {
    "ranker_kl_weight": 0.7,
    "retriever_kl_weight": 1.3,
    "infonce_weight": 0.9,
    "adv_weight": 0.4,
}


def _model(vocab=VOCAB):
  ranker = cross_encoder_model.CrossEncoder(
      test_util.tiny_encoder(vocab, seed=1), "cls", rngs=nnx.Rngs(2)
  )
  return ar2.AR2Model(test_util.tiny_encoder(vocab, seed=0), ranker)


def _ids(rng, n, width, min_len):
  lengths = rng.integers(min_len, width + 1, n)
  mask = (np.arange(width)[None] < lengths[:, None]).astype(np.int32)
  return rng.integers(5, VOCAB, (n, width)).astype(np.int32) * mask, mask


def _batch(seed=0, pad_last=True):
  """B queries x G passages; with pad_last, query 1's last slot is padding."""
  rng = np.random.default_rng(seed)
  out = {}
  out["query_ids"], out["query_mask"] = _ids(rng, B, LQ, 3)
  out["passage_ids"], out["passage_mask"] = _ids(rng, B * G, LP, 3)
  out["pair_ids"], out["pair_mask"] = _ids(rng, B * G, LPAIR, 6)
  out["pair_types"] = (np.arange(LPAIR)[None] >= 4).astype(np.int32) * (
      out["pair_mask"]
  )
  out["pair_markers"] = np.zeros((B * G, 2), np.int32)
  out["positive_counts"] = np.ones(B, np.int32)
  out["passage_doc"] = np.arange(B * G, dtype=np.int32)
  if pad_last:
    out["passage_doc"][-1] = -1
    out["passage_ids"][-1] = 0
    out["passage_mask"][-1] = 0
  out["relevant_doc"] = np.array([[0, -1], [G, -1]], np.int32)
  return out


def _loss_fn(phases=ar2.Phases(1, 1), weights=None):
  return functools.partial(
      ar2.loss,
      phases=phases,
      loss_fn=losses.contrastive.info_nce,
      temperature=TAU,
      ranker_temperature=T_D,
      pooling="mean",
      normalize=True,
      share_hard_negatives=True,
      weights=weights or WEIGHTS,
  )


def _scores(model, batch):
  """float64 retriever scores [B, B*G] / TAU and ranker scores [B, G]."""
  model_def, params = train_state.split_model(model)

  @jax.jit
  def outputs(prm):
    m = model_def.merge(prm)
    enc = functools.partial(bi_encoder.encode, pooling="mean", normalize=True)
    q = enc(m.retriever, batch["query_ids"], batch["query_mask"], None)
    p = enc(m.retriever, batch["passage_ids"], batch["passage_mask"], None)
    d = m.ranker(
        batch["pair_ids"],
        batch["pair_mask"],
        batch["pair_types"],
        batch["pair_markers"],
    )
    return q, p, d

  q, p, d = (np.asarray(x, np.float64) for x in outputs(params))
  return q @ p.T / TAU, d.reshape(B, G)


def _log_softmax(x, valid):
  x = np.where(valid, x, -np.inf)
  top = x.max(-1, keepdims=True)
  out = x - top - np.log(np.exp(x - top).sum(-1, keepdims=True))
  return np.where(valid, out, 0.0)


def _kl(teacher, student, valid):
  """Mean over rows of KL(softmax(teacher) || softmax(student))."""
  log_t, log_s = _log_softmax(teacher, valid), _log_softmax(student, valid)
  return np.mean(
      np.sum(np.where(valid, np.exp(log_t) * (log_t - log_s), 0), -1)
  )


def _oracle(retriever_qc, ranker_bg, batch):
  """(ranker loss, retriever loss) by hand."""
  valid_bg = batch["passage_doc"].reshape(B, G) >= 0
  own_bg = retriever_qc.reshape(B, B, G)[np.arange(B), np.arange(B)]
  # Ranker: InfoNCE over its group (positive in slot 0) + KL(p_G || p_D).
  ranker_nce = np.mean(-_log_softmax(ranker_bg, valid_bg)[:, 0])
  ranker = ranker_nce + WEIGHTS["ranker_kl_weight"] * _kl(
      own_bg, ranker_bg / T_D, valid_bg
  )
  # Retriever: InfoNCE over every valid passage of the batch (no passage
  # repeats a query's relevant doc in another slot), positive at i * G.
  valid_qc = np.broadcast_to(batch["passage_doc"] >= 0, (B, B * G))
  log_p = _log_softmax(retriever_qc, valid_qc)
  retriever_nce = np.mean(-log_p[np.arange(B), np.arange(B) * G])
  reward = np.log(1 / (1 + np.exp(-(ranker_bg[:, :1] - ranker_bg))))
  adv = np.mean(
      np.sum(np.where(valid_bg, reward * _log_softmax(own_bg, valid_bg), 0), -1)
  )
  retriever = (
      WEIGHTS["retriever_kl_weight"] * _kl(ranker_bg / T_D, own_bg, valid_bg)
      + WEIGHTS["infonce_weight"] * retriever_nce
      + WEIGHTS["adv_weight"] * adv
  )
  return ranker, retriever


def _jitted_loss(model, batch, weights=None):
  """`(step) -> (loss, aux)` of `_loss_fn`, jitted once, without dropout."""
  model_def, params = train_state.split_model(model)
  fn = _loss_fn(weights=weights)
  jitted = jax.jit(lambda prm, t: fn(model_def.merge(prm), batch, None, t))
  return lambda t: jitted(params, t)


class LossTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.model, cls.batch = _model(), _batch()
    cls.scores = _scores(cls.model, cls.batch)
    cls.want_ranker, cls.want_retriever = _oracle(*cls.scores, cls.batch)
    # One program for both phases: the step is an argument.
    cls.loss = staticmethod(_jitted_loss(cls.model, cls.batch))

  def test_ranker_step_by_hand(self):
    # Steps 0, 2, ... of one-step phases, ranker first, train the ranker.
    value, aux = self.loss(2)
    self.assertEqual(float(aux["retriever_phase"]), 0.0)
    np.testing.assert_allclose(
        value,
        self.want_ranker,
        rtol=test_util.FP32_LONG_RTOL,
        atol=test_util.FP32_LONG_ATOL,
    )
    np.testing.assert_allclose(value, aux["ranker_loss"], rtol=0, atol=0)
    # The KL term is big enough for the comparison to see it.
    self.assertGreater(WEIGHTS["ranker_kl_weight"] * aux["ranker_kl"], 1e-3)

  def test_retriever_step_by_hand(self):
    value, aux = self.loss(3)
    self.assertEqual(float(aux["retriever_phase"]), 1.0)
    np.testing.assert_allclose(
        value,
        self.want_retriever,
        rtol=test_util.FP32_LONG_RTOL,
        atol=test_util.FP32_LONG_ATOL,
    )
    # Each term is big enough for the comparison to see it.
    for name in ("retriever_kl", "retriever_infonce", "retriever_adv"):
      self.assertGreater(abs(float(aux[name])), 1e-2, name)

  def test_ranker_step_without_kl_skips_the_retriever(self):
    weights = dict(WEIGHTS, ranker_kl_weight=0.0)
    value, aux = _jitted_loss(self.model, self.batch, weights)(0)
    _, ranker_bg = self.scores
    valid_bg = self.batch["passage_doc"].reshape(B, G) >= 0
    np.testing.assert_allclose(
        value,
        np.mean(-_log_softmax(ranker_bg, valid_bg)[:, 0]),
        rtol=test_util.FP32_LONG_RTOL,
    )
    # Not computed in that phase: reported as 0.
    self.assertEqual(float(aux["retriever_infonce"]), 0.0)


class PhasesTest(absltest.TestCase):

  def test_schedule_by_hand(self):
    phases = ar2.Phases(ranker_steps=2, retriever_steps=3)
    got = [bool(phases.is_retriever(t)) for t in range(7)]
    self.assertEqual(got, [False, False, True, True, True, False, False])
    self.assertEqual([int(n) for n in phases.counts(7)], [4, 3])
    first = ar2.Phases(ranker_steps=2, retriever_steps=3, first="retriever")
    got = [bool(first.is_retriever(t)) for t in range(7)]
    self.assertEqual(got, [True, True, True, False, False, True, True])
    self.assertEqual([int(n) for n in first.counts(7)], [2, 5])
    only = ar2.Phases(ranker_steps=0, retriever_steps=1)
    self.assertTrue(all(bool(only.is_retriever(t)) for t in range(3)))


def _optim_config(**ar2_overrides):
  config = train_config.get_config("ar2,smoke")
  config.unlock()
  config.optim.weight_decay = 0.1
  config.optim.warmup_steps = 0
  config.optim.warmup_fraction = 0.0
  config.optim.decay = "constant"
  config.ar2.ranker_learning_rate = 3e-3
  config.optim.learning_rate = 1e-3
  config.ar2.update(ar2_overrides)
  return config


class AlternatingOptimizerTest(absltest.TestCase):

  def test_zero_gradient_moves_plain_adamw(self):
    # What the alternating optimizer prevents: AdamW with moments from past
    # steps moves params on a zero gradient (and decays them).
    tx = optax.adamw(1e-2, weight_decay=0.1)
    p = {"w": np.ones((2, 2), np.float32)}
    state = tx.init(p)
    _, state = tx.update({"w": np.ones((2, 2), np.float32)}, state, p)
    update, _ = tx.update({"w": np.zeros((2, 2), np.float32)}, state, p)
    self.assertGreater(float(np.abs(update["w"]).min()), 1e-3)

  def test_idle_model_is_frozen_in_each_phase(self):
    phases = ar2.Phases(ranker_steps=2, retriever_steps=2)
    config = _optim_config()
    tx, schedule = ar2.make_optimizer(config, 6, phases)
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    model_def, params = train_state.split_model(_model())
    layout = train_state.state_layout(model_def, params, tx, mesh)
    state = train_state.create(params, tx, layout)
    batch = _batch(pad_last=False)
    spec = {k: v.shape for k, v in batch.items()}
    step_fn = steps.make_train_step(
        mesh,
        layout.shardings,
        spec,
        model_def=model_def,
        tx=tx,
        loss_fn=_loss_fn(phases),
        # Dropout runs in the CLI smoke test; here it adds ~12 s of compile.
        dropout=False,
        learning_rate_fn=schedule,
    )
    history = [jax.device_get(state)]
    rates = []
    for t in range(6):
      placed = steps.put_batch(
          _batch(t, pad_last=False), steps.batch_shardings(mesh, spec)
      )
      state, metrics = step_fn(state, placed, jax.random.PRNGKey(0))
      history.append(jax.device_get(state))
      rates.append(float(metrics["learning_rate"]))
      self.assertEqual(float(metrics["retriever_phase"]), float(t in (2, 3)))

    def same(a, b):
      return all(
          np.array_equal(x, y)
          for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
      )

    # Steps 0, 1 and 4, 5 train the ranker; 2, 3 the retriever.
    for t, trained in enumerate(
        ["ranker"] * 2 + ["retriever"] * 2 + ["ranker"] * 2
    ):
      idle = "retriever" if trained == "ranker" else "ranker"
      before, after = history[t], history[t + 1]
      self.assertTrue(same(before["params"][idle], after["params"][idle]), t)
      self.assertFalse(
          same(before["params"][trained], after["params"][trained])
      )
      # The idle model's AdamW state (moments, count) stands still too.
      self.assertTrue(
          same(
              getattr(before["opt_state"], idle),
              getattr(after["opt_state"], idle),
          ),
          t,
      )
      self.assertEqual(int(after["opt_state"].count), t + 1)
    # Each model's constant rate, by phase.
    np.testing.assert_allclose(
        rates, [3e-3, 3e-3, 1e-3, 1e-3, 3e-3, 3e-3], rtol=1e-6
    )

  def test_each_model_decays_over_its_own_steps(self):
    config = _optim_config()
    config.optim.decay = "linear"
    _, schedule = ar2.make_optimizer(config, 10, ar2.Phases(2, 3))
    # The retriever has 6 of the 10 steps (2..4, 7..9), the ranker 4.
    rates = [float(schedule(t)) for t in range(10)]
    ranker = [3e-3 * (1 - n / 4) for n in range(4)]
    retriever = [1e-3 * (1 - n / 6) for n in range(6)]
    want = ranker[:2] + retriever[:3] + ranker[2:] + retriever[3:]
    np.testing.assert_allclose(rates, want, rtol=1e-6)


class NegativesTest(absltest.TestCase):
  """The ranker's groups: the positive and the retriever's current top-n."""

  def test_groups_are_the_retrievers_top_n_minus_positives(self):
    tokenizer = tokenizers.WordPieceTokenizer.from_pretrained_dir(
        pretrained.resolve_model_dir(pretrained.DEFAULT_MODEL)
    )
    model = _model(vocab=tokenizer.vocab_size)
    config = train_config.get_config("ar2,smoke")
    config.unlock()
    config.evals = ml_collections.ConfigDict()
    config.model.pooling, config.model.normalize = "mean", True
    config.data.group_size, config.data.negative_depth = 3, 2
    model_def, params = train_state.split_model(model)
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    encoder = ar2.KIND.train_evaluator(
        config, model_def, tokenizer, mesh, workdir=None
    ).encoder(params)
    queries = ["red apple pie", "deep sea fish"]
    doc_ids = ["a", "b", "c", "d", "e", "f", "g", "h"]
    doc_texts = [
        "red apple pie",  # a: q0's positive, the query's own text
        "a story of the sea",  # b: q1's positive
        "red apple pie",  # c: q0's text again: its top negative
        "deep sea fish",  # d: q1's text: its top negative
        "green tea",
        "fish market prices",
        "apple orchards in autumn",
        "sea shells",
    ]
    data = pipeline.TrainingData(
        [
            pipeline.TrainingExample("q0", queries[0], ("a",)),
            pipeline.TrainingExample("q1", queries[1], ("b",)),
        ],
        doc_ids,
        doc_texts,
    )
    data = negatives.mine(
        data,
        method="dense",
        depth=2,
        encode_fn=functools.partial(encoder.encode, progress=False),
    )

    # Brute force: each text alone through the retriever module.
    def embed(text):
      ids = np.asarray([tokenizer.encode(text, 32)], np.int32)
      return np.asarray(
          bi_encoder.encode(
              model.retriever,
              ids,
              np.ones_like(ids),
              None,
              pooling="mean",
              normalize=True,
          ),
          np.float64,
      )[0]

    docs = np.stack([embed(t) for t in doc_texts])
    loader = train.make_loader(
        config, data, tokenizer, losses.get_loss("infonce")
    )
    featurize = ar2.KIND.train_spec(
        config,
        loader=loader,
        tokenizer=tokenizer,
        loss_spec=losses.get_loss("infonce"),
        mesh=mesh,
    ).featurize
    host = loader.batch_at(0)
    batch = featurize(0, host)
    query_of = {ex.query: ex for ex in data.examples}
    texts, _ = loader.texts_at(0, host)
    for row in range(config.train.batch_size):
      ex = query_of[texts[row * 3]]
      scores = docs @ embed(ex.query)
      ranked = [
          doc_ids[i]
          for i in np.argsort(-scores, kind="stable")
          if doc_ids[i] not in ex.positive_ids
      ]
      # No near-tie at the cut: the top 2 is well defined.
      cut = sorted(scores[[doc_ids.index(d) for d in ranked]])[::-1]
      self.assertGreater(cut[1] - cut[2], 1e-4)
      group = [doc_ids[d] for d in batch["passage_doc"][row * 3 : row * 3 + 3]]
      self.assertIn(group[0], ex.positive_ids)
      self.assertCountEqual(group[1:], ranked[:2])
      # By hand: the copy of the query's own text comes first.
      self.assertEqual(ranked[0], {"q0": "c", "q1": "d"}[ex.query_id])
      # The ranker scores exactly these (query, passage) pairs.
      pairs = features.encode_pairs(
          tokenizer,
          [ex.query] * 3,
          [doc_texts[doc_ids.index(d)] for d in group],
          config.data.pair_max_length,
          "cls",
          pad_to_multiple_of=config.data.pair_max_length,
      )
      np.testing.assert_array_equal(
          batch["pair_ids"][row * 3 : row * 3 + 3], pairs["input_ids"]
      )


def _save_run(workdir, params, model_cfg, step=3):
  """A train workdir with a checkpoint of `params` at `step`."""
  state = {"step": np.zeros((), np.int32), "params": params}
  with checkpointing.Checkpointer(
      workdir / "checkpoints", save_interval_steps=1, max_to_keep=None
  ) as checkpointer:
    checkpointer.save(
        step,
        jax.device_put(state),
        data={"step": step, "seed": 0},
        metadata={"config": {"model": model_cfg}},
        force=True,
    )


def _assert_same_leaves(got, want):
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


class WarmStartTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.root = pathlib.Path(self.create_tempdir().full_path)
    self.model = {"pretrained": "all-MiniLM-L6-v2", "architecture": "bert"}
    self.config = train_config.get_config("ar2,smoke")
    self.config.unlock()
    self.model_def, self.params = train_state.split_model(_model())

  def _initial_params(self):
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    return ar2.KIND.initial_params(
        self.config, self.model_def, self.params, mesh
    )

  def test_each_model_from_its_run(self):
    root, config = self.root, self.config
    source = train_state.split_model(
        ar2.AR2Model(
            test_util.tiny_encoder(VOCAB, seed=5),
            cross_encoder_model.CrossEncoder(
                test_util.tiny_encoder(VOCAB, seed=6), "cls", rngs=nnx.Rngs(7)
            ),
        )
    )[1]
    _save_run(
        root / "bi", source["retriever"], dict(self.model, kind="bi_encoder")
    )
    _save_run(
        root / "ce",
        source["ranker"],
        dict(self.model, kind="cross_encoder", head="cls"),
    )
    config.ar2.retriever_init = str(root / "bi")
    got = self._initial_params()
    _assert_same_leaves(got["retriever"], source["retriever"])
    # No ranker_init: as built.
    _assert_same_leaves(got["ranker"], self.params["ranker"])

    config.ar2.ranker_init = str(root / "ce")
    _assert_same_leaves(self._initial_params()["ranker"], source["ranker"])

    config.ar2.ranker_init = str(root / "bi")
    with self.assertRaisesRegex(
        ConfigError, "config.ar2.ranker_init=.*'bi_encoder'"
    ):
      self._initial_params()
    config.ar2.ranker_init = str(root / "ce")
    config.model.head = "emb"
    with self.assertRaisesRegex(ConfigError, "model.head='cls'"):
      self._initial_params()
    config.ar2.ranker_init = str(root / "missing")
    with self.assertRaisesRegex(ConfigError, "config.ar2.ranker_init="):
      self._initial_params()

  def test_a_run_with_model_selection_gives_its_selected_step(self):
    model_cfg = dict(self.model, kind="bi_encoder")
    early, late = (
        train_state.split_model(test_util.tiny_encoder(VOCAB, seed=s))[1]
        for s in (5, 8)
    )
    _save_run(self.root / "bi", early, model_cfg, step=3)
    _save_run(self.root / "bi", late, model_cfg, step=6)
    self.config.ar2.retriever_init = str(self.root / "bi")
    # No selection.json: the latest step.
    _assert_same_leaves(self._initial_params()["retriever"], late)
    selection = metric_logging.Selection(
        str(self.root / "bi" / metric_logging.SELECTION_FILE), "eval/a/ndcg@10"
    )
    selection.update(3, {"eval/a/ndcg@10": 0.7})
    selection.update(6, {"eval/a/ndcg@10": 0.6})
    _assert_same_leaves(self._initial_params()["retriever"], early)


class ValidateTest(absltest.TestCase):

  def _config(self, **overrides):
    config = train_config.get_config("ar2,smoke")
    config.unlock()
    for key, value in overrides.items():
      node = config
      *path, last = key.split(".")
      for part in path:
        node = node[part]
      node[last] = value
    return config

  def test_bad_values_name_their_key(self):
    for key, value, pattern in [
        ("data.negatives", "bm25", "config.data.negatives"),
        ("ar2.ranker_steps", -1, "config.ar2.ranker_steps"),
        ("ar2.first_phase", "both", "config.ar2.first_phase"),
        ("ar2.adv_weight", -0.5, "config.ar2.adv_weight"),
        ("ar2.ranker_temperature", 0.0, "config.ar2.ranker_temperature"),
        ("data.group_size", 1, "config.data.group_size"),
        ("loss.name", "joint_lh", "config.loss.name"),
    ]:
      with self.subTest(key=key):
        with self.assertRaisesRegex(ConfigError, pattern):
          ar2.KIND.validate(self._config(**{key: value}))
    with self.assertRaisesRegex(ConfigError, "both 0"):
      ar2.KIND.validate(
          self._config(**{"ar2.ranker_steps": 0, "ar2.retriever_steps": 0})
      )
    ar2.KIND.validate(self._config())  # the shipped smoke config is valid

  def test_refresh_steps_checks(self):
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    config = train_config.get_config("smoke")
    config.unlock()
    config.data.refresh_steps = 3  # with BM25 negatives
    with self.assertRaisesRegex(ConfigError, "config.data.refresh_steps=3"):
      train_checks.validate(config, mesh)
    config.data.negatives = "dense"
    config.data.refresh_epochs = 1.0
    with self.assertRaisesRegex(ConfigError, "set one of them to 0"):
      train_checks.validate(config, mesh)
    config.data.refresh_epochs = 0.0
    train_checks.validate(config, mesh)
    config.data.refresh_steps = -1
    with self.assertRaisesRegex(ConfigError, "config.data.refresh_steps=-1"):
      train_checks.validate(config, mesh)


if __name__ == "__main__":
  absltest.main()
