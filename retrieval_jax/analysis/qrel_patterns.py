r"""Qrel patterns with k relevant documents per query, and an exact embedding.

Patterns. "On the Theoretical Limitations of Embedding-Based Retrieval"
(Weller et al., arXiv 2508.21038) builds its LIMIT collections and compares
four qrel patterns over n documents, m queries and k relevant documents per
query:

* dense: the first m k-subsets of range(n0) in lexicographic order, n0 the
  smallest n with C(n, k) >= m (LIMIT: 1000 pairs over 46 documents, since
  C(46, 2) = 1035); the other documents are judged for no query;
* random: k distinct documents drawn per query;
* cycle: query i holds documents i, i + 1, ..., i + k - 1 (mod n);
* disjoint: query i holds the block i*k, ..., i*k + k - 1.

Every pattern here is an int32 array `relevant_mk` [m, k] whose row i lists
query i's relevant document indices in increasing order; `to_matrix` and
`from_matrix` convert to and from the boolean qrel matrix [m, n].

Exact embedding. "R^{2k} is Theoretically Large Enough for Embedding-based
Top-k Retrieval" (Wang et al., arXiv 2601.20844) shows that dimension 2k
realises every k-subset as an exact top-k, for any number of documents.
Put document j on the trigonometric moment curve at angle
theta_j = 2 pi j / n,

  v_j = (cos theta_j, sin theta_j, cos 2theta_j, sin 2theta_j, ...,
         cos k theta_j, sin k theta_j),

and for the set S take the monic polynomial p(z) = prod_{a in S} (z - w_a)
with w_a = exp(i theta_a), coefficients p_0 ... p_k (ascending). On the unit
circle conj(z) = 1/z, so

  |p(e^{i theta})|^2 = r_0 + sum_{j=1..k} 2 Re(c_j e^{i j theta}),
  c_j = sum_t p_{t+j} conj(p_t),   r_0 = sum_t |p_t|^2,

(c_j is the autocorrelation of the coefficient sequence). The query

  q = -2 (Re c_1, -Im c_1, ..., Re c_k, -Im c_k)

then scores q . v_theta = r_0 - |p(e^{i theta})|^2 <= r_0, with equality
exactly at the k roots, i.e. at the documents of S: the top-k is S. For
k = 2, c_1 = -(conj(s) + s conj(P)) and c_2 = conj(P), with s = w_a + w_b and
P = w_a w_b. All documents have norm sqrt(k), so dot-product and cosine
rankings agree.

The construction is exact in real arithmetic, but its margin (the gap
between the lowest relevant and the highest irrelevant score) shrinks fast
with n. The worst set for k = 2 is S = {a, a + 2}: document a + 1 lies
2 pi / n from both roots, so its score falls short of r_0 by only
|p|^2 ~ (2 pi / n)^4, i.e. ~ n^-4. For unit-norm queries (k = 2) the
smallest margin over all pairs is 2.2e-2 at n = 10, 4.2e-5 at 46, 1.9e-6
at 100 and 2.3e-8 at 300. At n = 300 that is below the float32 rounding of
scores of size ~1: float32 no longer realises every top-2 (about 0.6% of
the pairs lose their exact top-2) while float64 still does. A "capacity"
claim about a dimension therefore depends on precision and margin as much
as on the dimension.
"""

from collections.abc import Callable
import itertools
import math

import numpy as np

from retrieval_jax.data import beir


