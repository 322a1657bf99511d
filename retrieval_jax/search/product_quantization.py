"""Asymmetric distance computation (ADC) for product-quantised documents.

A PQ code splits D into M sub-spaces of S = D / M dims; document n stores
one centroid id per sub-space, codes_nm [N, M], into centroids_mks
[M, K, S]. ADC scores a float query against the codes without decoding:
tables_qmk = ⟨q_m, c_mk⟩ once per query, then score(q, n) = Σ_m
tables[q, m, codes[n, m]] = ⟨q, decode(codes_n)⟩. This is JPQ's search, in
JAX so trained centroids are searched by the program that trains them;
`faiss_pq_arrays` reads the codebooks and codes of a faiss `IndexPQ`, whose
own decode is the tests' oracle.
"""

import functools

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from retrieval_jax.search import chunked

_HIGHEST = lax.Precision.HIGHEST


def faiss_pq_arrays(index) -> tuple[np.ndarray, np.ndarray]:
  """The codebooks and codes of a faiss `IndexPQ`, as ADC takes them.

  Returns centroids_mks float32 [M, 2^nbits, S] and codes_nm int32 [N, M]
  (faiss packs a code's M ids of `nbits` bits each, low bit first).
  """
  import faiss  # pylint: disable=g-import-not-at-top

  pq = index.pq
  centroids_mks = faiss.vector_to_array(pq.centroids).reshape(
      pq.M, pq.ksub, pq.dsub
  )
  packed_nb = faiss.vector_to_array(index.codes).reshape(index.ntotal, -1)
  if pq.nbits == 8:
    return centroids_mks, packed_nb.astype(np.int32)
  bits_nx = np.unpackbits(packed_nb, axis=1, bitorder="little")
  bits_nmb = bits_nx[:, : pq.M * pq.nbits].reshape(-1, pq.M, pq.nbits)
  weights_b = 1 << np.arange(pq.nbits, dtype=np.int32)
  return centroids_mks, bits_nmb.astype(np.int32) @ weights_b


def decode(centroids_mks: jax.Array, codes_nm: jax.Array) -> jax.Array:
  """[N, M] codes -> [N, M·S] reconstructed float32 vectors."""
  m = centroids_mks.shape[0]
  sub_nms = centroids_mks[jnp.arange(m)[None, :], codes_nm.astype(jnp.int32)]
  return sub_nms.reshape(codes_nm.shape[0], -1)


def adc_tables(queries_qd: jax.Array, centroids_mks: jax.Array) -> jax.Array:
  """[Q, D] queries -> [Q, M, K] float32 tables ⟨q_m, c_mk⟩."""
  m, _, s = centroids_mks.shape
  q_qms = queries_qd.astype(jnp.float32).reshape(-1, m, s)
  return jnp.einsum("qms,mks->qmk", q_qms, centroids_mks, precision=_HIGHEST)


def adc_scores(tables_qmk: jax.Array, codes_nm: jax.Array) -> jax.Array:
  """[Q, M, K] tables × [N, M] codes -> [Q, N] float32 Σ_m table entries."""
  m = tables_qmk.shape[1]
  # [Q, N, M] gathered entries: chunk N (`adc_topk`) to bound memory.
  entries_qnm = tables_qmk[
      :, jnp.arange(m)[None, :], codes_nm.astype(jnp.int32)
  ]
  return jnp.sum(entries_qnm, axis=-1)


@functools.partial(jax.jit, static_argnames=("k",))
def _adc_scan(tables_qmk, codes_tcm, num_docs, *, k):
  return chunked.scan_topk(
      lambda codes_cm: adc_scores(tables_qmk, codes_cm),
      codes_tcm,
      num_docs,
      k=k,
      fill=-jnp.inf,
  )


def adc_topk(
    queries_qd, centroids_mks, codes_nm, k: int, *, chunk_size: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
  """Top-k documents by ADC score: ([Q, k] float32, [Q, k] int32 rows).

  codes_nm: [N, M] ints or their `chunked.chunk_rows` (built once per
  index); ties go to the smaller row. Single device, N scanned in chunks.
  """
  codes = chunked.chunk_rows(codes_nm, chunk_size)
  if not 1 <= k <= codes.num_rows:
    raise ValueError(f"k={k} must be in [1, N={codes.num_rows}]")
  tables_qmk = adc_tables(jnp.asarray(queries_qd), jnp.asarray(centroids_mks))
  scores_qk, index_qk = _adc_scan(
      tables_qmk,
      codes.rows_tc,
      jnp.int32(codes.num_rows),
      k=k,
  )
  return np.asarray(scores_qk), np.asarray(index_qk)
