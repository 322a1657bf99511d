"""BPR: a bi-encoder trained for binary passage codes (Yamada et al. 2021).

The model is the bi-encoder's (tied towers); BPR's hash layer has no
parameters (`layers.binary_hash`). Training: h̃ = `hash_codes(e, β_t)`, with
sign(e) forward and the gradient of tanh(β_t·e) backward (straight-through;
`config.model.bpr_straight_through=False` trains on tanh(β_t·e) itself, the
reference code's default), β_t = sqrt(1 + γ·step) (HashNet's schedule, γ =
`config.model.bpr_hashnet_gamma`, BPR's 0.1). Loss: `losses.bpr`'s
candidate loss on ⟨h̃_q, h̃_p⟩ plus `config.loss.ranking_weight` × its
re-ranking loss (InfoNCE on ⟨e_q, h̃_p⟩, no temperature); domain adaptation
adds margin-MSE of ⟨e_q, h̃_p⟩ against a frozen copy of the starting encoder
(`frozen_teacher`). Evaluation (`build_index`): the trained encoder's corpus
embeddings as packed sign bits, Hamming top-k of sign(q), re-ranked by
⟨q, sign d⟩ (`search.compression`'s sign index). The evaluate mode reads a
run as a dense retriever (float32, no hashing).
"""

import functools

import jax
import jax.numpy as jnp

from retrieval_jax import losses
from retrieval_jax import train_state
from retrieval_jax.errors import ConfigError
from retrieval_jax.kinds import base
from retrieval_jax.kinds import bi_encoder
from retrieval_jax.kinds import frozen_teacher
from retrieval_jax.layers import binary_hash
from retrieval_jax.search import compression

# Hamming candidates re-scored with the float query (the compression
# experiment's setting: the whole top 1,000 evaluated).
RERANK_DEPTH = 1000


def loss(
    model,
    batch,
    rng,
    step,
    *extra,
    pooling: str,
    normalize: bool,
    hashnet_gamma: float,
    straight_through: bool,
    share_hard_negatives: bool,
    ranking_weight: float,
    margin_mse_weight: float,
    teacher_scale: float,
):
  """BPR's loss on one batch (`base.TrainSpec.loss`).

  Batch: the bi-encoder's (query_ids / query_mask [B, Lq], passage_ids /
  passage_mask [B*G, Lp], positive_counts [B], passage_doc [B*G],
  relevant_doc [B, R]). With `extra` (the teacher, `margin_mse_weight` > 0)
  returns (loss, (aux, extra)), else (loss, aux).
  """
  q_rng, p_rng = base.split_rng(rng)
  enc = functools.partial(
      bi_encoder.encode, model, pooling=pooling, normalize=normalize
  )
  q_bd = enc(batch["query_ids"], batch["query_mask"], q_rng)
  p_cd = enc(
      batch["passage_ids"],
      frozen_teacher.padding_attends_first(
          batch["passage_mask"], batch["passage_doc"]
      ),
      p_rng,
  )
  beta = binary_hash.hashnet_beta(step, hashnet_gamma)
  hash_ = functools.partial(
      binary_hash.hash_codes, beta=beta, straight_through=straight_through
  )
  hq_bd, hp_cd = hash_(q_bd), hash_(p_cd)
  # float32 scores: code · code reaches ±D, exact in float32 for D < 2^24.
  candidate_qc = jnp.einsum(
      "bd,cd->bc", hq_bd, hp_cd, preferred_element_type=jnp.float32
  )
  rerank_qc = jnp.einsum(
      "bd,cd->bc", q_bd, hp_cd, preferred_element_type=jnp.float32
  )
  group_size = p_cd.shape[0] // q_bd.shape[0]
  positive_qc, valid_qc = losses.contrastive.group_masks(
      batch["positive_counts"],
      group_size,
      batch["passage_doc"],
      batch["relevant_doc"],
      share_hard_negatives=share_hard_negatives,
  )
  candidate, cand_aux = losses.bpr.candidate_loss(
      candidate_qc, positive_qc, valid_qc
  )
  rerank, rerank_aux = losses.bpr.rerank_loss(rerank_qc, positive_qc, valid_qc)
  value = candidate + ranking_weight * rerank
  aux = {
      "num_valid_rows": rerank_aux["num_valid_rows"],
      "accuracy": rerank_aux["accuracy"],
      "candidate_accuracy": cand_aux["accuracy"],
      "candidate_loss": candidate,
      "rerank_loss": rerank,
      "hash_beta": beta,
  }
  if not extra:
    return value, aux
  (extra,) = extra
  teacher_bg = frozen_teacher.teacher_scores(
      model, extra, batch, pooling=pooling, normalize=normalize
  )
  student_bg = frozen_teacher.own_groups(rerank_qc)
  mse, _ = frozen_teacher.margin_mse(
      student_bg, teacher_bg, batch["passage_doc"], teacher_scale=teacher_scale
  )
  aux["margin_mse"] = mse
  return value + margin_mse_weight * mse, (aux, extra)


