"""In-batch contrastive losses on a global score matrix (DPR group layout).

B queries, G passages each, C = B·G candidates query-major; the first m_i
slots of query i's group are its positives, the rest hard negatives. A loss is
`fn(scores_qc [B, C] already / τ, positive_qc, valid_qc [B, C] bool) -> (loss,
aux)`: float32 means over rows with a valid positive, aux "num_valid_rows" and
"accuracy", so `sharded_contrastive.py` can combine shards of any loss.
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp

# Masked logits become NEG, not -inf (NaN gradients); a quarter of the float32
# min stays finite when two masked LSEs are added (LSEPair) or subtracted.
NEG = 0.25 * float(jnp.finfo(jnp.float32).min)


def masked_logsumexp(x_qc: jax.Array, mask_qc: jax.Array) -> jax.Array:
  """[..., C] -> [...] log Σ_{mask} exp(x); all-masked rows give ~NEG."""
  # `where`, not a -inf bias: masked entries get exactly zero gradient.
  return jax.nn.logsumexp(jnp.where(mask_qc, x_qc, NEG), axis=-1)


def candidate_masks(
    rows_r: jax.Array,
    cols_c: jax.Array,
    positive_counts_b: jax.Array,
    group_size: int,
    passage_doc_x: jax.Array | None,
    relevant_doc_rk: jax.Array | None,
    share_hard_negatives: bool,
) -> tuple[jax.Array, jax.Array]:
  """[R, K] bool positive, valid masks of global rows × cols (`group_masks`)."""
  # jnp.asarray: numpy inputs must not be indexed by traced indices.
  counts_b = jnp.asarray(positive_counts_b, jnp.int32)
  owner_c = cols_c // group_size
  slot_c = cols_c % group_size
  own_rc = owner_c[None, :] == rows_r[:, None]
  positive_slot_c = slot_c < counts_b[owner_c]  # a positive of its owner
  positive_rc = own_rc & positive_slot_c[None, :]
  valid_rc = jnp.ones_like(positive_rc)
  if not share_hard_negatives:
    # Others' positives stay in-batch negatives (DPR), hard ones go (SPLADE).
    valid_rc &= own_rc | positive_slot_c[None, :]
  if passage_doc_x is not None:
    doc_x = jnp.asarray(passage_doc_x, jnp.int32)
    doc_c = doc_x[cols_c]
    # A row's own positive docs are relevant: catches duplicates anyway.
    g_g = jnp.arange(group_size, dtype=jnp.int32)
    own_doc_rg = doc_x[rows_r[:, None] * group_size + g_g[None, :]]
    own_doc_rg = jnp.where(
        g_g[None, :] < counts_b[rows_r][:, None], own_doc_rg, -1
    )
    known_rk = own_doc_rg
    if relevant_doc_rk is not None:
      known_rk = jnp.concatenate(
          [known_rk, jnp.asarray(relevant_doc_rk, jnp.int32)], axis=1
      )
    # R·K·(G + R') bools: below the float32 scores for G + R' ≲ 32.
    is_known_rc = jnp.any(
        (doc_c[None, :, None] == known_rk[:, None, :])
        & (known_rk[:, None, :] >= 0),
        axis=-1,
    )
    # A relevant doc outside the row's positive slots is a false negative.
    valid_rc &= positive_rc | ~is_known_rc
    valid_rc &= (doc_c >= 0)[None, :]
  return positive_rc, valid_rc


def group_masks(
    positive_counts_b: jax.Array,
    group_size: int,
    passage_doc_c: jax.Array | None = None,
    relevant_doc_br: jax.Array | None = None,
    share_hard_negatives: bool = True,
) -> tuple[jax.Array, jax.Array]:
  """(positive_qc, valid_qc), [B, C = B·G] bool, of the group layout.

  positive_qc[i, j] = (j // G == i) & (j % G < m_i). valid_qc drops padding
  (passage_doc_c [C] int32 < 0), query i's known-relevant docs (own positives,
  relevant_doc_br [B, R] int32) outside its positive slots, and, without
  `share_hard_negatives`, other queries' hard negatives.
  """
  b = jnp.shape(positive_counts_b)[0]
  rows_b = jnp.arange(b, dtype=jnp.int32)
  cols_c = jnp.arange(b * group_size, dtype=jnp.int32)
  if passage_doc_c is None:
    relevant_doc_br = None
  return candidate_masks(
      rows_b,
      cols_c,
      positive_counts_b,
      group_size,
      passage_doc_c,
      relevant_doc_br,
      share_hard_negatives,
  )


def rows_with_positive(
    positive_counts_b: jax.Array,
    group_size: int,
    passage_doc_x: jax.Array | None,
) -> jax.Array:
  """[B] bool rows with a valid positive slot (only padding invalidates one)."""
  counts_b = jnp.asarray(positive_counts_b, jnp.int32)
  g_g = jnp.arange(group_size, dtype=jnp.int32)
  slot_bg = g_g[None, :] < counts_b[:, None]
  if passage_doc_x is not None:
    slot_bg &= jnp.asarray(passage_doc_x).reshape(-1, group_size) >= 0
  return jnp.any(slot_bg, axis=-1)


def scores_and_masks(
    q_bd: jax.Array,
    p_cd: jax.Array,
    batch: Mapping[str, jax.Array],
    temperature: float,
    share_hard_negatives: bool = True,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(scores_qc = q·p / τ float32, positive_qc, valid_qc), all [B, C].

  q_bd: [B, D], p_cd: [C = B·G, D], float32 or bfloat16; `batch`:
  "positive_counts", optionally "passage_doc", "relevant_doc" (`group_masks`).
  """
  b, c = q_bd.shape[0], p_cd.shape[0]
  if c % b:
    raise ValueError(f"{c} passages do not form groups for {b} queries")
  # float32 accumulation even for bf16 embeddings: the LSE needs it.
  scores_qc = (
      jnp.einsum("bd,cd->bc", q_bd, p_cd, preferred_element_type=jnp.float32)
      / temperature
  )
  positive_qc, valid_qc = group_masks(
      batch["positive_counts"],
      c // b,
      batch.get("passage_doc"),
      batch.get("relevant_doc"),
      share_hard_negatives,
  )
  return scores_qc, positive_qc, valid_qc


