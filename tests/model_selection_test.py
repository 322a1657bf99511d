"""Held-out training queries and model selection on them.

Oracles: the holdout is a pure function of (ids, num, seed), drawn from the
sorted ids; training drops exactly it and the "holdout" eval block reads
exactly it; the selection keeps the best step's metrics, survives a resume
and forgets the evaluations after the resumed step; the cross-encoder's
InfoNCE term adds with its weight to the KL written out by hand.
"""

import json
import os

from absl.testing import absltest
import jax.numpy as jnp
import numpy as np

from configs import train as train_config
from retrieval_jax import kinds
from retrieval_jax import metric_logging
from retrieval_jax import train
from retrieval_jax import train_checks
from retrieval_jax.data import beir
from retrieval_jax.data import pipeline
from retrieval_jax.errors import ConfigError
from retrieval_jax.kinds import base
from retrieval_jax.kinds import cross_encoder

LIMIT = os.path.join(os.path.dirname(__file__), "..", "data", "limit-small")


def _config(num=100, **evals):
  """The smoke cross-encoder with a LIMIT-small train-split holdout block."""
  config = train_config.get_config("smoke,cross_encoder")
  with config.unlocked():
    config.data.holdout_queries = num
    config.evals.holdout = config.evals.limit_dev.copy_and_resolve_references()
    config.evals.holdout.split = "train"
    config.evals.holdout.queries = "holdout"
    for name, value in evals.items():
      config.evals[name].queries = value
  return config


class HoldoutIdsTest(absltest.TestCase):

  def test_a_pure_function_of_the_sorted_ids_and_the_seed(self):
    ids = [f"q{i}" for i in range(50)]
    picked = pipeline.holdout_query_ids(ids, 10, seed=3)
    self.assertLen(picked, 10)
    self.assertLessEqual(picked, set(ids))
    # Order and repeats of the input do not matter; the seed does.
    self.assertEqual(
        picked, pipeline.holdout_query_ids(ids[::-1] + ids[:5], 10, seed=3)
    )
    order = np.random.default_rng(3).permutation(50)
    self.assertEqual(picked, {sorted(ids)[i] for i in order[:10]})
    self.assertNotEqual(picked, pipeline.holdout_query_ids(ids, 10, seed=4))

  def test_cannot_hold_out_none_or_all(self):
    for num in (0, 3):
      with self.assertRaisesRegex(ValueError, f"cannot hold out {num} of 3"):
        pipeline.holdout_query_ids(["a", "b", "c"], num, seed=0)

  def test_config_holdout_is_drawn_from_the_blocks_qrels(self):
    config = _config(100)
    held = base.holdout_query_ids(config)
    qrels = beir.read_qrels(beir.qrels_path(LIMIT, "train"))
    self.assertEqual(
        held, pipeline.holdout_query_ids(list(qrels), 100, config.data.seed)
    )
    collection = base.eval_collection(config, "holdout")
    self.assertEqual(set(collection.qrels), held)
    self.assertEqual(set(collection.judged_query_ids()), held)
    # The other block keeps every judged query of its split.
    dev = base.eval_collection(config, "limit_dev")
    self.assertLen(dev.qrels, 200)

  def test_training_drops_exactly_the_held_out_queries(self):
    config = _config(100)
    held = base.holdout_query_ids(config)
    data = pipeline.TrainingData.from_beir(LIMIT, split="train")
    kept = train._hold_out(data, held, 100)
    self.assertLen(kept.examples, len(data.examples) - 100)
    self.assertEmpty({ex.query_id for ex in kept.examples} & held)

  def test_a_holdout_of_other_queries_is_refused(self):
    data = pipeline.TrainingData.from_beir(LIMIT, split="train")
    with self.assertRaisesRegex(
        ConfigError, r"holdout_queries=2: only 1 of the 2 held-out"
    ):
      train._hold_out(data, {"query_0", "not_a_training_query"}, 2)

  def test_bad_settings_name_the_key(self):
    cases = [
        (_config(0), r"evals.holdout.queries='holdout' .*holdout_queries > 0"),
        (_config(5, limit_dev="holdout"), r"exactly one config.evals block"),
        (_config(5, limit_dev="some"), r"evals.limit_dev.queries='some'"),
        (_config(-1), r"holdout_queries=-1"),
        (_config(800), r"holdout_queries=800 .*cannot hold out 800 of 800"),
    ]
    for config, regex in cases:
      with self.subTest(regex=regex):
        with self.assertRaisesRegex(ConfigError, regex):
          kinds.get(config.model).validate(config)


