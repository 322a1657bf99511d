"""Learned sparse retrieval: SPLADE and inference-free SPLADE.

  splade          q . d of max-pooled log(1 + ReLU) MLM-head weights, plus
                  lambda_q(t) FLOPS(q) + lambda_d(t) FLOPS(d)
  inference_free  documents encoded the same way; a query is the bag of its
                  tokens weighted by the training corpus's idf (no query
                  encoder), plus lambda_d(t) FLOPS(d), which the idf weights
                  make IDF-aware

Scores are raw (no temperature). lambda(t) = lambda * min(1, (t / T)^2)
(quadratic warm-up; T = 0: none). `config.loss.doc_regularizer="idf_flops"`
writes the document term as `regularizers.idf_flops` of the contributions
u = q-weight * w the ranking sees, with the training corpus's idf:
inference-free u = idf * w, which equals FLOPS(w) (the paper's loss, made
explicit); SPLADE u = w, a 1/idf^2-weighted FLOPS. Both kinds also distil a
teacher (`config.loss.teacher`, `base.distillation_loss`). Both are
evaluated by the evaluate mode.
"""

import functools

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections

from retrieval_jax import pretrained
from retrieval_jax.data import features
from retrieval_jax.errors import ConfigError
from retrieval_jax.kinds import base
from retrieval_jax.losses import regularizers
from retrieval_jax.models import splade as splade_model

# `config.loss.doc_regularizer` values.
DOC_REGULARIZERS = ("flops", "idf_flops")


def special_ids(tokenizer) -> tuple[int, ...]:
  """[CLS], [SEP], [PAD]: never useful as sparse terms ([CLS] tops every
  text's SPLADE weights), so their columns are zeroed."""
  return (tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id)


def bag_of_tokens(ids_bl, mask_bl, weight_v, special: tuple[int, ...]):
  """Inference-free queries: [B, V] = 1[token j in the query] * weight_j.

  Each token counts once (a max over positions); special tokens and
  padding give 0.
  """
  keep_bl = mask_bl.astype(bool)
  for i in special:
    keep_bl &= ids_bl != i
  b, v = ids_bl.shape[0], weight_v.shape[0]
  rows_bl = jnp.broadcast_to(jnp.arange(b)[:, None], ids_bl.shape)
  bag_bv = (
      jnp.zeros((b, v), jnp.float32)
      .at[rows_bl, ids_bl]
      .max(keep_bl.astype(jnp.float32))
  )
  return bag_bv * jax.nn.relu(weight_v.astype(jnp.float32))[None, :]


def loss(
    model,
    batch,
    rng,
    step,
    *,
    loss_fn,
    share_hard_negatives=True,
    flops_q=0.0,
    flops_d=0.0,
    flops_warmup_steps=0,
    idf_v=None,
    special=(),
    doc_regularizer="flops",
    regularizer_idf_v=None,
    distill_loss="",
    infonce_weight=0.0,
):
  """A sparse kind's training loss (see `base.TrainSpec`); `idf_v` [V] set
  means inference-free queries. Aux adds flops_q / flops_d and the mean
  non-zero terms per query / passage (l0_q, l0_d).

  doc_regularizer "idf_flops": flops_d is `regularizers.idf_flops` of the
  document contributions (w times the query's idf weights; w for encoded
  queries) with idf `regularizer_idf_v` [V]. distill_loss: a
  `base.DISTILLATION_LOSSES` name fitting batch "teacher_scores" [B*G]
  (`base.distillation_loss`, plus infonce_weight times InfoNCE).
  """
  q_rng, p_rng = base.split_rng(rng)
  warmup = (
      regularizers.quadratic_warmup(step, flops_warmup_steps)
      if flops_warmup_steps
      else 1.0
  )
  valid_c = batch["passage_doc"] >= 0
  p_cv = model(
      batch["passage_ids"],
      batch["passage_mask"],
      None,
      deterministic=p_rng is None,
      dropout_rng=p_rng,
  )
  if idf_v is None:
    q_bv = model(
        batch["query_ids"],
        batch["query_mask"],
        None,
        deterministic=q_rng is None,
        dropout_rng=q_rng,
    )
    reg_q = regularizers.flops(q_bv)
  else:
    q_bv = bag_of_tokens(
        batch["query_ids"], batch["query_mask"], jnp.asarray(idf_v), special
    )
    reg_q = jnp.zeros((), jnp.float32)
  if doc_regularizer == "idf_flops":
    reg_idf_v = jnp.asarray(regularizer_idf_v, jnp.float32)
    u_cv = p_cv
    if idf_v is not None:
      # What an idf-weighted bag scores: ReLU(idf_j) * w_j per term.
      u_cv = p_cv * jax.nn.relu(jnp.asarray(idf_v, jnp.float32))[None, :]
    reg_d = regularizers.idf_flops(u_cv, reg_idf_v, valid_c)
  else:
    reg_d = regularizers.flops(p_cv, valid_c)
  scores_qc = jnp.einsum(
      "bv,cv->bc", q_bv, p_cv, preferred_element_type=jnp.float32
  )
  if distill_loss:
    ranking, aux = base.distillation_loss(
        scores_qc,
        batch,
        loss_name=distill_loss,
        infonce_weight=infonce_weight,
        share_hard_negatives=share_hard_negatives,
    )
  else:
    ranking, aux = base.in_batch_loss(
        scores_qc,
        batch,
        loss_fn=loss_fn,
        share_hard_negatives=share_hard_negatives,
    )
  l0_d = jnp.sum(jnp.where(valid_c, jnp.sum(p_cv > 0, -1), 0)) / jnp.maximum(
      jnp.sum(valid_c), 1
  )
  return ranking + warmup * (flops_q * reg_q + flops_d * reg_d), dict(
      aux,
      ranking_loss=ranking,
      flops_q=reg_q,
      flops_d=reg_d,
      l0_q=jnp.mean(jnp.sum(q_bv > 0, axis=-1)),
      l0_d=l0_d,
  )


