"""Hard-negative mining for training queries, with an on-disk cache.

`bm25_negatives` (Lucene BM25) and `dense_negatives` (any `encode_fn(texts)
-> float32 [N, D]`, exact top-k) return per query the first `depth`
unexcluded docs in rank order, ties to the smaller corpus index. BM25 mines
SciFact's 809 queries in ~1 s, dense mining far slower, so `cached_negatives`
keeps results under a content hash of the inputs (`mining_key`). `mine` is
the trainer's entry point.
"""

from collections.abc import Callable, Iterable, Mapping, Sequence
import json
import os
import time
from typing import Any

from absl import logging
import jax
import numpy as np

from retrieval_jax import io
from retrieval_jax.data import pipeline
from retrieval_jax.search import bm25
from retrieval_jax.search import exact_topk

MINING_METHODS = ("bm25", "dense")
# texts: list[str] [N] -> float32 [N, D] embeddings.
EncodeFn = Callable[[list[str]], np.ndarray]
BM25_SETTINGS = bm25.SETTINGS
# Bumped when the cache file layout changes, so old files re-mine.
CACHE_FORMAT = 1


def _check_inputs(
    query_texts: Sequence[str],
    corpus_ids: Sequence[str],
    corpus_texts: Sequence[str],
    exclude: Sequence[set[str]],
    depth: int,
) -> None:
  if len(corpus_ids) != len(corpus_texts):
    raise ValueError(
        f"corpus_ids has {len(corpus_ids)} entries but corpus_texts has"
        f" {len(corpus_texts)}"
    )
  if not corpus_ids:
    raise ValueError("the corpus is empty: there is nothing to mine")
  if len(set(corpus_ids)) != len(corpus_ids):
    # A negative is returned by id; a repeated id would be ambiguous.
    raise ValueError("corpus_ids holds duplicate ids")
  if len(exclude) != len(query_texts):
    raise ValueError(
        f"exclude has {len(exclude)} sets but there are {len(query_texts)}"
        " queries (one set of known relevant doc ids per query)"
    )
  if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
    raise ValueError(f"depth must be a positive integer, got {depth!r}")


def _unexcluded(
    ranked: Iterable[int],
    corpus_ids: Sequence[str],
    excluded: set[str],
    depth: int,
) -> list[str]:
  """The first `depth` ids of a ranking that are not in `excluded`."""
  out = []
  for i in ranked:
    doc_id = corpus_ids[int(i)]
    # Known relevant docs would teach the model to push positives away.
    if doc_id not in excluded:
      out.append(doc_id)
      if len(out) == depth:
        break
  return out


def bm25_negatives(
    query_texts: Sequence[str],
    corpus_ids: Sequence[str],
    corpus_texts: Sequence[str],
    exclude: Sequence[set[str]],
    *,
    depth: int = 100,
) -> list[list[str]]:
  """BM25 (`BM25_SETTINGS`) negatives: list[list[str]] [Q][<= depth].

  Docs sharing no term score 0 and are never returned. corpus_texts: what the
  baselines index (`beir.doc_text`); exclude: each query's relevant ids.
  """
  _check_inputs(query_texts, corpus_ids, corpus_texts, exclude, depth)
  start = time.perf_counter()
  index = bm25.Bm25Index.build(corpus_texts)
  negatives = []
  for scores_n, excluded in zip(index.scores(query_texts), exclude):
    if scores_n is None:
      negatives.append([])
      continue
    # Over-fetch by the excluded count so `depth` remain after exclusion.
    ranked = bm25.top_indices(scores_n, depth + len(excluded))
    ranked = ranked[scores_n[ranked] > 0]
    negatives.append(_unexcluded(ranked, corpus_ids, excluded, depth))
  logging.info(
      "BM25 negatives: %d queries x %d docs, depth %d, in %.1f s",
      len(query_texts),
      len(corpus_ids),
      depth,
      time.perf_counter() - start,
  )
  return negatives


