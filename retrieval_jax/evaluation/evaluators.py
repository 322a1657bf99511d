"""Evaluator plug-ins: each runs a model on held-out data and scores it.

`RetrievalEvaluator` (encode, exact top-k, `ir_metrics`) serves the evaluate
mode and evaluation during training alike, so numbers are computed one way.
"""

import dataclasses
from absl import logging
import pathlib
import time
from collections.abc import Sequence

import numpy as np

from retrieval_jax.data import beir
from retrieval_jax.evaluation import ir_metrics
from retrieval_jax.evaluation import trec_run
from retrieval_jax.search import exact_topk


@dataclasses.dataclass
class RetrievalResult:
  """One evaluation: mean `metrics`, `per_query` {measure: {qid: value}}, `run`.

  timing: seconds per phase and throughput; scores_qk float32 and indices_qk
  [Q, k] corpus rows, best first, for `query_ids` in query-file order.
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

  def __init__(
      self,
      collection: beir.BeirCollection,
      *,
      measures: Sequence[str] = ir_metrics.DEFAULT_MEASURES,
      relevance_level: int = 1,
      top_k: int = 1000,
      metric: str = "cosine",
      chunk_size: int = 16384,
      max_queries: int = 0,
      name: str = "retrieval",
  ):
    """Selects the judged queries (the first `max_queries`, 0 = all).

    relevance_level is trec_eval's `-l`; top_k is clipped to the corpus size.
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
    # Judged queries in query-file order (trec_eval averages over these).
    query_ids = [q for q in collection.query_ids if q in collection.qrels]
    if max_queries:
      query_ids = query_ids[:max_queries]
    if not query_ids:
      raise ValueError(f"{name}: no query of the collection has judgments")
    self.query_ids = query_ids
    text_of = dict(zip(collection.query_ids, collection.queries))
    self.query_texts = [text_of[q] for q in query_ids]
    self.qrels = {q: collection.qrels[q] for q in query_ids}

  def run(
      self,
      encoder,
      *,
      batch_size: int = 64,
      pad_multiple: int = 16,
      sort_by_length: bool = True,
      progress: bool = True,
      mesh=None,
  ) -> RetrievalResult:
    """Encodes with a `TextEncoder`, searches over `mesh` and scores."""
    docs_nd, queries_qd, timing = self.encode(
        encoder,
        batch_size=batch_size,
        pad_multiple=pad_multiple,
        sort_by_length=sort_by_length,
        progress=progress,
    )
    start = time.perf_counter()
    scores_qk, indices_qk = exact_topk.exact_topk(
        queries_qd,
        docs_nd,
        self.top_k,
        metric=self.metric,
        chunk_size=self.chunk_size,
        mesh=mesh,
    )
    timing["search_s"] = time.perf_counter() - start
    return self.score_ranking(scores_qk, indices_qk, timing)

  def encode(
      self, encoder, **kwargs
  ) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """(docs_nd, queries_qd float32 in corpus / query_ids order, timing).

    The encoder's document / query prompts are prepended (`query_texts` stay
    raw for the retrievers that read text).
    """
    timing = {}
    start = time.perf_counter()
    docs_nd = encoder.encode_documents(
        self.collection.doc_texts(), desc=f"{self.name}: corpus", **kwargs
    )
    timing["encode_corpus_s"] = time.perf_counter() - start
    start = time.perf_counter()
    queries_qd = encoder.encode_queries(
        self.query_texts, desc=f"{self.name}: queries", **kwargs
    )
    timing["encode_queries_s"] = time.perf_counter() - start
    timing["corpus_texts_per_s"] = len(self.collection.doc_ids) / max(
        timing["encode_corpus_s"], 1e-9
    )
    return docs_nd, queries_qd, timing

  def score_ranking(
      self,
      scores_qk: np.ndarray,
      indices_qk: np.ndarray,
      timing: dict[str, float] | None = None,
  ) -> RetrievalResult:
    """Scores any retriever's [Q, k] ranking of `query_ids` (-inf / -1 pad)."""
    if len(indices_qk) != len(self.query_ids):
      raise ValueError(
          f"{self.name}: {len(indices_qk)} ranked rows for "
          f"{len(self.query_ids)} queries"
      )
    run = trec_run.run_from_topk(
        self.query_ids, self.collection.doc_ids, scores_qk, indices_qk
    )
    return self.score_run(
        run, timing, scores_qk=scores_qk, indices_qk=indices_qk
    )

  def score_run(
      self,
      run: dict[str, dict[str, float]],
      timing: dict[str, float] | None = None,
      *,
      scores_qk: np.ndarray | None = None,
      indices_qk: np.ndarray | None = None,
  ) -> RetrievalResult:
    """Scores a run {qid: {doc id: score}}; absent queries score 0.

    scores_qk / indices_qk default to the run in trec_eval's order.
    """
    timing = dict(timing or {})
    start = time.perf_counter()
    metrics, per_query = ir_metrics.evaluate(
        self.qrels, run, self.measures, relevance_level=self.relevance_level
    )
    timing["metrics_s"] = time.perf_counter() - start
    if indices_qk is None:
      scores_qk, indices_qk = _arrays_from_run(
          run, self.query_ids, self.collection.doc_ids
      )
    logging.info("%s: %s", self.name, metrics)
    return RetrievalResult(
        metrics=metrics,
        per_query=per_query,
        run=run,
        timing=timing,
        query_ids=self.query_ids,
        scores_qk=np.asarray(scores_qk),
        indices_qk=np.asarray(indices_qk),
    )