def _row_setup(scores_qc, positive_qc, valid_qc):
  scores_qc = jnp.asarray(scores_qc)
  scores_qc = scores_qc.astype(jnp.promote_types(scores_qc.dtype, jnp.float32))
  pos_qc = positive_qc & valid_qc
  neg_qc = valid_qc & ~positive_qc
  # m_i counts *valid* positives: a padded positive slot is not one.
  num_pos_q = jnp.sum(pos_qc, axis=-1).astype(scores_qc.dtype)
  return scores_qc, pos_qc, neg_qc, num_pos_q


def _accuracy_rows(scores_qc, pos_qc, valid_qc):
  top_q = jnp.argmax(jnp.where(valid_qc, scores_qc, NEG), axis=-1)
  return jnp.take_along_axis(pos_qc, top_q[:, None], axis=-1)[:, 0]


def _reduce(loss_q, row_valid_q, **rows):
  weight_q = row_valid_q.astype(loss_q.dtype)
  n = jnp.sum(weight_q)
  # max(n, 1): a batch without a valid row gives 0, and `loss * n` is the
  # per-row sum in every case (the sharded reduction relies on it).
  denom = jnp.maximum(n, 1.0)

  def mean(x_q):
    return jnp.sum(jnp.where(row_valid_q, x_q, 0.0)) / denom

  aux = {"num_valid_rows": n}
  aux.update({k: mean(v.astype(loss_q.dtype)) for k, v in rows.items()})
  return mean(loss_q), aux


def _joint_rows(scores_qc, pos_qc, valid_qc, num_pos_q, normalize):
  lse_q = masked_logsumexp(scores_qc, valid_qc)
  pos_sum_q = jnp.sum(jnp.where(pos_qc, scores_qc, 0.0), axis=-1)
  # Σ_p (LSE − s_p) = m·LSE − Σ_p s_p: one LSE per row, not one per positive.
  loss_q = num_pos_q * lse_q - pos_sum_q
  if normalize:
    loss_q = loss_q / jnp.maximum(num_pos_q, 1.0)
  return loss_q


