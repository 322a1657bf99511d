"""Evaluator plug-ins: each runs a model on held-out data and scores it.

`RetrievalEvaluator` encodes a collection's corpus and judged queries, runs
exact top-k search and scores the run with `ir_metrics` (trec_eval's
conventions). The evaluate mode and periodic evaluation during training both
use it, so the numbers are computed one way only.
"""

import dataclasses
from absl import logging
import time
from collections.abc import Sequence

import numpy as np

from retrieval_jax.data import beir
from retrieval_jax.evaluation import ir_metrics
from retrieval_jax.evaluation import trec_run
from retrieval_jax.search import exact_topk


@dataclasses.dataclass
class RetrievalResult:
  """What one retrieval evaluation produced.

  Attributes:
    metrics: mean value per measure, e.g. {"ndcg@10": 0.645}.
    per_query: {measure: {query_id: value}}.
    run: {query_id: {doc_id: score}} (top-k per query).
    timing: seconds spent per phase ("encode_corpus", "encode_queries",
      "search", "metrics") and throughput.
    query_ids: the evaluated queries, in query-file order.
    scores_qk: float32 [Q, k] search scores, best first.
    indices_qk: [Q, k] corpus rows of those scores.
  """
  metrics: dict[str, float]
  per_query: dict[str, dict[str, float]]
  run: dict[str, dict[str, float]]
  timing: dict[str, float]
  query_ids: list[str]
  scores_qk: np.ndarray
  indices_qk: np.ndarray


class RetrievalEvaluator:
  """Dense retrieval evaluation of one BEIR collection split."""

  def __init__(self, collection: beir.BeirCollection, *,
               measures: Sequence[str] = ir_metrics.DEFAULT_MEASURES,
               relevance_level: int = 1, top_k: int = 1000,
               metric: str = "cosine", chunk_size: int = 16384,
               max_queries: int = 0, name: str = "retrieval"):
    """Selects the judged queries and checks the measure names.

    Args:
      collection: corpus, queries and the split's qrels.
      measures: measure names understood by `ir_metrics.evaluate`.
      relevance_level: binary-relevance threshold (trec_eval's `-l`).
      top_k: documents retrieved per query (clipped to the corpus size).
      metric: "cosine" or "dot".
      chunk_size: corpus rows scored per search step.
      max_queries: evaluate only the first N judged queries (0 = all).
      name: prefix for logs.
    """
    self.collection = collection
    self.measures = tuple(measures)
    # Fail on a misspelt measure now, not after an hour of encoding.
    ir_metrics.evaluate({"q": {"d": 1}}, {"q": {"d": 1.0}}, self.measures)
    self.relevance_level = relevance_level
    self.top_k = min(top_k, len(collection.doc_ids))
    self.metric = metric
    self.chunk_size = chunk_size
    self.name = name
    # Queries with judgments in this split, in query-file order (trec_eval
    # averages over queries present in both run and qrels).
    query_ids = [q for q in collection.query_ids if q in collection.qrels]
    if max_queries:
      query_ids = query_ids[:max_queries]
    if not query_ids:
      raise ValueError(f"{name}: no query of the collection has judgments")
    self.query_ids = query_ids
    text_of = dict(zip(collection.query_ids, collection.queries))
    self.query_texts = [text_of[q] for q in query_ids]
    self.qrels = {q: collection.qrels[q] for q in query_ids}

  def run(self, encoder, *, batch_size: int = 64, pad_multiple: int = 16,
          sort_by_length: bool = True, progress: bool = True,
          mesh=None) -> RetrievalResult:
    """Encodes, searches and scores.

    Args:
      encoder: a `TextEncoder` (anything with its `encode` signature).
      batch_size, pad_multiple, sort_by_length, progress: passed to `encode`.
      mesh: devices the corpus is sharded over during search (None = all).

    Returns:
      The metrics, per-query values, run and timings.
    """
    kwargs = dict(batch_size=batch_size, pad_multiple=pad_multiple,
                  sort_by_length=sort_by_length, progress=progress)
    timing = {}
    start = time.perf_counter()
    docs_nd = encoder.encode(self.collection.doc_texts(),
                             desc=f"{self.name}: corpus", **kwargs)
    timing["encode_corpus_s"] = time.perf_counter() - start
    start = time.perf_counter()
    queries_qd = encoder.encode(self.query_texts,
                                desc=f"{self.name}: queries", **kwargs)
    timing["encode_queries_s"] = time.perf_counter() - start
    start = time.perf_counter()
    scores_qk, indices_qk = exact_topk.exact_topk(
        queries_qd, docs_nd, self.top_k, metric=self.metric,
        chunk_size=self.chunk_size, mesh=mesh)
    timing["search_s"] = time.perf_counter() - start
    start = time.perf_counter()
    run = trec_run.run_from_topk(self.query_ids, self.collection.doc_ids,
                                 scores_qk, indices_qk)
    metrics, per_query = ir_metrics.evaluate(
        self.qrels, run, self.measures, relevance_level=self.relevance_level)
    timing["metrics_s"] = time.perf_counter() - start
    timing["corpus_texts_per_s"] = (
        len(self.collection.doc_ids) / max(timing["encode_corpus_s"], 1e-9))
    logging.info("%s: %s", self.name, metrics)
    return RetrievalResult(metrics=metrics, per_query=per_query, run=run,
                           timing=timing, query_ids=self.query_ids,
                           scores_qk=scores_qk, indices_qk=indices_qk)
