"""Tests for the distillation teachers (retrieval_jax/teachers.py).

On a 12-document toy corpus with a tiny random encoder (tests/test_util.py):
BM25's scores are Bm25Index.pair_scores' (what the cross-encoder distilled
before, so its targets are unchanged); the hybrid teacher equals
search/fusion's interpolation of the dense and BM25 runs over each query's
candidates (and the formula by hand); the ensemble is the mean of per-query
normalised members; scores round-trip through the workdir cache, which a
changed input invalidates.
"""

import json
import pathlib
import shutil
import tempfile

from absl.testing import absltest
import jax
import numpy as np
import pytest

from configs import train as train_config
from retrieval_jax import encoding
from retrieval_jax import kinds
from retrieval_jax import pretrained
from retrieval_jax import sharding
from retrieval_jax import teachers
from retrieval_jax.data import negatives
from retrieval_jax.data import pipeline
from retrieval_jax.data import tokenizers
from retrieval_jax.data import features
from retrieval_jax.models import cross_encoder as cross_encoder_model
from retrieval_jax.models import splade as splade_model
from retrieval_jax.search import bm25
from retrieval_jax.search import fusion
import test_util

WORDS = [
    "otter", "rock", "shell", "glacier", "snow", "ice", "reed", "wood",
    "music", "slide", "rule", "engineer", "river", "dam", "sea", "cold",
]  # fmt: skip
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS


def _data(negatives=None) -> pipeline.TrainingData:
  """5 queries over 12 docs of 3 words each (doc i: words i .. i+2)."""
  doc_ids = [f"d{i}" for i in range(12)]
  doc_texts = [" ".join(WORDS[i : i + 3]) for i in range(12)]
  negatives = negatives or [
      ("d5", "d9", "d11"),
      ("d0", "d7"),
      ("d1", "d2", "d3", "d4"),
      ("d10",),
      ("d0", "d1", "d3"),
  ]
  queries = ["otter rock", "glacier ice cold", "reed music", "slide", "sea dam"]
  positives = [("d0",), ("d3", "d4"), ("d6",), ("d9",), ("d11",)]
  examples = [
      pipeline.TrainingExample(f"q{i}", q, pos, tuple(neg))
      for i, (q, pos, neg) in enumerate(zip(queries, positives, negatives))
  ]
  return pipeline.TrainingData(examples, doc_ids, doc_texts, source="toy")


def _encoder():
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  return encoding.TextEncoder(
      test_util.tiny_encoder(len(VOCAB), seed=3),
      tokenizers.WordPieceTokenizer(VOCAB),
      mesh,
      pooling="mean",
      normalize=True,
      max_length=16,
  )


class FixedTeacher:
  """Returns given score lists; counts calls; `fail` makes a call an error."""

  name = "fixed"

  def __init__(self, lists, tag="a", fail=False):
    self.lists, self.tag, self.fail, self.calls = lists, tag, fail, 0

  def key(self):
    return {"teacher": self.name, "tag": self.tag}

  def scores(self, data):
    del data
    if self.fail:
      raise AssertionError("scored instead of reading the cache")
    self.calls += 1
    return [np.asarray(s, np.float32) for s in self.lists]


class TeachersTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.data = _data()
    cls.bm25 = teachers.Bm25Teacher(cls.data.doc_texts)
    cls.encoder = _encoder()

  def _candidates(self, ex):
    return [self.data.doc_index[d] for d in ex.candidate_ids]

  def test_bm25_equals_pair_scores(self):
    index = bm25.Bm25Index.build(self.data.doc_texts, progress=False)
    got = self.bm25.scores(self.data)
    for ex, scores in zip(self.data.examples, got):
      rows = self._candidates(ex)
      want = index.pair_scores([ex.query] * len(rows), rows)
      # Bitwise: the cross-encoder's targets must not move.
      np.testing.assert_array_equal(scores, want)
      self.assertEqual(scores.dtype, np.float32)
    # Not all zero: the queries share terms with their candidates.
    self.assertGreater(float(got[0][0]), 0.0)

  def test_hybrid_equals_fusion_of_the_two_runs(self):
    dense = teachers.DenseTeacher(
        self.encoder, self.data.doc_texts, {"weights": "tiny"}
    )
    hybrid = teachers.HybridTeacher(dense, self.bm25)
    got = hybrid.scores(self.data)
    docs_nd = self.encoder.encode(list(self.data.doc_texts), progress=False)
    queries_qd = self.encoder.encode(
        [ex.query for ex in self.data.examples], progress=False
    )
    index = bm25.Bm25Index.build(self.data.doc_texts, progress=False)
    for q, ex in enumerate(self.data.examples):
      rows = self._candidates(ex)
      dense_run = {
          ex.query_id: {
              ex.candidate_ids[j]: float(docs_nd[r] @ queries_qd[q])
              for j, r in enumerate(rows)
          }
      }
      bm25_n = index.scores([ex.query])[0]
      sparse_run = {
          ex.query_id: {
              ex.candidate_ids[j]: float(bm25_n[r])
              for j, r in enumerate(rows)
              if bm25_n[r] > 0
          }
      }
      fused = fusion.interpolate(
          dense_run,
          sparse_run,
          alpha=1.0,
          normalization="minmax_center",
          k=100,
      )[ex.query_id]
      want = [fused[d] for d in ex.candidate_ids]
      # Two encoder calls over other batches: a whole forward pass apart.
      np.testing.assert_allclose(
          got[q], want, rtol=test_util.FP32_LONG_RTOL, atol=1e-5
      )
      # By hand: centred min-max of each list, missing BM25 at its minimum.
      d = np.array([dense_run[ex.query_id][c] for c in ex.candidate_ids])
      s_present = sparse_run[ex.query_id]
      s_min = min(s_present.values())
      s = np.array([s_present.get(c, s_min) for c in ex.candidate_ids])

      def center(x):
        span = x.max() - x.min()
        return (x - (x.max() + x.min()) / 2) / span if span else 0 * x

      np.testing.assert_allclose(
          got[q], center(s) + center(d), rtol=1e-4, atol=1e-5
      )

  @pytest.mark.slow
  def test_model_teachers_score_each_pair_as_their_model(self):
    from flax import nnx  # pylint: disable=g-import-not-at-top

    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    tokenizer = tokenizers.WordPieceTokenizer(VOCAB)
    texts = self.data.doc_texts
    ce = cross_encoder_model.CrossEncoder(
        test_util.tiny_encoder(len(VOCAB), seed=4), "cls", rngs=nnx.Rngs(0)
    )
    got_ce = teachers.CrossEncoderTeacher(
        ce, tokenizer, {"data": {"pair_max_length": 16}}, mesh, texts
    ).scores(self.data)
    sp = splade_model.Splade(
        test_util.tiny_encoder(len(VOCAB), seed=5),
        bias_init=0.0,
        rngs=nnx.Rngs(1),
    )
    got_sp = teachers.SparseTeacher(
        encoding.SparseEncoder(sp, tokenizer, mesh, max_length=16),
        texts,
        {"weights": "tiny"},
    ).scores(self.data)
    for q, ex in enumerate(self.data.examples):
      rows = self._candidates(ex)
      pairs = features.encode_pairs(
          tokenizer, [ex.query] * len(rows), [texts[r] for r in rows], 16, "cls"
      )
      want = ce(
          pairs["input_ids"], pairs["attention_mask"], pairs["token_type_ids"]
      )
      np.testing.assert_allclose(got_ce[q], want, rtol=1e-4, atol=1e-5)
      ids = [
          tokenizer.encode(t, 16) for t in [ex.query] + [texts[r] for r in rows]
      ]
      ids_nl, lengths_n = pipeline.pad_tokens(ids, 16, tokenizer.pad_id)
      w_nv = np.asarray(sp(ids_nl, pipeline.length_mask(lengths_n, 16)))
      np.testing.assert_allclose(
          got_sp[q], w_nv[1:] @ w_nv[0], rtol=1e-4, atol=1e-4
      )

  def test_ensemble_is_the_mean_of_normalised_members(self):
    a = FixedTeacher([[0.0, 2.0, 4.0], [1.0, 1.0], [3, 0, 0, 0, 6], [5, 6]])
    b = FixedTeacher([[9.0, 1.0, 5.0], [0.0, 4.0], [1, 1, 1, 1, 1], [0, 1]])
    ex = _data(negatives=[("d5", "d9"), (), ("d1", "d2", "d3", "d7"), ("d10",)])
    ex = pipeline.TrainingData(ex.examples[:4], ex.doc_ids, ex.doc_texts)
    got = teachers.EnsembleTeacher([a, b]).scores(ex)
    want = [
        [(-0.5 + 0.5) / 2, (0.0 - 0.5) / 2, (0.5 + 0.0) / 2],
        [(0.0 - 0.5) / 2, (0.0 + 0.5) / 2],  # a constant list centres to 0
        [0.0, -0.25, -0.25, -0.25, 0.25],
        [-0.5, 0.5],
    ]
    for g, w in zip(got, want):
      np.testing.assert_allclose(g, w, rtol=1e-6)

  def test_cache_round_trip(self):
    cache = pathlib.Path(tempfile.mkdtemp())
    self.addCleanup(shutil.rmtree, cache, ignore_errors=True)
    rng = np.random.default_rng(0)
    lists = [
        rng.normal(size=len(ex.candidate_ids)).astype(np.float32) * 7
        for ex in self.data.examples
    ]
    first = teachers.score_data(self.data, FixedTeacher(lists), cache)
    files = list(cache.iterdir())
    self.assertLen(files, 1)
    self.assertTrue(files[0].name.startswith("fixed-"))
    for ex, want in zip(first.examples, lists):
      np.testing.assert_array_equal(np.float32(ex.teacher_scores), want)
    # A resume reads them back, bit for bit, without scoring.
    again = teachers.score_data(
        self.data, FixedTeacher(lists, fail=True), cache
    )
    self.assertEqual(
        [ex.teacher_scores for ex in again.examples],
        [ex.teacher_scores for ex in first.examples],
    )
    # Another teacher, other candidates or another corpus text: rescored.
    fewer = self.data.with_negatives(
        [ex.negative_ids[:1] for ex in self.data.examples]
    )
    for changed_teacher, data in (
        (FixedTeacher(lists, tag="b"), self.data),
        (
            FixedTeacher([
                l[: len(ex.candidate_ids)]
                for l, ex in zip(lists, fewer.examples)
            ]),
            fewer,
        ),
        (
            FixedTeacher(lists),
            pipeline.TrainingData(
                self.data.examples,
                self.data.doc_ids,
                self.data.doc_texts[:-1] + ("changed",),
            ),
        ),
    ):
      teachers.score_data(data, changed_teacher, cache)
      self.assertEqual(changed_teacher.calls, 1)
    # A damaged file is rescored, not trusted.
    files[0].write_text(json.dumps({"format": 1}))
    fresh = FixedTeacher(lists)
    teachers.score_data(self.data, fresh, cache)
    self.assertEqual(fresh.calls, 1)

  def test_loader_rows_carry_their_scores(self):
    lists = [
        np.arange(len(ex.candidate_ids), dtype=np.float32) + 10 * q
        for q, ex in enumerate(self.data.examples)
    ]
    data = teachers.score_data(self.data, FixedTeacher(lists), None)
    loader = pipeline.TrainLoader(
        data,
        tokenizers.WordPieceTokenizer(VOCAB),
        batch_size=5,
        group_size=3,
        unit="query",
        positives="one",
        query_max_length=8,
        passage_max_length=8,
        seed=1,
        prefetch=0,
    )
    batch = loader.batch_at(0)
    _, examples_b = loader.examples_at(0)
    for row, example in enumerate(examples_b):
      q = int(loader.units[example, 0])
      ex = data.examples[q]
      for slot in range(3):
        doc = int(batch["passage_doc"][row * 3 + slot])
        want = (
            0.0
            if doc < 0
            else lists[q][ex.candidate_ids.index(data.doc_ids[doc])]
        )
        self.assertEqual(batch["teacher_scores"][row * 3 + slot], want)


