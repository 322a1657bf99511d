"""Tests of the Lucene BM25 retriever against the formula by hand."""

import math

from absl.testing import absltest
import numpy as np

from retrieval_jax.search import bm25

# Words chosen so the analyzer (lower-case, stop list, Porter) keeps them
# as they are: no stop words, no suffixes the stemmer would cut.
_DOCS = [
    "apple banana apple",
    "banana cherry",
    "cherry cherry cherry date",
    "grape",
]


def _lucene_bm25(query_terms, docs, k1=0.9, b=0.4):
  """Lucene's BM25 of every doc, straight from the formula."""
  tokens = [d.split() for d in docs]
  n = len(docs)
  avgdl = sum(map(len, tokens)) / n
  out = np.zeros(n)
  for term in set(query_terms):
    df = sum(term in t for t in tokens)
    if not df:
      continue
    idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
    for i, t in enumerate(tokens):
      tf = t.count(term)
      out[i] += idf * tf / (tf + k1 * (1 - b + b * len(t) / avgdl))
  return out


class Bm25Test(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.index = bm25.Bm25Index.build(_DOCS)

  def test_scores_match_the_formula(self):
    for query in ["apple", "banana cherry", "cherry date grape"]:
      (got,) = self.index.scores([query])
      np.testing.assert_allclose(
          got, _lucene_bm25(query.split(), _DOCS), rtol=1e-5
      )

  def test_unknown_terms_give_no_scores(self):
    self.assertEqual(self.index.scores(["zebra"]), [None])

  def test_search_ranks_pads_and_drops_zero_scores(self):
    scores, indices = self.index.search(["banana", "zebra"], 3)
    want = _lucene_bm25(["banana"], _DOCS)
    # Docs 0 and 1 contain "banana"; the others score 0 and are dropped.
    self.assertEqual(indices[0].tolist()[2], -1)
    self.assertEqual(sorted(indices[0, :2].tolist()), [0, 1])
    np.testing.assert_allclose(
        scores[0, :2], np.sort(want)[::-1][:2], rtol=1e-5
    )
    self.assertTrue(np.isneginf(scores[0, 2]))
    self.assertEqual(indices[1].tolist(), [-1, -1, -1])

  def test_ties_go_to_the_smaller_index(self):
    index = bm25.Bm25Index.build(["kiwi lemon", "lemon kiwi", "melon"])
    _, indices = index.search(["kiwi"], 2)
    self.assertEqual(indices[0].tolist(), [0, 1])

  def test_pair_scores(self):
    got = self.index.pair_scores(
        ["cherry", "cherry", "zebra", "apple"], [2, -1, 0, 0]
    )
    want = [
        _lucene_bm25(["cherry"], _DOCS)[2],
        0.0,
        0.0,
        _lucene_bm25(["apple"], _DOCS)[0],
    ]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    with self.assertRaisesRegex(ValueError, "one query per pair"):
      self.index.pair_scores(["a"], [0, 1])

  def test_top_indices(self):
    scores = np.array([1.0, 3.0, 3.0, 2.0, 3.0])
    self.assertEqual(bm25.top_indices(scores, 2).tolist(), [1, 2])
    self.assertEqual(bm25.top_indices(scores, 9).tolist(), [1, 2, 4, 3, 0])

  def test_bad_input(self):
    with self.assertRaisesRegex(ValueError, "empty"):
      bm25.Bm25Index.build([])
    with self.assertRaisesRegex(ValueError, "positive integer"):
      self.index.search(["apple"], 0)
    self.assertGreater(self.index.size_bytes(), 0)


if __name__ == "__main__":
  absltest.main()
