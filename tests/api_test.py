"""The notebook API: load, encode, index, search.

Oracles: dense search equals a NumPy cosine ranking of the API's own
embeddings, which equal the `TextEncoder`'s; a document's own text finds
that document first; the BM25 index equals `search.bm25`'s ranking.
"""

from absl.testing import absltest
import numpy as np

import retrieval_jax
from retrieval_jax.data import beir
from retrieval_jax.search import bm25
import test_util


class ApiTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    collection = beir.load_beir(test_util.LIMIT_SMALL, split="test")
    cls.corpus = dict(zip(collection.doc_ids, collection.doc_texts()))
    _, cls.queries = collection.judged_queries()
    cls.queries = cls.queries[:8]
    cls.enc = retrieval_jax.load("all-MiniLM-L6-v2", max_length=64)

  def test_dense_index_matches_numpy_ranking(self):
    index = retrieval_jax.index(self.corpus, self.enc)
    ids, scores = index.search(self.queries, k=5)
    docs = self.enc.encode(list(self.corpus.values()))
    queries = self.enc.encode(self.queries)
    cos = queries @ docs.T  # Normalised embeddings (all-MiniLM-L6-v2).
    order = np.argsort(-cos, axis=1, kind="stable")[:, :5]
    doc_ids = list(self.corpus)
    self.assertEqual(ids, [[doc_ids[i] for i in row] for row in order])
    np.testing.assert_allclose(
        scores, np.take_along_axis(cos, order, 1), atol=1e-5
    )
    # A document's own text retrieves it first.
    first_id, first_text = next(iter(self.corpus.items()))
    self.assertEqual(index.search(first_text, k=1)[0], [[first_id]])

  def test_bm25_index_and_plain_list_corpus(self):
    texts = list(self.corpus.values())
    ids, scores = retrieval_jax.index(texts, kind="bm25").search(
        self.queries, k=3
    )
    want_scores, want_rows = bm25.Bm25Index.build(texts).search(self.queries, 3)
    self.assertEqual(
        ids, [[str(r) for r in row if r >= 0] for row in want_rows]
    )
    np.testing.assert_array_equal(scores, want_scores)
    with self.assertRaisesRegex(ValueError, "needs a model"):
      retrieval_jax.index(texts, kind="dense")


if __name__ == "__main__":
  absltest.main()
