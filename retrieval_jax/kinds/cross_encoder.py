"""Cross-encoder: one joint pass over a (query, passage) pair -> a score.

Each query's group (its positive, then hard negatives) becomes pairs
tokenised together at `config.data.pair_max_length`; the loss is a
`losses.LOSSES` objective over the group, or a list loss of
`losses.LISTWISE_LOSSES` on 1/0 labels or on a teacher's scores
(`config.loss.teacher`, e.g. "bm25": distillation; the loader's
"teacher_scores", see `retrieval_jax/teachers.py`). Evaluations re-rank a
first stage (dense or BM25) of each eval collection.
"""

import functools
import json
import pathlib

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from retrieval_jax import encoding
from retrieval_jax import io
from retrieval_jax import losses
from retrieval_jax import pretrained
from retrieval_jax.data import features
from retrieval_jax.errors import ConfigError
from retrieval_jax.evaluation import evaluators
from retrieval_jax.kinds import base
from retrieval_jax.models import cross_encoder as cross_encoder_model

# First stages a cross-encoder's evaluations can re-rank.
FIRST_STAGES = ("dense", "bm25")


group_labels = base.group_labels


def group_loss(
    scores_bg, positive_bg, valid_bg, *, loss_name: str, teacher_bg=None
):
  """A registry loss on the [B, G] pair scores of each query's group.

  Names of `losses.LOSSES` take the scores as logits over the group,
  positives first; names of `losses.LISTWISE_LOSSES` take 1/0 labels, or
  the teacher's scores `teacher_bg` when given (distillation); margin_mse
  needs the teacher (`base.group_distillation_loss`).
  """
  if loss_name == "margin_mse":
    if teacher_bg is None:
      raise ValueError("loss 'margin_mse' needs teacher scores")
    return base.group_distillation_loss(
        scores_bg, teacher_bg, positive_bg, valid_bg, loss_name=loss_name
    )
  if loss_name in losses.LISTWISE_LOSSES:
    labels_bg = (
        positive_bg.astype(jnp.float32)
        if teacher_bg is None
        else teacher_bg.astype(jnp.float32)
    )
    return losses.LISTWISE_LOSSES[loss_name](scores_bg, labels_bg, valid_bg)
  if teacher_bg is not None:
    raise ValueError(f"loss {loss_name!r} takes no teacher scores")
  return losses.get_loss(loss_name).fn(scores_bg, positive_bg, valid_bg)


def loss(model, batch, rng, step, *, loss_name: str, infonce_weight=0.0):
  """The cross-encoder's training loss (see `base.TrainSpec`).

  Batch: pair_ids / pair_mask / pair_types [B*G, L], pair_markers [B*G, 2]
  (the "emb" head's marker positions), positive_counts [B], passage_doc
  [B*G]; optionally teacher_scores [B*G] float32 (distillation targets).
  infonce_weight > 0 (with a teacher) adds that times InfoNCE over each
  group (its positives against its negatives).
  """
  del step
  positive_bg, valid_bg = group_labels(
      batch["positive_counts"], batch["passage_doc"]
  )
  scores_p = model(
      batch["pair_ids"],
      batch["pair_mask"],
      batch["pair_types"],
      batch["pair_markers"],
      deterministic=rng is None,
      dropout_rng=rng,
  )
  teacher_p = batch.get("teacher_scores")
  scores_bg = scores_p.reshape(valid_bg.shape)
  value, aux = group_loss(
      scores_bg,
      positive_bg,
      valid_bg,
      loss_name=loss_name,
      teacher_bg=(
          None if teacher_p is None else teacher_p.reshape(valid_bg.shape)
      ),
  )
  if infonce_weight:
    ranking, _ = losses.get_loss("infonce").fn(scores_bg, positive_bg, valid_bg)
    aux = dict(aux, distillation_loss=value, infonce_loss=ranking)
    value = value + infonce_weight * ranking
  return value, aux


