"""Bit-packed binary codes: Hamming distance and top-k, in JAX and NumPy.

A code packs the signs of a [.., D] vector (x >= 0 -> bit 1, as
`layers.binary_hash.sign_codes`) with `np.packbits` (uint8, D/8 bytes); the
uint32 form is the same bytes read little-endian, so both forms of a code
hold the same bits and give the same distances. Hamming distance = popcount
of XOR (`lax.population_count`, `np.bitwise_count`); for ±1 codes
⟨a, b⟩ = D − 2·Hamming(a, b). Top-k is by ascending distance, ties to the
smaller document index (the order exact search uses), so brute force is
its exact oracle. `rerank` is BPR's second stage: the continuous query
scores the ±1 codes of the Hamming candidates.
Hand-written rather than faiss `IndexBinaryFlat`: the JAX path runs under
jit on any backend next to the trainer's encoders, and BPR's re-ranking
needs the candidates' codes (faiss is the tests' second oracle).
"""

import functools

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from retrieval_jax.search import chunked

WORD_DTYPES = ("uint8", "uint32")
# Little-endian uint32 words: the same on every host.
_U32_LE = np.dtype("<u4")


def pack_signs(x_nd, word: str = "uint8") -> np.ndarray:
  """[N, D] float -> [N, W] packed sign bits (bit = x >= 0), NumPy.

  word "uint8": W = ceil(D / 8), `np.packbits` order; "uint32": W =
  ceil(D / 32), the uint8 bytes zero-padded and read little-endian.
  Padding bits are 0 in every code, so they never add to a distance.
  """
  if word not in WORD_DTYPES:
    raise ValueError(f"word={word!r}: expected one of {WORD_DTYPES}")
  bits_nd = np.asarray(x_nd) >= 0
  bytes_nb = np.packbits(bits_nd, axis=-1)
  if word == "uint8":
    return bytes_nb
  pad = -bytes_nb.shape[-1] % 4
  bytes_nb = np.pad(bytes_nb, ((0, 0), (0, pad)))
  return np.ascontiguousarray(bytes_nb).view(_U32_LE).astype(np.uint32)


def unpack_signs(codes_nw, dim: int) -> np.ndarray:
  """[N, W] uint8 / uint32 codes -> [N, dim] float32 ±1, NumPy."""
  codes_nw = np.asarray(codes_nw)
  if codes_nw.dtype == np.uint32:
    codes_nw = np.ascontiguousarray(codes_nw.astype(_U32_LE)).view(np.uint8)
  bits_nd = np.unpackbits(codes_nw, axis=-1, count=dim)
  return 2.0 * bits_nd.astype(np.float32) - 1.0


def hamming_distance_np(a_qw, b_nw) -> np.ndarray:
  """[Q, W] × [N, W] packed codes -> [Q, N] int32 distances, NumPy."""
  a_qw, b_nw = np.asarray(a_qw), np.asarray(b_nw)
  # NumPy >= 2 (a stated dependency) has a popcount ufunc.
  xor_qnw = a_qw[:, None, :] ^ b_nw[None, :, :]
  return np.bitwise_count(xor_qnw).sum(axis=-1, dtype=np.int32)