def dense_negatives(
    encode_fn: EncodeFn,
    query_texts: Sequence[str],
    corpus_ids: Sequence[str],
    corpus_texts: Sequence[str],
    exclude: Sequence[set[str]],
    *,
    depth: int = 100,
    metric: str = "dot",
    mesh=None,
) -> list[list[str]]:
  """Negatives by an encoder and exact top-k: list[list[str]] [Q][<= depth].

  metric "dot" scores as the encoder's own embeddings do; mesh shards the
  corpus (None: all devices).
  """
  _check_inputs(query_texts, corpus_ids, corpus_texts, exclude, depth)
  start = time.perf_counter()
  docs_nd = np.asarray(encode_fn(list(corpus_texts)), np.float32)
  queries_qd = np.asarray(encode_fn(list(query_texts)), np.float32)
  # One k (one compile), large enough that `depth` survive any exclusion.
  max_excluded = max((len(s) for s in exclude), default=0)
  k = min(len(corpus_ids), depth + max_excluded)
  # exact_topk breaks ties by the smaller index: the lists are deterministic.
  _, indices_qk = exact_topk.exact_topk(
      queries_qd, docs_nd, k, metric=metric, mesh=mesh
  )
  negatives = [
      _unexcluded(indices_k, corpus_ids, excluded, depth)
      for indices_k, excluded in zip(indices_qk, exclude)
  ]
  logging.info(
      "Dense negatives: %d queries x %d docs, depth %d, in %.1f s",
      len(query_texts),
      len(corpus_ids),
      depth,
      time.perf_counter() - start,
  )
  return negatives


def mining_key(
    method: str,
    settings: Mapping[str, Any],
    query_ids: Sequence[str],
    query_texts: Sequence[str],
    corpus_ids: Sequence[str],
    corpus_texts: Sequence[str],
    exclude: Sequence[set[str]],
    depth: int,
) -> dict[str, Any]:
  """The JSON cache key of one mining run: everything its result depends on."""
  # Hashes, not texts: the key is stored and a corpus can be gigabytes. The
  # counts make a mismatch easy to read in the file.
  return {
      "method": method,
      "settings": dict(settings),
      "depth": depth,
      "num_queries": len(query_ids),
      "num_docs": len(corpus_ids),
      "queries": io.fingerprint(query_ids, query_texts),
      "corpus": io.fingerprint(corpus_ids, corpus_texts),
      # The positives decide what is excluded, so they belong to the key.
      "exclude": io.fingerprint([sorted(s) for s in exclude]),
  }


def encoder_key(params: Any, **options: Any) -> dict[str, Any]:
  """Identifies an encoder for `mining_key`: its weights' SHA-256 + options.

  Hashing weights keeps a fine-tuned model off its start's cache (~0.2 s for
  MiniLM's 22M). Pass only parameters (changing RNG counters would change
  the key); options are what changes embeddings (pooling, max_length, ...).
  """
  leaves = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      # Typed keys (dropout RNG state) have no numpy form; their bits do.
      leaf = jax.random.key_data(leaf)
    # Names too: the same arrays under another layout are another model.
    leaves.append(
        io.fingerprint(
            jax.tree_util.keystr(path), np.asarray(jax.device_get(leaf))
        )
    )
  return {"weights": io.fingerprint(leaves), **options}


