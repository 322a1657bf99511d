"""Chunks of corpus documents, several of one document per batch (Revela).

Each document (`beir.doc_text`, tokenized once) is cut into consecutive
chunks of `chunk_length - 2` tokens ([CLS] and [SEP] complete the width); a
trailing piece shorter than `min_tokens` is dropped, and so are documents
left without a chunk. Epoch e visits the documents in
`default_rng([seed, e]).permutation` order; document d gives min(its chunks,
`chunks_per_doc`) chunks, drawn by `default_rng([seed, e, d])` and kept in
document order, as consecutive items of the epoch's stream. Batch t is
items [t*B, (t+1)*B) of the stream of epochs (a document's chunks may
straddle two batches): a pure function of (corpus, settings, seed, t), so a
resumed run sees the same batches. Chunks of one document are each other's
useful neighbours, the other documents' chunks the distractors.
"""

from collections.abc import Sequence
import functools
import time

from absl import logging
import numpy as np

from retrieval_jax.data import beir
from retrieval_jax.data import pipeline
from retrieval_jax.data import spans

TASK = "chunks"  # `config.data.spans.task` of a chunk-batch run


def split_chunks(
    ids: Sequence[int], size: int, min_tokens: int
) -> list[list[int]]:
  """Consecutive pieces of `size` ids; a last piece < min_tokens dropped."""
  pieces = [list(ids[s : s + size]) for s in range(0, len(ids), size)]
  if pieces and len(pieces[-1]) < min_tokens:
    pieces.pop()
  return pieces


class ChunkLoader(spans.CorpusLoader):
  """Deterministic, step-indexed batches of document chunks (module doc).

  Batches: chunk_ids / chunk_mask int32 [B, chunk_length] ([CLS] chunk
  [SEP], right-padded), chunk_doc int32 [B] (the document's corpus row),
  chunk_index int32 [B] (its chunk number in the document).
  """

  def __init__(
      self,
      doc_ids: Sequence[str],
      titles: Sequence[str],
      texts: Sequence[str],
      tokenizer,
      *,
      batch_size: int,
      chunk_length: int,
      chunks_per_doc: int,
      seed: int,
      min_tokens: int = 8,
      source: str = "<memory>",
  ):
    """Checks the settings, tokenizes and cuts the corpus once."""
    self.batch_size = pipeline.check_int("batch_size", batch_size, 2)
    self.chunk_length = pipeline.check_int("chunk_length", chunk_length, 3)
    self.chunks_per_doc = pipeline.check_int(
        "chunks_per_doc", chunks_per_doc, 1
    )
    self.min_tokens = pipeline.check_int("min_tokens", min_tokens, 1)
    self.seed = pipeline.check_int("seed", seed, 0)
    self.tokenizer, self.source = tokenizer, source
    self.num_docs = len(doc_ids)
    start = time.perf_counter()
    size = self.chunk_length - 2
    # _chunks[x]: the chunk id lists of usable document x (row _rows[x]).
    self._chunks, rows = [], []
    for d, (title, text) in enumerate(zip(titles, texts)):
      ids = tokenizer.tokenize_to_ids(beir.doc_text(title, text))
      pieces = split_chunks(ids, size, min(self.min_tokens, size))
      if pieces:
        self._chunks.append(pieces)
        rows.append(d)
    if not self._chunks:
      raise ValueError(
          f"{source}: no document has {self.min_tokens} tokens for a chunk"
      )
    self._rows = np.array(rows, np.int32)
    # Items each usable document gives per epoch.
    self._take = np.minimum(
        [len(c) for c in self._chunks], self.chunks_per_doc
    ).astype(np.int64)
    self._epoch = functools.lru_cache(maxsize=8)(self._epoch_layout)
    logging.info(
        "ChunkLoader: %d chunks of %d tokens from %d of %d documents in %.1f s",
        sum(len(c) for c in self._chunks),
        size,
        len(self._chunks),
        self.num_docs,
        time.perf_counter() - start,
    )

  @property
  def num_examples(self) -> int:
    """Chunks per epoch (the stream's epoch length)."""
    return int(self._take.sum())

  def _epoch_layout(self, epoch: int):
    """(document order, end offset of each one's items in the stream)."""
    order = np.random.default_rng([self.seed, epoch]).permutation(
        len(self._chunks)
    )
    return order, np.cumsum(self._take[order])

  def chosen(self, epoch: int, doc: int) -> np.ndarray:
    """Sorted chunk numbers usable document `doc` gives in `epoch`."""
    rng = np.random.default_rng([self.seed, epoch, doc])
    count = len(self._chunks[doc])
    return np.sort(rng.choice(count, int(self._take[doc]), replace=False))

  def items_at(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """(usable document, chunk number) int64 [B] of batch `step`."""
    step = pipeline.check_int("step", step, 0)
    positions = step * self.batch_size + np.arange(self.batch_size)
    docs, chunk_numbers = [], []
    for p in positions:
      epoch, offset = divmod(int(p), self.num_examples)
      order, ends = self._epoch(epoch)
      k = int(np.searchsorted(ends, offset, side="right"))
      doc = int(order[k])
      slot = offset - (int(ends[k - 1]) if k else 0)
      docs.append(doc)
      chunk_numbers.append(int(self.chosen(epoch, doc)[slot]))
    return np.array(docs, np.int64), np.array(chunk_numbers, np.int64)

  def batch_at(self, step: int) -> dict[str, np.ndarray]:
    """The batch of step `step` (class docstring)."""
    docs_b, numbers_b = self.items_at(step)
    tok, width = self.tokenizer, self.chunk_length
    rows = [
        [tok.cls_id, *self._chunks[d][n], tok.sep_id]
        for d, n in zip(docs_b, numbers_b)
    ]
    ids, lengths = pipeline.pad_tokens(rows, width, tok.pad_id)
    return {
        "chunk_ids": ids,
        "chunk_mask": pipeline.length_mask(lengths, width),
        "chunk_doc": self._rows[docs_b],
        "chunk_index": numbers_b.astype(np.int32),
    }

  def describe(self) -> str:
    """One line of counts for the training log."""
    return (
        f"{self.num_examples} chunks/epoch (<= {self.chunks_per_doc} of "
        f"{self.chunk_length - 2} tokens per document) from "
        f"{len(self._chunks)} of {self.num_docs} documents ({self.source}), "
        f"{self.steps_per_epoch} steps/epoch at batch {self.batch_size}"
    )