class CrossEncoderTargetsTest(absltest.TestCase):

  def test_bm25_targets_are_unchanged(self):
    # Before the teacher module, the cross-encoder scored each batch row
    # with `Bm25Index.pair_scores` over the training corpus, times
    # teacher_scale; the loader's cached rows must give the same floats.
    try:
      tokenizer = tokenizers.WordPieceTokenizer.from_pretrained_dir(
          pretrained.resolve_model_dir(pretrained.DEFAULT_MODEL)
      )
    except FileNotFoundError as e:
      raise absltest.SkipTest(str(e))
    config = train_config.get_config(
        "smoke,cross_encoder,loss=kl_distillation,teacher=bm25"
    )
    with config.unlocked():
      config.loss.teacher_scale = 0.3
    data = negatives.mine(
        pipeline.TrainingData.from_beir(test_util.LIMIT_SMALL, "train"),
        method="bm25",
        depth=5,
    )
    data = teachers.score_data(
        data, teachers.build(config, data.doc_texts, None), None
    )
    loss_spec = kinds.KINDS["cross_encoder"].loss_spec(config)
    loader = pipeline.TrainLoader(
        data,
        tokenizer,
        batch_size=8,
        group_size=4,
        unit=loss_spec.unit,
        positives=loss_spec.positives,
        query_max_length=16,
        passage_max_length=32,
        seed=0,
        prefetch=0,
    )
    spec = kinds.KINDS["cross_encoder"].train_spec(
        config,
        loader=loader,
        tokenizer=tokenizer,
        loss_spec=loss_spec,
        mesh=None,
    )
    index = bm25.Bm25Index.build(data.doc_texts, progress=False)
    for step in (0, 7):
      host = loader.batch_at(step)
      queries, _ = loader.texts_at(step, host)
      want = config.loss.teacher_scale * index.pair_scores(
          queries, host["passage_doc"]
      )
      got = spec.featurize(step, host)["teacher_scores"]
      np.testing.assert_array_equal(got, want)
      self.assertEqual(got.dtype, want.dtype)
      self.assertGreater(np.count_nonzero(got), 8)


if __name__ == "__main__":
  absltest.main()
