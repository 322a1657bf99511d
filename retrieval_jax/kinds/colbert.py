"""ColBERT: token vectors scored by MaxSim (late interaction).

Training scores every query against every passage row of the batch by
MaxSim over L2-normalised token vectors (no temperature) and takes a
`losses.LOSSES` objective; the batch has ColBERT's own layout ([Q]/[D]
markers, [MASK]-augmented queries, `data/features.py`). Evaluated by the
evaluate mode (re-ranking a first stage).
"""

import functools

from flax import nnx

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
    chunk_size=None
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
    return colbert_model.ColBERT(
        loaded.model, model_cfg.colbert_dim, rngs=nnx.Rngs(seed)
    )

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


KIND = ColBERT()
