"""Retriever kinds, chosen by `config.model.kind` through `KINDS`.

Each kind is one module implementing `base.Kind`; the trainer, evaluation and
export look it up here. Adding a kind is one module and one line below
(README: "Adding a retriever kind").
"""

import pathlib

import jax
import jax.numpy as jnp
import ml_collections

from retrieval_jax import checkpointing
from retrieval_jax import pretrained
from retrieval_jax import train_state
from retrieval_jax.data import tokenizers
from retrieval_jax.errors import ConfigError
from retrieval_jax.kinds import base
from retrieval_jax.kinds import bi_encoder
from retrieval_jax.kinds import colbert
from retrieval_jax.kinds import cross_encoder
from retrieval_jax.kinds import splade

KINDS: dict[str, base.Kind] = {
    "bi_encoder": bi_encoder.KIND,
    "cross_encoder": cross_encoder.KIND,
    "splade": splade.SPLADE,
    "inference_free": splade.INFERENCE_FREE,
    "colbert": colbert.KIND,
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

  Args:
    kinds: the kinds the caller accepts (None: any); others: ValueError.
    step: the checkpoint step; None for the latest.

  Returns:
    (model, tokenizer, run config dict, checkpoint step).
  """
  built = {}

  def abstract(metadata):
    model_cfg = ml_collections.ConfigDict(
        metadata.get("config", {}).get("model", {})
    )
    name = model_cfg.get("kind", "bi_encoder")
    allowed = tuple(KINDS) if kinds is None else kinds
    if name not in allowed:
      raise ValueError(
          f"{str(train_workdir)!r}: that run trained a {name!r}"
          f" model; expected one of {allowed}"
      )
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

  step, metadata, params = checkpointing.read_run_checkpoint(
      pathlib.Path(train_workdir) / "checkpoints", abstract, step
  )
  return (
      built["model_def"].merge(params),
      built["tokenizer"],
      metadata["config"],
      step,
  )