class RerankEvaluator:
  """`config.evals` as re-ranking of a first stage with the params trained.

  The first stage (`config.evals.<name>.first_stage`: the pretrained
  bi-encoder `config.model.pretrained`, or BM25) is ranked once and kept in
  <workdir>/first_stage_<name>.json, keyed by the settings that decide it;
  its metrics are reported as "first_stage/<name>/<measure>".
  """

  def __init__(self, config, model_def, tokenizer, mesh, workdir):
    self.config, self.model_def = config, model_def
    self.tokenizer, self.mesh = tokenizer, mesh
    self.evals, self.first_stage_metrics = {}, {}
    self._first_stage_encoder = None
    for name, ev in config.evals.items():
      collection = base.eval_collection(config, name)
      candidates, metrics = self._first_stage(
          name,
          ev,
          collection,
          pathlib.Path(workdir) / f"first_stage_{name}.json",
      )
      self.evals[name] = evaluators.RerankEvaluator(
          collection,
          candidates,
          depth=ev.rerank_depth,
          measures=ev.measures,
          name=name,
      )
      self.first_stage_metrics.update(
          {f"first_stage/{name}/{k}": v for k, v in metrics.items()}
      )

  def _first_stage(self, name, ev, collection, path):
    key = {
        "kind": ev.first_stage,
        "path": str(ev.path),
        "split": ev.split,
        "depth": max(ev.rerank_depth, ev.top_k),
        "max_queries": ev.max_queries,
        "queries": io.fingerprint(sorted(collection.qrels)),
        "measures": list(ev.measures),
        "model": self.config.model.pretrained,
        "max_length": self.config.model.max_length,
    }
    if path.exists():
      cached = json.loads(path.read_text())
      if cached.get("key") == key:
        logging.info("%s: first stage from %s", name, path)
        return cached["candidates"], cached["metrics"]
    encoder = self.encoder(None) if ev.first_stage == "dense" else None
    candidates, metrics = evaluators.first_stage(
        ev.first_stage,
        collection,
        depth=key["depth"],
        measures=ev.measures,
        max_queries=ev.max_queries,
        encoder=encoder,
        batch_size=ev.batch_size,
        mesh=self.mesh,
    )
    if jax.process_index() == 0:
      io.write_json_atomic(
          path, {"key": key, "candidates": candidates, "metrics": metrics}
      )
    return candidates, metrics

  def encoder(self, params) -> encoding.TextEncoder:
    """The dense first stage, `config.model.pretrained` (not `params`: the
    cross-encoder's): it ranks the evaluations' candidates and mines the
    training negatives (`config.data.negatives="dense"`), so training
    groups come from the ranking the model will re-rank."""
    del params
    if self._first_stage_encoder is None:
      self._first_stage_encoder = encoding.TextEncoder.from_pretrained(
          self.config.model.pretrained,
          self.mesh,
          max_length=self.config.model.max_length,
      )
    return self._first_stage_encoder

  def run(self, params, out_dir=None) -> dict[str, float]:
    """{"eval/<name>/<measure>": value} of the re-ranked runs; with
    `out_dir`, each one's run.trec and per-query values go to
    <out_dir>/<name>/."""
    model = self.model_def.merge(params)
    out = {}
    with jax.default_matmul_precision(self.config.model.matmul_precision):
      for name, evaluator in self.evals.items():
        scorer = encoding.PairScorer(
            model,
            self.tokenizer,
            evaluator.query_texts,
            evaluator.collection.doc_texts(),
            max_length=self.config.data.pair_max_length,
            batch_size=self.config.evals[name].batch_size,
            mesh=self.mesh,
            desc=f"{name}: re-rank",
        )
        result = evaluator.run(scorer)
        out.update(
            {f"eval/{name}/{k}": float(v) for k, v in result.metrics.items()}
        )
        if out_dir is not None and jax.process_index() == 0:
          evaluators.write_result(
              result, pathlib.Path(out_dir) / name, tag=name
          )
    return out


