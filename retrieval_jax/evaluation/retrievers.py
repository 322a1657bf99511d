"""The retrievers of the evaluate mode, one per `config.retriever.kind`.

dense (exact top-k), bm25, hybrid (dense + BM25 fusion), dense_prf (vector
PRF), splade / inference_free (a trained run over a scipy inverted index),
colbert (MaxSim re-ranking of a first stage's top `rerank_depth`, with
optional pruning) and rerank (a trained cross-encoder run re-scoring a
first stage). Every dense search (dense, dense_prf, hybrid's dense half, a
dense first stage) goes through `config.retriever.index`: exact, or a
`search/compression.py` index (`dense_searcher`). Each returns a `RetrievalResult` and `stats` measured the same
way for every kind: index bytes, "search_ms_per_query" (one query at a
time, encoded, after a warm-up) and "encode_ms_per_query" (batch query
encoding / queries). Dense embeddings, sparse indexes and ColBERT vectors
are cached in `config.encode.cache_dir` (default the workdir), keyed by the
model and the texts.
"""

from collections.abc import Callable
import functools
import json
import os
import pathlib
import time
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

from retrieval_jax import errors
from retrieval_jax import io
from retrieval_jax.data import embedding_shards
from retrieval_jax.evaluation import evaluators

KINDS = (
    "dense",
    "bm25",
    "hybrid",
    "dense_prf",
    "splade",
    "inference_free",
    "colbert",
    "rerank",
)
# Retrievers that embed with a dense encoder (a pretrained model or a
# trained bi-encoder run).
DENSE_KINDS = ("dense", "hybrid", "dense_prf")
# First stages a ColBERT re-ranking can take its candidates from.
FIRST_STAGES = ("bm25", "dense", "splade", "inference_free")
PRF_METHODS = ("average", "rocchio")
# config.retriever.index: float32 exact search; the alternatives are the
# kinds of search/compression.py (`compression.INDEXES`).
EXACT_INDEX = "exact"
# The stats keys describing a dense index (`dense_searcher`).
INDEX_STATS = (
    "index",
    "bytes_per_doc",
    "index_config",
    "index_build_s",
    "index_reused",
)
# Smallest value of each integer index parameter.
_INDEX_PARAM_MINIMUM = {
    "dims": 1,
    "m": 1,
    "nbits": 1,
    "rerank_depth": 0,
    "ef_construction": 1,
    "ef_search": 1,
    "nlist": 0,
    "nprobe": 1,
}


class RetrieverError(errors.ConfigError):
  """A `config.retriever` value is wrong; the message names the key."""


def _latency_ms(
    search_one: Callable[[int], Any], num_queries: int, limit: int
) -> float:
  """Mean ms of `search_one(i)` over the first `limit` queries, warmed up."""
  n = min(limit, num_queries)
  if n < 1:
    return float("nan")
  search_one(0)  # Compiles (dense) or fills caches, outside the timing.
  start = time.perf_counter()
  for i in range(n):
    search_one(i)
  return 1e3 * (time.perf_counter() - start) / n


# (path, size, mtime_ns) -> SHA-256: a weight file is hashed once per process.
_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}


