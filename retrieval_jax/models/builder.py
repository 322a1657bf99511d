"""Which model `config.model.kind` names, built on a pretrained encoder.

The trainer builds a run's model here, and jobs that use a trained run
(evaluation, experiments) rebuild the same model from the run's saved
config here, so the two can never disagree:

  bi_encoder      the encoder itself, pooled (encoding.TextEncoder)
  cross_encoder   models.cross_encoder.CrossEncoder (config.model.head)
  splade          models.splade.Splade: query and document sides encoded
  inference_free  the same Splade as the document encoder; queries are a
                  bag of their tokens weighted by idf (no query encoder)
  colbert         models.colbert.ColBERT (config.model.colbert_dim)
"""

import pathlib

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
import ml_collections

from retrieval_jax import checkpointing
from retrieval_jax import pretrained
from retrieval_jax import train_state
from retrieval_jax.data import tokenizers

KINDS = ("bi_encoder", "cross_encoder", "splade", "inference_free",
         "colbert")
SPARSE_KINDS = ("splade", "inference_free")


def special_ids(tokenizer) -> tuple[int, ...]:
  """[CLS], [SEP], [PAD]: never useful as sparse terms ([CLS] tops every
  text's SPLADE weights), so their columns are zeroed."""
  return (tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id)


def build(model_cfg, loaded: pretrained.PretrainedModel, tokenizer, *,
          seed: int = 0):
  """The model of `model_cfg.kind` on `loaded`'s (pretrained) encoder.

  Args:
    model_cfg: `config.model` (kind and the kind's own keys).
    loaded: from `pretrained.load_model`.
    tokenizer: its WordPiece tokenizer (special ids).
    seed: initialises the new heads' weights.

  Returns:
    The NNX module (the encoder itself for "bi_encoder").
  """
  kind = model_cfg.get("kind", "bi_encoder")
  rngs = nnx.Rngs(seed)
  if kind == "bi_encoder":
    return loaded.model
  if kind == "cross_encoder":
    from retrieval_jax.models import cross_encoder  # pylint: disable=g-import-not-at-top
    return cross_encoder.CrossEncoder(loaded.model, model_cfg.head, rngs=rngs)
  if kind in SPARSE_KINDS:
    from retrieval_jax.models import splade  # pylint: disable=g-import-not-at-top
    model = splade.Splade(
        loaded.model, aggregation=model_cfg.splade_aggregation,
        bias_init=model_cfg.splade_bias_init,
        special_ids=special_ids(tokenizer), rngs=rngs)
    # A checkpoint with BERT's MLM head (bert-base-uncased, ...) gives the
    # head its trained transform and bias; all-MiniLM-L6-v2 has none, and
    # the head keeps its identity init (the decoder is the tied embedding
    # table either way).
    if model_cfg.get("architecture", "bert") == "bert" and splade.load_mlm_head(
        model.head, pretrained.read_state_dict(loaded.model_dir)):
      logging.info("SPLADE: MLM head weights from %s", loaded.model_dir)
    return model
  if kind == "colbert":
    from retrieval_jax.models import colbert  # pylint: disable=g-import-not-at-top
    return colbert.ColBERT(loaded.model, model_cfg.colbert_dim, rngs=rngs)
  raise ValueError(f"config.model.kind={kind!r}: expected one of {KINDS}")


def load_trained(train_workdir: str | pathlib.Path, mesh, *,
                 kinds: tuple[str, ...] = KINDS, step: int | None = None):
  """The trained model of a train-mode workdir, read-only.

  Args:
    train_workdir: the run's workdir (its checkpoints/ is read).
    mesh: the params are replicated on it.
    kinds: the model kinds the caller can use.
    step: the checkpoint step; None for the latest.

  Returns:
    (model, tokenizer, run config dict, checkpoint step).

  Raises:
    FileNotFoundError: no checkpoint in <train_workdir>/checkpoints.
    ValueError: the run trained a kind not in `kinds`.
  """
  directory = pathlib.Path(train_workdir) / "checkpoints"
  built = {}

  def abstract(metadata):
    run = metadata.get("config", {})
    kind = run.get("model", {}).get("kind", "bi_encoder")
    if kind not in kinds:
      raise ValueError(
          f"{str(train_workdir)!r}: that run trained a {kind!r} model; "
          f"expected one of {kinds}")
    model_cfg = ml_collections.ConfigDict(run["model"])
    loaded = pretrained.load_model(model_cfg, dtype=jnp.dtype(model_cfg.dtype))
    tokenizer = tokenizers.WordPieceTokenizer.from_pretrained_dir(
        loaded.model_dir)
    model = build(model_cfg, loaded, tokenizer)
    built["model_def"], params = train_state.split_model(model)
    built["tokenizer"] = tokenizer
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=replicated), params)

  step, metadata, params = checkpointing.read_run_checkpoint(
      directory, abstract, step)
  return (built["model_def"].merge(params), built["tokenizer"],
          metadata["config"], step)
