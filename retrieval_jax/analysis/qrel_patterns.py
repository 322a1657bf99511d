r"""Qrel patterns with k relevant docs per query, and an exact embedding.

LIMIT's patterns (Weller et al., arXiv 2508.21038) as int32 relevant_mk
[m, k], rows sorted: dense, random, cycle, disjoint. The moment-curve
embedding (Wang et al., arXiv 2601.20844) makes every k-subset S an exact
top-k in R^{2k}: scores r_0 - |p(e^{i theta})|^2, p(z) = prod_S (z - w_a).
Its k = 2 margin shrinks ~n^-4 (worst S = {a, a + 2}): 2.2e-2, 4.2e-5,
1.9e-6, 2.3e-8 at n = 10, 46, 100, 300; at 300 float32 loses ~0.6% of the
exact top-2s and float64 none, so capacity depends on precision too.
"""

from collections.abc import Callable
import itertools
import math

import numpy as np

from retrieval_jax.data import beir


def _check_positive_int(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{name} must be an int, got {value!r}")
  if value < 1:
    raise ValueError(f"{name} must be >= 1, got {value}")
  return int(value)


def _min_dense_docs(num_queries: int, k: int) -> int:
  n = k
  while math.comb(n, k) < num_queries:
    n += 1
  return n


def dense(
    num_docs: int | None = None, k: int = 2, num_queries: int | None = None
) -> np.ndarray:
  """First num_queries k-subsets (all if None) of range(n0): int32 [m, k].

  n0 is num_docs, or if None the least n with C(n, k) >= num_queries (LIMIT:
  1000 -> 46); a larger num_docs only adds docs judged for no query.
  """
  k = _check_positive_int("k", k)
  if num_docs is None and num_queries is None:
    raise ValueError("dense needs num_docs or num_queries, got neither")
  if num_docs is not None:
    num_docs = _check_positive_int("num_docs", num_docs)
    if num_docs < k:
      raise ValueError(f"num_docs must be >= k={k}, got num_docs={num_docs}")
  if num_queries is None:
    n = num_docs
  else:
    num_queries = _check_positive_int("num_queries", num_queries)
    n = _min_dense_docs(num_queries, k)
    if num_docs is not None and num_docs < n:
      raise ValueError(
          f"num_docs={num_docs} is too small for num_queries={num_queries} "
          f"dense {k}-subsets: C(n, {k}) >= {num_queries} needs n >= {n}"
      )
  combos = itertools.combinations(range(n), k)
  if num_queries is not None:
    combos = itertools.islice(combos, num_queries)
  # Flat iterator: a list would hold C(n, k) Python tuples at once.
  flat = np.fromiter(itertools.chain.from_iterable(combos), np.int32)
  return flat.reshape(-1, k)


def _check_sizes(num_docs, num_queries, k) -> tuple[int, int, int]:
  num_docs = _check_positive_int("num_docs", num_docs)
  num_queries = _check_positive_int("num_queries", num_queries)
  k = _check_positive_int("k", k)
  if k > num_docs:
    raise ValueError(f"k must be <= num_docs={num_docs}, got k={k}")
  return num_docs, num_queries, k


def random(
    num_docs: int, num_queries: int, k: int, seed: int = 0
) -> np.ndarray:
  """Sorted rng.choice(num_docs, k, replace=False) per row: int32 [m, k].

  numpy's PCG64 stream, not Python `random`'s; two rows may share a set.
  """
  num_docs, num_queries, k = _check_sizes(num_docs, num_queries, k)
  rng = np.random.default_rng(seed)
  relevant_mk = np.empty((num_queries, k), np.int32)
  # Per-row draws: an argsort of [m, n] uniforms would need m * n memory.
  for i in range(num_queries):
    relevant_mk[i] = np.sort(rng.choice(num_docs, size=k, replace=False))
  return relevant_mk


def cycle(num_docs: int, num_queries: int, k: int) -> np.ndarray:
  """Row i is sorted (i + j) % num_docs, j < k: int32 [num_queries, k]."""
  num_docs, num_queries, k = _check_sizes(num_docs, num_queries, k)
  i_m1 = np.arange(num_queries)[:, None]
  j_1k = np.arange(k)[None, :]
  return np.sort((i_m1 + j_1k) % num_docs, axis=1).astype(np.int32)


def disjoint(num_docs: int, num_queries: int, k: int) -> np.ndarray:
  """Row i is i*k, ..., i*k + k - 1: int32 [num_queries, k]."""
  num_docs, num_queries, k = _check_sizes(num_docs, num_queries, k)
  if num_queries * k > num_docs:
    raise ValueError(
        "disjoint needs num_queries * k <= num_docs, got num_queries="
        f"{num_queries} * k={k} = {num_queries * k} > num_docs={num_docs}"
    )
  return np.arange(num_queries * k, dtype=np.int32).reshape(num_queries, k)


def _dense_pattern(num_docs, num_queries, k, seed=0):
  del seed  # Deterministic.
  return dense(num_docs, k, num_queries)


def _random_pattern(num_docs, num_queries, k, seed=0):
  return random(num_docs, num_queries, k, seed)


def _cycle_pattern(num_docs, num_queries, k, seed=0):
  del seed  # Deterministic.
  return cycle(num_docs, num_queries, k)


def _disjoint_pattern(num_docs, num_queries, k, seed=0):
  del seed  # Deterministic.
  return disjoint(num_docs, num_queries, k)


# One signature for all; seed matters only for "random", None sizes "dense".
PATTERNS: dict[str, Callable[..., np.ndarray]] = {
    "dense": _dense_pattern,
    "random": _random_pattern,
    "cycle": _cycle_pattern,
    "disjoint": _disjoint_pattern,
}


def to_matrix(relevant_mk: np.ndarray, num_docs: int) -> np.ndarray:
  """Bool qrel matrix a_mn [m, num_docs] of int relevant_mk [m, k]."""
  relevant_mk = _check_relevant(relevant_mk, num_docs)
  a_mn = np.zeros((relevant_mk.shape[0], num_docs), bool)
  np.put_along_axis(a_mn, relevant_mk, True, axis=1)
  return a_mn


def from_matrix(a_mn: np.ndarray) -> np.ndarray:
  """Pattern int32 [m, k] of a qrel a_mn [m, n] with equal row counts."""
  a_mn = np.asarray(a_mn)
  if a_mn.ndim != 2:
    raise ValueError(f"a_mn must be 2-D [m, n], got shape {a_mn.shape}")
  mask_mn = a_mn != 0
  counts_m = mask_mn.sum(axis=1)
  if counts_m.size and (counts_m != counts_m[0]).any():
    bad = int(np.flatnonzero(counts_m != counts_m[0])[0])
    raise ValueError(
        "a_mn rows must have equal numbers of relevant docs; row 0 has "
        f"{counts_m[0]}, row {bad} has {counts_m[bad]}"
    )
  k = int(counts_m[0]) if counts_m.size else 0
  # np.nonzero walks row-major, so each row's columns come out ascending.
  _, cols = np.nonzero(mask_mn)
  return cols.astype(np.int32).reshape(a_mn.shape[0], k)


def limit_qrels(
    path: str, split: str = "test"
) -> tuple[np.ndarray, list[str], list[str]]:
  """BEIR qrels (score > 0) as (relevant_mk, doc_ids, query_ids).

  relevant_mk int32 [m, k] holds corpus indices; on LIMIT-small it equals
  dense(num_queries=1000).
  """
  # "error": a dropped judgment would silently shorten a row.
  collection = beir.load_beir(path, split=split, on_unknown="error")
  index = {doc_id: i for i, doc_id in enumerate(collection.doc_ids)}
  query_ids, rows = [], []
  for query_id in collection.judged_query_ids():
    judged = collection.qrels[query_id]
    rows.append(sorted(index[d] for d, score in judged.items() if score > 0))
    query_ids.append(query_id)
  counts = sorted({len(r) for r in rows})
  if len(counts) != 1 or counts[0] == 0:
    raise ValueError(
        f"{path} split {split!r}: every judged query needs the same, "
        f"nonzero number of relevant docs; found counts {counts}"
    )
  relevant_mk = np.array(rows, np.int32).reshape(len(rows), counts[0])
  return relevant_mk, list(collection.doc_ids), query_ids


def _check_relevant(relevant_mk, num_docs: int) -> np.ndarray:
  relevant_mk = np.asarray(relevant_mk)
  if relevant_mk.ndim != 2 or not np.issubdtype(relevant_mk.dtype, np.integer):
    raise ValueError(
        "relevant_mk must be a 2-D int array [m, k], got shape "
        f"{relevant_mk.shape} dtype {relevant_mk.dtype}"
    )
  if relevant_mk.size and (
      relevant_mk.min() < 0 or relevant_mk.max() >= num_docs
  ):
    raise ValueError(
        f"relevant_mk must lie in [0, {num_docs}), got range "
        f"[{relevant_mk.min()}, {relevant_mk.max()}]"
    )
  sorted_mk = np.sort(relevant_mk, axis=1)
  if (sorted_mk[:, 1:] == sorted_mk[:, :-1]).any():
    raise ValueError("relevant_mk rows must hold distinct doc indices")
  return relevant_mk


def moment_curve_docs(n: int, k: int = 2, dtype=np.float64) -> np.ndarray:
  """Moment-curve docs [n, 2k]: (cos t, sin t, ..., sin kt), t = 2 pi j / n.

  Rows have norm sqrt(k); computed in float64, then cast to dtype.
  """
  n = _check_positive_int("n", n)
  k = _check_positive_int("k", k)
  theta_n1 = (2 * np.pi / n) * np.arange(n)[:, None]
  angle_nk = theta_n1 * np.arange(1, k + 1)[None, :]
  docs_nkc = np.stack([np.cos(angle_nk), np.sin(angle_nk)], axis=-1)
  return docs_nkc.reshape(n, 2 * k).astype(dtype)


def moment_curve_queries(
    relevant_mk: np.ndarray, n: int, dtype=np.float64
) -> np.ndarray:
  """Queries q_md [m, 2k] whose exact top-k on moment_curve_docs is the row.

  Expanded in complex128, cast at the end: float32 is rounded float64.
  """
  n = _check_positive_int("n", n)
  relevant_mk = _check_relevant(relevant_mk, n)
  m, k = relevant_mk.shape
  roots_mk = np.exp(2j * np.pi * relevant_mk.astype(np.float64) / n)
  # Ascending coefficients; times (z - w) = shift up one power minus w * p.
  poly_mt = np.ones((m, 1), np.complex128)
  for a in range(k):
    w_m1 = roots_mk[:, a : a + 1]
    zero_m1 = np.zeros((m, 1), np.complex128)
    poly_mt = np.concatenate(
        [zero_m1, poly_mt], axis=1
    ) - w_m1 * np.concatenate([poly_mt, zero_m1], axis=1)
  # c_j = sum_t p_{t+j} conj(p_t), j = 1..k.
  c_mk = np.stack(
      [
          np.sum(poly_mt[:, j:] * np.conj(poly_mt[:, : k + 1 - j]), axis=1)
          for j in range(1, k + 1)
      ],
      axis=1,
  )
  q_mkc = np.stack([-2 * c_mk.real, 2 * c_mk.imag], axis=-1)
  return q_mkc.reshape(m, 2 * k).astype(dtype)


def _check_scores(scores_mn, relevant_mk) -> tuple[np.ndarray, np.ndarray]:
  scores_mn = np.asarray(scores_mn)
  if scores_mn.ndim != 2:
    raise ValueError(
        f"scores_mn must be 2-D [m, n], got shape {scores_mn.shape}"
    )
  relevant_mk = _check_relevant(relevant_mk, scores_mn.shape[1])
  if relevant_mk.shape[0] != scores_mn.shape[0]:
    raise ValueError(
        f"scores_mn has {scores_mn.shape[0]} rows but relevant_mk has "
        f"{relevant_mk.shape[0]}"
    )
  return scores_mn, relevant_mk


def top_k_recall(scores_mn: np.ndarray, relevant_mk: np.ndarray) -> float:
  """Mean recall@k, k = relevant_mk.shape[1]; 1.0 iff every top-k is exact.

  Ties go to the lower doc index (stable argsort), not to relevant docs.
  """
  scores_mn, relevant_mk = _check_scores(scores_mn, relevant_mk)
  m, k = relevant_mk.shape
  top_mk = np.argsort(-scores_mn, axis=1, kind="stable")[:, :k]
  hit_mk = (top_mk[:, :, None] == relevant_mk[:, None, :]).any(axis=2)
  return float(hit_mk.sum() / (m * k))


def min_top_k_margin(scores_mn: np.ndarray, relevant_mk: np.ndarray) -> float:
  """min_i (min relevant - max irrelevant score); > 0 iff all top-k exact."""
  scores_mn, relevant_mk = _check_scores(scores_mn, relevant_mk)
  if relevant_mk.shape[1] >= scores_mn.shape[1]:
    raise ValueError(
        "min_top_k_margin needs an irrelevant doc: k="
        f"{relevant_mk.shape[1]} >= n={scores_mn.shape[1]}"
    )
  # float64 so the subtraction adds no rounding of its own.
  scores_mn = scores_mn.astype(np.float64)
  relevant_min_m = np.take_along_axis(scores_mn, relevant_mk, axis=1).min(1)
  masked_mn = scores_mn.copy()
  np.put_along_axis(masked_mn, relevant_mk, -np.inf, axis=1)
  return float((relevant_min_m - masked_mn.max(axis=1)).min())