def _arrays_from_run(run, query_ids, doc_ids):
  """[Q, k] scores and corpus rows of a run, trec_eval's order, padded."""
  row_of = {d: i for i, d in enumerate(doc_ids)}
  ranked = [ir_metrics.trec_eval_sorted(run.get(q, {})) for q in query_ids]
  k = max((len(r) for r in ranked), default=0)
  scores_qk = np.full((len(query_ids), k), -np.inf, np.float32)
  indices_qk = np.full((len(query_ids), k), -1, np.int64)
  for i, pairs in enumerate(ranked):
    for j, (doc, score) in enumerate(pairs):
      scores_qk[i, j], indices_qk[i, j] = score, row_of[doc]
  return scores_qk, indices_qk


class RerankEvaluator:
  """Re-ranking evaluation: a pair scorer re-orders first-stage candidates.

  The run holds only each judged query's first `depth` candidates, re-ranked.
  """

  def __init__(
      self,
      collection: beir.BeirCollection,
      candidates: dict[str, Sequence[str]],
      *,
      depth: int,
      measures: Sequence[str] = ir_metrics.DEFAULT_MEASURES,
      relevance_level: int = 1,
      name: str = "rerank",
  ):
    """candidates: {qid: doc ids in first-stage order}, the queries evaluated."""
    ir_metrics.evaluate({"q": {"d": 1}}, {"q": {"d": 1.0}}, measures)
    if depth < 1:
      raise ValueError(f"{name}: depth must be >= 1, got {depth}")
    self.collection = collection
    self.measures = tuple(measures)
    self.relevance_level = relevance_level
    self.depth = depth
    self.name = name
    row_of = {d: i for i, d in enumerate(collection.doc_ids)}
    text_of = dict(zip(collection.query_ids, collection.queries))
    self.query_ids = [q for q in collection.query_ids if q in candidates]
    if not self.query_ids:
      raise ValueError(f"{name}: no candidates for any query of the collection")
    # Corpus rows, -1 past the end of a short list.
    self.candidates_qk = np.full((len(self.query_ids), depth), -1, np.int64)
    for i, q in enumerate(self.query_ids):
      docs = list(candidates[q])[:depth]
      unknown = [d for d in docs if d not in row_of]
      if unknown:
        raise ValueError(
            f"{name}: query {q!r}: candidate {unknown[0]!r} is "
            "not in the corpus"
        )
      self.candidates_qk[i, : len(docs)] = [row_of[d] for d in docs]
    self.query_texts = [text_of[q] for q in self.query_ids]
    self.qrels = {q: collection.qrels.get(q, {}) for q in self.query_ids}

  def run(self, scorer) -> RetrievalResult:
    """Scores every candidate pair, re-ranks and evaluates.

    scorer: (query_rows [Q], doc_rows [Q, depth]) -> [Q, depth] scores, rows of
    `self.query_texts` and `collection.doc_texts()` (e.g. `PairScorer`).
    """
    start = time.perf_counter()
    scores_qk, indices_qk = rerank(scorer, self.candidates_qk)
    timing = {"score_pairs_s": time.perf_counter() - start}
    real_qk = self.candidates_qk >= 0
    timing["pairs_per_s"] = real_qk.sum() / max(timing["score_pairs_s"], 1e-9)
    run = trec_run.run_from_topk(
        self.query_ids, self.collection.doc_ids, scores_qk, indices_qk
    )
    metrics, per_query = ir_metrics.evaluate(
        self.qrels, run, self.measures, relevance_level=self.relevance_level
    )
    logging.info("%s: %s", self.name, metrics)
    return RetrievalResult(
        metrics=metrics,
        per_query=per_query,
        run=run,
        timing=timing,
        query_ids=self.query_ids,
        scores_qk=scores_qk,
        indices_qk=indices_qk,
    )