def _check_positive_int(name: str, value) -> int:
  """Returns `value` as an int, or raises ValueError unless it is >= 1."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{name} must be an int, got {value!r}")
  if value < 1:
    raise ValueError(f"{name} must be >= 1, got {value}")
  return int(value)


def _min_dense_docs(num_queries: int, k: int) -> int:
  """Smallest n with C(n, k) >= num_queries (n >= k)."""
  n = k
  while math.comb(n, k) < num_queries:
    n += 1
  return n


def dense(num_docs: int | None = None, k: int = 2,
          num_queries: int | None = None) -> np.ndarray:
  """The dense pattern: k-subsets in lexicographic combination order.

  With `num_queries` None, every k-subset of range(num_docs) is a query
  (the free-embedding experiment's qrels). Otherwise the queries are the
  first `num_queries` k-subsets of range(n0), n0 the smallest n with
  C(n, k) >= num_queries, as LIMIT was built (1000 queries -> n0 = 46); a
  larger `num_docs` only adds documents judged for no query.

  Args:
    num_docs: int or None, the number of documents; None means n0 (then
      `num_queries` is required).
    k: int, relevant documents per query.
    num_queries: int or None, the number of queries; None means all
      C(num_docs, k).

  Returns:
    relevant_mk: int32 [m, k], rows in `itertools.combinations` order.

  Raises:
    ValueError: both sizes None, a size < 1, num_docs < k, or num_docs < n0.
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
          f"dense {k}-subsets: C(n, {k}) >= {num_queries} needs n >= {n}")
  combos = itertools.combinations(range(n), k)
  if num_queries is not None:
    combos = itertools.islice(combos, num_queries)
  # Built from a flat iterator: np.array(list(...)) of tuples would hold
  # C(n, k) Python tuples at once.
  flat = np.fromiter(itertools.chain.from_iterable(combos), np.int32)
  return flat.reshape(-1, k)


def _check_sizes(num_docs, num_queries, k) -> tuple[int, int, int]:
  """Validates the three sizes shared by random, cycle and disjoint."""
  num_docs = _check_positive_int("num_docs", num_docs)
  num_queries = _check_positive_int("num_queries", num_queries)
  k = _check_positive_int("k", k)
  if k > num_docs:
    raise ValueError(f"k must be <= num_docs={num_docs}, got k={k}")
  return num_docs, num_queries, k


def random(num_docs: int, num_queries: int, k: int,
           seed: int = 0) -> np.ndarray:
  """The random pattern: k distinct documents drawn per query.

  Each row is `rng.choice(num_docs, k, replace=False)`, sorted, with
  `rng = np.random.default_rng(seed)` drawn row after row. This is numpy's
  PCG64 stream: it does not reproduce patterns drawn with Python's `random`
  module (e.g. `random.sample`), only their distribution. Rows are drawn
  independently, so two queries may share the same set.

  Args:
    num_docs: int, the number of documents.
    num_queries: int, the number of queries.
    k: int, relevant documents per query (<= num_docs).
    seed: int, the generator seed.

  Returns:
    relevant_mk: int32 [num_queries, k].
  """
  num_docs, num_queries, k = _check_sizes(num_docs, num_queries, k)
  rng = np.random.default_rng(seed)
  relevant_mk = np.empty((num_queries, k), np.int32)
  # One small draw per row: a vectorised argsort of [m, n] uniforms would
  # need m * n memory (50M entries for LIMIT's full 50k-document corpus).
  for i in range(num_queries):
    relevant_mk[i] = np.sort(rng.choice(num_docs, size=k, replace=False))
  return relevant_mk


def cycle(num_docs: int, num_queries: int, k: int) -> np.ndarray:
  """The cycle pattern: query i holds documents (i + j) % num_docs, j < k.

  Queries past num_docs repeat earlier rows (the pattern has period
  num_docs).

  Args:
    num_docs: int, the number of documents.
    num_queries: int, the number of queries.
    k: int, relevant documents per query (<= num_docs, so a row never
      wraps onto itself).

  Returns:
    relevant_mk: int32 [num_queries, k], rows sorted (a wrapped row such as
    {n - 1, 0} reads [0, n - 1]).
  """
  num_docs, num_queries, k = _check_sizes(num_docs, num_queries, k)
  i_m1 = np.arange(num_queries)[:, None]
  j_1k = np.arange(k)[None, :]
  return np.sort((i_m1 + j_1k) % num_docs, axis=1).astype(np.int32)


