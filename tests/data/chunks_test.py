"""Document chunk batches (Revela's data), step-indexed.

Oracles: pieces by hand; every chunk a consecutive slice of its document's
tokens at its chunk number's offset, laid out [CLS] chunk [SEP]; per epoch
each document gives min(its chunks, k) distinct chunks, adjacent in the
stream; a batch a pure function of (seed, step) whatever was asked before,
and another seed another order.
"""

import collections

from absl.testing import absltest
import numpy as np

from retrieval_jax import pretrained
from retrieval_jax.data import beir
from retrieval_jax.data import chunks
from retrieval_jax.data import tokenizers
from test_util import LIMIT_SMALL


def _tokenizer():
  try:
    model_dir = pretrained.resolve_model_dir(pretrained.DEFAULT_MODEL)
  except FileNotFoundError as e:
    raise absltest.SkipTest(str(e))
  return tokenizers.WordPieceTokenizer.from_pretrained_dir(model_dir)


class SplitChunksTest(absltest.TestCase):

  def test_pieces_by_hand(self):
    ids = list(range(10))
    self.assertEqual(
        chunks.split_chunks(ids, 4, 2), [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    )
    self.assertEqual(
        chunks.split_chunks(ids, 4, 3), [[0, 1, 2, 3], [4, 5, 6, 7]]
    )
    self.assertEqual(chunks.split_chunks([1], 4, 2), [])


class ChunkLoaderTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tok = _tokenizer()
    _, titles, texts = beir.read_corpus(str(LIMIT_SMALL / "corpus.jsonl"))
    cls.doc_tokens = [
        cls.tok.tokenize_to_ids(beir.doc_text(t, x))
        for t, x in zip(titles, texts)
    ]

  def _loader(self, seed=0, batch_size=6, k=2):
    return chunks.ChunkLoader.from_beir(
        LIMIT_SMALL,
        self.tok,
        batch_size=batch_size,
        chunk_length=32,
        chunks_per_doc=k,
        seed=seed,
    )

  def test_chunks_are_slices_laid_out_with_specials(self):
    loader = self._loader()
    for step in (0, 5, 17):
      batch = loader.batch_at(step)
      for row in range(loader.batch_size):
        n = int(batch["chunk_mask"][row].sum())
        ids = batch["chunk_ids"][row]
        self.assertEqual(ids[0], self.tok.cls_id)
        self.assertEqual(ids[n - 1], self.tok.sep_id)
        np.testing.assert_array_equal(ids[n:], self.tok.pad_id)
        start = 30 * int(batch["chunk_index"][row])
        doc = self.doc_tokens[int(batch["chunk_doc"][row])]
        self.assertEqual(list(ids[1 : n - 1]), doc[start : start + 30])

  def test_an_epoch_gives_each_document_k_distinct_adjacent_chunks(self):
    loader = self._loader(batch_size=4, k=2)
    # LIMIT-small: 141-171 tokens, 5-6 chunks of 30 each; 46 docs x 2.
    self.assertEqual(loader.num_examples, 92)
    stream = []
    for step in range(92 // 4):
      batch = loader.batch_at(step)
      stream += list(zip(batch["chunk_doc"], batch["chunk_index"]))
    seen = collections.Counter(d for d, _ in stream)
    self.assertEqual(set(seen.values()), {2})
    self.assertLen(set(stream), 92)  # no chunk twice
    for a in range(0, 92, 2):  # a document's chunks are neighbours
      self.assertEqual(stream[a][0], stream[a + 1][0])
      self.assertLess(stream[a][1], stream[a + 1][1])
    # The next epoch starts over in another order.
    nxt = loader.batch_at(23)
    self.assertNotEqual(list(nxt["chunk_doc"]), [d for d, _ in stream[:4]])

  def test_short_documents_give_fewer_chunks_and_batches_straddle(self):
    # One WordPiece per letter: 2 tokens (1 chunk of 3), 9 (3 chunks), none.
    loader = chunks.ChunkLoader(
        ["short", "long", "empty"],
        ["", "", ""],
        ["x y", "a b c d e f g h i", ""],
        self.tok,
        batch_size=2,
        chunk_length=5,
        chunks_per_doc=2,
        seed=3,
        min_tokens=1,
    )
    self.assertEqual((loader.num_examples, loader.steps_per_epoch), (3, 2))
    items = []
    for step in range(3):  # two epochs of 3 items
      batch = loader.batch_at(step)
      items += list(zip(batch["chunk_doc"], batch["chunk_index"]))
    for epoch in (items[:3], items[3:]):
      self.assertEqual(sorted(d for d, _ in epoch), [0, 1, 1])
      long_chunks = [n for d, n in epoch if d == 1]
      self.assertLess(long_chunks[0], long_chunks[1])
      self.assertEqual([n for d, n in epoch if d == 0], [0])
      docs = [d for d, _ in epoch]
      self.assertEqual(abs(docs.index(1) - (2 - docs[::-1].index(1))), 1)

  def test_batches_are_a_function_of_seed_and_step(self):
    first = self._loader().batch_at(9)
    other = self._loader()
    for step in (3, 40, 1):
      other.batch_at(step)
    again = other.batch_at(9)
    for key, value in first.items():
      np.testing.assert_array_equal(again[key], value)
    reseeded = self._loader(seed=1).batch_at(9)
    self.assertFalse(np.array_equal(reseeded["chunk_ids"], first["chunk_ids"]))

  def test_bad_settings_are_named(self):
    with self.assertRaisesRegex(ValueError, "chunks_per_doc must be >= 1"):
      self._loader(k=0)
    with self.assertRaisesRegex(ValueError, "batch_size must be >= 2"):
      self._loader(batch_size=1)


if __name__ == "__main__":
  absltest.main()
