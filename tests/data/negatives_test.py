"""Tests for hard-negative mining and its cache.

BM25: rank order, exclusion, ties and zero scores on a toy corpus; on
SciFact's train queries, agreement with bm25s' own retrieval and how often
the known positive ranks at the top before exclusion. Dense: an exact
reference on a bag-of-words stand-in, and the real encoder on LIMIT-small.
Cache: hits, misses on changed inputs, atomic writes, bad files.
"""

import json
import os
import shutil
import tempfile
from unittest import mock
import zlib

from absl.testing import absltest
import numpy as np

from retrieval_jax import io
from retrieval_jax.data import beir
from retrieval_jax.data import negatives
from retrieval_jax.data import pipeline
from test_util import LIMIT_SMALL, SCIFACT

# The toy corpus: d4 repeats d0 (a tie), d2 shares no term with the query.
_TOY_IDS = ["d0", "d1", "d2", "d3", "d4"]
_TOY_TEXTS = [
    "apple banana",
    "apple apple apple cherry pie",
    "zebra crossing",
    "banana split",
    "apple banana",
]


def make_tempdir(test: absltest.TestCase) -> str:
  """A fresh directory removed after the test (works under pytest too)."""
  path = tempfile.mkdtemp()
  test.addCleanup(shutil.rmtree, path, ignore_errors=True)
  return path


class BagOfWordsEncoder:
  """Hashed bag-of-words vectors: an `encode_fn` that records its calls.

  Scores are small integers, so float32 matmuls in any order agree exactly
  and an exact reference ranking exists.
  """

  def __init__(self, dim: int = 64):
    self.dim = dim
    self.calls = []

  def __call__(self, texts):
    self.calls.append(list(texts))
    out_nd = np.zeros((len(texts), self.dim), np.float32)
    for i, text in enumerate(texts):
      for word in text.lower().replace("?", " ").split():
        out_nd[i, zlib.crc32(word.encode()) % self.dim] += 1
    return out_nd


def reference_ranking(scores_qn: np.ndarray) -> np.ndarray:
  """Rows ordered by (score descending, index ascending)."""
  return np.argsort(-scores_qn, axis=1, kind="stable")


class Bm25ToyTest(absltest.TestCase):

  def mine(self, exclude, depth=10, query="apple banana"):
    return negatives.bm25_negatives(
        [query], _TOY_IDS, _TOY_TEXTS, [exclude], depth=depth
    )[0]

  def test_ties_by_index_and_zero_scores_dropped(self):
    got = self.mine(set())
    # d0 and d4 tie (same text) and d0 has the smaller index; d2 shares no
    # term, so BM25 does not rank it at all.
    self.assertEqual(got[:2], ["d0", "d4"])
    self.assertCountEqual(got, ["d0", "d1", "d3", "d4"])

  def test_excluded_docs_removed_and_depth_refilled(self):
    full = self.mine(set())
    got = self.mine({"d0", "d3"}, depth=2)
    self.assertEqual(got, [d for d in full if d not in {"d0", "d3"}][:2])
    self.assertEqual(self.mine({"d0"}, depth=1), ["d4"])

  def test_query_without_corpus_terms_gets_nothing(self):
    self.assertEqual(self.mine(set(), query="quokka"), [])

  def test_each_query_is_mined_independently_of_the_others(self):
    # Batch-mates, and their order, must not change a query's list.
    queries = ["apple", "banana split", "cherry apple"]
    exclude = [set(), {"d3"}, set()]
    together = negatives.bm25_negatives(
        queries, _TOY_IDS, _TOY_TEXTS, exclude, depth=3
    )
    alone = [self.mine(e, depth=3, query=q) for q, e in zip(queries, exclude)]
    self.assertEqual(together, alone)
    reversed_ = negatives.bm25_negatives(
        queries[::-1], _TOY_IDS, _TOY_TEXTS, exclude[::-1], depth=3
    )
    self.assertEqual(reversed_[::-1], together)
    # "apple": d1 holds it three times in five words, which outscores the
    # two-word d0 and d4 (tf saturates, k1 = 0.9); d0 before d4 on the tie.
    self.assertEqual(together[0], ["d1", "d0", "d4"])

  def test_bad_arguments(self):
    with self.assertRaisesRegex(ValueError, "exclude has 0 sets"):
      negatives.bm25_negatives(["q"], _TOY_IDS, _TOY_TEXTS, [])
    with self.assertRaisesRegex(ValueError, "depth must be a positive"):
      negatives.bm25_negatives(["q"], _TOY_IDS, _TOY_TEXTS, [set()], depth=0)
    with self.assertRaisesRegex(ValueError, "corpus_texts has 1"):
      negatives.bm25_negatives(["q"], _TOY_IDS, ["x"], [set()])
    with self.assertRaisesRegex(ValueError, "duplicate ids"):
      negatives.bm25_negatives(["q"], ["a", "a"], ["x", "y"], [set()])