class Bpr(bi_encoder.BiEncoder):
  """See the module docstring."""

  name = "bpr"
  model_keys = ("bpr_hashnet_gamma", "bpr_straight_through")
  architectures = ("bert",)
  trains_with_evals = False

  def validate(self, config) -> None:
    super().validate(config)
    if config.loss.name != "infonce":
      raise ConfigError(
          f"config.loss.name={config.loss.name!r}: BPR's objective is fixed "
          "(hinge on codes + InfoNCE re-ranking loss); set 'infonce', which "
          "also builds its batches"
      )
    if config.loss.temperature != 1.0:
      raise ConfigError(
          f"config.loss.temperature={config.loss.temperature}: BPR's scores "
          "carry no temperature; set 1.0"
      )
    gamma = config.model.bpr_hashnet_gamma
    if (
        isinstance(gamma, bool)
        or not isinstance(gamma, (int, float))
        or (gamma < 0)
    ):
      raise ConfigError(
          f"config.model.bpr_hashnet_gamma={gamma!r}: expected a number >= 0"
      )
    frozen_teacher.check_settings(config, self)

  def train_spec(self, config, *, loader, tokenizer, loss_spec, mesh):
    del loader, tokenizer, loss_spec, mesh
    ranking_weight, mse_weight, scale = frozen_teacher.check_settings(
        config, self
    )
    extra = None
    if mse_weight:
      extra = train_state.ExtraState(
          init=frozen_teacher.init_extra,
          shardings=frozen_teacher.extra_shardings,
      )
    return base.TrainSpec(
        featurize=base.take_keys(),
        loss=functools.partial(
            loss,
            pooling=config.model.pooling,
            normalize=config.model.normalize,
            hashnet_gamma=float(config.model.bpr_hashnet_gamma),
            straight_through=bool(config.model.bpr_straight_through),
            share_hard_negatives=config.loss.share_hard_negatives,
            ranking_weight=ranking_weight,
            margin_mse_weight=mse_weight,
            teacher_scale=scale,
        ),
        extra=extra,
    )

  def build_index(self, model, run_dir, docs_nd, *, rerank_depth=None):
    """The run's compressed index: `compression`'s sign index of docs_nd.

    docs_nd: [N, D] corpus embeddings by the trained encoder (`model`; the
    run's `text_encoder`). Hamming top max(k, rerank_depth) of sign(q),
    re-ranked by ⟨q, sign d⟩ (rerank_depth 0: Hamming order only).
    """
    del model, run_dir  # The codes are the signs of docs_nd.
    depth = RERANK_DEPTH if rerank_depth is None else rerank_depth
    return compression.build(
        "sign", jax.device_get(docs_nd), metric="dot", rerank_depth=depth
    )


KIND = Bpr()
