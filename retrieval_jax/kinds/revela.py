"""Revela: a bi-encoder trained by language modelling over in-batch chunks.

Cai et al. 2025 ("Revela: Dense Retriever Learning via Language Modeling"):
a batch of document chunks (`data/chunks.py`, several chunks of each
document); the retriever embeds each chunk, p(j | i) = softmax over j != i
of cos(e_i, e_j) / `config.loss.temperature` weighs how much chunk i's
causal LM (`models/revela.py`, random init, `config.model.revela_lm`)
attends to chunk j; the next-token loss of every chunk trains the LM and,
through those weights, the retriever. Evaluation, encoding and export are
the bi-encoder's, on the retriever alone. Not as the paper: a BERT
retriever and a small GPT-2-style LM (not LoRA-tuned LLaMA / Qwen for
both), batches of one document's chunks (not BM25 neighbours), no
query/passage prefixes or first-half queries, temperature 0.05 on cosines.
"""

import functools

from flax import nnx
import jax.numpy as jnp

from retrieval_jax import losses
from retrieval_jax.data import chunks
from retrieval_jax.errors import ConfigError
from retrieval_jax.kinds import base
from retrieval_jax.kinds import bi_encoder
from retrieval_jax.losses import language_modeling
from retrieval_jax.models import revela as revela_model
from retrieval_jax.models import transformer_encoder

LOSS = "next_token"  # config.loss.name of a Revela run
_BATCH_KEYS = ("chunk_ids", "chunk_mask", "chunk_doc")


def lm_config(
    model_cfg, vocab_size: int, dtype
) -> transformer_encoder.EncoderConfig:
  """The LM's sizes from `config.model.revela_lm`; ValueError if invalid."""
  lm = model_cfg.revela_lm
  return transformer_encoder.EncoderConfig(
      vocab_size=vocab_size,
      hidden_size=lm.hidden_size,
      num_layers=lm.num_layers,
      num_heads=lm.num_heads,
      intermediate_size=lm.intermediate_size,
      max_position_embeddings=lm.max_length,
      hidden_dropout=lm.dropout,
      attention_dropout=lm.dropout,
      dtype=dtype,
  )


def loss(model, batch, rng, step, *, temperature, pooling, normalize):
  """Next-token loss of every chunk with in-batch attention (`TrainSpec`).

  Batch: chunk_ids / chunk_mask int32 [B, L], chunk_doc int32 [B]. Aux:
  the LM's token accuracy and "same_doc_weight", the mean p(j | i) mass on
  chunk i's own document's chunks (rows that have some).
  """
  del step
  r_rng, lm_rng = base.split_rng(rng)
  ids_bl, mask_bl = batch["chunk_ids"], batch["chunk_mask"]
  emb_bd = bi_encoder.encode(
      model.retriever,
      ids_bl,
      mask_bl,
      r_rng,
      pooling=pooling,
      normalize=normalize,
  )
  weights_bc = revela_model.neighbour_weights(emb_bd, temperature)
  logits_blv = model.lm(
      ids_bl,
      mask_bl,
      weights_bc,
      deterministic=lm_rng is None,
      dropout_rng=lm_rng,
  )
  value, aux = language_modeling.next_token_loss(logits_blv, ids_bl, mask_bl)
  doc_b = batch["chunk_doc"]
  same_bc = (doc_b[:, None] == doc_b[None, :]) & ~jnp.eye(
      doc_b.shape[0], dtype=bool
  )
  has_b = jnp.any(same_bc, axis=1).astype(jnp.float32)
  mass_b = jnp.sum(jnp.where(same_bc, weights_bc, 0.0), axis=1)
  aux = dict(aux)
  aux["same_doc_weight"] = jnp.sum(mass_b * has_b) / jnp.maximum(
      jnp.sum(has_b), 1.0
  )
  return value, aux


class Revela(bi_encoder.BiEncoder):
  """See the module docstring."""

  name = "revela"
  model_keys = ("revela_lm", "revela_v_norm")
  architectures = ("bert",)
  dense_negatives = False

  def loss_spec(self, config) -> losses.LossSpec:
    """Next-token prediction: one chunk per example, no positives."""
    if config.loss.name != LOSS:
      raise ConfigError(
          f"config.loss.name={config.loss.name!r}: a 'revela' model trains "
          f"by next-token prediction; set {LOSS!r}"
      )
    return losses.LossSpec(
        language_modeling.next_token_loss,
        losses.ONE,
        losses.PAIR,
        "Next-token prediction with retriever-weighted in-batch attention.",
    )

  def validate(self, config) -> None:
    super().validate(config)
    data = config.data
    if data.format != "corpus" or data.spans.task != chunks.TASK:
      raise ConfigError(
          "config.model.kind='revela' trains on document chunks: set "
          "config.data.format='corpus' and config.data.spans.task="
          f"{chunks.TASK!r} (see configs/train.py:pretrain_revela)"
      )
    if not config.loss.temperature > 0:
      raise ConfigError(
          f"config.loss.temperature={config.loss.temperature}: p(j | i) "
          "needs a temperature > 0"
      )
    try:
      lm = lm_config(config.model, 2, jnp.float32)
    except (ValueError, TypeError) as e:
      raise ConfigError(f"config.model.revela_lm: {e}") from e
    if data.passage_max_length > lm.max_position_embeddings:
      raise ConfigError(
          f"config.data.passage_max_length={data.passage_max_length} (the "
          "chunk width) exceeds config.model.revela_lm.max_length="
          f"{lm.max_position_embeddings}"
      )

  def build(self, model_cfg, loaded, tokenizer, *, seed: int = 0):
    lm = revela_model.InBatchLM(
        lm_config(model_cfg, tokenizer.vocab_size, loaded.config.dtype),
        v_norm=bool(model_cfg.revela_v_norm),
        rngs=nnx.Rngs(seed),
    )
    return revela_model.Revela(loaded.model, lm)

  def train_spec(self, config, *, loader, tokenizer, loss_spec, mesh):
    del loader, tokenizer, loss_spec, mesh
    return base.TrainSpec(
        featurize=base.take_keys(_BATCH_KEYS),
        loss=functools.partial(
            loss,
            temperature=float(config.loss.temperature),
            pooling=config.model.pooling,
            normalize=config.model.normalize,
        ),
    )

  def text_encoder(self, model, tokenizer, run_cfg, mesh, *, max_length):
    return super().text_encoder(
        model.retriever, tokenizer, run_cfg, mesh, max_length=max_length
    )

  def serving_towers(
      self, model, tokenizer, run_cfg, export_cfg, *, corpus_texts
  ):
    return super().serving_towers(
        model.retriever,
        tokenizer,
        run_cfg,
        export_cfg,
        corpus_texts=corpus_texts,
    )


KIND = Revela()