class CrossEncoder(base.Kind):
  """See the module docstring."""

  name = "cross_encoder"
  model_keys = ("head",)
  trains_with_evals = True
  retriever = "rerank"
  distills = True
  # With the first stage's encoder (`RerankEvaluator.encoder`).
  dense_negatives = True

  def loss_spec(self, config) -> losses.LossSpec:
    name = config.loss.name
    if name == "margin_mse":
      return super().loss_spec(config)
    if name in losses.LISTWISE_LOSSES:
      # One (query, positive) pair per example, its group filled with hard
      # negatives labelled 0.
      return losses.LossSpec(
          losses.LISTWISE_LOSSES[name],
          losses.ONE,
          losses.PAIR,
          f"{name} on 1/0 pair labels",
      )
    if name not in losses.LOSSES:
      raise ConfigError(
          f"config.loss.name={name!r}: unknown loss; known: "
          f"{sorted(losses.LOSSES) + sorted(losses.LISTWISE_LOSSES)}"
          " or 'margin_mse'"
      )
    return losses.LOSSES[name]

  def validate_teacher(self, config, *, labels_without_teacher=True) -> None:
    # The list losses also train on the groups' 1/0 labels.
    super().validate_teacher(config, labels_without_teacher=True)

  def validate(self, config) -> None:
    super().validate(config)
    if config.model.head not in cross_encoder_model.HEADS:
      raise ConfigError(
          f"config.model.head={config.model.head!r}: expected "
          f"one of {cross_encoder_model.HEADS}"
      )
    if config.data.get("refresh_epochs", 0.0) or config.data.get(
        "refresh_steps", 0
    ):
      raise ConfigError(
          "config.data.refresh_epochs / refresh_steps: a cross-encoder's"
          " dense negatives come from its fixed first stage"
          " (config.model.pretrained); set both to 0"
      )
    for name, ev in config.evals.items():
      if ev.get("first_stage") not in FIRST_STAGES:
        raise ConfigError(
            f"config.evals.{name}.first_stage="
            f"{ev.get('first_stage')!r}: a cross-encoder "
            f"re-ranks one of {FIRST_STAGES}"
        )
      if ev.get("rerank_depth", 0) < 1:
        raise ConfigError(f"config.evals.{name}.rerank_depth must be >= 1")

  def build(self, model_cfg, loaded, tokenizer, *, seed: int = 0):
    from flax import nnx  # pylint: disable=g-import-not-at-top

    del tokenizer
    head = None
    if model_cfg.head == "cls" and pretrained.has_sequence_classifier(
        pretrained.tensor_shapes(loaded.model_dir)
    ):
      # A cross-encoder checkpoint (BertForSequenceClassification, as HF and
      # sentence-transformers save one) keeps its pooler and classifier.
      head = pretrained.read_sequence_classifier(
          pretrained.read_state_dict(loaded.model_dir),
          loaded.config.hidden_size,
      )
    # Else the head (if any) starts from BERT's init, seeded by the run's seed.
    model = cross_encoder_model.CrossEncoder(
        loaded.model,
        model_cfg.head,
        rngs=nnx.Rngs(seed),
        pooler=head is not None and "pooler_dd" in head,
    )
    if head is not None:
      for name, value in head.items():
        target = getattr(model, name)
        target.set_value(jnp.asarray(value, dtype=target[...].dtype))
      logging.info("cross-encoder: classifier head from %s", loaded.model_dir)
    return model

  def checkpoint_run(self, loaded, tokenizer):
    """A BertForSequenceClassification checkpoint (HF / sentence-transformers
    CrossEncoder) scoring pairs as it was trained to, [CLS] head, pairs up
    to the checkpoint's max length."""
    if not pretrained.has_sequence_classifier(
        pretrained.tensor_shapes(loaded.model_dir)
    ):
      raise ValueError(
          f"{loaded.model_dir} has no classifier.weight, so it is not a "
          "cross-encoder checkpoint"
      )
    run_cfg = base.checkpoint_run_config(self, loaded, head="cls")
    run_cfg["data"]["pair_max_length"] = loaded.max_length
    model = self.build(
        ml_collections.ConfigDict(run_cfg["model"]), loaded, tokenizer
    )
    return model, run_cfg

  def train_spec(self, config, *, loader, tokenizer, loss_spec, mesh):
    del loss_spec, mesh
    teacher = config.loss.get("teacher", "")
    width = config.data.pair_max_length

    def featurize(step, host_batch):
      # (query, passage) rows tokenised together, at one fixed width.
      queries, passages = loader.texts_at(step, host_batch)
      pairs = features.encode_pairs(
          tokenizer,
          queries,
          passages,
          width,
          config.model.head,
          pad_to_multiple_of=width,
      )
      batch = {
          "pair_ids": pairs["input_ids"],
          "pair_mask": pairs["attention_mask"],
          "pair_types": pairs["token_type_ids"],
          "pair_markers": pairs.get(
              "markers", np.zeros((len(queries), 2), np.int32)
          ),
          "positive_counts": host_batch["positive_counts"],
          "passage_doc": host_batch["passage_doc"],
      }
      if teacher:
        # The teacher's score of every row, as the list loss's targets.
        batch["teacher_scores"] = (
            config.loss.teacher_scale * host_batch["teacher_scores"]
        )
      return batch

    return base.TrainSpec(
        featurize=featurize,
        loss=functools.partial(
            loss,
            loss_name=config.loss.name,
            infonce_weight=config.loss.get("infonce_weight", 0.0),
        ),
    )

  def train_evaluator(self, config, model_def, tokenizer, mesh, workdir):
    return RerankEvaluator(config, model_def, tokenizer, mesh, workdir)

  def serving_towers(
      self, model, tokenizer, run_cfg, export_cfg, *, corpus_texts
  ):
    del export_cfg, corpus_texts
    head = model.head
    info = {
        "head": head,
        "layout": (
            "[CLS] query [SEP] passage [SEP], longest-first truncated;"
            " token_type_ids 1 on the passage part"
        ),
    }
    inputs = ("input_ids", "attention_mask", "token_type_ids")
    if head == "emb":
      # Rows [CLS] [Q] query [SEP] [I] passage [SEP]; markers: [B, 2].
      inputs += ("markers",)
      info["marker_ids"] = [
          tokenizer.token_to_id(t)
          for t in (features.PAIR_QUERY_MARKER, features.PAIR_ITEM_MARKER)
      ]

    def score(cross_encoder, *arrays):
      return cross_encoder(*arrays)

    return {
        "pair": base.ServingTower(
            score,
            model,
            run_cfg["data"]["pair_max_length"],
            inputs=inputs,
            info=info,
        )
    }


KIND = CrossEncoder()