class SelectionTest(absltest.TestCase):

  def test_keeps_the_best_step_and_resumes(self):
    path = os.path.join(self.create_tempdir().full_path, "selection.json")
    metric = "eval/holdout/ndcg@10"
    selection = metric_logging.Selection(path, metric)
    self.assertIsNone(selection.best_step)
    curve = {20: 0.5, 40: 0.7, 60: 0.6, 80: 0.7}
    for step, value in curve.items():
      best = selection.update(step, {metric: value, "eval/test/ndcg@10": step})
      self.assertEqual(best, step in (20, 40))
    record = json.loads(open(path).read())
    # Ties go to the earlier step; its other metrics come with it.
    self.assertEqual(record["best_step"], 40)
    self.assertEqual(record["best"]["eval/test/ndcg@10"], 40.0)
    self.assertEqual(record["history"], {str(k): v for k, v in curve.items()})
    # A run resumed from step 40 evaluates 60 and 80 again.
    resumed = metric_logging.Selection(path, metric, resume_step=40)
    self.assertEqual(resumed.history, {20: 0.5, 40: 0.7})
    resumed.update(60, {metric: 0.9, "eval/test/ndcg@10": 1.0})
    self.assertEqual(resumed.best_step, 60)
    # Another metric starts a new record.
    other = metric_logging.Selection(path, "eval/x/y", resume_step=40)
    self.assertEmpty(other.history)

  def test_the_selected_step_is_the_runs_model(self):
    workdir = self.create_tempdir().full_path
    self.assertIsNone(metric_logging.selected_step(workdir))
    path = os.path.join(workdir, metric_logging.SELECTION_FILE)
    selection = metric_logging.Selection(path, "eval/a/b")
    for step, value in ((10, 0.2), (20, 0.4), (30, 0.3)):
      selection.update(step, {"eval/a/b": value})
    self.assertEqual(metric_logging.read_selection(workdir), (20, "eval/a/b"))
    self.assertEqual(metric_logging.selected_step(workdir), 20)

  def test_init_from_reads_the_selected_step(self):
    workdir = self.create_tempdir().full_path
    checkpoints = os.path.join(workdir, "checkpoints")
    self.assertIsNone(train.init_from_step(""))
    self.assertIsNone(train.init_from_step(checkpoints))
    selection = metric_logging.Selection(
        os.path.join(workdir, metric_logging.SELECTION_FILE), "eval/a/map"
    )
    selection.update(20, {"eval/a/map": 0.5})
    selection.update(40, {"eval/a/map": 0.4})
    self.assertEqual(train.init_from_step(checkpoints), 20)

  def test_unknown_metric(self):
    path = os.path.join(self.create_tempdir().full_path, "selection.json")
    selection = metric_logging.Selection(path, "eval/holdout/ndcg@10")
    with self.assertRaisesRegex(KeyError, "not among the evaluation"):
      selection.update(1, {"eval/test/ndcg@10": 0.1})

  def test_select_metric_settings(self):
    config = _config(100)
    with config.unlocked():
      config.train.select_metric = "eval/holdout/ndcg@10"
      config.train.eval_every = 4
      config.checkpoint.max_to_keep = 0
    train_checks.validate_settings(config)
    cases = [
        ("ndcg@10", 4, 0, "expected 'eval/<config.evals name>/<measure>'"),
        ("eval/other/ndcg@10", 4, 0, "no block 'other' measuring 'ndcg@10'"),
        ("eval/holdout/map", 4, 0, "no block 'holdout' measuring 'map'"),
        ("eval/holdout/ndcg@10", 0, 0, "set config.train.eval_every > 0"),
        ("eval/holdout/ndcg@10", 4, 2, "set config.checkpoint.max_to_keep=0"),
        ("eval/holdout/ndcg@10", 3, 0, "a divisor of .*eval_every=3"),
    ]
    for metric, every, keep, regex in cases:
      with config.unlocked():
        config.train.select_metric = metric
        config.train.eval_every = every
        config.checkpoint.max_to_keep = keep
      with self.subTest(metric=metric, every=every, keep=keep):
        with self.assertRaisesRegex(ConfigError, regex):
          train_checks.validate_settings(config)