def _files_digest(root: pathlib.Path) -> str:
  """SHA-256 over the names and contents of the files under `root`.

  Caches are keyed by this, not by a path: new weights at an old path (a
  replaced model.safetensors, a retrained run) never reuse old embeddings.
  """
  files = [root] if root.is_file() else sorted(root.rglob("*"))
  parts = []
  for f in files:
    if not f.is_file():
      continue
    st = f.stat()
    key = (str(f.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _FILE_DIGESTS:
      _FILE_DIGESTS[key] = io.file_sha256(f)
    parts.append(
        [str(f.relative_to(root)) if f != root else f.name, _FILE_DIGESTS[key]]
    )
  return io.fingerprint(parts)


def _checkpoint_digest(path: str | os.PathLike, step: int) -> str:
  """Content digest of a run's checkpoint at `step`, or of a published
  checkpoint's files (a run key may name either)."""
  path = pathlib.Path(path).expanduser()
  step_dir = path / "checkpoints" / str(step)
  if step_dir.is_dir():
    return _files_digest(step_dir)
  from retrieval_jax import pretrained  # pylint: disable=g-import-not-at-top

  return _files_digest(pretrained.resolve_model_dir(str(path)))


def _weights_digest(config) -> str:
  """Content digest of the dense encoder's weights: the run's checkpoint
  (`config.model.checkpoint` = "<run>@<step>") or the pretrained files."""
  from retrieval_jax import pretrained  # pylint: disable=g-import-not-at-top

  checkpoint = config.model.get("checkpoint", "")
  run, sep, step = checkpoint.partition("@")
  if sep and step.isdigit() and pathlib.Path(run).is_dir():
    return _checkpoint_digest(run, int(step))
  model_dir = pretrained.resolve_model_dir(config.model.pretrained)
  return _files_digest(model_dir)


def _dense_cache_key(config, evaluator) -> str:
  model = config.model
  return io.fingerprint(
      [
          model.pretrained,
          model.pooling,
          str(model.normalize),
          model.dtype,
          str(model.max_length),
          model.get("checkpoint", ""),
          _weights_digest(config),
      ],
      list(evaluator.collection.doc_ids),
      evaluator.collection.doc_texts(),
      evaluator.query_texts,
  )[:16]


def corpus_key_parts(config, encoder) -> dict[str, str]:
  """What a dense encoder's corpus vectors depend on besides the texts: the
  weights' content digest and each setting that changes a vector (the key
  of `--mode=encode`'s shard sets, `data/embedding_shards.py`)."""
  return {
      "weights": _weights_digest(config),
      "model": json.dumps(
          {
              "dtype": config.model.dtype,
              "matmul_precision": config.model.matmul_precision,
              "pooling": encoder.pooling,
              "normalize": bool(encoder.normalize),
              "max_length": int(encoder.max_length),
              "doc_prompt": encoder.doc_prompt,
          },
          sort_keys=True,
      ),
  }


def _read_cache(path: pathlib.Path, read: Callable[[pathlib.Path], Any]):
  """`read(path)`, or None when absent; an unreadable file is moved aside to
  `<name>.corrupt` (logged, never deleted) for the caller to rebuild."""
  if not path.is_file():
    return None
  try:
    return read(path)
  except Exception as e:  # pylint: disable=broad-exception-caught
    # np.load alone raises BadZipFile, ValueError, KeyError, EOFError...
    aside = path.with_name(path.name + ".corrupt")
    os.replace(path, aside)
    logging.warning(
        "%s: unreadable cache (%s: %s), moved to %s; rebuilding",
        path,
        type(e).__name__,
        e,
        aside,
    )
    return None


def _load_cache(path: pathlib.Path, keys: tuple[str, ...]):
  """The arrays `keys` of an .npz cache (see `_read_cache`)."""

  def read(p):
    with np.load(p) as f:
      return tuple(f[k] for k in keys)

  return _read_cache(path, read)


def dense_embeddings(
    config, evaluator, encoder_fn, workdir
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
  """The corpus and query embeddings, from the workdir cache if present.

  Args:
    config: the evaluate config (model settings key the cache).
    evaluator: the `RetrievalEvaluator`.
    encoder_fn: () -> `TextEncoder`, called only on a cache miss.
    workdir: where the cache lives unless `config.encode.cache_dir` is set.

  Returns:
    (docs_nd, queries_qd, timing) as `RetrievalEvaluator.encode`; a cache
    hit reports the timings of the run that wrote it. The corpus half also
    comes from a finished float32 `--mode=encode` shard set of the same
    weights, settings and corpus in the cache directory (`corpus_shards/`):
    bitwise what encoding here gives when that run had one shard and the
    same `config.encode` batching.
  """
  cache_dir = pathlib.Path(config.encode.get("cache_dir", "") or workdir)
  cache_dir.mkdir(parents=True, exist_ok=True)
  path = cache_dir / f"dense_{_dense_cache_key(config, evaluator)}.npz"
  cached = _load_cache(path, ("docs_nd", "queries_qd", "timing"))
  if cached is not None:
    logging.info("dense embeddings from %s", path)
    return cached[0], cached[1], json.loads(str(cached[2]))
  encoder = encoder_fn()
  batching = dict(
      batch_size=config.encode.batch_size,
      pad_multiple=config.encode.pad_multiple,
      sort_by_length=config.encode.sort_by_length,
  )
  shards = cache_dir / embedding_shards.DEFAULT_DIR
  corpus = evaluator.collection
  if embedding_shards.matches(
      shards,
      key_parts=corpus_key_parts(config, encoder),
      doc_ids=corpus.doc_ids,
      texts=corpus.doc_texts(),
      dtype="float32",
  ):
    logging.info("dense corpus embeddings from %s", shards)
    docs_nd, _ = embedding_shards.read(shards)
    seconds = embedding_shards.read_manifest(shards)["seconds"]
    start = time.perf_counter()
    queries_qd = encoder.encode_queries(
        evaluator.query_texts, desc=f"{evaluator.name}: queries", **batching
    )
    timing = {
        "encode_corpus_s": seconds,
        "encode_queries_s": time.perf_counter() - start,
        "corpus_texts_per_s": len(corpus.doc_ids) / max(seconds, 1e-9),
    }
  else:
    docs_nd, queries_qd, timing = evaluator.encode(encoder, **batching)
  io.save_npz_atomic(
      path,
      docs_nd=docs_nd.astype(np.float32),
      queries_qd=queries_qd.astype(np.float32),
      timing=json.dumps(timing),
  )
  return docs_nd, queries_qd, timing


def _index_name(config) -> str:
  return config.retriever.get("index", EXACT_INDEX)


def _index_params(config) -> dict[str, Any]:
  """config.retriever.index_params.<index> as a dict ({} when absent)."""
  params = config.retriever.get("index_params", None)
  block = params.get(_index_name(config), None) if params else None
  return dict(block.to_dict() if block is not None else {})


def _check_index_fits(kind: str, params: dict[str, Any], num_docs, dim):
  """The limits the corpus sets, named by key before faiss trips on them."""
  key = f"config.retriever.index_params.{kind}"
  if kind == "pca" and params["dims"] > dim:
    raise RetrieverError(
        f"{key}.dims={params['dims']}: more than the embeddings' {dim}"
        " dimensions"
    )
  if kind in ("pq", "ivf_pq") and dim % params["m"]:
    raise RetrieverError(
        f"{key}.m={params['m']}: must divide the embedding dimension {dim}"
    )
  if kind in ("pq", "ivf_pq") and 2 ** params["nbits"] > num_docs:
    raise RetrieverError(
        f"{key}.nbits={params['nbits']}: {2 ** params['nbits']} centroids per"
        f" sub-quantiser need as many documents; the corpus has {num_docs}"
    )
  if kind == "ivf_pq" and params["nlist"] > num_docs:
    raise RetrieverError(
        f"{key}.nlist={params['nlist']}: more lists than the corpus'"
        f" {num_docs} documents"
    )


def dense_searcher(config, docs_nd, mesh, workdir):
  """The dense search `config.retriever.index` names, over [N, D] docs.

  "exact": `exact_topk` over float32 vectors. Else the `compression` index,
  built from docs_nd or reloaded from <workdir>/index/ when its content
  key (kind, metric, parameters, vectors) matches.

  Returns:
    (search, stats): search(queries_qd, k) -> ([Q, k] scores, [Q, k] rows,
    -1 = none); stats has index_bytes, bytes_per_doc, index (the name) and
    for a compression index index_config, index_build_s, index_reused.
  """
  from retrieval_jax.search import compression  # pylint: disable=g-import-not-at-top
  from retrieval_jax.search import exact_topk  # pylint: disable=g-import-not-at-top

  kind = _index_name(config)
  if kind == EXACT_INDEX:
    corpus = exact_topk.encode_corpus(
        docs_nd,
        metric=config.search.metric,
        chunk_size=config.search.chunk_size,
        mesh=mesh,
    )
    stats = {
        "index_bytes": int(docs_nd.astype(np.float32).nbytes),
        "bytes_per_doc": 4.0 * docs_nd.shape[1],
        "index": kind,
    }
    return functools.partial(exact_topk.search, corpus), stats
  params = _index_params(config)
  _check_index_fits(
      kind, dict(compression.INDEXES[kind].defaults, **params), *docs_nd.shape
  )
  directory = pathlib.Path(workdir) / "index"
  try:
    index, info = compression.build_or_load(
        directory, kind, docs_nd, metric=config.search.metric, **params
    )
  except (ValueError, RuntimeError) as e:  # faiss raises RuntimeError
    raise RetrieverError(
        f"config.retriever.index_params.{kind}={params}: building the"
        f" {kind} index failed: {str(e).strip().splitlines()[-1]}"
    ) from e
  logging.info(
      "%s index %s %s (%.1f s to build)",
      kind,
      "reused from" if info["reused"] else "built in",
      directory,
      info["build_s"],
  )
  stats = {
      "index_bytes": index.nbytes,
      "bytes_per_doc": float(index.bytes_per_doc),
      "index": kind,
      "index_config": index.config,
      "index_build_s": info["build_s"],
      "index_reused": info["reused"],
  }
  return index.search, stats


def _timed_search(config, search, queries_qd, k):
  """(scores, rows, seconds for all queries, ms per one-query search)."""
  start = time.perf_counter()
  scores_qk, indices_qk = search(queries_qd, k)
  search_s = time.perf_counter() - start
  latency = _latency_ms(
      lambda i: search(queries_qd[i : i + 1], k),
      len(queries_qd),
      config.retriever.latency_queries,
  )
  return scores_qk, indices_qk, search_s, latency


def _dense(config, evaluator, encoder_fn, mesh, workdir):
  docs_nd, queries_qd, timing = dense_embeddings(
      config, evaluator, encoder_fn, workdir
  )
  search, stats = dense_searcher(config, docs_nd, mesh, workdir)
  if "index_build_s" in stats:
    timing["index_s"] = 0.0 if stats["index_reused"] else stats["index_build_s"]
  scores_qk, indices_qk, timing["search_s"], latency = _timed_search(
      config, search, queries_qd, evaluator.top_k
  )
  stats.update(
      search_ms_per_query=latency,
      encode_ms_per_query=1e3 * timing["encode_queries_s"] / len(queries_qd),
  )
  return evaluator.score_ranking(scores_qk, indices_qk, timing), stats


def _index_stats(stats) -> dict[str, Any]:
  """A dense part's index description, for a retriever built on it."""
  return {k: v for k, v in stats.items() if k in INDEX_STATS}


def _bm25(config, evaluator, encoder_fn, mesh, workdir):
  del encoder_fn, mesh, workdir
  from retrieval_jax.search import bm25  # pylint: disable=g-import-not-at-top

  index = bm25.Bm25Index.build(evaluator.collection.doc_texts())
  texts = evaluator.query_texts
  start = time.perf_counter()
  scores_qk, indices_qk = index.search(texts, evaluator.top_k)
  timing = {"index_s": index.build_s, "search_s": time.perf_counter() - start}
  # Tokenising the query is BM25's "query encoding"; it is inside search.
  stats = {
      "index_bytes": index.size_bytes(),
      "search_ms_per_query": _latency_ms(
          lambda i: index.search(texts[i : i + 1], evaluator.top_k),
          len(texts),
          config.retriever.latency_queries,
      ),
      "encode_ms_per_query": 0.0,
  }
  return evaluator.score_ranking(scores_qk, indices_qk, timing), stats


def _hybrid(config, evaluator, encoder_fn, mesh, workdir):
  from retrieval_jax.search import fusion  # pylint: disable=g-import-not-at-top

  r = config.retriever
  dense, dense_stats = _dense(config, evaluator, encoder_fn, mesh, workdir)
  sparse, sparse_stats = _bm25(config, evaluator, encoder_fn, mesh, workdir)
  start = time.perf_counter()
  run = fusion.interpolate(
      _cut(dense.run, r.fusion_depth),
      _cut(sparse.run, r.fusion_depth),
      alpha=r.alpha,
      normalization=r.normalization,
      weight_on_dense=r.weight_on_dense,
      k=evaluator.top_k,
  )
  fuse_s = time.perf_counter() - start
  timing = {"dense_" + k: v for k, v in dense.timing.items()}
  timing.update({"bm25_" + k: v for k, v in sparse.timing.items()})
  timing["fuse_s"] = fuse_s
  n = len(evaluator.query_ids)
  stats = {
      "index_bytes": dense_stats["index_bytes"] + sparse_stats["index_bytes"],
      # The two searches run one after the other, then the fusion.
      "search_ms_per_query": (
          dense_stats["search_ms_per_query"]
          + sparse_stats["search_ms_per_query"]
          + 1e3 * fuse_s / n
      ),
      "encode_ms_per_query": dense_stats["encode_ms_per_query"],
      "parts": {"dense": dense.metrics, "bm25": sparse.metrics},
      "dense_index": _index_stats(dense_stats),
  }
  return evaluator.score_run(run, timing), stats


def _cut(run, depth):
  from retrieval_jax.evaluation import ir_metrics  # pylint: disable=g-import-not-at-top

  return ir_metrics.truncate_run(run, depth) if depth else run


def _dense_prf(config, evaluator, encoder_fn, mesh, workdir):
  from retrieval_jax.search import prf  # pylint: disable=g-import-not-at-top

  r = config.retriever
  docs_nd, queries_qd, timing = dense_embeddings(
      config, evaluator, encoder_fn, workdir
  )
  k = evaluator.top_k
  # Both passes search the same index; the feedback vectors are the cached
  # float32 embeddings (stats: feedback_bytes, beside a compressed index).
  search, stats = dense_searcher(config, docs_nd, mesh, workdir)
  first_scores, first_qk, first_s, first_ms = _timed_search(
      config, search, queries_qd, k
  )
  del first_scores
  depth = (
      max(r.prf_k, r.prf_k_bottom) if r.prf_method == "rocchio" else (r.prf_k)
  )
  # Rocchio's bottom k are the last of the first pass's top `prf_depth`.
  feedback_qk = np.asarray(first_qk)[:, : max(depth, r.prf_depth)]
  start = time.perf_counter()
  if r.prf_method == "average":
    new_qd = prf.average_prf(queries_qd, docs_nd, feedback_qk, k=r.prf_k)
  else:
    new_qd = prf.rocchio_prf(
        queries_qd,
        docs_nd,
        feedback_qk,
        alpha=r.prf_alpha,
        beta=r.prf_beta,
        gamma=r.prf_gamma,
        k_top=r.prf_k,
        k_bottom=r.prf_k_bottom,
    )
  new_qd = np.asarray(new_qd)
  prf_s = time.perf_counter() - start
  scores_qk, indices_qk, second_s, second_ms = _timed_search(
      config, search, new_qd, k
  )
  timing.update(first_search_s=first_s, prf_s=prf_s, search_s=second_s)
  if "index_build_s" in stats:
    timing["index_s"] = 0.0 if stats["index_reused"] else stats["index_build_s"]
    stats["feedback_bytes"] = int(docs_nd.astype(np.float32).nbytes)
  stats.update(
      search_ms_per_query=first_ms + second_ms + 1e3 * prf_s / len(queries_qd),
      encode_ms_per_query=1e3 * timing["encode_queries_s"] / len(queries_qd),
  )
  return evaluator.score_ranking(scores_qk, indices_qk, timing), stats


def _trained(config, key: str, kind: str, mesh):
  """(model, tokenizer, run config, step) of `config.retriever.<key>`."""
  from retrieval_jax import kinds  # pylint: disable=g-import-not-at-top

  path = config.retriever.get(key, "")
  if not path:
    raise RetrieverError(
        f"config.retriever.{key} is empty: set it to the workdir of a "
        f"configs/train.py:scifact,{kind} run"
    )
  try:
    return kinds.load_run(path, mesh, kinds=(kind,))
  except (FileNotFoundError, ValueError) as e:
    raise RetrieverError(f"config.retriever.{key}: {e}") from e


def _sparse_cache(config, evaluator, key, workdir, step):
  cache_dir = pathlib.Path(config.encode.get("cache_dir", "") or workdir)
  cache_dir.mkdir(parents=True, exist_ok=True)
  digest = io.fingerprint(
      [
          str(pathlib.Path(config.retriever[key]).resolve()),
          str(step),
          _checkpoint_digest(config.retriever[key], step),
          str(config.model.max_length),
          str(config.retriever.top_terms),
      ],
      list(evaluator.collection.doc_ids),
      evaluator.collection.doc_texts(),
  )[:16]
  return cache_dir / f"sparse_{digest}.npz"


def _sparse(config, evaluator, encoder_fn, mesh, workdir, *, kind):
  """SPLADE or inference-free retrieval over an inverted index."""
  del encoder_fn
  import scipy.sparse  # pylint: disable=g-import-not-at-top
  from retrieval_jax import encoding  # pylint: disable=g-import-not-at-top
  from retrieval_jax import kinds  # pylint: disable=g-import-not-at-top
  from retrieval_jax.search import sparse_index  # pylint: disable=g-import-not-at-top

  key = "splade_workdir" if kind == "splade" else "inference_free_workdir"
  model, tokenizer, _, step = _trained(config, key, kind, mesh)
  encoder = encoding.SparseEncoder.from_model(
      model,
      tokenizer,
      mesh,
      max_length=config.model.max_length,
      top_terms=config.retriever.top_terms,
  )
  timing = {}
  cache = _sparse_cache(config, evaluator, key, workdir, step)
  index = _read_cache(cache, sparse_index.load)
  if index is not None:
    logging.info("sparse index from %s", cache)
  else:
    start = time.perf_counter()
    docs_nv = encoder.encode(
        evaluator.collection.doc_texts(),
        batch_size=config.encode.batch_size,
        desc=f"{kind}: corpus",
    )
    timing["encode_corpus_s"] = time.perf_counter() - start
    index = sparse_index.SparseIndex(
        docs_nv.tocsc(), docs_nv.shape[0], docs_nv.shape[1]
    )
    sparse_index.save(index, cache)
  texts = evaluator.query_texts
  start = time.perf_counter()
  # Inference-free: includes the idf over the searched corpus.
  queries_qv = kinds.KINDS[kind].query_matrix(
      encoder,
      tokenizer,
      texts,
      evaluator.collection.doc_texts(),
      max_length=config.model.max_length,
      batch_size=config.encode.batch_size,
      desc=f"{kind}: queries",
  )
  timing["encode_queries_s"] = time.perf_counter() - start
  # Kept for side-by-side latency benchmarks (experiments/retrievers).
  scipy.sparse.save_npz(
      pathlib.Path(workdir) / "queries_sparse.npz", queries_qv.tocsr()
  )
  (pathlib.Path(workdir) / "sparse_index_path.txt").write_text(str(cache))
  start = time.perf_counter()
  k = evaluator.top_k
  scores_qk, indices_qk = sparse_index.search(index, queries_qv, k)
  timing["search_s"] = time.perf_counter() - start
  index_stats = sparse_index.stats(index)
  q_terms = np.diff(queries_qv.indptr)
  stats = {
      "index_bytes": sparse_index.index_size_bytes(index),
      "search_ms_per_query": _latency_ms(
          lambda i: sparse_index.search(index, queries_qv[i : i + 1], k),
          len(texts),
          config.retriever.latency_queries,
      ),
      "encode_ms_per_query": 1e3 * timing["encode_queries_s"] / len(texts),
      "terms_per_doc": index_stats["avg_terms_per_doc"],
      "terms_per_query": float(q_terms.mean()),
      "checkpoint_step": step,
  }
  return evaluator.score_ranking(scores_qk, indices_qk, timing), stats


def _colbert_embeddings(config, evaluator, encoder, workdir, step):
  cache_dir = pathlib.Path(config.encode.get("cache_dir", "") or workdir)
  cache_dir.mkdir(parents=True, exist_ok=True)
  digest = io.fingerprint(
      [
          str(pathlib.Path(config.retriever.colbert_workdir).resolve()),
          str(step),
          _checkpoint_digest(config.retriever.colbert_workdir, step),
          str(config.model.max_length),
      ],
      list(evaluator.collection.doc_ids),
      evaluator.collection.doc_texts(),
  )[:16]
  path = cache_dir / f"colbert_{digest}.npz"
  cached = _load_cache(path, ("docs_nld", "masks_nl", "timing"))
  if cached is not None:
    logging.info("ColBERT document vectors from %s", path)
    return cached[0], cached[1], json.loads(str(cached[2]))
  start = time.perf_counter()
  docs_nld, masks_nl = encoder.embed_docs(
      evaluator.collection.doc_texts(),
      batch_size=config.encode.batch_size,
      desc="colbert: corpus",
  )
  timing = {"encode_corpus_s": time.perf_counter() - start}
  io.save_npz_atomic(
      path, docs_nld=docs_nld, masks_nl=masks_nl, timing=json.dumps(timing)
  )
  return docs_nld, masks_nl, timing


def _colbert(config, evaluator, encoder_fn, mesh, workdir):
  """A first stage's top `rerank_depth`, re-ranked by ColBERT's MaxSim."""
  from retrieval_jax import encoding  # pylint: disable=g-import-not-at-top
  from retrieval_jax.search import late_interaction  # pylint: disable=g-import-not-at-top

  r = config.retriever
  model, tokenizer, run_cfg, step = _trained(
      config, "colbert_workdir", "colbert", mesh
  )
  encoder = encoding.MultiVectorEncoder.from_model(
      model,
      tokenizer,
      mesh,
      query_maxlen=run_cfg["data"]["query_max_length"],
      doc_maxlen=config.model.max_length,
      augment=run_cfg["model"]["colbert_augment"],
  )
  docs_nld, masks_nl, timing = _colbert_embeddings(
      config, evaluator, encoder, workdir, step
  )
  first, first_stats = _RETRIEVERS[r.first_stage](
      config, evaluator, encoder_fn, mesh, workdir
  )
  texts = evaluator.query_texts
  start = time.perf_counter()
  queries_qld, q_masks_ql = encoder.embed_queries(
      texts, desc="colbert: queries"
  )
  timing["encode_queries_s"] = time.perf_counter() - start
  depth = r.rerank_depth
  scores_qk = first.scores_qk[:, :depth]
  indices_qk = first.indices_qk[:, :depth]
  prune = r.prune_ratio or None
  start = time.perf_counter()
  out = late_interaction.two_stage(
      scores_qk,
      indices_qk,
      queries_qld,
      q_masks_ql,
      docs_nld,
      masks_nl,
      prune_ratio=prune,
  )
  timing["rerank_s"] = time.perf_counter() - start
  timing.update({"first_stage_" + k: v for k, v in first.timing.items()})

  def one(i):
    # batch=1: a lone query is not padded to a batch of copies.
    late_interaction.two_stage(
        scores_qk[i : i + 1],
        indices_qk[i : i + 1],
        queries_qld[i : i + 1],
        q_masks_ql[i : i + 1],
        docs_nld,
        masks_nl,
        prune_ratio=prune,
        batch=1,
    )

  n = len(texts)
  stats = {
      "index_bytes": (
          int(docs_nld.nbytes + masks_nl.nbytes) + first_stats["index_bytes"]
      ),
      "search_ms_per_query": (
          first_stats["search_ms_per_query"]
          + _latency_ms(one, n, r.latency_queries)
      ),
      "encode_ms_per_query": (
          first_stats["encode_ms_per_query"]
          + 1e3 * timing["encode_queries_s"] / n
      ),
      "maxsim_per_query": out.num_maxsim / n,
      "checkpoint_step": step,
      "parts": {r.first_stage: first.metrics},
      "first_stage_index": _index_stats(first_stats),
  }
  return (
      evaluator.score_ranking(out.run_scores(), out.indices_qk, timing),
      stats,
  )


def _rerank(config, evaluator, encoder_fn, mesh, workdir):
  """A first stage's top `rerank_depth`, re-scored by a cross-encoder run."""
  from retrieval_jax import encoding  # pylint: disable=g-import-not-at-top

  r = config.retriever
  model, tokenizer, run_cfg, step = _trained(
      config, "rerank_workdir", "cross_encoder", mesh
  )
  first, first_stats = _RETRIEVERS[r.first_stage](
      config, evaluator, encoder_fn, mesh, workdir
  )
  scorer = encoding.PairScorer(
      model,
      tokenizer,
      evaluator.query_texts,
      evaluator.collection.doc_texts(),
      max_length=run_cfg["data"]["pair_max_length"],
      batch_size=config.encode.batch_size,
      mesh=mesh,
      desc="re-rank",
  )
  candidates_qk = np.asarray(first.indices_qk)[:, : r.rerank_depth]
  start = time.perf_counter()
  scores_qk, indices_qk = evaluators.rerank(scorer, candidates_qk)
  timing = {"rerank_s": time.perf_counter() - start}
  timing.update({"first_stage_" + k: v for k, v in first.timing.items()})
  n = len(evaluator.query_texts)
  stats = {
      "index_bytes": first_stats["index_bytes"],
      "search_ms_per_query": (
          first_stats["search_ms_per_query"] + 1e3 * timing["rerank_s"] / n
      ),
      "encode_ms_per_query": first_stats["encode_ms_per_query"],
      "pairs_per_query": float((candidates_qk >= 0).sum() / n),
      "checkpoint_step": step,
      "parts": {r.first_stage: first.metrics},
      "first_stage_index": _index_stats(first_stats),
  }
  return evaluator.score_ranking(scores_qk, indices_qk, timing), stats


_RETRIEVERS = {
    "dense": _dense,
    "bm25": _bm25,
    "hybrid": _hybrid,
    "dense_prf": _dense_prf,
    "splade": functools.partial(_sparse, kind="splade"),
    "inference_free": functools.partial(_sparse, kind="inference_free"),
    "colbert": _colbert,
    "rerank": _rerank,
}


# The model kind (configs/train.py variant) each run key takes.
_RUN_KINDS = {
    "splade_workdir": "splade",
    "inference_free_workdir": "inference_free",
    "colbert_workdir": "colbert",
    "rerank_workdir": "cross_encoder",
}


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks `config.retriever` up front, naming the offending key."""
  r = config.retriever
  if r.kind not in KINDS:
    raise RetrieverError(
        f"config.retriever.kind={r.kind!r}: expected one of {KINDS}"
    )
  if r.kind == "hybrid":
    from retrieval_jax.search import fusion  # pylint: disable=g-import-not-at-top

    if r.normalization not in fusion.NORMALIZATIONS:
      raise RetrieverError(
          f"config.retriever.normalization={r.normalization!r}: expected "
          f"one of {fusion.NORMALIZATIONS}"
      )
    if r.fusion_depth < 0:
      raise RetrieverError(
          "config.retriever.fusion_depth must be >= 0 (0 = the whole top_k)"
      )
  if r.kind in ("colbert", "rerank"):
    if r.first_stage not in FIRST_STAGES:
      raise RetrieverError(
          f"config.retriever.first_stage={r.first_stage!r}:"
          f" expected one of {FIRST_STAGES}"
      )
    if r.rerank_depth < 1:
      raise RetrieverError("config.retriever.rerank_depth must be >= 1")
    if not 0 <= r.prune_ratio < 1:
      raise RetrieverError(
          f"config.retriever.prune_ratio={r.prune_ratio}: "
          "expected 0 (off) <= ratio < 1"
      )
  needed = {
      "splade": ["splade_workdir"],
      "inference_free": ["inference_free_workdir"],
      "colbert": ["colbert_workdir"],
      "rerank": ["rerank_workdir"],
  }.get(r.kind, [])
  if r.kind in ("colbert", "rerank") and r.first_stage in (
      "splade",
      "inference_free",
  ):
    needed.append(f"{r.first_stage}_workdir")
  for key in needed:
    if not r.get(key, ""):
      raise RetrieverError(
          f"config.retriever.{key} is empty: set it to the workdir of a "
          f"configs/train.py:scifact,{_RUN_KINDS[key]} run"
      )
  if r.kind == "dense_prf" and r.prf_method not in PRF_METHODS:
    raise RetrieverError(
        f"config.retriever.prf_method={r.prf_method!r}: "
        f"expected one of {PRF_METHODS}"
    )
  if _index_name(config) != EXACT_INDEX:
    _validate_index(config)


def _validate_index(config: ml_collections.ConfigDict) -> None:
  """`config.retriever.index` and its `index_params` block."""
  from retrieval_jax.search import compression  # pylint: disable=g-import-not-at-top
  from retrieval_jax.search import hamming  # pylint: disable=g-import-not-at-top

  r = config.retriever
  kind = _index_name(config)
  if kind not in compression.INDEXES:
    raise RetrieverError(
        f"config.retriever.index={kind!r}: expected {EXACT_INDEX!r} or one"
        f" of {tuple(compression.INDEXES)}"
    )
  dense_first_stage = r.kind in ("colbert", "rerank") and (
      r.first_stage == "dense"
  )
  if r.kind not in DENSE_KINDS and not dense_first_stage:
    raise RetrieverError(
        f"config.retriever.index={kind!r}: config.retriever.kind={r.kind!r}"
        " has no dense search (the index serves dense, dense_prf, hybrid and"
        f" a dense first_stage); set config.retriever.index={EXACT_INDEX!r}"
    )
  key = f"config.retriever.index_params.{kind}"
  defaults = compression.INDEXES[kind].defaults
  for name, value in _index_params(config).items():
    if name not in defaults:
      raise RetrieverError(
          f"{key}.{name}: unknown parameter; {kind} takes {sorted(defaults)}"
      )
    if name in _INDEX_PARAM_MINIMUM:
      least = 2 if (kind, name) == ("hnsw", "m") else _INDEX_PARAM_MINIMUM[name]
      if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise RetrieverError(
            f"{key}.{name}={value!r}: expected an integer >= {least}"
        )
  params = dict(defaults, **_index_params(config))
  if kind == "pq" and params["engine"] not in ("faiss", "jax"):
    raise RetrieverError(
        f"{key}.engine={params['engine']!r}: expected 'faiss' or 'jax'"
    )
  if kind == "sign" and params["word"] not in hamming.WORD_DTYPES:
    raise RetrieverError(
        f"{key}.word={params['word']!r}: expected one of {hamming.WORD_DTYPES}"
    )
  if kind in compression.FAISS_KINDS:
    try:
      import faiss  # pylint: disable=g-import-not-at-top,unused-import
    except ImportError as e:
      raise RetrieverError(
          f"config.retriever.index={kind!r} needs faiss, which is not"
          ' installed: pip install -e ".[index]"'
      ) from e


def retrieve(
    config: ml_collections.ConfigDict,
    evaluator: "evaluators.RetrievalEvaluator",
    encoder_fn: Callable[[], Any],
    mesh,
    workdir,
) -> tuple["evaluators.RetrievalResult", dict[str, Any]]:
  """Runs `config.retriever.kind` and scores it with `evaluator`.

  Args:
    config: the evaluate config.
    evaluator: the judged queries and measures.
    encoder_fn: () -> the dense `TextEncoder` (built only if needed).
    mesh: devices of the dense search.
    workdir: holds the caches (dense embeddings).

  Returns:
    (result, stats): stats has index_bytes, search_ms_per_query,
    encode_ms_per_query (and the parts' metrics for "hybrid").
  """
  validate(config)
  with jax.default_matmul_precision(config.model.matmul_precision):
    return _RETRIEVERS[config.retriever.kind](
        config, evaluator, encoder_fn, mesh, workdir
    )
