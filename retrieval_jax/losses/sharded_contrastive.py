"""`shard_map` form of the contrastive losses: the [B, C] matrix stays sharded.

Each shard all-gathers the passages (the transpose is a reduce-scatter, so no
PyTorch-style "× W" factor), scores its B/W queries against all C with masks
from *global* indices, and psums per-row sums and valid counts: loss and
gradients equal the dense loss at [B/W, C] peak memory per shard.
"""

from collections.abc import Callable, Sequence
import math

import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from retrieval_jax.losses import contrastive

LossFn = Callable[
    [jax.Array, jax.Array, jax.Array], tuple[jax.Array, dict[str, jax.Array]]
]


def _is_symmetric(loss_fn) -> bool:
  return getattr(loss_fn, "func", loss_fn) is contrastive.symmetric_info_nce


def _symmetric_shard(
    scores_lc,
    positive_lc,
    valid_lc,
    q_bd,
    p_cd,
    rows_l,
    counts_b,
    doc_c,
    rel_br,
    temperature,
    group_size,
    share,
):
  """Local rows of `symmetric_info_nce`; reverse terms need all B queries."""
  fwd_loss, aux = contrastive.info_nce(scores_lc, positive_lc, valid_lc)
  first_l = contrastive.first_positive(positive_lc, valid_lc)  # global cols
  scores_lb = (
      jnp.einsum(
          "ld,bd->lb", p_cd[first_l], q_bd, preferred_element_type=jnp.float32
      )
      / temperature
  )
  rows_b = jnp.arange(q_bd.shape[0], dtype=jnp.int32)
  # valid[i, first(k)] for every query i: the dense loss's column k.
  _, valid_bl = contrastive.candidate_masks(
      rows_b, first_l, counts_b, group_size, doc_c, rel_br, share
  )
  # Dropped queries are no reverse candidates; their validity depends only
  # on counts and ids, both gathered, so no [B, C] mask is needed.
  row_valid_b = contrastive.rows_with_positive(counts_b, group_size, doc_c)
  valid_lb = valid_bl.T & row_valid_b[None, :]
  rev_l = contrastive.reverse_rows(scores_lb, valid_lb, rows_l)
  # Same valid rows as the forward term, so it pairs with "num_valid_rows".
  n = aux["num_valid_rows"]
  rev_loss = jnp.sum(jnp.where(row_valid_b[rows_l], rev_l, 0.0)) / jnp.maximum(
      n, 1.0
  )
  aux = dict(aux, forward_loss=fwd_loss, reverse_loss=rev_loss)
  return 0.5 * (fwd_loss + rev_loss), aux


def sharded_contrastive_loss(
    loss_fn: LossFn,
    q_bd: jax.Array,
    p_cd: jax.Array,
    positive_counts_b: jax.Array,
    passage_doc_c: jax.Array | None,
    relevant_doc_br: jax.Array | None,
    *,
    temperature: float,
    group_size: int,
    mesh: Mesh,
    axis_names: Sequence[str] = ("data", "fsdp"),
    share_hard_negatives: bool = True,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """A `contrastive.py` loss on the global batch, computed shard by shard.

  Args:
    loss_fn: a `contrastive.py` loss (or partial); any loss whose loss and aux
      are means over valid rows works.
    q_bd: [B, D] float32 or bfloat16; p_cd: [C = B·G, D], query-major groups.
    positive_counts_b, passage_doc_c, relevant_doc_br, group_size,
      share_hard_negatives: as in `contrastive.group_masks`; τ = temperature.
    mesh, axis_names: the batch is split over the named mesh axes present (B
      divisible by their size); other axes see replicated inputs.

  Returns:
    (loss, aux) equal to the dense loss; "num_valid_rows" is the global count.
  """
  axes = tuple(a for a in axis_names if a in mesh.shape)
  num_shards = math.prod(mesh.shape[a] for a in axes)
  b, c = q_bd.shape[0], p_cd.shape[0]
  if c != b * group_size:
    raise ValueError(f"{c} passages != {b} queries x group size {group_size}")
  if b % num_shards:
    raise ValueError(f"batch {b} not divisible by {num_shards} shards {axes}")
  has_doc = passage_doc_c is not None
  has_rel = has_doc and relevant_doc_br is not None
  symmetric = _is_symmetric(loss_fn)
  rows = PartitionSpec(axes)
  rows2 = PartitionSpec(axes, None)

  def shard_fn(q_ld, p_md, counts_l, *ids):
    ids = list(ids)  # optional id arrays, only when present
    doc_m = ids.pop(0) if has_doc else None
    rel_lr = ids.pop(0) if has_rel else None
    b_local = q_ld.shape[0]
    # Linear index over `axes`, major to minor, as a PartitionSpec lays it out.
    shard = lax.axis_index(axes) if axes else 0
    rows_l = shard * b_local + jnp.arange(b_local, dtype=jnp.int32)

    def gather(x):  # tiled in shard order: the global array
      return lax.all_gather(x, axes, tiled=True) if axes else x

    p_cd = gather(p_md)
    # All counts and ids: column owners and duplicate positives can be anywhere.
    counts_b = gather(counts_l)
    doc_c = gather(doc_m) if has_doc else None
    # The only score block a shard ever holds: [B/W, C], float32.
    scores_lc = (
        jnp.einsum("ld,cd->lc", q_ld, p_cd, preferred_element_type=jnp.float32)
        / temperature
    )
    cols_c = jnp.arange(p_cd.shape[0], dtype=jnp.int32)
    positive_lc, valid_lc = contrastive.candidate_masks(
        rows_l,
        cols_c,
        counts_b,
        group_size,
        doc_c,
        rel_lr,
        share_hard_negatives,
    )
    if symmetric:
      loss, aux = _symmetric_shard(
          scores_lc,
          positive_lc,
          valid_lc,
          gather(q_ld),
          p_cd,
          rows_l,
          counts_b,
          doc_c,
          gather(rel_lr) if has_rel else None,
          temperature,
          group_size,
          share_hard_negatives,
      )
    else:
      loss, aux = loss_fn(scores_lc, positive_lc, valid_lc)
    # Local means × local counts are the local sums (0 for a shard without
    # valid rows); the global mean is psum(sums) / psum(counts).
    n = aux["num_valid_rows"]
    psum = (lambda x: lax.psum(x, axes)) if axes else (lambda x: x)
    total = psum(n)
    denom = jnp.maximum(total, 1.0)
    out = {
        k: psum(v * n) / denom for k, v in aux.items() if k != "num_valid_rows"
    }
    out["num_valid_rows"] = total
    return psum(loss * n) / denom, out

  args = [q_bd, p_cd, positive_counts_b]
  specs = [rows2, rows2, rows]
  if has_doc:
    args.append(passage_doc_c)
    specs.append(rows)
  if has_rel:
    args.append(relevant_doc_br)
    specs.append(rows2)
  # Mesh axes outside `axes` (e.g. model) see replicated inputs and compute
  # the same value, so the scalar outputs are replicated everywhere.
  return jax.shard_map(
      shard_fn, mesh=mesh, in_specs=tuple(specs), out_specs=PartitionSpec()
  )(*args)