class SelectedRunTest(absltest.TestCase):

  def test_training_selects_a_step_and_loading_the_run_gives_it(self):
    config = _config(8)
    with config.unlocked():
      config.train.eval_every = 2
      config.train.select_metric = "eval/holdout/ndcg@10"
      config.checkpoint.max_to_keep = 0
    workdir = self.create_tempdir().full_path
    results = train.train_and_evaluate(config, workdir)
    selected = results["selected"]
    history = {int(k): v for k, v in selected["history"].items()}
    self.assertEqual(set(history), {2, 4})
    best = max(sorted(history), key=history.get)
    self.assertEqual(selected["best_step"], best)
    # The selected step's metrics: those logged at that step.
    logged = {
        r["step"]: r
        for r in metric_logging.read_metrics(
            os.path.join(workdir, "metrics.jsonl")
        )
        if "eval/holdout/ndcg@10" in r
    }
    for key, value in selected["best"].items():
      self.assertAlmostEqual(logged[best][key], value, places=6)
    mesh = train_checks.make_mesh(config)
    *_, step = kinds.load_run(workdir, mesh)
    self.assertEqual(step, best)
    # Whichever step the record names: make it step 2 (not the latest).
    metric = config.train.select_metric
    metric_logging.Selection(
        os.path.join(workdir, metric_logging.SELECTION_FILE),
        metric,
        resume_step=4,
    ).update(2, dict(logged[2], **{metric: 2.0}))
    *_, step = kinds.load_run(workdir, mesh)
    self.assertEqual(step, 2)


class _FixedScores:
  """A stand-in cross-encoder returning fixed pair scores."""

  head = "cls"

  def __init__(self, scores):
    self.scores = jnp.asarray(scores, jnp.float32)

  def __call__(self, *args, **kwargs):
    del args, kwargs
    return self.scores


class CrossEncoderInfonceTest(absltest.TestCase):

  def test_kl_plus_weighted_infonce_by_hand(self):
    b, g = 3, 4
    rng = np.random.default_rng(0)
    scores = rng.normal(size=b * g).astype(np.float32) * 2
    teacher = rng.normal(size=b * g).astype(np.float32) * 3
    passage_doc = np.arange(b * g, dtype=np.int32)
    passage_doc[g + 3] = -1  # one padding slot in group 1
    batch = {
        "pair_ids": np.zeros((b * g, 4), np.int32),
        "pair_mask": np.ones((b * g, 4), np.int32),
        "pair_types": np.zeros((b * g, 4), np.int32),
        "pair_markers": np.zeros((b * g, 2), np.int32),
        "positive_counts": np.ones(b, np.int32),
        "passage_doc": passage_doc,
        "teacher_scores": teacher,
    }
    valid = (passage_doc >= 0).reshape(b, g)
    s_bg = scores.reshape(b, g).astype(np.float64)
    t_bg = teacher.reshape(b, g).astype(np.float64)
    kl, nce = [], []
    for s, t, v in zip(s_bg, t_bg, valid):
      log_p_t = t[v] - np.log(np.exp(t[v]).sum())
      log_p_s = s[v] - np.log(np.exp(s[v]).sum())
      kl.append(np.sum(np.exp(log_p_t) * (log_p_t - log_p_s)))
      nce.append(-log_p_s[0])  # the positive is slot 0
    model = _FixedScores(scores)
    for weight in (0.0, 0.5):
      value, aux = cross_encoder.loss(
          model,
          batch,
          None,
          0,
          loss_name="kl_distillation",
          infonce_weight=weight,
      )
      np.testing.assert_allclose(
          float(value), np.mean(kl) + weight * np.mean(nce), rtol=1e-5
      )
      if weight:
        np.testing.assert_allclose(
            float(aux["infonce_loss"]), np.mean(nce), rtol=1e-5
        )

  def test_fixed_first_stage_cannot_be_re_mined(self):
    config = train_config.get_config("smoke,cross_encoder,distill")
    kinds.get(config.model).validate(config)
    with config.unlocked():
      config.data.refresh_epochs = 1.0
    with self.assertRaisesRegex(ConfigError, "fixed first stage"):
      kinds.get(config.model).validate(config)

  def test_each_first_stage_trains_and_evaluates_on_its_own_ranking(self):
    for first_stage, negatives, depth in (
        ("dense", "dense", 20),
        ("bm25", "bm25", 100),
    ):
      config = train_config.get_config(
          f"scifact,cross_encoder,distill,first_stage={first_stage}"
      )
      with self.subTest(first_stage=first_stage):
        self.assertEqual(config.data.negatives, negatives)
        self.assertEqual(config.data.negative_depth, depth)
        for ev in config.evals.values():
          self.assertEqual(
              (ev.first_stage, ev.rerank_depth), (first_stage, depth)
          )
        every = config.train.eval_every
        self.assertEqual(config.checkpoint.every_steps % every, 0)
    with self.assertRaisesRegex(
        ValueError, "for scifact,cross_encoder,distill"
    ):
      train_config.get_config("scifact,first_stage=bm25")


if __name__ == "__main__":
  absltest.main()
