"""Span pair builders: ICT and independent cropping, step-indexed.

Oracles: crop lengths inside [ceil(0.1 n), floor(0.5 n)] and each crop a
contiguous slice of the document; an ICT query sentence absent from its
positive unless kept, the rest of the passage in order; the keep frequency
within 5 binomial standard deviations; batches a pure function of (seed,
step), whatever was asked before.
"""

import math

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from retrieval_jax import pretrained
from retrieval_jax.data import beir
from retrieval_jax.data import spans
from retrieval_jax.data import tokenizers
from test_util import LIMIT_SMALL, REPO

TINY = REPO / "tests" / "fixtures" / "tiny_beir"


def _tokenizer():
  try:
    model_dir = pretrained.resolve_model_dir(pretrained.DEFAULT_MODEL)
  except FileNotFoundError as e:
    raise absltest.SkipTest(str(e))
  return tokenizers.WordPieceTokenizer.from_pretrained_dir(model_dir)


def _is_slice(span, ids):
  n = len(span)
  return any(ids[s : s + n] == span for s in range(len(ids) - n + 1))


class CropTest(parameterized.TestCase):

  @parameterized.parameters(2, 3, 10, 37, 126)
  def test_lengths_in_bounds_and_spans_are_slices(self, n):
    ids = list(range(1000, 1000 + n))
    lo = max(1, math.ceil(0.1 * n))
    hi = max(lo, math.floor(0.5 * n))
    self.assertEqual(spans.crop_bounds(n, 0.1, 0.5), (lo, hi))
    rng = np.random.default_rng(0)
    lengths = set()
    for _ in range(300):
      a, b = spans.crop_pair(ids, rng, 0.1, 0.5)
      for span in (a, b):
        self.assertBetween(len(span), lo, hi)
        self.assertTrue(_is_slice(span, ids))
        lengths.add(len(span))
    # Every allowed length is drawn (uniform over lo..hi).
    self.assertEqual(lengths, set(range(lo, hi + 1)))

  def test_two_crops_are_independent_draws(self):
    ids = list(range(200))
    rng = np.random.default_rng(1)
    pairs = [spans.crop_pair(ids, rng) for _ in range(200)]
    self.assertGreater(sum(a != b for a, b in pairs), 190)


class IctTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    # Distinct tokens per sentence: a token names its sentence.
    self.sentences = [[10, 11], [20, 21, 22], [30], [40, 41]]

  def test_query_removed_unless_kept(self):
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(400):
      query, context, kept = spans.ict_pair(self.sentences, rng, 0.3)
      i = self.sentences.index(query)
      seen.add(i)
      others = [s for j, s in enumerate(self.sentences) if j != i or kept]
      self.assertEqual(context, [t for s in others for t in s])
      if not kept:
        self.assertEmpty(set(query) & set(context))
    self.assertEqual(seen, {0, 1, 2, 3})

  def test_keep_frequency_is_binomial(self):
    rng = np.random.default_rng(7)
    n, p = 20_000, 0.1
    kept = sum(spans.ict_pair(self.sentences, rng, p)[2] for _ in range(n))
    # 5 sigma: a false failure once in ~3.5 million runs.
    self.assertLess(abs(kept - n * p), 5 * math.sqrt(n * p * (1 - p)))
    for p, want in ((0.0, 0), (1.0, 50)):
      got = sum(spans.ict_pair(self.sentences, rng, p)[2] for _ in range(50))
      self.assertEqual(got, want)

  def test_needs_two_sentences(self):
    with self.assertRaisesRegex(ValueError, "2 sentences"):
      spans.ict_pair([[1, 2]], np.random.default_rng(0))

  def test_split_sentences_title_first(self):
    self.assertEqual(
        spans.split_sentences("T", "A b. C d? E!  F"),
        ["T", "A b.", "C d?", "E!", "F"],
    )
    self.assertEqual(spans.split_sentences("", "One."), ["One."])


class SpanLoaderTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tokenizer = _tokenizer()

  def _loader(self, task="crop", seed=0, **kwargs):
    settings = dict(
        task=task,
        batch_size=5,
        query_max_length=32,
        passage_max_length=32,
        seed=seed,
    )
    settings.update(kwargs)
    corpus = LIMIT_SMALL if task == "crop" else TINY
    return spans.SpanLoader.from_beir(corpus, self.tokenizer, **settings)

  @parameterized.parameters("crop", "ict")
  def test_batch_is_a_function_of_seed_and_step(self, task):
    a, b = self._loader(task), self._loader(task)
    # Other calls, in another order, change nothing.
    for step in (7, 0, 3):
      b.batch_at(step)
    for step in (0, 3, 7, 19):
      got, want = a.batch_at(step), b.batch_at(step)
      self.assertEqual(set(got), set(a.batch_spec))
      for key in got:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
        self.assertEqual(got[key].shape, a.batch_spec[key][0])
    resumed = b.iterate(3)
    for step in (3, 4):
      np.testing.assert_array_equal(
          next(resumed)["query_ids"], a.batch_at(step)["query_ids"]
      )
    other = self._loader(task, seed=1).batch_at(0)
    self.assertFalse(
        np.array_equal(other["query_ids"], a.batch_at(0)["query_ids"])
    )

  def test_epoch_visits_every_document_once(self):
    loader = self._loader(batch_size=4)
    self.assertEqual(loader.num_examples, 46)
    docs = np.concatenate(
        [loader.batch_at(t)["passage_doc"] for t in range(46 // 2)]
    )
    # Steps 0..22 hold stream items 0..91: epochs 0 and 1, each a permutation.
    self.assertCountEqual(docs[:46], range(46))
    self.assertCountEqual(docs[46:92], range(46))

  def test_crop_batch_lengths_in_bounds(self):
    loader = self._loader(batch_size=8)
    window = {
        i: len(self.tokenizer.tokenize_to_ids(t, 30))
        for i, t in enumerate(self._texts(LIMIT_SMALL))
    }
    for step in range(6):
      batch = loader.batch_at(step)
      for key in ("query", "passage"):
        lengths = batch[f"{key}_mask"].sum(1) - 2  # without [CLS] [SEP]
        for doc, n in zip(batch["passage_doc"], lengths):
          lo, hi = spans.crop_bounds(window[doc], 0.1, 0.5)
          self.assertBetween(n, lo, hi)
      np.testing.assert_array_equal(
          batch["relevant_doc"][:, 0], batch["passage_doc"]
      )
      np.testing.assert_array_equal(batch["positive_counts"], 1)

  def test_ict_batch_query_not_in_positive(self):
    loader = self._loader("ict", batch_size=7, keep_prob=0.0)
    self.assertEqual(loader.num_examples, 7)  # d4 has no title: 1 sentence
    batch = loader.batch_at(0)
    tok = self.tokenizer
    for i, doc in enumerate(batch["passage_doc"]):
      title, text = self._corpus(TINY)[doc]
      query = batch["query_ids"][i, 1 : batch["query_mask"][i].sum() - 1]
      passage = batch["passage_ids"][i, 1 : batch["passage_mask"][i].sum() - 1]
      sentences = [
          tok.tokenize_to_ids(s) for s in spans.split_sentences(title, text)
      ]
      self.assertIn(list(query), sentences)
      rest = [t for s in sentences if s != list(query) for t in s]
      self.assertEqual(list(passage), rest)

  def test_rejects_bad_settings(self):
    with self.assertRaisesRegex(ValueError, "task"):
      self._loader("bfs")
    with self.assertRaisesRegex(ValueError, "2 sentences"):
      spans.SpanLoader.from_beir(
          LIMIT_SMALL,
          self.tokenizer,
          task="ict",
          batch_size=2,
          query_max_length=16,
          passage_max_length=16,
          seed=0,
      )
    with self.assertRaisesRegex(ValueError, "min_crop"):
      self._loader(min_crop=0.6, max_crop=0.5)

  def _corpus(self, directory):
    _, titles, texts = beir.read_corpus(str(directory / "corpus.jsonl"))
    return list(zip(titles, texts))

  def _texts(self, directory):
    return [beir.doc_text(t, x) for t, x in self._corpus(directory)]


if __name__ == "__main__":
  absltest.main()