def disjoint(num_docs: int, num_queries: int, k: int) -> np.ndarray:
  """The disjoint pattern: query i holds documents i*k, ..., i*k + k - 1.

  Args:
    num_docs: int, the number of documents (>= num_queries * k).
    num_queries: int, the number of queries.
    k: int, relevant documents per query.

  Returns:
    relevant_mk: int32 [num_queries, k], equal to
    arange(num_queries * k).reshape(num_queries, k).

  Raises:
    ValueError: num_queries * k > num_docs.
  """
  num_docs, num_queries, k = _check_sizes(num_docs, num_queries, k)
  if num_queries * k > num_docs:
    raise ValueError(
        f"disjoint needs num_queries * k <= num_docs, got num_queries="
        f"{num_queries} * k={k} = {num_queries * k} > num_docs={num_docs}")
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


# Pattern name -> fn(num_docs, num_queries, k, seed) -> relevant_mk int32
# [m, k]. One signature for all four, so experiments can pick a pattern by
# name; seed matters only for "random". For "dense", num_docs may be None
# (the smallest that fits) and num_queries None (all C(num_docs, k)).
PATTERNS: dict[str, Callable[..., np.ndarray]] = {
    "dense": _dense_pattern,
    "random": _random_pattern,
    "cycle": _cycle_pattern,
    "disjoint": _disjoint_pattern,
}


def to_matrix(relevant_mk: np.ndarray, num_docs: int) -> np.ndarray:
  """The boolean qrel matrix of a pattern.

  Args:
    relevant_mk: int [m, k], document indices in [0, num_docs).
    num_docs: int, the number of columns.

  Returns:
    a_mn: bool [m, num_docs], True where the document is relevant.
  """
  relevant_mk = _check_relevant(relevant_mk, num_docs)
  a_mn = np.zeros((relevant_mk.shape[0], num_docs), bool)
  np.put_along_axis(a_mn, relevant_mk, True, axis=1)
  return a_mn


def from_matrix(a_mn: np.ndarray) -> np.ndarray:
  """The pattern of a qrel matrix with the same count in every row.

  Args:
    a_mn: [m, n], nonzero (or True) where relevant.

  Returns:
    relevant_mk: int32 [m, k], each row's nonzero columns in order.

  Raises:
    ValueError: not 2-D, or rows with different numbers of relevant docs.
  """
  a_mn = np.asarray(a_mn)
  if a_mn.ndim != 2:
    raise ValueError(f"a_mn must be 2-D [m, n], got shape {a_mn.shape}")
  mask_mn = a_mn != 0
  counts_m = mask_mn.sum(axis=1)
  if counts_m.size and (counts_m != counts_m[0]).any():
    bad = int(np.flatnonzero(counts_m != counts_m[0])[0])
    raise ValueError(
        f"a_mn rows must have equal numbers of relevant docs; row 0 has "
        f"{counts_m[0]}, row {bad} has {counts_m[bad]}")
  k = int(counts_m[0]) if counts_m.size else 0
  # np.nonzero walks row-major, so each row's columns come out ascending.
  _, cols = np.nonzero(mask_mn)
  return cols.astype(np.int32).reshape(a_mn.shape[0], k)


