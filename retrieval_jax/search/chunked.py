"""Corpus rows laid out once for a chunked `lax.scan` search (device side).

`hamming.hamming_topk` and `product_quantization.adc_topk` scan [T, C, ...]
chunks with a running top-k (`scan_topk`); building the padded device copy
once per index (not per query) keeps host-to-device copies out of the search.
"""

from collections.abc import Callable
import dataclasses

import jax
from jax import lax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class ChunkedRows:
  """rows_tc…: [T, C, ...] zero-padded rows; rows >= num_rows are padding."""

  rows_tc: jax.Array
  num_rows: int

  @property
  def chunk_size(self) -> int:
    return int(self.rows_tc.shape[1])


def chunk_rows(rows_n, chunk_size: int = 4096) -> ChunkedRows:
  """[N, ...] array (or a ChunkedRows, returned as is) -> ChunkedRows.

  chunk_size is clipped to N; the last chunk is zero-padded.
  """
  if isinstance(rows_n, ChunkedRows):
    return rows_n
  rows_n = jnp.asarray(rows_n)
  n = int(rows_n.shape[0])
  if n == 0:
    raise ValueError("no rows to search")
  chunk_size = max(1, min(int(chunk_size), n))
  num_chunks = -(-n // chunk_size)
  pad = [(0, num_chunks * chunk_size - n)] + [(0, 0)] * (rows_n.ndim - 1)
  rows_n = jnp.pad(rows_n, pad)
  return ChunkedRows(
      rows_n.reshape(num_chunks, chunk_size, *rows_n.shape[1:]), n
  )


def scan_topk(
    score_chunk: Callable[[jax.Array], jax.Array],
    rows_tc: jax.Array,
    num_rows: jax.Array,
    *,
    k: int,
    fill,
) -> tuple[jax.Array, jax.Array]:
  """Top-k rows by score, highest first; ties keep the smaller row.

  score_chunk: [C, ...] rows -> [Q, C] scores; rows >= num_rows score
  `fill`, below every real score. Traceable (call it inside a jit).
  Returns ([Q, k] scores, [Q, k] int32 rows).
  """
  num_chunks, chunk_size = rows_tc.shape[:2]
  shape = jax.eval_shape(score_chunk, rows_tc[0])
  q = shape.shape[0]

  def step(carry, xs):
    best_qk, index_qk = carry
    chunk, start = xs
    index_c = start + jnp.arange(chunk_size, dtype=jnp.int32)
    scores_qc = jnp.where(index_c[None, :] < num_rows, score_chunk(chunk), fill)
    # Running list first: lax.top_k keeps the lower position on ties, and
    # every earlier row sits at a lower position, so ties stay in row order.
    scores_qx = jnp.concatenate([best_qk, scores_qc], axis=1)
    index_qx = jnp.concatenate(
        [index_qk, jnp.broadcast_to(index_c, (q, chunk_size))], axis=1
    )
    best_qk, pos_qk = lax.top_k(scores_qx, k)
    return (best_qk, jnp.take_along_axis(index_qx, pos_qk, axis=1)), None

  starts_t = jnp.arange(num_chunks, dtype=jnp.int32) * chunk_size
  init = (
      jnp.full((q, k), fill, shape.dtype),
      jnp.full((q, k), jnp.iinfo(jnp.int32).max, jnp.int32),
  )
  (scores_qk, index_qk), _ = lax.scan(step, init, (rows_tc, starts_t))
  return scores_qk, index_qk
