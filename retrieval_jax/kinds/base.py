"""The interface every retriever kind implements (`Kind`, `TrainSpec`,
`ServingTower`).

Callers look a kind up in `kinds.KINDS` and never switch on its name.
"""

from collections.abc import Callable, Mapping
import dataclasses
from typing import Any

from flax import nnx
import jax

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


@dataclasses.dataclass(frozen=True)
class TrainSpec:
  """What the generic `steps.train_step` needs of a kind.

  featurize: `(step, host_batch) -> device batch` (numpy, split on data axes).
  loss: `(model, batch, rng, step) -> (loss, aux)`; rng: dropout key or None.
  value_and_grad: optional `(model_def, params, batch, rng, step) -> ((loss,
    aux), grads)` replacing `jax.value_and_grad(loss)` (GradCache).
  extra: optional state beside the params (a MoCo queue); then `loss` is
    `(model, batch, rng, step, extra) -> (loss, (aux, next extra))`.
  """

  featurize: Callable[[int, dict], dict]
  loss: Callable
  value_and_grad: Callable | None = None
  extra: train_state.ExtraState | None = None


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


class Kind:
  """A retriever kind; subclasses override what differs.

  name: `config.model.kind`; model_keys: the `config.model` keys it needs;
  architectures: encoders it wraps; dense_negatives: can mine negatives;
  trains_with_evals: `config.evals` run in training (else the evaluate mode);
  retriever: evaluate-mode retriever ("dense" kinds give `text_encoder`).
  """

  name: str = ""
  model_keys: tuple[str, ...] = ()
  architectures: tuple[str, ...] = ("bert",)
  dense_negatives: bool = False
  trains_with_evals: bool = False
  retriever: str = "dense"

  def loss_spec(self, config) -> losses.LossSpec:
    """The `LossSpec` of `config.loss.name` (batch construction included)."""
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
    if config.loss.get("teacher", ""):
      raise ConfigError(
          "config.loss.teacher is for a cross-encoder "
          "(config.model.kind='cross_encoder')"
      )

  def build(self, model_cfg, loaded, tokenizer, *, seed: int = 0) -> nnx.Module:
    """The NNX model on `loaded`'s (pretrained) encoder."""
    raise NotImplementedError

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
