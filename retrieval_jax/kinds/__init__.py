"""Retriever kinds, chosen by `config.model.kind` through `KINDS`.

Each kind is one module implementing `base.Kind`; the trainer, evaluation and
export look it up here. Adding a kind is one module and one line below
(README: "Adding a retriever kind"). `VIEWS`: runs of one kind that
`load_run` also reads as another (an AR2 run's retriever and ranker).
"""

import pathlib

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections

from retrieval_jax import checkpointing
from retrieval_jax import metric_logging
from retrieval_jax import pretrained
from retrieval_jax import train_state
from retrieval_jax.data import tokenizers
from retrieval_jax.errors import ConfigError
from retrieval_jax.kinds import ar2
from retrieval_jax.kinds import base
from retrieval_jax.kinds import bi_encoder
from retrieval_jax.kinds import bpr
from retrieval_jax.kinds import colbert
from retrieval_jax.kinds import cross_encoder
from retrieval_jax.kinds import jpq
from retrieval_jax.kinds import moco
from retrieval_jax.kinds import revela
from retrieval_jax.kinds import splade

KINDS: dict[str, base.Kind] = {
    "bi_encoder": bi_encoder.KIND,
    "cross_encoder": cross_encoder.KIND,
    "splade": splade.SPLADE,
    "inference_free": splade.INFERENCE_FREE,
    "colbert": colbert.KIND,
    "moco": moco.KIND,
    "revela": revela.KIND,
    "bpr": bpr.KIND,
    "jpq": jpq.KIND,
    "ar2": ar2.KIND,
}

# (run's kind, kind it is read as) -> `(model, run config) -> (the part's
# model, its run config)`.
VIEWS = {
    ("ar2", "bi_encoder"): ar2.as_retriever,
    ("ar2", "cross_encoder"): ar2.as_ranker,
}


def get(model_cfg) -> base.Kind:
  """The kind `config.model.kind` names (default "bi_encoder")."""
  name = model_cfg.get("kind", "bi_encoder")
  if name not in KINDS:
    raise ConfigError(
        f"config.model.kind={name!r}: expected one of {tuple(KINDS)}"
    )
  return KINDS[name]


def load_run(
    train_workdir: str | pathlib.Path,
    mesh,
    *,
    kinds: tuple[str, ...] | None = None,
    step: int | None = None,
):
  """A train-mode workdir's model, rebuilt from its saved config, read-only.

  `train_workdir` may instead name an off-the-shelf checkpoint of the one
  kind in `kinds` (a directory or hub id, `pretrained.resolve_model_dir`):
  see `load_checkpoint`.

  Args:
    kinds: the kinds the caller accepts (None: any); a run of another
      kind loads as its part of an accepted kind (`VIEWS`), else
      ValueError.
    step: the checkpoint step; None for the one `config.train.select_metric`
      selected (`metric_logging.selected_step`), else the latest.

  Returns:
    (model, tokenizer, run config dict, checkpoint step).
  """
  not_a_model = ""
  if not (pathlib.Path(train_workdir) / "checkpoints").is_dir():
    try:
      model_dir = pretrained.resolve_model_dir(train_workdir)
    except FileNotFoundError as e:
      not_a_model = str(e)
    else:
      if kinds is None or len(kinds) != 1:
        raise ValueError(
            f"{str(train_workdir)!r} is a model checkpoint, not a train "
            "workdir: evaluate it as one kind (configs/evaluate.py:"
            "retriever=KIND with config.retriever.KIND_workdir=CHECKPOINT)"
        )
      return load_checkpoint(model_dir, kinds[0])
  try:
    return _load_trained(train_workdir, mesh, kinds=kinds, step=step)
  except FileNotFoundError as e:
    if not not_a_model:
      raise
    raise FileNotFoundError(
        f"{e} (nor is it a model checkpoint: {not_a_model})"
    ) from e


def load_checkpoint(name_or_path, kind: str):
  """A published checkpoint of `kind` used as a trained run (step 0).

  SPLADE needs an MLM head, ColBERT `linear.weight`, a cross-encoder a
  sequence classifier (`Kind.checkpoint_run`); ValueError otherwise.
  Returns what `load_run` does.
  """
  loaded = pretrained.load_pretrained(name_or_path)
  tokenizer = tokenizers.WordPieceTokenizer.from_pretrained_dir(
      loaded.model_dir
  )
  model, run_cfg = KINDS[kind].checkpoint_run(loaded, tokenizer)
  logging.info("%s: the %s checkpoint %s", kind, kind, loaded.model_dir)
  return model, tokenizer, run_cfg, 0


def _load_trained(train_workdir, mesh, *, kinds, step):
  """`load_run` of a train-mode workdir."""
  built = {}

  def abstract(metadata):
    model_cfg = ml_collections.ConfigDict(
        metadata.get("config", {}).get("model", {})
    )
    name = model_cfg.get("kind", "bi_encoder")
    allowed = tuple(KINDS) if kinds is None else kinds
    views = [(name, k) for k in allowed if (name, k) in VIEWS]
    if name not in allowed and not views:
      raise ValueError(
          f"{str(train_workdir)!r}: that run trained a {name!r}"
          f" model; expected one of {allowed}"
      )
    built["view"] = VIEWS[views[0]] if name not in allowed else None
    loaded = pretrained.load_model(model_cfg, dtype=jnp.dtype(model_cfg.dtype))
    tokenizer = tokenizers.WordPieceTokenizer.from_pretrained_dir(
        loaded.model_dir
    )
    model = KINDS[name].build(model_cfg, loaded, tokenizer)
    built["model_def"], params = train_state.split_model(model)
    built["tokenizer"] = tokenizer
    # Laid out as the trainer lays them out (the current rules).
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        params,
        train_state.param_shardings(built["model_def"], params, mesh),
    )

  if step is None:
    step = metric_logging.selected_step(train_workdir)
  step, metadata, params = checkpointing.read_run_checkpoint(
      pathlib.Path(train_workdir) / "checkpoints", abstract, step
  )
  model, run_cfg = built["model_def"].merge(params), metadata["config"]
  if built["view"] is not None:
    model, run_cfg = built["view"](model, run_cfg)
  return model, built["tokenizer"], run_cfg, step
