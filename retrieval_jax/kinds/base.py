"""The interface every retriever kind implements (`Kind`, `TrainSpec`,
`ServingTower`).

Callers look a kind up in `kinds.KINDS` and never switch on its name. Also
the distillation shared by the kinds that learn from a teacher
(`config.loss.teacher`, scores from `retrieval_jax/teachers.py`): the
checks of the teacher settings and the list loss over each query's group.
"""

from collections.abc import Callable, Mapping
import dataclasses
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from retrieval_jax import losses
from retrieval_jax import train_state
from retrieval_jax.errors import ConfigError

# Loader keys a step of the in-batch kinds reads; the others stay on host.
STEP_KEYS = (
    "query_ids",
    "query_mask",
    "passage_ids",
    "passage_mask",
    "positive_counts",
    "passage_doc",
    "relevant_doc",
)

# Losses that read raw cosines (not softmax logits): temperature must be 1.
COSINE_LOSSES = ("orthogonal_projection",)

# `config.loss.teacher`: "" none; scores of every (query, candidate) row from
# BM25, the evaluate mode's dense + BM25 fusion ("hybrid"), a bi-encoder
# ("dense") or cross-encoder run, the normalised mean of a dense and a sparse
# teacher ("ensemble"), or the training file's own scores ("file").
TEACHERS = ("", "bm25", "hybrid", "dense", "cross_encoder", "ensemble", "file")
# Teachers that read `config.loss.teacher_workdir`: required / optional.
WORKDIR_TEACHERS = ("dense", "cross_encoder")
# Losses that take graded targets (a teacher's scores) over each group.
DISTILLATION_LOSSES = tuple(
    sorted(set(losses.LISTWISE_LOSSES) - {"bce"}) + ["margin_mse"]
)


@dataclasses.dataclass(frozen=True)
class TrainSpec:
  """What the generic `steps.train_step` needs of a kind.

  featurize: `(step, host_batch) -> device batch` (numpy, split on data axes).
  loss: `(model, batch, rng, step) -> (loss, aux)`; rng: dropout key or None.
  value_and_grad: optional `(model_def, params, batch, rng, step) -> ((loss,
    aux), grads)` replacing `jax.value_and_grad(loss)` (GradCache).
  extra: optional state beside the params (a MoCo queue); then `loss` is
    `(model, batch, rng, step, extra) -> (loss, (aux, next extra))`.
  optimizer: optional `(total_steps) -> (tx, learning rate schedule)`
    replacing `optimizers.make_optimizer(config.optim, total_steps)`.
  """

  featurize: Callable[[int, dict], dict]
  loss: Callable
  value_and_grad: Callable | None = None
  extra: train_state.ExtraState | None = None
  optimizer: Callable | None = None


@dataclasses.dataclass(frozen=True)
class ServingTower:
  """One program of a kind's serving export (`Kind.serving_towers`).

  fn: `(weights, *inputs) -> output or tuple of outputs`, deterministic; a
    module `weights` arrives rebuilt from the exported parameters.
  weights: an NNX module (its `nnx.Param`s are the weight file) or a
    {name: array} dict; towers given the same object share one file.
  max_length: the widest input L, specials included.
  inputs: the int32 inputs in call order, [B, L] each ("markers": [B, 2]).
  fixed_length: inputs are always max_length wide (else any L <= it).
  info: JSON facts for the manifest's tower entry (input layout, ...).
  """

  fn: Callable
  weights: Any
  max_length: int
  inputs: tuple[str, ...] = ("input_ids", "attention_mask")
  fixed_length: bool = False
  info: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def take_keys(keys=STEP_KEYS) -> Callable[[int, dict], dict]:
  """A featurizer that forwards the loader's arrays `keys` unchanged."""

  def featurize(step, host_batch):
    del step
    return {k: host_batch[k] for k in keys}

  return featurize