def _key_digest(key: Mapping[str, Any]) -> str:
  """`io.fingerprint` of the key's canonical JSON (sorted, no spaces)."""
  try:
    text = json.dumps(
        key, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
  except (TypeError, ValueError) as e:
    raise ValueError(f"the cache key must be JSON-serialisable: {e}") from None
  return io.fingerprint(text)


def _is_negatives(value: Any) -> bool:
  return isinstance(value, list) and all(
      isinstance(row, list) and all(isinstance(d, str) for d in row)
      for row in value
  )


def _read_cache(path: str, digest: str) -> list[list[str]] | None:
  """The cached negatives when `path` holds this key's; else None."""
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      cached = json.load(f)
  except (OSError, ValueError) as e:
    # Writes are atomic, so someone else wrote this file; re-mining is safe.
    logging.warning(
        "%s: unreadable negatives cache (%s); mining again", path, e
    )
    return None
  # Never trust another layout: a wrong list would silently train wrongly.
  if not (
      isinstance(cached, dict)
      and cached.get("format") == CACHE_FORMAT
      and _is_negatives(cached.get("negatives"))
  ):
    logging.warning(
        "%s: not a negatives cache of format %d; mining again",
        path,
        CACHE_FORMAT,
    )
    return None
  if cached.get("key_digest") != digest:
    logging.info("%s: inputs or settings changed; mining again", path)
    return None
  return cached["negatives"]


def cached_negatives(
    cache_path: str | os.PathLike,
    key: Mapping[str, Any],
    compute_fn: Callable[[], list[list[str]]],
) -> list[list[str]]:
  """`compute_fn()`, computed once per key and kept in a JSON file.

  The file holds one result and the SHA-256 of `key`'s canonical JSON;
  another key recomputes and replaces it. Written to a temp name and
  renamed, so a killed run leaves the old or the new file, never half.
  """
  path = os.fspath(cache_path)
  digest = _key_digest(key)
  cached = _read_cache(path, digest)
  if cached is not None:
    logging.info("%s: reusing mined negatives (%d queries)", path, len(cached))
    return cached
  negatives = compute_fn()
  # JSON turns tuples into lists: a hit and a miss return the same type.
  negatives = [list(row) for row in negatives]
  if not _is_negatives(negatives):
    raise ValueError("compute_fn must return a list of lists of doc-id strings")
  # The key is stored in full so a stale file can be diagnosed by eye.
  io.write_json_atomic(
      path,
      {
          "format": CACHE_FORMAT,
          "key_digest": digest,
          "key": key,
          "negatives": negatives,
      },
      indent=None,
  )
  logging.info("%s: cached mined negatives (%d queries)", path, len(negatives))
  return negatives


def mine(
    data: pipeline.TrainingData,
    *,
    method: str,
    depth: int = 100,
    cache_dir: str | os.PathLike | None = None,
    encode_fn: EncodeFn | None = None,
    encoder_key: Mapping[str, Any] | None = None,
) -> pipeline.TrainingData:
  """`data` with hard negatives for every query, all its positives excluded.

  cache_dir holds `<method>.json` (None: no cache). "dense" needs encode_fn
  (texts -> float32 [N, D]) and, with a cache, `encoder_key()`'s result.
  """
  if method not in MINING_METHODS:
    raise ValueError(f"method must be one of {MINING_METHODS}, got {method!r}")
  query_ids = [ex.query_id for ex in data.examples]
  query_texts = [ex.query for ex in data.examples]
  # All positives: each is relevant, whichever one a batch feeds.
  exclude = [set(ex.positive_ids) for ex in data.examples]
  if method == "bm25":
    settings = BM25_SETTINGS

    def compute():
      return bm25_negatives(
          query_texts, data.doc_ids, data.doc_texts, exclude, depth=depth
      )

  else:
    if encode_fn is None:
      raise ValueError('method "dense" needs encode_fn')
    if cache_dir is not None and encoder_key is None:
      # Without it, another model's cached negatives would be reused.
      raise ValueError('method "dense" with a cache_dir needs encoder_key')
    settings = dict(encoder_key or {})

    def compute():
      return dense_negatives(
          encode_fn,
          query_texts,
          data.doc_ids,
          data.doc_texts,
          exclude,
          depth=depth,
      )

  if cache_dir is None:
    return data.with_negatives(compute())
  # One file per method: switching methods back and forth evicts nothing.
  key = mining_key(
      method,
      settings,
      query_ids,
      query_texts,
      data.doc_ids,
      data.doc_texts,
      exclude,
      depth,
  )
  path = os.path.join(cache_dir, f"{method}.json")
  return data.with_negatives(cached_negatives(path, key, compute))