def limit_qrels(path: str, split: str = "test"
                ) -> tuple[np.ndarray, list[str], list[str]]:
  """Reads a BEIR collection's qrels as a pattern over corpus order.

  For the LIMIT-small collection this gives 1000 x 2 over its 46 documents;
  there the rows equal `dense(num_queries=1000)`, since the corpus lists the
  documents in the order the generator numbered them.

  Args:
    path: str, a BEIR directory (corpus.jsonl, queries.jsonl, qrels/).
    split: str, the qrels split to read.

  Returns:
    (relevant_mk, doc_ids, query_ids): relevant_mk int32 [m, k], row i the
    sorted corpus indices of the documents judged relevant (score > 0) to
    query_ids[i]; doc_ids list[str] [n] in corpus order; query_ids
    list[str] [m], the judged queries in queries.jsonl order.

  Raises:
    ValueError: queries with different numbers of relevant documents (or
      none).
    beir.BeirFormatError: a malformed collection, or qrels naming ids the
      collection lacks.
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
        f"nonzero number of relevant docs; found counts {counts}")
  relevant_mk = np.array(rows, np.int32).reshape(len(rows), counts[0])
  return relevant_mk, list(collection.doc_ids), query_ids


def _check_relevant(relevant_mk, num_docs: int) -> np.ndarray:
  """Validates a pattern: 2-D ints in [0, num_docs), distinct per row."""
  relevant_mk = np.asarray(relevant_mk)
  if relevant_mk.ndim != 2 or not np.issubdtype(relevant_mk.dtype,
                                                 np.integer):
    raise ValueError(
        f"relevant_mk must be a 2-D int array [m, k], got shape "
        f"{relevant_mk.shape} dtype {relevant_mk.dtype}")
  if relevant_mk.size and (relevant_mk.min() < 0 or
                           relevant_mk.max() >= num_docs):
    raise ValueError(
        f"relevant_mk must lie in [0, {num_docs}), got range "
        f"[{relevant_mk.min()}, {relevant_mk.max()}]")
  sorted_mk = np.sort(relevant_mk, axis=1)
  if (sorted_mk[:, 1:] == sorted_mk[:, :-1]).any():
    raise ValueError("relevant_mk rows must hold distinct doc indices")
  return relevant_mk


def moment_curve_docs(n: int, k: int = 2, dtype=np.float64) -> np.ndarray:
  """Documents on the trigonometric moment curve of degree k in R^{2k}.

  Args:
    n: int, the number of documents; document j sits at 2 pi j / n.
    k: int, the degree (the top-k size the embedding realises).
    dtype: numpy float dtype of the result; computed in float64, then cast.

  Returns:
    docs_nd: [n, 2k] of `dtype`, row j = (cos t, sin t, cos 2t, sin 2t, ...,
    cos kt, sin kt) with t = 2 pi j / n; every row has norm sqrt(k).
  """
  n = _check_positive_int("n", n)
  k = _check_positive_int("k", k)
  theta_n1 = (2 * np.pi / n) * np.arange(n)[:, None]
  angle_nk = theta_n1 * np.arange(1, k + 1)[None, :]
  docs_nkc = np.stack([np.cos(angle_nk), np.sin(angle_nk)], axis=-1)
  return docs_nkc.reshape(n, 2 * k).astype(dtype)


def moment_curve_queries(relevant_mk: np.ndarray, n: int,
                         dtype=np.float64) -> np.ndarray:
  """Queries whose exact top-k on `moment_curve_docs(n, k)` is their row.

  Query i is q = -2 (Re c_1, -Im c_1, ..., Re c_k, -Im c_k), where c_j is
  the lag-j autocorrelation of the coefficients of
  p(z) = prod_{a in row i} (z - exp(2 pi i a / n)); its score against the
  document at angle t is r_0 - |p(e^{it})|^2 (see the module docstring).

  Args:
    relevant_mk: int [m, k], distinct document indices in [0, n) per row.
    n: int, the number of documents on the curve.
    dtype: numpy float dtype of the result. The polynomial is expanded in
      complex128 and the result cast at the end, so a float32 query is the
      rounded float64 one (its rounding, not the expansion's, limits it).

  Returns:
    q_md: [m, 2k] of `dtype`.
  """
  n = _check_positive_int("n", n)
  relevant_mk = _check_relevant(relevant_mk, n)
  m, k = relevant_mk.shape
  roots_mk = np.exp(2j * np.pi * relevant_mk.astype(np.float64) / n)
  # Ascending coefficients of prod (z - w): multiplying by (z - w) shifts
  # the coefficients up one power and subtracts w times the old ones.
  poly_mt = np.ones((m, 1), np.complex128)
  for a in range(k):
    w_m1 = roots_mk[:, a:a + 1]
    zero_m1 = np.zeros((m, 1), np.complex128)
    poly_mt = (np.concatenate([zero_m1, poly_mt], axis=1)
               - w_m1 * np.concatenate([poly_mt, zero_m1], axis=1))
  # c_j = sum_t p_{t+j} conj(p_t), j = 1..k.
  c_mk = np.stack(
      [np.sum(poly_mt[:, j:] * np.conj(poly_mt[:, :k + 1 - j]), axis=1)
       for j in range(1, k + 1)], axis=1)
  q_mkc = np.stack([-2 * c_mk.real, 2 * c_mk.imag], axis=-1)
  return q_mkc.reshape(m, 2 * k).astype(dtype)


def _check_scores(scores_mn, relevant_mk) -> tuple[np.ndarray, np.ndarray]:
  scores_mn = np.asarray(scores_mn)
  if scores_mn.ndim != 2:
    raise ValueError(
        f"scores_mn must be 2-D [m, n], got shape {scores_mn.shape}")
  relevant_mk = _check_relevant(relevant_mk, scores_mn.shape[1])
  if relevant_mk.shape[0] != scores_mn.shape[0]:
    raise ValueError(
        f"scores_mn has {scores_mn.shape[0]} rows but relevant_mk has "
        f"{relevant_mk.shape[0]}")
  return scores_mn, relevant_mk


def top_k_recall(scores_mn: np.ndarray, relevant_mk: np.ndarray) -> float:
  """Fraction of relevant documents found in each query's top-k, k = |row|.

  sum_i |relevant_i ∩ top-k_i| / sum_i |relevant_i|; with k relevant per
  query this is recall@k averaged over queries, and 1.0 iff every top-k is
  exact. Ties are broken towards the lowest document index (a stable
  argsort of -scores): a relevant document tied at the k-th place with a
  lower-indexed irrelevant one counts as a miss, so the value does not
  depend on the sort's luck.

  Args:
    scores_mn: float [m, n], higher is better.
    relevant_mk: int [m, k].

  Returns:
    float in [0, 1].
  """
  scores_mn, relevant_mk = _check_scores(scores_mn, relevant_mk)
  m, k = relevant_mk.shape
  top_mk = np.argsort(-scores_mn, axis=1, kind="stable")[:, :k]
  hit_mk = (top_mk[:, :, None] == relevant_mk[:, None, :]).any(axis=2)
  return float(hit_mk.sum() / (m * k))


def min_top_k_margin(scores_mn: np.ndarray,
                     relevant_mk: np.ndarray) -> float:
  """Smallest gap between a query's relevant and irrelevant scores.

  min over queries of (min relevant score - max irrelevant score). Positive
  iff every query's top-k is exactly its relevant set with no ties; zero or
  negative means a tie or a miss somewhere.

  Args:
    scores_mn: float [m, n].
    relevant_mk: int [m, k], k < n.

  Returns:
    float, computed in float64 from the given scores.
  """
  scores_mn, relevant_mk = _check_scores(scores_mn, relevant_mk)
  if relevant_mk.shape[1] >= scores_mn.shape[1]:
    raise ValueError(
        f"min_top_k_margin needs an irrelevant doc: k="
        f"{relevant_mk.shape[1]} >= n={scores_mn.shape[1]}")
  # float64 so the subtraction adds no rounding of its own.
  scores_mn = scores_mn.astype(np.float64)
  relevant_min_m = np.take_along_axis(scores_mn, relevant_mk, axis=1).min(1)
  masked_mn = scores_mn.copy()
  np.put_along_axis(masked_mn, relevant_mk, -np.inf, axis=1)
  return float((relevant_min_m - masked_mn.max(axis=1)).min())