class Bm25SciFactTest(absltest.TestCase):
  """SciFact train queries: 809, 5,183 docs (about 10 s in all)."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    if not (SCIFACT / "qrels" / "train.tsv").is_file():
      raise absltest.SkipTest(f"{SCIFACT} is not available")
    collection = beir.load_beir(str(SCIFACT), "train")
    cls.query_ids, cls.query_texts = collection.judged_queries()
    cls.doc_ids = collection.doc_ids
    cls.doc_texts = collection.doc_texts()
    cls.positives = [set(collection.qrels[q]) for q in cls.query_ids]
    # Before exclusion: the plain BM25 ranking.
    cls.ranked = negatives.bm25_negatives(
        cls.query_texts,
        cls.doc_ids,
        cls.doc_texts,
        [set() for _ in cls.query_ids],
        depth=100,
    )
    cls.mined = negatives.bm25_negatives(
        cls.query_texts, cls.doc_ids, cls.doc_texts, cls.positives, depth=50
    )

  def test_positive_ranks_high_before_exclusion(self):
    # Measured with DATA.md's settings: a positive is BM25's top-1 for 58.6%
    # of the 809 train queries, in the top 10 for 83.4%, in the top 100 for
    # 93.1% (SciFact test R@10 is 0.795). The bounds leave a few points for
    # tokenizer-level drift but catch a broken index or a shuffled ranking.
    def hit_rate(k):
      return np.mean([
          bool(pos.intersection(r[:k]))
          for pos, r in zip(self.positives, self.ranked)
      ])

    self.assertGreater(hit_rate(1), 0.55)
    self.assertGreater(hit_rate(10), 0.80)
    self.assertGreater(hit_rate(100), 0.90)

  def test_negatives_are_the_ranking_minus_positives(self):
    for pos, ranked, mined in zip(self.positives, self.ranked, self.mined):
      self.assertEmpty(pos.intersection(mined))
      self.assertEqual(mined, [d for d in ranked if d not in pos][:50])

  def test_matches_bm25s_retrieve(self):
    # bm25s' own top-k with the same settings, put in (score desc, index)
    # order; cut at 100 from a deeper list so boundary ties cannot differ.
    import bm25s  # pylint: disable=g-import-not-at-top
    import Stemmer  # pylint: disable=g-import-not-at-top

    stemmer = Stemmer.Stemmer("porter")
    retriever = bm25s.BM25(method="lucene", k1=0.9, b=0.4)
    retriever.index(
        bm25s.tokenize(
            self.doc_texts, stopwords="en", stemmer=stemmer, show_progress=False
        ),
        show_progress=False,
    )
    indices_qk, scores_qk = retriever.retrieve(
        bm25s.tokenize(
            self.query_texts,
            stopwords="en",
            stemmer=stemmer,
            show_progress=False,
        ),
        k=150,
        show_progress=False,
        n_threads=1,
    )
    for ranked, indices_k, scores_k in zip(self.ranked, indices_qk, scores_qk):
      order = np.lexsort((indices_k, -scores_k))
      want = [self.doc_ids[indices_k[j]] for j in order if scores_k[j] > 0]
      self.assertEqual(ranked, want[:100])

  def test_queries_get_full_depth(self):
    # Every SciFact claim shares terms with well over 50 abstracts.
    self.assertGreaterEqual(min(len(m) for m in self.mined), 25)
    self.assertGreater(np.mean([len(m) == 50 for m in self.mined]), 0.95)


class DenseNegativesTest(absltest.TestCase):

  def test_matches_exact_reference(self):
    corpus = [
        "apple banana",
        "banana",
        "cherry",
        "apple cherry",
        "banana split",
        "apple",
        "split pea soup",
        "banana apple cherry",
    ]
    ids = [f"d{i}" for i in range(len(corpus))]
    queries = ["apple banana", "split banana", "cherry"]
    exclude = [{"d0"}, {"d4", "d1"}, set()]
    encoder = BagOfWordsEncoder()
    got = negatives.dense_negatives(
        encoder, queries, ids, corpus, exclude, depth=4
    )
    self.assertEqual(encoder.calls, [corpus, queries])
    scores_qn = encoder(queries) @ encoder(corpus).T
    for row, excluded, mined in zip(reference_ranking(scores_qn), exclude, got):
      want = [ids[i] for i in row if ids[i] not in excluded][:4]
      self.assertEqual(mined, want)

  def test_depth_beyond_corpus(self):
    got = negatives.dense_negatives(
        BagOfWordsEncoder(),
        ["a"],
        ["x", "y", "z"],
        ["a", "b", "a b"],
        [{"y"}],
        depth=10,
    )
    self.assertCountEqual(got[0], ["x", "z"])

  def test_real_encoder_on_limit_small(self):
    from retrieval_jax import encoding  # pylint: disable=g-import-not-at-top
    from retrieval_jax import pretrained  # pylint: disable=g-import-not-at-top
    from retrieval_jax import sharding  # pylint: disable=g-import-not-at-top
    import jax  # pylint: disable=g-import-not-at-top

    try:
      loaded = pretrained.load_pretrained(pretrained.DEFAULT_MODEL)
    except FileNotFoundError as e:
      self.skipTest(str(e))
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    encoder = encoding.TextEncoder.from_model(loaded, mesh, max_length=16)
    collection = beir.load_beir(str(LIMIT_SMALL), "dev")
    query_ids, query_texts = collection.judged_queries()
    query_ids, query_texts = query_ids[:24], query_texts[:24]
    exclude = [set(collection.qrels[q]) for q in query_ids]
    docs = collection.doc_texts()
    mined = negatives.dense_negatives(
        lambda texts: encoder.encode(texts, progress=False),
        query_texts,
        collection.doc_ids,
        docs,
        exclude,
        depth=10,
        mesh=mesh,
    )
    # Check the lists against the encoder's own scores: in order, and no
    # unlisted, non-excluded doc scores above the last one listed.
    # One call for both sides: every text pads to max_length, so the rows
    # do not depend on their batch-mates.
    emb_xd = encoder.encode(query_texts + docs, progress=False)
    scores_qn = emb_xd[: len(query_texts)] @ emb_xd[len(query_texts) :].T
    index = {d: i for i, d in enumerate(collection.doc_ids)}
    for scores_n, excluded, got in zip(scores_qn, exclude, mined):
      self.assertLen(got, 10)
      self.assertEmpty(excluded.intersection(got))
      listed = scores_n[[index[d] for d in got]]
      self.assertTrue(np.all(np.diff(listed) <= 1e-5), listed)
      rest = [
          scores_n[i]
          for d, i in index.items()
          if d not in excluded and d not in got
      ]
      self.assertLessEqual(max(rest), listed[-1] + 1e-5)


class CacheTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.path = os.path.join(make_tempdir(self), "sub", "negs.json")
    self.calls = 0

  def compute(self, value="a"):
    def fn():
      self.calls += 1
      return [[value, "b"], []]

    return fn

  def test_hit_and_miss(self):
    key = {"method": "bm25", "corpus": io.fingerprint(["x"])}
    self.assertEqual(
        negatives.cached_negatives(self.path, key, self.compute()),
        [["a", "b"], []],
    )
    self.assertEqual(self.calls, 1)
    # Same key: read back, not recomputed (a restarted run).
    self.assertEqual(
        negatives.cached_negatives(self.path, dict(key), self.compute("z")),
        [["a", "b"], []],
    )
    self.assertEqual(self.calls, 1)
    # Changed input: recomputed and the file replaced.
    key2 = {"method": "bm25", "corpus": io.fingerprint(["y"])}
    self.assertEqual(
        negatives.cached_negatives(self.path, key2, self.compute("z")),
        [["z", "b"], []],
    )
    self.assertEqual(self.calls, 2)
    self.assertEqual(
        negatives.cached_negatives(self.path, key2, self.compute("q")),
        [["z", "b"], []],
    )
    self.assertEqual(self.calls, 2)
    # Only the cache file remains: temporary files were renamed away.
    self.assertEqual(os.listdir(os.path.dirname(self.path)), ["negs.json"])

  def test_corrupt_file_recomputes(self):
    os.makedirs(os.path.dirname(self.path))
    with open(self.path, "w") as f:
      f.write('{"format": 1, "negat')
    got = negatives.cached_negatives(self.path, {"k": 1}, self.compute())
    self.assertEqual(got, [["a", "b"], []])
    self.assertEqual(self.calls, 1)
    with open(self.path) as f:
      self.assertEqual(json.load(f)["negatives"], got)

  def test_failed_compute_leaves_old_file(self):
    negatives.cached_negatives(self.path, {"k": 1}, self.compute())

    def boom():
      raise RuntimeError("mining failed")

    with self.assertRaisesRegex(RuntimeError, "mining failed"):
      negatives.cached_negatives(self.path, {"k": 2}, boom)
    self.assertEqual(
        negatives.cached_negatives(self.path, {"k": 1}, self.compute("z")),
        [["a", "b"], []],
    )
    self.assertEqual(self.calls, 1)

  def test_bad_key_and_bad_result(self):
    with self.assertRaisesRegex(ValueError, "JSON-serialisable"):
      negatives.cached_negatives(self.path, {"k": object()}, self.compute())
    with self.assertRaisesRegex(ValueError, "lists of doc-id strings"):
      negatives.cached_negatives(self.path, {"k": 1}, lambda: [[1, 2]])
    self.assertFalse(os.path.exists(self.path))

  def test_mining_key_tracks_every_input(self):
    args = dict(
        method="bm25",
        settings=negatives.BM25_SETTINGS,
        query_ids=["q"],
        query_texts=["t"],
        corpus_ids=["d", "e"],
        corpus_texts=["x", "y"],
        exclude=[{"d"}],
        depth=5,
    )
    base = negatives.mining_key(**args)
    self.assertEqual(base, negatives.mining_key(**args))
    for name, value in [
        ("query_texts", ["u"]),
        ("corpus_texts", ["x", "z"]),
        ("exclude", [{"e"}]),
        ("depth", 6),
        ("settings", {**negatives.BM25_SETTINGS, "k1": 1.2}),
        ("method", "dense"),
    ]:
      self.assertNotEqual(
          base, negatives.mining_key(**{**args, name: value}), name
      )


def _toy_data() -> pipeline.TrainingData:
  return pipeline.TrainingData(
      [
          pipeline.TrainingExample("q1", "apple banana", ("d0",)),
          pipeline.TrainingExample("q2", "banana split", ("d3", "d1")),
      ],
      _TOY_IDS,
      _TOY_TEXTS,
      source="toy",
  )


class MineTest(absltest.TestCase):

  def test_bm25_through_cache(self):
    data = _toy_data()
    cache_dir = make_tempdir(self)
    with mock.patch.object(
        negatives, "bm25_negatives", wraps=negatives.bm25_negatives
    ) as miner:
      mined = negatives.mine(data, method="bm25", depth=2, cache_dir=cache_dir)
      again = negatives.mine(data, method="bm25", depth=2, cache_dir=cache_dir)
      self.assertEqual(miner.call_count, 1)
    self.assertTrue(os.path.isfile(os.path.join(cache_dir, "bm25.json")))
    self.assertEqual(mined.examples, again.examples)
    want = negatives.bm25_negatives(
        ["apple banana", "banana split"],
        _TOY_IDS,
        _TOY_TEXTS,
        [{"d0"}, {"d3", "d1"}],
        depth=2,
    )
    self.assertEqual([list(ex.negative_ids) for ex in mined.examples], want)
    self.assertEqual(want[0][0], "d4")
    self.assertEqual(
        negatives.mine(data, method="bm25", depth=2).examples, mined.examples
    )

  def test_dense_through_cache_keyed_by_the_encoder(self):
    data = _toy_data()
    cache_dir = make_tempdir(self)
    encoder = BagOfWordsEncoder()
    key = {"weights": "a", "pooling": "mean"}
    mined = negatives.mine(
        data,
        method="dense",
        depth=2,
        cache_dir=cache_dir,
        encode_fn=encoder,
        encoder_key=key,
    )
    want = negatives.dense_negatives(
        BagOfWordsEncoder(),
        ["apple banana", "banana split"],
        _TOY_IDS,
        _TOY_TEXTS,
        [{"d0"}, {"d3", "d1"}],
        depth=2,
    )
    self.assertEqual([list(ex.negative_ids) for ex in mined.examples], want)
    self.assertLen(encoder.calls, 2)
    # Same encoder key: read back without encoding.
    negatives.mine(
        data,
        method="dense",
        depth=2,
        cache_dir=cache_dir,
        encode_fn=encoder,
        encoder_key=dict(key),
    )
    self.assertLen(encoder.calls, 2)
    # Another encoder (e.g. fine-tuned weights): mined again.
    negatives.mine(
        data,
        method="dense",
        depth=2,
        cache_dir=cache_dir,
        encode_fn=encoder,
        encoder_key={**key, "weights": "b"},
    )
    self.assertLen(encoder.calls, 4)

  def test_bad_arguments(self):
    data = _toy_data()
    with self.assertRaisesRegex(ValueError, "needs encode_fn"):
      negatives.mine(data, method="dense")
    with self.assertRaisesRegex(ValueError, "needs encoder_key"):
      negatives.mine(
          data,
          method="dense",
          encode_fn=BagOfWordsEncoder(),
          cache_dir=make_tempdir(self),
      )
    with self.assertRaisesRegex(ValueError, "method must be one of"):
      negatives.mine(data, method="splade")


class EncoderKeyTest(absltest.TestCase):

  def test_tracks_weights_names_and_options(self):
    params = {"w": np.ones((2, 3), np.float32), "b": np.zeros(3, np.float32)}
    base = negatives.encoder_key(params, pooling="mean")
    self.assertEqual(
        base,
        negatives.encoder_key(
            {k: v.copy() for k, v in params.items()}, pooling="mean"
        ),
    )
    self.assertEqual(base["pooling"], "mean")
    changed = dict(params, w=params["w"] + 1e-3)
    renamed = {"w2": params["w"], "b": params["b"]}
    for other in (
        negatives.encoder_key(changed, pooling="mean"),
        negatives.encoder_key(renamed, pooling="mean"),
        negatives.encoder_key(params, pooling="cls"),
    ):
      self.assertNotEqual(base, other)
    json.dumps(base)  # Goes into the JSON cache file.

  def test_accepts_typed_rng_keys(self):
    import jax  # pylint: disable=g-import-not-at-top

    params = {"w": np.ones(2, np.float32)}
    one = negatives.encoder_key({**params, "key": jax.random.key(0)})
    self.assertNotEqual(
        one, negatives.encoder_key({**params, "key": jax.random.key(1)})
    )


if __name__ == "__main__":
  absltest.main()
