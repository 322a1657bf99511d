"""ColBERT: token vectors scored by MaxSim (late interaction).

Training scores every query against every passage row of the batch by
MaxSim over L2-normalised token vectors (no temperature) and takes a
`losses.LOSSES` objective; the batch has ColBERT's own layout ([Q]/[D]
markers, [MASK]-augmented queries, `data/features.py`). Evaluated by the
evaluate mode (re-ranking a first stage).
"""

import functools
import json

from absl import logging
from flax import nnx
import jax.numpy as jnp
import ml_collections

from retrieval_jax import pretrained
from retrieval_jax.data import features
from retrieval_jax.kinds import base
from retrieval_jax.models import colbert as colbert_model
from retrieval_jax.search import late_interaction


def loss(
    model,
    batch,
    rng,
    step,
    *,
    loss_fn,
    share_hard_negatives=True,
    chunk_size=None,
):
  """ColBERT's training loss (see `base.TrainSpec`); `chunk_size` passages
  per MaxSim chunk bound its memory (None = all at once)."""
  del step
  q_rng, p_rng = base.split_rng(rng)
  q_bld = model(
      batch["query_ids"],
      batch["query_mask"],
      None,
      deterministic=q_rng is None,
      dropout_rng=q_rng,
  )
  p_cld = model(
      batch["passage_ids"],
      batch["passage_mask"],
      None,
      deterministic=p_rng is None,
      dropout_rng=p_rng,
  )
  scores_qc = late_interaction.maxsim_all(
      q_bld,
      batch["query_score_mask"],
      p_cld,
      batch["passage_score_mask"],
      chunk_size=chunk_size,
  )
  ranking, aux = base.in_batch_loss(
      scores_qc,
      batch,
      loss_fn=loss_fn,
      share_hard_negatives=share_hard_negatives,
  )
  return ranking, dict(aux, ranking_loss=ranking)