def teacher_featurizer(config, keys=STEP_KEYS) -> Callable[[int, dict], dict]:
  """`take_keys(keys)`, plus "teacher_scores" times config.loss.teacher_scale
  when the run has a teacher."""
  if not config.loss.get("teacher", ""):
    return take_keys(keys)
  scale = config.loss.teacher_scale

  def featurize(step, host_batch):
    del step
    batch = {k: host_batch[k] for k in keys}
    batch["teacher_scores"] = scale * host_batch["teacher_scores"]
    return batch

  return featurize


def group_labels(positive_counts_b, passage_doc_p):
  """[B, G] positive and valid masks of the loader's query-major groups.

  Row i's group is passages i*G .. i*G+G-1, its first positive_counts[i]
  are positives; padding passages (doc -1) are invalid.
  """
  b = positive_counts_b.shape[0]
  valid_bg = (passage_doc_p >= 0).reshape(b, -1)
  slot_g = jnp.arange(valid_bg.shape[1])
  positive_bg = (slot_g[None, :] < positive_counts_b[:, None]) & valid_bg
  return positive_bg, valid_bg


def group_distillation_loss(
    scores_bg, teacher_bg, positive_bg, valid_bg, *, loss_name: str
):
  """A `DISTILLATION_LOSSES` loss of [B, G] student vs teacher group scores.

  The list losses (`losses.LISTWISE_LOSSES`) take the teacher's scores as
  graded targets over each group; margin_mse compares the margins of the
  first positive (slot 0: groups hold one positive) over each valid
  negative.
  """
  teacher_bg = teacher_bg.astype(jnp.float32)
  if loss_name == "margin_mse":
    return losses.listwise.margin_mse(
        scores_bg[:, 0],
        scores_bg[:, 1:],
        teacher_bg[:, 0],
        teacher_bg[:, 1:],
        valid_bg[:, 1:] & ~positive_bg[:, 1:] & positive_bg[:, :1],
    )
  return losses.LISTWISE_LOSSES[loss_name](scores_bg, teacher_bg, valid_bg)


def distillation_loss(
    scores_qc,
    batch,
    *,
    loss_name: str,
    infonce_weight: float = 0.0,
    share_hard_negatives: bool = True,
):
  """A teacher's distillation on float32 [B, B*G] in-batch scores.

  The student's [B, G] group scores are each query's own block of
  `scores_qc`; `group_distillation_loss` fits them to batch
  "teacher_scores" [B*G] (already scaled). infonce_weight > 0 adds that
  times InfoNCE over all B*G passages (in-batch and hard negatives). Aux:
  the loss's own, "distillation_loss" and "infonce_loss" (unweighted).
  """
  b = scores_qc.shape[0]
  g = scores_qc.shape[1] // b
  rows_b = jnp.arange(b)
  scores_bg = scores_qc.reshape(b, b, g)[rows_b, rows_b]
  positive_bg, valid_bg = group_labels(
      batch["positive_counts"], batch["passage_doc"]
  )
  loss, aux = group_distillation_loss(
      scores_bg,
      batch["teacher_scores"].reshape(b, g),
      positive_bg,
      valid_bg,
      loss_name=loss_name,
  )
  aux = dict(aux, distillation_loss=loss)
  if infonce_weight:
    ranking, _ = in_batch_loss(
        scores_qc,
        batch,
        loss_fn=losses.LOSSES["infonce"].fn,
        share_hard_negatives=share_hard_negatives,
    )
    loss = loss + infonce_weight * ranking
    aux["infonce_loss"] = ranking
  return loss, aux


def in_batch_loss(scores_qc, batch, *, loss_fn, share_hard_negatives: bool):
  """`loss_fn(scores_qc, positive_qc, valid_qc)` on float32 [B, B*G] scores."""
  group_size = scores_qc.shape[1] // scores_qc.shape[0]
  positive_qc, valid_qc = losses.contrastive.group_masks(
      batch["positive_counts"],
      group_size,
      batch.get("passage_doc"),
      batch.get("relevant_doc"),
      share_hard_negatives=share_hard_negatives,
  )
  return loss_fn(scores_qc, positive_qc, valid_qc)