def hamming_topk_np(
    queries_qw, docs_nw, k: int, *, chunk_size: int = 8192
) -> tuple[np.ndarray, np.ndarray]:
  """Top-k nearest codes, NumPy: ([Q, k] int32 distances, [Q, k] int32 ids).

  Ties go to the smaller index: the key distance·N + index is unique.
  """
  n = len(docs_nw)
  if not 1 <= k <= n:
    raise ValueError(f"k={k} must be in [1, N={n}]")
  q = len(queries_qw)
  best_qk = np.zeros((q, 0), np.int64)
  for lo in range(0, n, chunk_size):
    dist_qc = hamming_distance_np(queries_qw, docs_nw[lo : lo + chunk_size])
    ids_c = np.arange(lo, lo + dist_qc.shape[1], dtype=np.int64)
    key_qc = dist_qc.astype(np.int64) * n + ids_c[None, :]
    key_qx = np.concatenate([best_qk, key_qc], axis=1)
    m = min(k, key_qx.shape[1])
    best_qk = np.partition(key_qx, m - 1, axis=1)[:, :m]
  best_qk = np.sort(best_qk, axis=1)
  return (best_qk // n).astype(np.int32), (best_qk % n).astype(np.int32)


def hamming_distance(a_qw: jax.Array, b_nw: jax.Array) -> jax.Array:
  """[Q, W] × [N, W] packed codes -> [Q, N] int32 distances, JAX."""
  xor_qnw = jnp.bitwise_xor(a_qw[:, None, :], b_nw[None, :, :])
  return jnp.sum(lax.population_count(xor_qnw).astype(jnp.int32), axis=-1)


@functools.partial(jax.jit, static_argnames=("k",))
def _topk_scan(queries_qw, docs_tcw, num_docs, *, k):
  """Running top-k over [T, C, W] chunks (lower index first on ties)."""
  # Negated distances, highest first; padding below every real one.
  neg_qk, index_qk = chunked.scan_topk(
      lambda chunk_cw: -hamming_distance(queries_qw, chunk_cw),
      docs_tcw,
      num_docs,
      k=k,
      fill=-jnp.iinfo(jnp.int32).max,
  )
  return -neg_qk, index_qk


def hamming_topk(
    queries_qw, docs_nw, k: int, *, chunk_size: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
  """Top-k nearest codes, JAX: ([Q, k] int32 distances, [Q, k] int32 ids).

  docs_nw: [N, W] uint8 / uint32 codes (as queries_qw), or their
  `chunked.chunk_rows` (build it once per index: no copy per search); the
  scan's [Q, chunk, W] XOR bounds memory. Single device.
  """
  docs = chunked.chunk_rows(docs_nw, chunk_size)
  if not 1 <= k <= docs.num_rows:
    raise ValueError(f"k={k} must be in [1, N={docs.num_rows}]")
  dist_qk, index_qk = _topk_scan(
      jnp.asarray(queries_qw),
      docs.rows_tc,
      jnp.int32(docs.num_rows),
      k=k,
  )
  return np.asarray(dist_qk), np.asarray(index_qk)


def _unpack_jax(codes_xw: jax.Array, dim: int) -> jax.Array:
  """[..., W] uint8 / uint32 codes -> [..., dim] float32 ±1 (`pack_signs`)."""
  if codes_xw.dtype == jnp.uint32:
    # Little-endian bytes of each word, then np.packbits' big bit order.
    shifts_b = jnp.arange(4, dtype=jnp.uint32) * 8
    codes_xw = (codes_xw[..., None] >> shifts_b).astype(jnp.uint8)
    codes_xw = codes_xw.reshape(*codes_xw.shape[:-2], -1)
  shifts_8 = 7 - jnp.arange(8, dtype=jnp.uint8)
  bits_xb8 = (codes_xw[..., None] >> shifts_8) & 1
  bits_xd = bits_xb8.reshape(*bits_xb8.shape[:-2], -1)[..., :dim]
  return 2.0 * bits_xd.astype(jnp.float32) - 1.0


@functools.partial(jax.jit, static_argnames=("dim", "k"))
def _rerank(queries_qd, docs_nw, candidates_qc, *, dim, k):
  codes_qcd = _unpack_jax(docs_nw[candidates_qc], dim)
  scores_qc = jnp.einsum(
      "qd,qcd->qc",
      queries_qd.astype(jnp.float32),
      codes_qcd,
      precision=lax.Precision.HIGHEST,
  )
  # Candidates arrive best Hamming first: ties keep that order.
  scores_qk, pos_qk = lax.top_k(scores_qc, k)
  return scores_qk, jnp.take_along_axis(candidates_qc, pos_qk, axis=1)


def rerank(
    queries_qd, docs_nw, candidates_qc, k: int, *, dim: int
) -> tuple[np.ndarray, np.ndarray]:
  """BPR's re-ranking: ⟨q, ±1 code of d⟩ over each query's candidates.

  queries_qd [Q, dim] float; docs_nw [N, W] packed codes; candidates_qc
  [Q, C] int32 rows (a Hamming top-C). Returns ([Q, k] float32 scores,
  descending; [Q, k] int32 rows), k <= C.
  """
  if not 1 <= k <= candidates_qc.shape[1]:
    raise ValueError(f"k={k} must be in [1, C={candidates_qc.shape[1]}]")
  scores_qk, index_qk = _rerank(
      jnp.asarray(queries_qd),
      jnp.asarray(docs_nw),
      jnp.asarray(candidates_qc, jnp.int32),
      dim=dim,
      k=k,
  )
  return np.asarray(scores_qk), np.asarray(index_qk)
