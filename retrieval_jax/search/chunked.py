"""Corpus rows laid out once for a chunked `lax.scan` search (device side).

`hamming.hamming_topk` and `product_quantization.adc_topk` scan [T, C, ...]
chunks with a running top-k; building the padded device copy once per index
(not per query) keeps host-to-device copies out of the search.
"""

import dataclasses

import jax
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