def info_nce(
    scores_qc: jax.Array, positive_qc: jax.Array, valid_qc: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """InfoNCE / DPR NLL `LSE_C s − s_p` (`joint_lh` for several positives)."""
  scores_qc, pos_qc, _, num_pos_q = _row_setup(scores_qc, positive_qc, valid_qc)
  loss_q = _joint_rows(scores_qc, pos_qc, valid_qc, num_pos_q, False)
  return _reduce(
      loss_q,
      num_pos_q > 0,
      accuracy=_accuracy_rows(scores_qc, pos_qc, valid_qc),
  )


def joint_lh(
    scores_qc: jax.Array,
    positive_qc: jax.Array,
    valid_qc: jax.Array,
    *,
    normalize_by_positives: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """JointLH: `Σ_{p∈P_i} (LSE_{C_i} s − s_p)` = −Σ_p log π_p per row.

  The optimum spreads mass evenly over the positives: minimum m·log m, not 0.
  """
  scores_qc, pos_qc, _, num_pos_q = _row_setup(scores_qc, positive_qc, valid_qc)
  loss_q = _joint_rows(
      scores_qc, pos_qc, valid_qc, num_pos_q, normalize_by_positives
  )
  return _reduce(
      loss_q,
      num_pos_q > 0,
      accuracy=_accuracy_rows(scores_qc, pos_qc, valid_qc),
  )


def sum_marg_lh(
    scores_qc: jax.Array, positive_qc: jax.Array, valid_qc: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """SumMargLH: `LSE_{C_i} s − LSE_{P_i} s` = −log Σ_{p∈P} π_p per row."""
  scores_qc, pos_qc, _, num_pos_q = _row_setup(scores_qc, positive_qc, valid_qc)
  loss_q = masked_logsumexp(scores_qc, valid_qc) - masked_logsumexp(
      scores_qc, pos_qc
  )
  return _reduce(
      loss_q,
      num_pos_q > 0,
      accuracy=_accuracy_rows(scores_qc, pos_qc, valid_qc),
  )


def lse_pair(
    scores_qc: jax.Array,
    positive_qc: jax.Array,
    valid_qc: jax.Array,
    *,
    normalize_by_positives: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """LSEPair: log(1 + Σ_P Σ_N exp(s_n − s_p)) = softplus(LSE_N s + LSE_P −s)."""
  scores_qc, pos_qc, neg_qc, num_pos_q = _row_setup(
      scores_qc, positive_qc, valid_qc
  )
  loss_q = jax.nn.softplus(
      masked_logsumexp(scores_qc, neg_qc) + masked_logsumexp(-scores_qc, pos_qc)
  )
  if normalize_by_positives:  # max(m, 1) guards dropped rows only
    loss_q = loss_q / jnp.maximum(num_pos_q, 1.0)
  return _reduce(
      loss_q,
      num_pos_q > 0,
      accuracy=_accuracy_rows(scores_qc, pos_qc, valid_qc),
  )


def orthogonal_projection(
    scores_qc: jax.Array,
    positive_qc: jax.Array,
    valid_qc: jax.Array,
    *,
    gamma: float = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`(1 − mean_P cos) + γ·|mean_N cos|` per row; scores are cosines (τ = 1).

  Needs no other rows, so it trains with one-query batches (long documents).
  """
  scores_qc, pos_qc, neg_qc, num_pos_q = _row_setup(
      scores_qc, positive_qc, valid_qc
  )
  num_neg_q = jnp.sum(neg_qc, axis=-1).astype(scores_qc.dtype)
  pos_mean_q = jnp.sum(
      jnp.where(pos_qc, scores_qc, 0.0), axis=-1
  ) / jnp.maximum(num_pos_q, 1.0)
  neg_mean_q = jnp.sum(
      jnp.where(neg_qc, scores_qc, 0.0), axis=-1
  ) / jnp.maximum(num_neg_q, 1.0)
  loss_q = (1.0 - pos_mean_q) + gamma * jnp.abs(neg_mean_q)
  return _reduce(
      loss_q,
      num_pos_q > 0,
      accuracy=_accuracy_rows(scores_qc, pos_qc, valid_qc),
      positive_cosine=pos_mean_q,
      negative_cosine=neg_mean_q,
  )


def first_positive(positive_qc: jax.Array, valid_qc: jax.Array) -> jax.Array:
  """[B] int32 column of each row's first valid positive (0 if none)."""
  return jnp.argmax(positive_qc & valid_qc, axis=-1).astype(jnp.int32)


def reverse_rows(
    scores_kb: jax.Array, valid_kb: jax.Array, target_k: jax.Array
) -> jax.Array:
  """[K] doc→query rows `LSE_b s_kb − s_k,target_k` of scores_kb [K, B]."""
  target_s_k = jnp.take_along_axis(scores_kb, target_k[:, None], axis=-1)
  return masked_logsumexp(scores_kb, valid_kb) - target_s_k[:, 0]


def symmetric_info_nce(
    scores_qc: jax.Array, positive_qc: jax.Array, valid_qc: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """½ [query→document + document→query InfoNCE], a mean of per-row terms.

  Each first positive picks its query among the B, without hard negatives
  (sentence-transformers' MultipleNegativesSymmetricRanking).
  """
  scores_qc, pos_qc, _, num_pos_q = _row_setup(scores_qc, positive_qc, valid_qc)
  row_valid_q = num_pos_q > 0
  fwd_q = _joint_rows(scores_qc, pos_qc, valid_qc, num_pos_q, False)
  first_k = first_positive(pos_qc, valid_qc)
  # Column k of the B×B block holds every query's score for k's positive.
  scores_kb = jnp.take(scores_qc, first_k, axis=1).T
  valid_kb = jnp.take(valid_qc, first_k, axis=1).T & row_valid_q[None, :]
  rev_k = reverse_rows(
      scores_kb, valid_kb, jnp.arange(scores_qc.shape[0], dtype=jnp.int32)
  )
  return _reduce(
      0.5 * (fwd_q + rev_k),
      row_valid_q,
      accuracy=_accuracy_rows(scores_qc, pos_qc, valid_qc),
      forward_loss=fwd_q,
      reverse_loss=rev_k,
  )