class ColBERT(base.Kind):
  """See the module docstring."""

  name = "colbert"
  model_keys = ("colbert_dim",)
  retriever = "colbert"

  def build(self, model_cfg, loaded, tokenizer, *, seed: int = 0):
    del tokenizer
    model = colbert_model.ColBERT(
        loaded.model, model_cfg.colbert_dim, rngs=nnx.Rngs(seed)
    )
    # A ColBERT checkpoint (colbert-ir's HF_ColBERT) brings its projection.
    w_hd = pretrained.read_colbert_projection(
        pretrained.read_state_dict(loaded.model_dir),
        loaded.config.hidden_size,
    )
    if w_hd is not None:
      if w_hd.shape[1] != model_cfg.colbert_dim:
        raise ValueError(
            f"config.model.colbert_dim={model_cfg.colbert_dim}, but "
            f"{loaded.model_dir} projects to {w_hd.shape[1]} dimensions"
        )
      model.linear_hd.set_value(
          jnp.asarray(w_hd, dtype=model.linear_hd[...].dtype)
      )
      logging.info("ColBERT: projection from %s", loaded.model_dir)
    return model

  def checkpoint_run(self, loaded, tokenizer):
    """A colbert-ir checkpoint (BertModel + `linear.weight`), with the query
    length of its artifact.metadata (else ColBERT's 32) and [MASK]
    augmentation."""
    shape = pretrained.tensor_shapes(loaded.model_dir).get(
        pretrained.COLBERT_PROJECTION
    )
    if shape is None:
      raise ValueError(
          f"{loaded.model_dir} has no {pretrained.COLBERT_PROJECTION}, so it "
          "is not a ColBERT checkpoint"
      )
    metadata_path = loaded.model_dir / "artifact.metadata"
    metadata = (
        json.loads(metadata_path.read_text()) if metadata_path.is_file() else {}
    )
    if metadata.get("attend_to_mask_tokens"):
      raise ValueError(
          f"{metadata_path}: attend_to_mask_tokens=true is not supported "
          "(query [MASK] padding is scored, not attended)"
      )
    # torch [dim, hidden]; `build` checks it against the encoder.
    run_cfg = base.checkpoint_run_config(
        self, loaded, colbert_dim=int(shape[0]), colbert_augment=True
    )
    run_cfg["data"]["query_max_length"] = int(metadata.get("query_maxlen", 32))
    model = self.build(
        ml_collections.ConfigDict(run_cfg["model"]), loaded, tokenizer
    )
    return model, run_cfg

  def train_spec(self, config, *, loader, tokenizer, loss_spec, mesh):
    del mesh
    g = config.data.group_size

    def featurize(step, host_batch):
      # Queries at a fixed width, documents padded to the full passage
      # width (one compiled shape).
      queries, passages = loader.texts_at(step, host_batch)
      q_ids, q_mask, q_score = features.encode_queries(
          tokenizer,
          queries[::g],
          query_maxlen=config.data.query_max_length,
          augment=config.model.colbert_augment,
      )
      p_ids, p_mask, p_score = features.encode_docs(
          tokenizer,
          passages,
          doc_maxlen=config.data.passage_max_length,
          pad_multiple=config.data.passage_max_length,
      )
      return {
          "query_ids": q_ids,
          "query_mask": q_mask,
          "query_score_mask": q_score,
          "passage_ids": p_ids,
          "passage_mask": p_mask,
          "passage_score_mask": p_score,
          **{
              k: host_batch[k]
              for k in ("positive_counts", "passage_doc", "relevant_doc")
          },
      }

    return base.TrainSpec(
        featurize=featurize,
        loss=functools.partial(
            loss,
            loss_fn=loss_spec.fn,
            share_hard_negatives=config.loss.share_hard_negatives,
        ),
    )

  def serving_towers(
      self, model, tokenizer, run_cfg, export_cfg, *, corpus_texts
  ):
    del corpus_texts
    augment = bool(run_cfg["model"]["colbert_augment"])
    punctuation = features.punctuation_ids(tokenizer)

    def scored(colbert, ids_bl, mask_bl, score_bl):
      # `MultiVectorEncoder`'s output: unscored rows zeroed, plus the mask.
      e_bld = colbert(ids_bl, mask_bl, jnp.zeros_like(ids_bl))
      return e_bld * score_bl[:, :, None].astype(e_bld.dtype), score_bl

    def query(colbert, input_ids_bl, attention_mask_bl):
      # Augmented: the [MASK] fill is scored though not attended to.
      score_bl = (
          jnp.ones_like(attention_mask_bl) if augment else attention_mask_bl
      )
      return scored(colbert, input_ids_bl, attention_mask_bl, score_bl)

    def passage(colbert, input_ids_bl, attention_mask_bl):
      # Punctuation is attended to but not scored (`features.pad_docs`).
      score_bl = attention_mask_bl * (
          1 - jnp.isin(input_ids_bl, punctuation).astype(jnp.int32)
      )
      return scored(colbert, input_ids_bl, attention_mask_bl, score_bl)

    marker = tokenizer.token_to_id
    return {
        "query": base.ServingTower(
            query,
            model,
            run_cfg["data"]["query_max_length"],
            fixed_length=True,
            info={
                "layout": (
                    "[CLS] marker tokens [SEP], then fill to max_length"
                    " (attention_mask 0 on the fill)"
                ),
                "marker_id": marker(features.QUERY_MARKER),
                "fill_id": tokenizer.mask_id if augment else tokenizer.pad_id,
                "augment": augment,
            },
        ),
        "passage": base.ServingTower(
            passage,
            model,
            export_cfg.passage_max_length,
            info={
                "layout": "[CLS] marker tokens [SEP], [PAD]ded",
                "marker_id": marker(features.DOC_MARKER),
                "unscored_ids": punctuation.tolist(),
            },
        ),
    }


KIND = ColBERT()