def split_rng(rng, num: int = 2):
  """`num` dropout keys from the step key, or Nones without dropout."""
  return (None,) * num if rng is None else tuple(jax.random.split(rng, num))


# `config.evals.<name>.queries`: every judged query of the split, or only
# the training queries `config.data.holdout_queries` leaves out of training.
EVAL_QUERIES = ("all", "holdout")


def holdout_query_ids(config) -> frozenset[str]:
  """The training queries held out for model selection (empty: none).

  `config.data.holdout_queries` of the judged queries of the one eval block
  with `queries="holdout"` (its qrels split holds the training queries),
  drawn by `config.data.seed`; training drops them, that block evaluates
  only them.
  """
  from retrieval_jax.data import beir  # pylint: disable=g-import-not-at-top
  from retrieval_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  num = config.data.get("holdout_queries", 0)
  for name, ev in config.evals.items():
    if ev.get("queries", "all") not in EVAL_QUERIES:
      raise ConfigError(
          f"config.evals.{name}.queries={ev.queries!r}: expected one of"
          f" {EVAL_QUERIES}"
      )
  names = [
      n for n, ev in config.evals.items() if ev.get("queries") == "holdout"
  ]
  if isinstance(num, bool) or not isinstance(num, int) or num < 0:
    raise ConfigError(
        f"config.data.holdout_queries={num!r}: must be an int >= 0"
    )
  if not num:
    if names:
      raise ConfigError(
          f"config.evals.{names[0]}.queries='holdout' evaluates held-out "
          "training queries: set config.data.holdout_queries > 0"
      )
    return frozenset()
  if len(names) != 1:
    raise ConfigError(
        f"config.data.holdout_queries={num}: exactly one config.evals block"
        f" must evaluate them (queries='holdout'); found {names or 'none'}"
    )
  ev = config.evals[names[0]]
  path = beir.qrels_path(ev.path, ev.split)
  try:
    return pipeline.holdout_query_ids(
        list(beir.read_qrels(path)), num, config.data.seed
    )
  except (FileNotFoundError, ValueError) as e:
    raise ConfigError(f"config.data.holdout_queries={num} ({path}): {e}") from e


def eval_collection(config, name: str):
  """`config.evals.<name>`'s BEIR collection; for `queries="holdout"`, its
  qrels restricted to `holdout_query_ids(config)`."""
  from retrieval_jax.data import beir  # pylint: disable=g-import-not-at-top

  ev = config.evals[name]
  collection = beir.load_beir(ev.path, split=ev.split, on_unknown="warn")
  if ev.get("queries", "all") == "holdout":
    keep = holdout_query_ids(config)
    collection = dataclasses.replace(
        collection,
        qrels={q: d for q, d in collection.qrels.items() if q in keep},
    )
  return collection