def sparse_output(w_bv, top_terms: int):
  """Served form of [B, V] weights: themselves (top_terms 0), else the
  `top_terms` largest as (int32 ids [B, k], float32 weights [B, k]),
  weights descending; zero weights among them are absent terms."""
  if not top_terms:
    return w_bv
  weights_bk, ids_bk = jax.lax.top_k(w_bv, top_terms)
  return ids_bk.astype(jnp.int32), weights_bk


class Splade(base.Kind):
  """See the module docstring."""

  model_keys = ("splade_aggregation", "splade_bias_init")
  distills = True

  def __init__(self, name: str):
    self.name = self.retriever = name

  def validate(self, config) -> None:
    super().validate(config)
    regularizer = config.loss.get("doc_regularizer", "flops")
    if regularizer not in DOC_REGULARIZERS:
      raise ConfigError(
          f"config.loss.doc_regularizer={regularizer!r}: expected one of "
          f"{DOC_REGULARIZERS}"
      )

  def build(self, model_cfg, loaded, tokenizer, *, seed: int = 0):
    model = splade_model.Splade(
        loaded.model,
        aggregation=model_cfg.splade_aggregation,
        bias_init=model_cfg.splade_bias_init,
        # Off for published checkpoints (`checkpoint_run`), which score the
        # special tokens' columns like any other.
        special_ids=(
            special_ids(tokenizer)
            if model_cfg.get("splade_zero_special_ids", True)
            else ()
        ),
        rngs=nnx.Rngs(seed),
    )
    # A checkpoint with BERT's MLM head gives the head its trained
    # transform and bias; all-MiniLM-L6-v2 has none, and the head keeps its
    # identity init (the decoder is the tied embedding table either way).
    if pretrained.load_mlm_head(
        model.head, pretrained.read_state_dict(loaded.model_dir)
    ):
      logging.info("SPLADE: MLM head weights from %s", loaded.model_dir)
    return model

  def checkpoint_run(self, loaded, tokenizer):
    """A BertForMaskedLM-style SPLADE checkpoint (naver/splade-*, the
    opensearch inference-free document encoders) as published: max pooling,
    its MLM head and bias, no column zeroed."""
    if not pretrained.has_mlm_head(pretrained.tensor_shapes(loaded.model_dir)):
      raise ValueError(
          f"{loaded.model_dir} has no MLM head (cls.predictions.*), so it "
          f"is not a {self.name} checkpoint"
      )
    run_cfg = base.checkpoint_run_config(
        self,
        loaded,
        splade_aggregation="max",
        splade_bias_init=0.0,
        splade_zero_special_ids=False,
    )
    model = self.build(
        ml_collections.ConfigDict(run_cfg["model"]), loaded, tokenizer
    )
    return model, run_cfg

  def train_spec(self, config, *, loader, tokenizer, loss_spec, mesh):
    del mesh
    regularizer = config.loss.get("doc_regularizer", "flops")
    kwargs = dict(
        loss_fn=loss_spec.fn,
        share_hard_negatives=config.loss.share_hard_negatives,
        flops_q=config.loss.flops_q,
        flops_d=config.loss.flops_d,
        flops_warmup_steps=config.loss.flops_warmup_steps,
        doc_regularizer=regularizer,
        distill_loss=config.loss.name if config.loss.get("teacher") else "",
        infonce_weight=config.loss.get("infonce_weight", 0.0),
    )
    idf_v = None
    if self.name == "inference_free" or regularizer == "idf_flops":
      # The query side's idf (and the regulariser's) comes from the
      # training corpus.
      idf_v = features.idf_from_corpus(
          [tokenizer.tokenize_to_ids(t) for t in loader.data.doc_texts],
          tokenizer.vocab_size,
      )
    if self.name == "inference_free":
      kwargs.update(idf_v=idf_v, special=special_ids(tokenizer))
    if regularizer == "idf_flops":
      kwargs["regularizer_idf_v"] = idf_v
    return base.TrainSpec(
        featurize=base.teacher_featurizer(config),
        loss=functools.partial(loss, **kwargs),
    )

  def query_matrix(
      self, encoder, tokenizer, queries, corpus_texts, *, max_length, **kw
  ):
    """Queries as a scipy CSR [Q, V] for searching `corpus_texts`.

    SPLADE encodes them (`encoder.encode(queries, **kw)`); inference-free
    takes each query's bag of tokens weighted by the idf of the corpus being
    searched (WordPiece document frequencies over `corpus_texts`).
    """
    import scipy.sparse  # pylint: disable=g-import-not-at-top

    if self.name == "splade":
      return encoder.encode(queries, **kw)
    idf_v = features.idf_from_corpus(
        [tokenizer.tokenize_to_ids(t) for t in corpus_texts],
        tokenizer.vocab_size,
    )
    return scipy.sparse.csr_matrix(
        features.inference_free_query(
            [tokenizer.encode(q, max_length) for q in queries],
            vocab_size=tokenizer.vocab_size,
            idf_v=idf_v,
            special_ids=special_ids(tokenizer),
        )
    )

  def serving_towers(
      self, model, tokenizer, run_cfg, export_cfg, *, corpus_texts
  ):
    del run_cfg
    top_terms = export_cfg.get("top_terms", 0)
    if not 0 <= top_terms <= tokenizer.vocab_size:
      raise ConfigError(
          f"config.export.top_terms={top_terms}: expected 0 (all "
          f"{tokenizer.vocab_size} weights) up to the vocabulary size"
      )
    info = {
        "output": "top_terms" if top_terms else "weights",
        "top_terms": int(top_terms),
        "vocab_size": int(tokenizer.vocab_size),
    }

    def encode(splade, input_ids_bl, attention_mask_bl):
      return sparse_output(splade(input_ids_bl, attention_mask_bl), top_terms)

    towers = {
        name: base.ServingTower(
            encode,
            model,
            export_cfg[f"{name}_max_length"],
            info=dict(info, encoder="splade"),
        )
        for name in ("query", "passage")
    }
    if self.name == "inference_free":
      # Queries are not encoded: each is the bag of its tokens weighted by
      # the idf the run trained with; the table is the tower's one weight.
      special = special_ids(tokenizer)
      idf_v = features.idf_from_corpus(
          [tokenizer.tokenize_to_ids(t) for t in corpus_texts()],
          tokenizer.vocab_size,
      )

      def bag(weights, input_ids_bl, attention_mask_bl):
        w_bv = bag_of_tokens(
            input_ids_bl, attention_mask_bl, weights["idf_v"], special
        )
        return sparse_output(w_bv, top_terms)

      towers["query"] = base.ServingTower(
          bag,
          {"idf_v": idf_v},
          export_cfg.query_max_length,
          info=dict(info, encoder="idf_bag", special_token_ids=list(special)),
      )
    return towers


SPLADE = Splade("splade")
INFERENCE_FREE = Splade("inference_free")
