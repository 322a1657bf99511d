"""Exact top-k search over an encoded corpus: chunked, jitted and sharded.

Corpus rows split over the `CORPUS` rule's mesh axes; each device scans its
slice in a `lax.scan` keeping a running top-k, then the lists are merged.
Scores are float32 inner products ("exact" for them; inputs must be finite);
ties go to the smaller corpus index: `lax.top_k` puts the lower position
first and every candidate list is laid out in index order.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from retrieval_jax import sharding

METRICS = ("dot", "cosine")
# Index of the running top-k's empty slots; above every real or padding index.
_EMPTY_INDEX = np.iinfo(np.int32).max
# Cosine of a zero vector is defined as 0 (normalised by max(norm, eps)).
_NORM_EPS = 1e-12


@dataclasses.dataclass(frozen=True)
class EncodedCorpus:
  """A corpus padded, normalised and sharded for `search`.

  embeddings_nd: [N_pad, D]; rows >= num_docs are padding, never returned.
  """

  embeddings_nd: jax.Array
  num_docs: int
  metric: str
  chunk_size: int
  mesh: Mesh


def _corpus_axes(mesh: Mesh) -> tuple[str, ...]:
  spec = sharding.logical_to_spec((sharding.CORPUS, None))
  axes = spec[0]
  if axes is None:
    return ()
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  return tuple(a for a in axes if a in mesh.shape)


def _num_shards(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in _corpus_axes(mesh)]))


def _l2_normalize(x_nd: jax.Array) -> jax.Array:
  x_nd = x_nd.astype(jnp.float32)
  norm_n1 = jnp.linalg.norm(x_nd, axis=-1, keepdims=True)
  return x_nd / jnp.maximum(norm_n1, _NORM_EPS)


@functools.partial(
    jax.jit, static_argnames=("num_pad", "normalize", "out_sharding")
)
def _pad_and_place(corpus_nd, *, num_pad, normalize, out_sharding):
  # The constraint lets each device materialise only its own rows.
  if normalize:
    corpus_nd = _l2_normalize(corpus_nd)
  corpus_nd = jnp.pad(corpus_nd, ((0, num_pad), (0, 0)))
  return jax.lax.with_sharding_constraint(corpus_nd, out_sharding)


def encode_corpus(
    corpus_nd,
    *,
    metric: str = "dot",
    chunk_size: int = 16384,
    mesh: Mesh | None = None,
) -> EncodedCorpus:
  """Pads, normalises (cosine, in float32) and shards [N, D] rows once.

  chunk_size bounds the rows scored per scan step and device (the [Q, chunk]
  float32 scores); mesh defaults to `sharding.make_mesh()`.
  """
  if metric not in METRICS:
    raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
  if corpus_nd.ndim != 2:
    raise ValueError(f"corpus must be [N, D], got shape {corpus_nd.shape}")
  num_docs = int(corpus_nd.shape[0])
  if num_docs == 0:
    raise ValueError("empty corpus")
  mesh = sharding.make_mesh() if mesh is None else mesh
  shards = _num_shards(mesh)
  rows_per_shard = -(-num_docs // shards)
  # Fewest chunks `chunk_size` allows, then the smallest multiple of 128
  # (aligned groups and tiles) covering the shard: little padding.
  num_chunks = -(-rows_per_shard // max(int(chunk_size), 128))
  chunk_size = -(-rows_per_shard // (num_chunks * 128)) * 128
  rows_per_shard = num_chunks * chunk_size
  num_pad = rows_per_shard * shards - num_docs
  out_sharding = NamedSharding(mesh, PartitionSpec(_corpus_axes(mesh), None))
  embeddings_nd = _pad_and_place(
      corpus_nd,
      num_pad=num_pad,
      normalize=metric == "cosine",
      out_sharding=out_sharding,
  )
  return EncodedCorpus(embeddings_nd, num_docs, metric, chunk_size, mesh)


def _merge(scores_qa, index_qa, scores_qb, index_qb, k):
  """Top-k of two candidate lists; list `a` must hold the smaller indices.

  The running top-k first also makes CPU TopK cheap (it heapifies the first k).
  """
  scores_qc = jnp.concatenate([scores_qa, scores_qb], axis=-1)
  index_qc = jnp.concatenate([index_qa, index_qb], axis=-1)
  scores_qk, pos_qk = lax.top_k(scores_qc, k)
  return scores_qk, jnp.take_along_axis(index_qc, pos_qk, axis=-1)


def default_group_size(k: int, chunk_size: int) -> int:
  """Power of two near sqrt(chunk / k) in [1, 128] (divides every chunk).

  Balances the chunk / g group maxima against the k × g candidates.
  """
  ideal = np.sqrt(chunk_size / max(k, 1))
  return int(2 ** np.clip(np.round(np.log2(ideal)), 0, 7))


def _update_topk(
    best_scores_qk, best_index_qk, scores_qc, start, num_docs, group_size
):
  """Merges one chunk's [Q, C] scores into the running [Q, k] top-k, exactly.

  Two stages: the top-k groups of `group_size` rows by maximum (lower group
  first on ties) hold the chunk's top-k rows, since a row r outside them is
  outranked by the k selected groups' maximum rows. A row enters only with a
  score > tau, the running k-th (running rows precede the chunk), so groups
  with max <= tau become -inf; with <= m groups left, top-m is exact too.
  """
  q, c = scores_qc.shape
  k = best_scores_qk.shape[1]
  # Padding is masked by index, never trusted to score low.
  num_groups = c // group_size if group_size > 1 else 0
  if num_groups <= k or c % group_size:
    valid_c = start + jnp.arange(c, dtype=jnp.int32) < num_docs
    masked_qc = jnp.where(valid_c[None, :], scores_qc, -jnp.inf)
    index_qc = jnp.broadcast_to(start + jnp.arange(c, dtype=jnp.int32), (q, c))
    return _merge(best_scores_qk, best_index_qk, masked_qc, index_qc, k)

  scores_qgr = scores_qc.reshape(q, num_groups, group_size)
  # Maxima of the raw scores: masking all of [Q, C] first would cost one
  # more full pass over the scores (the CPU reduction does not fuse it).
  max_qg = jnp.max(scores_qgr, axis=-1)
  group_start_g = start + jnp.arange(num_groups, dtype=jnp.int32) * group_size
  max_qg = jnp.where(group_start_g[None, :] < num_docs, max_qg, -jnp.inf)
  # Only the group holding row num_docs mixes real and padding rows.
  mixed = jnp.clip((num_docs - start) // group_size, 0, num_groups - 1)
  rows_qr = lax.dynamic_slice_in_dim(
      scores_qc, mixed * group_size, group_size, axis=1
  )
  valid_r = (
      start + mixed * group_size + jnp.arange(group_size, dtype=jnp.int32)
  ) < num_docs
  mixed_max_q1 = jnp.max(
      jnp.where(valid_r[None, :], rows_qr, -jnp.inf), axis=1, keepdims=True
  )
  max_qg = lax.dynamic_update_slice_in_dim(max_qg, mixed_max_q1, mixed, axis=1)
  tau_q1 = best_scores_qk[:, -1:]
  max_qg = jnp.where(max_qg > tau_q1, max_qg, -jnp.inf)

  def merge_groups(m):  # exact when every group above tau is in the top m
    _, group_qm = lax.top_k(max_qg, m)
    group_qm = jnp.sort(group_qm, axis=-1)  # index order: tie-break contract
    cand_qmr = jnp.take_along_axis(scores_qgr, group_qm[:, :, None], axis=1)
    pos_qmr = group_qm[:, :, None] * group_size + jnp.arange(
        group_size, dtype=group_qm.dtype
    )
    index_qmr = start + pos_qmr.astype(jnp.int32)
    cand_qmr = jnp.where(index_qmr < num_docs, cand_qmr, -jnp.inf)
    return _merge(
        best_scores_qk,
        best_index_qk,
        cand_qmr.reshape(q, -1),
        index_qmr.reshape(q, -1),
        k,
    )

  # Once few groups beat tau (<= k / 4 for all queries) select only those;
  # below k = 32 the branch costs more than it saves (measured on CPU).
  few = k // 4
  if k < 32:
    return merge_groups(k)
  num_above_q = jnp.sum(max_qg > -jnp.inf, axis=1)
  return lax.cond(
      jnp.max(num_above_q) <= few,
      lambda: merge_groups(few),
      lambda: merge_groups(k),
  )


@functools.partial(
    jax.jit, static_argnames=("k", "chunk_size", "group_size", "mesh")
)
def _search_batch(
    queries_qd, corpus_nd, num_docs, *, k, chunk_size, group_size, mesh
):
  """Top-k of one query batch against the sharded corpus (see `search`)."""
  axes = _corpus_axes(mesh)
  row_spec = PartitionSpec(axes, None)

  def search_shard(queries_qd, corpus_md, num_docs):
    rows, dim = corpus_md.shape
    num_chunks = rows // chunk_size
    shard = lax.axis_index(axes) if axes else 0
    starts_c = (
        shard * rows + jnp.arange(num_chunks, dtype=jnp.int32) * chunk_size
    )
    chunks_tcd = corpus_md.reshape(num_chunks, chunk_size, dim)

    def step(carry, xs):
      chunk_cd, start = xs
      # HIGHEST: full float32 products on TPU/GPU (no bf16 / TF32 passes).
      scores_qc = jnp.einsum(
          "qd,cd->qc",
          queries_qd,
          chunk_cd,
          precision=lax.Precision.HIGHEST,
          preferred_element_type=jnp.float32,
      )
      return _update_topk(*carry, scores_qc, start, num_docs, group_size), None

    q = queries_qd.shape[0]
    init = (
        jnp.full((q, k), -jnp.inf, jnp.float32),
        jnp.full((q, k), _EMPTY_INDEX, jnp.int32),
    )
    if axes:  # the carry is per-shard after one step
      init = lax.pcast(init, axes, to="varying")
    (scores_qk, index_qk), _ = lax.scan(step, init, (chunks_tcd, starts_c))
    return scores_qk[None], index_qk[None]

  scores_sqk, index_sqk = jax.shard_map(
      search_shard,
      mesh=mesh,
      in_specs=(PartitionSpec(), row_spec, PartitionSpec()),
      out_specs=(PartitionSpec(axes), PartitionSpec(axes)),
  )(queries_qd, corpus_nd, num_docs)
  # Shards hold consecutive row blocks, so shard-major order is index order.
  q = queries_qd.shape[0]
  scores_qx = scores_sqk.transpose(1, 0, 2).reshape(q, -1)
  index_qx = index_sqk.transpose(1, 0, 2).reshape(q, -1)
  scores_qk, pos_qk = lax.top_k(scores_qx, k)
  return scores_qk, jnp.take_along_axis(index_qx, pos_qk, axis=-1)


def search(
    corpus: EncodedCorpus,
    queries_qd,
    k: int,
    *,
    query_batch_size: int | None = None,
    group_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Exact top-k rows of an `EncodedCorpus` for [Q, D] queries, 1 <= k <= N.

  query_batch_size: queries per jitted call (the last zero-padded: one compiled
  shape); group_size 1 disables the two-stage selection. Returns scores_qk
  [Q, k] float32 descending and indices_qk [Q, k] int32.
  """
  dim = corpus.embeddings_nd.shape[1]
  if queries_qd.ndim != 2 or queries_qd.shape[1] != dim:
    raise ValueError(
        f"queries must be [Q, {dim}], got shape {queries_qd.shape}"
    )
  if not 1 <= k <= corpus.num_docs:
    raise ValueError(f"k={k} must be in [1, N={corpus.num_docs}]")
  num_queries = queries_qd.shape[0]
  if corpus.metric == "cosine":
    queries_qd = _l2_normalize(jnp.asarray(queries_qd))
  batch = num_queries if query_batch_size is None else int(query_batch_size)
  batch = max(1, min(batch, num_queries))
  if group_size is None:
    group_size = default_group_size(k, corpus.chunk_size)
  run = functools.partial(
      _search_batch,
      corpus_nd=corpus.embeddings_nd,
      num_docs=jnp.int32(corpus.num_docs),
      k=k,
      chunk_size=corpus.chunk_size,
      group_size=group_size,
      mesh=corpus.mesh,
  )
  outputs = []
  for lo in range(0, num_queries, batch):
    queries_bd = queries_qd[lo : lo + batch]
    short = batch - queries_bd.shape[0]  # zero rows: one compiled shape
    if short:
      queries_bd = jnp.pad(jnp.asarray(queries_bd), ((0, short), (0, 0)))
    # Fetched after the loop, so the next batch queues while this one runs.
    outputs.append((run(queries_bd), batch - short))
  scores_qk = np.concatenate([np.asarray(s)[:n] for (s, _), n in outputs])
  indices_qk = np.concatenate([np.asarray(i)[:n] for (_, i), n in outputs])
  # Only non-finite scores (inf / NaN inputs) could let a padding row through.
  if (indices_qk >= corpus.num_docs).any():
    raise FloatingPointError("non-finite scores: padding rows were selected")
  return scores_qk, indices_qk


def exact_topk(
    queries_qd,
    corpus_nd,
    k: int,
    *,
    metric: str = "dot",
    chunk_size: int = 16384,
    mesh: Mesh | None = None,
    query_batch_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """One-shot `encode_corpus` + `search`: [Q, k] float32 scores, int32 rows."""
  corpus = encode_corpus(
      corpus_nd, metric=metric, chunk_size=chunk_size, mesh=mesh
  )
  return search(corpus, queries_qd, k, query_batch_size=query_batch_size)
