"""Lucene BM25 as a retriever: index a corpus, score and rank queries.

bm25s with `SETTINGS` reproduces DATA.md's BM25 rows (SciFact test nDCG@10
0.671); `Bm25Index` is the one place BM25 is computed. Ranking is done here,
so ties go to the smaller corpus index; docs sharing no query term never come.
"""

from collections.abc import Sequence
import dataclasses
import time
from typing import Any

from absl import logging
import numpy as np

# DATA.md's baseline settings (Pyserini's defaults); part of BM25 cache keys.
SETTINGS = {
    "library": "bm25s",
    "method": "lucene",
    "k1": 0.9,
    "b": 0.4,
    "token_pattern": r"(?u)\b\w\w+\b",
    "lower": True,
    "stopwords": "en",
    "stemmer": "porter",
}


def top_indices(scores_n: np.ndarray, k: int) -> np.ndarray:
  """int64 [min(k, N)] best rows of [N] scores (score desc, index asc)."""
  n = scores_n.shape[0]
  if k < n:
    # Keep every row tied with the k-th score: the stable sort, not
    # argpartition's arbitrary choice, decides among ties.
    kth = scores_n[np.argpartition(-scores_n, k - 1)[k - 1]]
    candidates = np.flatnonzero(scores_n >= kth)
  else:
    candidates = np.arange(n)
  order = np.argsort(-scores_n[candidates], kind="stable")
  return candidates[order[:k]]


@dataclasses.dataclass
class Bm25Index:
  """A BM25 index of one corpus; build with `Bm25Index.build(texts)`.

  `retriever` is the bm25s index, `build_s` the seconds spent indexing.
  """

  retriever: Any
  num_docs: int
  settings: dict[str, Any]
  build_s: float

  @classmethod
  def build(
      cls,
      corpus_texts: Sequence[str],
      settings: dict[str, Any] | None = None,
      *,
      progress: bool = True,
  ) -> "Bm25Index":
    """Tokenizes and indexes non-empty `corpus_texts` (`beir.doc_text` rows).

    `progress`: bm25s's bars on stderr (tokenize, count, score).
    """
    if not corpus_texts:
      raise ValueError("the corpus is empty: there is nothing to index")
    import bm25s  # pylint: disable=g-import-not-at-top

    settings = dict(SETTINGS if settings is None else settings)
    start = time.perf_counter()
    retriever = bm25s.BM25(
        method=settings["method"], k1=settings["k1"], b=settings["b"]
    )
    index = cls(retriever, len(corpus_texts), settings, 0.0)
    retriever.index(
        index._tokenize(corpus_texts, return_ids=True, progress=progress),
        show_progress=progress,
    )
    index.build_s = time.perf_counter() - start
    return index

  def _tokenize(
      self, texts: Sequence[str], return_ids: bool, progress: bool = False
  ):
    import bm25s  # pylint: disable=g-import-not-at-top
    import Stemmer  # pylint: disable=g-import-not-at-top

    s = self.settings  # one analyzer for queries and documents
    return bm25s.tokenize(
        list(texts),
        return_ids=return_ids,
        lower=s["lower"],
        token_pattern=s["token_pattern"],
        stopwords=s["stopwords"],
        stemmer=Stemmer.Stemmer(s["stemmer"]),
        show_progress=progress,
    )

  def scores(self, query_texts: Sequence[str]) -> list[np.ndarray | None]:
    """Per query, float32 [N] scores, or None if no term is in the corpus."""
    # Strings: the corpus vocabulary drops terms no document contains.
    out = []
    for tokens in self._tokenize(query_texts, return_ids=False):
      token_ids = self.retriever.get_tokens_ids(tokens)
      out.append(
          np.asarray(self.retriever.get_scores_from_ids(token_ids), np.float32)
          if token_ids
          else None
      )
    return out

  def pair_scores(
      self, query_texts: Sequence[str], doc_rows: Sequence[int]
  ) -> np.ndarray:
    """float32 [P] scores of (query_texts[p], doc_rows[p]); rows < 0 score 0."""
    if len(query_texts) != len(doc_rows):
      raise ValueError(
          f"{len(query_texts)} queries for {len(doc_rows)} "
          "doc rows: expected one query per pair"
      )
    unique = sorted(set(query_texts))
    by_text = dict(zip(unique, self.scores(unique)))
    out = np.zeros(len(doc_rows), np.float32)
    for p, (text, row) in enumerate(zip(query_texts, doc_rows)):
      if row >= 0 and by_text[text] is not None:
        out[p] = by_text[text][row]
    return out

  def search(
      self, query_texts: Sequence[str], k: int
  ) -> tuple[np.ndarray, np.ndarray]:
    """Top k (<= N) docs per query, ties to the smaller corpus index.

    Returns (scores_qk float32, indices_qk int64), best first, padded with
    -inf and -1 (skipped by `trec_run.run_from_topk`) past the matches.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
      raise ValueError(f"k must be a positive integer, got {k!r}")
    k = min(k, self.num_docs)
    scores_qk = np.full((len(query_texts), k), -np.inf, np.float32)
    indices_qk = np.full((len(query_texts), k), -1, np.int64)
    for i, scores_n in enumerate(self.scores(query_texts)):
      if scores_n is None:
        continue
      ranked = top_indices(scores_n, k)
      ranked = ranked[scores_n[ranked] > 0]
      scores_qk[i, : len(ranked)] = scores_n[ranked]
      indices_qk[i, : len(ranked)] = ranked
    return scores_qk, indices_qk

  def size_bytes(self) -> int:
    """Bytes of the stored score matrix (data, indices, pointers)."""
    return int(
        sum(
            np.asarray(a).nbytes
            for a in self.retriever.scores.values()
            if hasattr(a, "nbytes")
        )
    )


def retrieve(
    query_texts: Sequence[str], corpus_texts: Sequence[str], k: int
) -> tuple[np.ndarray, np.ndarray]:
  """Indexes `corpus_texts` and returns `Bm25Index.search(query_texts, k)`."""
  index = Bm25Index.build(corpus_texts)
  start = time.perf_counter()
  out = index.search(query_texts, k)
  logging.info(
      "BM25: %d queries x %d docs, top %d, index %.1f s, search %.1f s",
      len(query_texts),
      len(corpus_texts),
      k,
      index.build_s,
      time.perf_counter() - start,
  )
  return out