class Kind:
  """A retriever kind; subclasses override what differs.

  name: `config.model.kind`; model_keys: the `config.model` keys it needs;
  architectures: encoders it wraps; dense_negatives: can mine negatives;
  trains_with_evals: `config.evals` run in training (else the evaluate mode);
  retriever: evaluate-mode retriever ("dense" kinds give `text_encoder`);
  distills: learns from `config.loss.teacher` (`DISTILLATION_LOSSES` over
  each query's group, the batch's "teacher_scores" as targets).
  """

  name: str = ""
  model_keys: tuple[str, ...] = ()
  architectures: tuple[str, ...] = ("bert",)
  dense_negatives: bool = False
  trains_with_evals: bool = False
  retriever: str = "dense"
  distills: bool = False

  def loss_spec(self, config) -> losses.LossSpec:
    """The `LossSpec` of `config.loss.name` (batch construction included)."""
    name = config.loss.name
    if self.distills and name in DISTILLATION_LOSSES:
      # One (query, positive) pair per example, its group the positive and
      # hard negatives, each row with its teacher score.
      return losses.LossSpec(
          (
              losses.listwise.margin_mse
              if name == "margin_mse"
              else losses.LISTWISE_LOSSES[name]
          ),
          losses.ONE,
          losses.PAIR,
          f"{name} of the group scores against a teacher's",
      )
    try:
      return losses.get_loss(config.loss.name)
    except ValueError as e:
      raise ConfigError(
          f"config.loss.name={config.loss.name!r}: unknown "
          f"loss; known: {sorted(losses.LOSSES)}"
      ) from e

  def validate(self, config) -> None:
    """Kind-specific checks of `config`; raises `ConfigError`."""
    self.loss_spec(config)
    model = config.model
    architecture = model.get("architecture", "bert")
    if architecture not in self.architectures:
      raise ConfigError(
          f"config.model.kind={self.name!r} needs "
          f"config.model.architecture in {self.architectures}"
      )
    missing = [k for k in self.model_keys if k not in model]
    if missing:
      raise ConfigError(
          f"config.model.kind={self.name!r} needs config.model."
          f"{missing[0]} (see configs/train.py:{self.name})"
      )
    if config.data.negatives == "dense" and not self.dense_negatives:
      raise ConfigError(
          "config.data.negatives='dense' mines with the model being trained,"
          f" which a {self.name!r} model cannot do; use 'bm25' or 'none'"
      )
    if config.evals and not self.trains_with_evals:
      raise ConfigError(
          f"config.evals: a {self.name!r} run is evaluated by the evaluate "
          f"mode (configs/evaluate.py:retriever={self.name}), not during "
          "training; set config.evals to {}"
      )
    if config.train.grad_cache_chunks[0] and self.name != "bi_encoder":
      raise ConfigError(
          "config.train.grad_cache_chunks: GradCache is for "
          f"bi-encoders; set (0, 0) for a {self.name!r} model"
      )
    if config.loss.name in COSINE_LOSSES and (
        config.loss.temperature != 1.0 or config.model.normalize is False
    ):
      raise ConfigError(
          f"config.loss.name={config.loss.name!r} reads cosine similarities: "
          f"set config.loss.temperature=1 (is {config.loss.temperature}) and "
          "keep config.model.normalize on"
      )
    if config.loss.get("sharded") and self.name != "bi_encoder":
      raise ConfigError(
          "config.loss.sharded: the shard_map loss is for "
          f"bi-encoders; set False for a {self.name!r} model"
      )
    holdout_query_ids(config)
    self.validate_teacher(config)

  def validate_teacher(self, config, *, labels_without_teacher=False) -> None:
    """The `config.loss.teacher` settings; raises `ConfigError`.

    labels_without_teacher: the list losses may train on 1/0 labels (the
    cross-encoder), else they need a teacher.
    """
    loss = config.loss
    teacher, name = loss.get("teacher", ""), loss.name
    if teacher not in TEACHERS:
      raise ConfigError(
          f"config.loss.teacher={teacher!r}: expected one of {TEACHERS}"
      )
    weight = loss.get("infonce_weight", 0.0)
    if not isinstance(weight, (int, float)) or weight < 0:
      raise ConfigError(f"config.loss.infonce_weight={weight!r}: must be >= 0")
    if weight and not teacher:
      raise ConfigError(
          f"config.loss.infonce_weight={weight}: adds InfoNCE to a "
          "distillation loss; set config.loss.teacher, or the weight to 0"
      )
    if not teacher:
      if name in DISTILLATION_LOSSES and not (
          labels_without_teacher and name in losses.LISTWISE_LOSSES
      ):
        raise ConfigError(
            f"config.loss.name={name!r} fits a teacher's scores: set "
            f"config.loss.teacher (one of {TEACHERS[1:]})"
        )
      return
    if not self.distills:
      raise ConfigError(
          f"config.loss.teacher={teacher!r}: a {self.name!r} model does not "
          "learn from a teacher; set config.loss.teacher=''"
      )
    if name not in DISTILLATION_LOSSES:
      raise ConfigError(
          f"config.loss.teacher={teacher!r} gives graded scores, which "
          f"config.loss.name={name!r} does not take; use one of "
          f"{list(DISTILLATION_LOSSES)}"
      )
    if teacher in WORKDIR_TEACHERS and not loss.get("teacher_workdir", ""):
      raise ConfigError(
          f"config.loss.teacher={teacher!r} needs config.loss.teacher_workdir"
          " (a train workdir or a model directory)"
      )
    if teacher == "file" and (
        config.data.format != "tevatron" or config.data.negatives != "file"
    ):
      raise ConfigError(
          "config.loss.teacher='file' reads the passages' scores of a "
          "Tevatron file: set config.data.format='tevatron' and "
          "config.data.negatives='file'"
      )
    if loss.get("sharded"):
      raise ConfigError(
          "config.loss.sharded: distillation (config.loss.teacher="
          f"{teacher!r}) computes its loss on the global batch; set False"
      )

  def build(self, model_cfg, loaded, tokenizer, *, seed: int = 0) -> nnx.Module:
    """The NNX model on `loaded`'s (pretrained) encoder."""
    raise NotImplementedError

  def initial_params(self, config, model_def, params, mesh) -> Any:
    """The params a run starts from without a checkpoint (warm starts of
    parts of the model); `params`, the built model's, by default."""
    del config, model_def, mesh
    return params

  def checkpoint_run(self, loaded, tokenizer) -> tuple[nnx.Module, dict]:
    """An off-the-shelf checkpoint of this kind, used as a trained run.

    `loaded`: the checkpoint's `pretrained.PretrainedModel`. Returns (model,
    run config dict as a train run saves it: "model", "data"); ValueError
    when the checkpoint lacks the kind's trained head.
    """
    del loaded, tokenizer
    raise ValueError(
        f"a {self.name!r} model is not read from a checkpoint; train one"
    )

  def train_spec(
      self, config, *, loader, tokenizer, loss_spec: losses.LossSpec, mesh
  ) -> TrainSpec:
    """The featurizer and loss of a training run on `mesh`."""
    raise NotImplementedError

  def train_evaluator(self, config, model_def, tokenizer, mesh, workdir) -> Any:
    """Runs `config.evals` on params: `.run(params) -> {name: value}`."""
    del config, model_def, tokenizer, mesh, workdir
    return None

  def text_encoder(
      self, model, tokenizer, run_cfg: dict, mesh, *, max_length: int
  ):
    """An `encoding.TextEncoder` over a trained model (dense kinds)."""
    raise NotImplementedError(f"a {self.name!r} run has no text encoder")

  def serving_towers(
      self,
      model,
      tokenizer,
      run_cfg: dict,
      export_cfg,
      *,
      corpus_texts: Callable[[], Any],
  ) -> dict[str, ServingTower]:
    """The programs `--mode=export` writes for a trained `model`, by name.

    export_cfg: `config.export` (token budgets, top_terms); corpus_texts:
    `() -> texts` of the corpus idf weights come from (inference-free).
    """
    del model, tokenizer, run_cfg, export_cfg, corpus_texts
    raise ConfigError(
        f"config.model.kind={self.name!r}: this kind has no serving export"
    )


def checkpoint_run_config(kind: "Kind", loaded, **model) -> dict:
  """The run config a checkpoint stands for: {"model": ..., "data": {}}."""
  return {
      "model": {
          "kind": kind.name,
          "architecture": "bert",
          "pretrained": str(loaded.model_dir),
          "pooling": loaded.pooling,
          "normalize": loaded.normalize,
          "max_length": loaded.max_length,
          "dtype": "float32",
          **model,
      },
      "data": {},
  }
