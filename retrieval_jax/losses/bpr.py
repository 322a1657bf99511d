"""The two losses of BPR (Yamada et al. 2021, "Efficient Passage Retrieval
with Hashing for Open-domain QA"), on the contrastive group layout.

Both follow `contrastive.py`'s contract `fn(scores_qc, positive_qc, valid_qc)
-> (loss, aux)` (a mean over rows with a valid positive, so
`sharded_contrastive` can combine shards), on different score matrices:
  candidate_loss: Hamming-space scores ⟨h̃_q, h̃_p⟩ of query and passage codes
    (`layers.binary_hash.hash_codes`), margin ranking
    max(0, α − (s⁺ − s⁻)) over (positive, negative) pairs, averaged as the
    reference code's `F.margin_ranking_loss` (the paper writes the sum over
    the n negatives: n× this); α = 0.1 (its `binary_ranking_loss_margin`).
  rerank_loss: continuous query vs passage codes ⟨e_q, h̃_p⟩, cross-entropy
    over the in-batch candidates (= `contrastive.info_nce`).
BPR trains on their sum (`loss`); scores carry no temperature (τ = 1).
"""

import jax
import jax.numpy as jnp

from retrieval_jax.losses import contrastive

# The reference implementation's `--binary_ranking_loss_margin` default.
MARGIN = 0.1


def candidate_loss(
    scores_qc: jax.Array,
    positive_qc: jax.Array,
    valid_qc: jax.Array,
    *,
    margin: float = MARGIN,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Per row, mean over pairs (p ∈ P, n ∈ N) of max(0, margin − s_p + s_n).

  scores_qc [B, C] float (code · code), positive_qc / valid_qc [B, C] bool.
  Builds [B, C, C] pair hinges: fine for in-batch C (a few hundred).
  """
  scores_qc, pos_qc, neg_qc, num_pos_q = contrastive._row_setup(  # pylint: disable=protected-access
      scores_qc, positive_qc, valid_qc
  )
  hinge_qpn = jax.nn.relu(
      margin - scores_qc[:, :, None] + scores_qc[:, None, :]
  )
  pair_qpn = pos_qc[:, :, None] & neg_qc[:, None, :]
  num_pairs_q = jnp.sum(pair_qpn, axis=(1, 2)).astype(scores_qc.dtype)
  # `where`, not a product: masked pairs get exactly zero gradient.
  loss_q = jnp.sum(jnp.where(pair_qpn, hinge_qpn, 0.0), axis=(1, 2))
  loss_q = loss_q / jnp.maximum(num_pairs_q, 1.0)
  return contrastive._reduce(  # pylint: disable=protected-access
      loss_q,
      num_pos_q > 0,
      accuracy=contrastive._accuracy_rows(scores_qc, pos_qc, valid_qc),  # pylint: disable=protected-access
  )


def rerank_loss(
    scores_qc: jax.Array, positive_qc: jax.Array, valid_qc: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Cross-entropy of ⟨e_q, h̃_p⟩ [B, C] over the valid candidates.

  The same objective as `contrastive.info_nce`, named for BPR's second stage.
  """
  return contrastive.info_nce(scores_qc, positive_qc, valid_qc)


def loss(
    candidate_scores_qc: jax.Array,
    rerank_scores_qc: jax.Array,
    positive_qc: jax.Array,
    valid_qc: jax.Array,
    *,
    margin: float = MARGIN,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """BPR's objective L_cand + L_rerank; aux holds both terms and accuracies.

  candidate_scores_qc: ⟨h̃_q, h̃_p⟩; rerank_scores_qc: ⟨e_q, h̃_p⟩; [B, C].
  """
  cand, cand_aux = candidate_loss(
      candidate_scores_qc, positive_qc, valid_qc, margin=margin
  )
  rerank, rerank_aux = rerank_loss(rerank_scores_qc, positive_qc, valid_qc)
  aux = {
      "num_valid_rows": rerank_aux["num_valid_rows"],
      "accuracy": rerank_aux["accuracy"],
      "candidate_accuracy": cand_aux["accuracy"],
      "candidate_loss": cand,
      "rerank_loss": rerank,
  }
  return cand + rerank, aux