def write_result(result: RetrievalResult, out_dir, *, tag: str) -> None:
  """`run.trec` and `metrics_per_query.json` of a result, into `out_dir`."""
  from retrieval_jax import io  # pylint: disable=g-import-not-at-top

  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  trec_run.write_run(out_dir / "run.trec", result.run, tag=tag)
  io.write_json_atomic(out_dir / "metrics_per_query.json", result.per_query)


def rerank(scorer, candidates_qk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Re-orders int candidates_qk (-1 past a list's end) by `scorer` scores.

  Returns (scores_qk float32, indices_qk), best first; -1 slots score -inf
  and stay last; ties keep the first stage's order.
  """
  real_qk = candidates_qk >= 0
  scores_qk = np.full(real_qk.shape, -np.inf, np.float32)
  counts_q = real_qk.sum(1)
  for k in np.unique(counts_q):  # by list length: no padding pair is scored
    rows = np.flatnonzero(counts_q == k)
    if k:
      scores_qk[rows, :k] = scorer(rows, candidates_qk[rows, :k])
  order_qk = np.argsort(-scores_qk, axis=1, kind="stable")
  return (
      np.take_along_axis(scores_qk, order_qk, axis=1),
      np.take_along_axis(candidates_qk, order_qk, axis=1),
  )


def first_stage(
    kind: str,
    collection: beir.BeirCollection,
    *,
    depth: int,
    measures: Sequence[str],
    max_queries: int = 0,
    encoder=None,
    batch_size: int = 64,
    mesh=None,
) -> tuple[dict[str, list[str]], dict[str, float]]:
  """({qid: doc ids in rank order}, metrics): a first stage for re-ranking.

  kind: "dense" (exact search with `encoder`, `batch_size`, `mesh`) or "bm25"
  (`search.bm25`, may find fewer than `depth`).
  """
  if kind == "dense":
    if encoder is None:
      raise ValueError("a dense first stage needs an encoder")
    result = RetrievalEvaluator(
        collection,
        measures=measures,
        top_k=depth,
        max_queries=max_queries,
        name="first stage",
    ).run(encoder, batch_size=batch_size, mesh=mesh)
    ids = collection.doc_ids
    return (
        {
            q: [ids[i] for i in row if i >= 0]
            for q, row in zip(result.query_ids, result.indices_qk.tolist())
        },
        result.metrics,
    )
  if kind != "bm25":
    raise ValueError(f"first stage {kind!r}: expected 'dense' or 'bm25'")
  from retrieval_jax.search import bm25  # pylint: disable=g-import-not-at-top

  query_ids, query_texts = collection.judged_queries()
  if max_queries:
    query_ids, query_texts = query_ids[:max_queries], query_texts[:max_queries]
  index = bm25.Bm25Index.build(collection.doc_texts())
  scores_qk, indices_qk = index.search(query_texts, depth)
  run = trec_run.run_from_topk(
      query_ids, collection.doc_ids, scores_qk, indices_qk
  )
  ids = collection.doc_ids
  ranked = [[ids[i] for i in row if i >= 0] for row in indices_qk.tolist()]
  metrics, _ = ir_metrics.evaluate(
      {q: collection.qrels[q] for q in query_ids}, run, measures
  )
  return dict(zip(query_ids, ranked)), metrics
