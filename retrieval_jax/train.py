"""The train mode: fine-tune a bi- or cross-encoder, checkpoint, evaluate.

A cross-encoder (`config.model.kind = "cross_encoder"`,
`models/cross_encoder.py`) trains on the same loader: each query's group
(its positive, then hard negatives) becomes (query, passage) pairs
tokenised together at `config.data.pair_max_length`, scored jointly and
fed to a registry loss over the group (InfoNCE, ...) or a pointwise /
listwise one on 1/0 labels ("bce", "listnet", ...). Its evaluations
re-rank a first stage (dense or BM25) of each eval collection.

`train_and_evaluate(config, workdir)` is the whole job; `main.py --mode=train`
and the notebooks call it the same way. Wiring only, no math: the step is
`steps.train_step`, losses come from `retrieval_jax.losses`, batches from
`data.pipeline.TrainLoader`.

Resume order (the first that applies):
  1. the latest complete checkpoint in <workdir>/checkpoints: the full state
     (params, optimizer, step) and the data position; the run continues as
     if it had never stopped (same batches, same dropout keys);
  2. `config.checkpoint.init_from`: params from another run's checkpoint
     directory, fresh optimizer, step 0;
  3. scratch: the pretrained weights of `config.model.pretrained`.

Workdir after a run:
  checkpoints/          Orbax checkpoints (state, data position, config)
  metrics.jsonl         one line per logged step (train/..., eval/..., perf/...)
  events.out.tfevents*  the same scalars for TensorBoard
  results.json          eval metrics before and after training, run summary
  negatives/            mined hard negatives (cache keyed by content)
"""

import json
import pathlib
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from retrieval_jax import checkpointing
from retrieval_jax import encoding
from retrieval_jax import metric_logging
from retrieval_jax import optimizers
from retrieval_jax import pretrained
from retrieval_jax import sharding
from retrieval_jax import steps
from retrieval_jax import train_state
from retrieval_jax.data import beir
from retrieval_jax.data import tokenizers
from retrieval_jax.models import builder
from retrieval_jax.search import bm25
from retrieval_jax.evaluation import evaluators
from retrieval_jax.evaluate import ConfigError

# Batch keys the step reads; the loader's other keys stay on the host.
STEP_KEYS = ("query_ids", "query_mask", "passage_ids", "passage_mask",
             "positive_counts", "passage_doc", "relevant_doc")


# ---------------------------------------------------------------------------
# Start-up checks: every bad value fails here, naming its key.


def is_cross_encoder(config) -> bool:
  """Whether `config.model.kind` asks for a cross-encoder (pair scorer)."""
  return config.model.get("kind", "bi_encoder") == "cross_encoder"


def _get_loss(config):
  """The loss's `LossSpec`; a cross-encoder also takes the listwise ones."""
  from retrieval_jax import losses  # pylint: disable=g-import-not-at-top
  name = config.loss.name
  if is_cross_encoder(config) and name in losses.LISTWISE_LOSSES:
    # One (query, positive) pair per example, its group filled with hard
    # negatives labelled 0.
    return losses.LossSpec(losses.LISTWISE_LOSSES[name], losses.ONE,
                           losses.PAIR, f"{name} on 1/0 pair labels")
  try:
    return losses.get_loss(name)
  except (KeyError, ValueError) as e:
    known = sorted(losses.LOSSES) + (sorted(losses.LISTWISE_LOSSES)
                                     if is_cross_encoder(config) else [])
    raise ConfigError(f"config.loss.name={name!r}: unknown loss; "
                      f"known: {known}") from e


def _check_path(key: str, value: str, *, is_dir: bool,
                needs: tuple[str, ...] = ()) -> pathlib.Path:
  path = pathlib.Path(value).expanduser()
  if not value:
    raise ConfigError(f"config.{key} is empty: set it to a "
                      f"{'directory' if is_dir else 'file'}")
  if is_dir and not path.is_dir():
    raise ConfigError(f"config.{key}={value!r}: no such directory")
  if not is_dir and not path.is_file():
    raise ConfigError(f"config.{key}={value!r}: no such file")
  missing = [n for n in needs if not (path / n).is_file()]
  if missing:
    raise ConfigError(f"config.{key}={value!r} lacks {missing}")
  return path


MODEL_KINDS = ("bi_encoder", "cross_encoder", "splade", "inference_free",
               "colbert")
# Kinds trained by `steps.representation_train_step` and evaluated by the
# evaluate mode (configs/evaluate.py:retriever=<kind>), not during training.
REPRESENTATION_KINDS = ("splade", "inference_free", "colbert")
# First stages a cross-encoder's evaluations can re-rank.
FIRST_STAGES = ("dense", "bm25")

# Losses that read raw cosines (not softmax logits): temperature must be 1.
COSINE_LOSSES = ("orthogonal_projection",)


def _validate_model(config) -> None:
  from retrieval_jax.models import m2_encoder  # pylint: disable=g-import-not-at-top
  model = config.model
  architecture = model.get("architecture", "bert")
  if architecture not in pretrained.ARCHITECTURES:
    raise ConfigError(f"config.model.architecture={architecture!r}: expected "
                      f"one of {pretrained.ARCHITECTURES}")
  kinds = (m2_encoder.POOLING_KINDS if architecture == "m2" else
           ("cls", "mean"))
  if model.pooling not in ("",) + tuple(kinds):
    raise ConfigError(f"config.model.pooling={model.pooling!r}: expected one "
                      f"of {kinds} or '' (the model's default)")
  kind = model.get("kind", "bi_encoder")
  if kind not in MODEL_KINDS:
    raise ConfigError(f"config.model.kind={kind!r}: expected one of "
                      f"{MODEL_KINDS}")
  if kind != "bi_encoder" and architecture != "bert":
    raise ConfigError(f"config.model.kind={kind!r} needs "
                      "config.model.architecture='bert'")
  if kind in REPRESENTATION_KINDS:
    needed = (("colbert_dim",) if kind == "colbert" else
              ("splade_aggregation", "splade_bias_init"))
    missing = [k for k in needed if k not in model]
    if missing:
      raise ConfigError(f"config.model.kind={kind!r} needs config.model."
                        f"{missing[0]} (see configs/train.py:{kind})")
  if kind == "cross_encoder":
    from retrieval_jax.models import cross_encoder  # pylint: disable=g-import-not-at-top
    if model.head not in cross_encoder.HEADS:
      raise ConfigError(f"config.model.head={model.head!r}: expected one of "
                        f"{cross_encoder.HEADS}")
  if model.dtype not in ("float32", "bfloat16"):
    raise ConfigError(f"config.model.dtype={model.dtype!r}: expected "
                      "'float32' or 'bfloat16'")
  if architecture == "m2":
    try:
      m2 = m2_encoder.config_from_block(model.m2)
    except (ValueError, KeyError, AttributeError) as e:
      raise ConfigError(f"config.model.m2: {e}") from e
    if model.max_length > m2.max_position_embeddings:
      raise ConfigError(
          f"config.model.max_length={model.max_length} exceeds the M2 "
          f"encoder's max_position_embeddings {m2.max_position_embeddings} "
          "(config.model.m2)")


def validate(config: ml_collections.ConfigDict, mesh) -> None:
  """Checks the config against the mesh and the file system.

  Raises:
    ConfigError: naming the offending key.
  """
  _get_loss(config)
  _validate_model(config)
  if config.loss.name in COSINE_LOSSES and (
      config.loss.temperature != 1.0 or config.model.normalize is False):
    raise ConfigError(
        f"config.loss.name={config.loss.name!r} reads cosine similarities: "
        f"set config.loss.temperature=1 (is {config.loss.temperature}) and "
        "keep config.model.normalize on")
  batch_size = config.train.batch_size
  if batch_size < 1:
    raise ConfigError(f"config.train.batch_size={batch_size}: must be >= 1")
  shards = sharding.data_size(mesh)
  if batch_size % shards:
    raise ConfigError(
        f"config.train.batch_size={batch_size} is not divisible by the "
        f"{shards} data shards of config.mesh.shape={tuple(config.mesh.shape)}"
        f" ({len(mesh.devices.flat)} devices)")
  if config.data.format == "beir":
    _check_path("data.path", config.data.path, is_dir=True,
                needs=("corpus.jsonl", "queries.jsonl",
                       f"qrels/{config.data.train_split}.tsv"))
  elif config.data.format == "pairs":
    _check_path("data.path", config.data.path, is_dir=False)
    _check_path("data.corpus_path", config.data.corpus_path, is_dir=True,
                needs=("corpus.jsonl",))
  else:
    raise ConfigError(f"config.data.format={config.data.format!r}: expected "
                      "'beir' or 'pairs'")
  if config.data.negatives not in ("bm25", "dense", "none"):
    raise ConfigError(f"config.data.negatives={config.data.negatives!r}: "
                      "expected 'bm25', 'dense' or 'none'")
  if is_cross_encoder(config) and config.data.negatives == "dense":
    raise ConfigError("config.data.negatives='dense' mines with the model "
                      "being trained, which a cross-encoder cannot do; use "
                      "'bm25'")
  kind = config.model.get("kind", "bi_encoder")
  if kind in REPRESENTATION_KINDS:
    if config.data.negatives == "dense":
      raise ConfigError(f"config.data.negatives='dense' mines with a "
                        f"bi-encoder; a {kind!r} run uses 'bm25' or 'none'")
    if config.evals:
      raise ConfigError(
          f"config.evals: a {kind!r} run is evaluated by the evaluate mode "
          f"(configs/evaluate.py:retriever={kind}), not during training; "
          "set config.evals to {}")
    from retrieval_jax import losses  # pylint: disable=g-import-not-at-top
    if config.loss.name not in losses.LOSSES:
      raise ConfigError(f"config.loss.name={config.loss.name!r}: a {kind!r} "
                        f"run takes one of {sorted(losses.LOSSES)}")
  if (is_cross_encoder(config) or kind in REPRESENTATION_KINDS) and (
      config.train.grad_cache_chunks[0]):
    raise ConfigError("config.train.grad_cache_chunks: GradCache is for "
                      f"bi-encoders; set (0, 0) for a {kind!r} model")
  q_chunks, p_chunks = config.train.grad_cache_chunks
  if (q_chunks or p_chunks) and not (q_chunks and p_chunks):
    raise ConfigError("config.train.grad_cache_chunks: set both (query, "
                      "passage) chunk counts, or (0, 0) for no GradCache")
  if q_chunks and (batch_size % q_chunks or
                   (batch_size * config.data.group_size) % p_chunks):
    raise ConfigError(
        f"config.train.grad_cache_chunks={tuple(config.train.grad_cache_chunks)}"
        f" must divide the {batch_size} queries and "
        f"{batch_size * config.data.group_size} passages of a batch")
  for name, ev in config.evals.items():
    _check_path(f"evals.{name}.path", ev.path, is_dir=True,
                needs=("corpus.jsonl", "queries.jsonl",
                       f"qrels/{ev.split}.tsv"))
    if is_cross_encoder(config):
      if ev.get("first_stage") not in FIRST_STAGES:
        raise ConfigError(f"config.evals.{name}.first_stage="
                          f"{ev.get('first_stage')!r}: a cross-encoder "
                          f"re-ranks one of {FIRST_STAGES}")
      if ev.get("rerank_depth", 0) < 1:
        raise ConfigError(f"config.evals.{name}.rerank_depth must be >= 1")
  _validate_teacher(config)


TEACHERS = ("", "bm25")



def _validate_teacher(config) -> None:
  """`config.loss.teacher`: graded targets for a cross-encoder's list loss."""
  from retrieval_jax import losses  # pylint: disable=g-import-not-at-top
  teacher = config.loss.get("teacher", "")
  if teacher not in TEACHERS:
    raise ConfigError(f"config.loss.teacher={teacher!r}: expected one of "
                      f"{TEACHERS}")
  if not teacher:
    return
  if not is_cross_encoder(config):
    raise ConfigError("config.loss.teacher is for a cross-encoder "
                      "(config.model.kind='cross_encoder')")
  graded = sorted(set(losses.LISTWISE_LOSSES) - {"bce"})
  if config.loss.name not in graded:
    raise ConfigError(
        f"config.loss.teacher={teacher!r} gives graded scores, which "
        f"config.loss.name={config.loss.name!r} does not take; use one of "
        f"{graded}")


# ---------------------------------------------------------------------------
# Pieces of the job.


def prepare_long_documents(config, workdir: pathlib.Path) -> None:
  """Builds the `config.long_docs` collection and points the run at it.

  The collection (long documents packed from `long_docs.source`, see
  `data/long_documents.py`) is written once to `long_docs.out_dir` (or
  <workdir>/long_docs) and reused while its settings and sources are
  unchanged. `data.path` and every evaluator's `path` that is empty are
  set to it.
  """
  if "long_docs" not in config or not config.long_docs.source:
    return
  from retrieval_jax.data import long_documents  # pylint: disable=g-import-not-at-top
  cfg = config.long_docs
  _check_path("long_docs.source", cfg.source, is_dir=True,
              needs=("corpus.jsonl", "queries.jsonl"))
  tokenizer_dir = pretrained.resolve_model_dir(config.model.pretrained)
  tokenizer = tokenizers.WordPieceTokenizer.from_pretrained_dir(tokenizer_dir)
  try:
    path, summary = long_documents.ensure_long_documents(
        cfg.source, cfg.out_dir or workdir / "long_docs",
        splits=tuple(cfg.splits), min_tokens=cfg.min_tokens,
        max_tokens=cfg.max_tokens, seed=cfg.seed,
        # Counted without [CLS]/[SEP], by the model's own tokenizer.
        count_tokens=lambda text: len(tokenizer.encode(text, 1 << 30)) - 2)
  except ValueError as e:
    raise ConfigError(f"config.long_docs: {e}") from e
  logging.info("long documents: %s", summary.get("description", summary))
  if not config.data.path:
    config.data.path = str(path)
  for ev in config.evals.values():
    if not ev.path:
      ev.path = str(path)


def _training_data(config, workdir: pathlib.Path, tokenizer, loss_spec,
                   encoder_fn):
  """Training groups with mined negatives, and the loader over them."""
  from retrieval_jax.data import negatives as negatives_lib  # pylint: disable=g-import-not-at-top
  from retrieval_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  data_cfg = config.data
  if data_cfg.format == "beir":
    data = pipeline.TrainingData.from_beir(
        data_cfg.path, split=data_cfg.train_split,
        corpus_dir=data_cfg.corpus_path or None)
  else:
    data = pipeline.TrainingData.from_pairs(data_cfg.path,
                                            data_cfg.corpus_path)
  if data_cfg.negatives != "none":
    data = negatives_lib.attach_negatives(
        data, method=data_cfg.negatives, depth=data_cfg.negative_depth,
        cache_dir=workdir / "negatives", encoder_fn=encoder_fn)
  loader = pipeline.TrainLoader(
      data, tokenizer, batch_size=config.train.batch_size,
      group_size=data_cfg.group_size, unit=loss_spec.unit,
      positives=loss_spec.positives, max_positives=data_cfg.max_positives,
      query_max_length=data_cfg.query_max_length,
      passage_max_length=data_cfg.passage_max_length, seed=data_cfg.seed,
      negative_depth=data_cfg.negative_depth,
      max_relevant=data_cfg.max_relevant)
  return data, loader


def _make_evaluators(config, workdir: pathlib.Path):
  from retrieval_jax.data import tfds_beir  # pylint: disable=g-import-not-at-top
  out = {}
  for name, ev in config.evals.items():
    collection = tfds_beir.load_beir_tfds(
        pathlib.Path(ev.path), split=ev.split,
        data_dir=pathlib.Path(config.data.tfds_dir or workdir / "tfds"),
        on_unknown="warn")
    out[name] = evaluators.RetrievalEvaluator(
        collection, measures=ev.measures, relevance_level=1,
        top_k=ev.top_k, metric="cosine" if config.model.normalize else "dot",
        max_queries=ev.max_queries, name=name)
  return out


class _EvalRunner:
  """Runs the evaluators on the current params with one compiled encoder."""

  def __init__(self, config, model_def, tokenizer, mesh, evals):
    self.config = config
    self.model_def = model_def
    self.mesh = mesh
    self.evals = evals
    self.encoder = None
    self.tokenizer = tokenizer

  def _encoder(self, params):
    # Merge the trained params into the module and split it whole: the
    # encode step takes the full NNX state. One TextEncoder (one compiled
    # step per padded length) serves every evaluation; only its state moves.
    model = self.model_def.merge(params)
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, NamedSharding(self.mesh, PartitionSpec()))
    if self.encoder is None:
      self.encoder = encoding.TextEncoder(
          graphdef=graphdef, state=state, tokenizer=self.tokenizer,
          pooling=self.config.model.pooling,
          normalize=self.config.model.normalize,
          max_length=self.config.model.max_length, mesh=self.mesh)
    else:
      self.encoder.state = state
    return self.encoder

  def run(self, params) -> dict[str, float]:
    """{"eval/<name>/<measure>": value} over every evaluator."""
    if not self.evals:
      return {}
    encoder = self._encoder(params)
    out = {}
    with jax.default_matmul_precision(self.config.model.matmul_precision):
      for name, evaluator in self.evals.items():
        ev = self.config.evals[name]
        result = evaluator.run(encoder, batch_size=ev.batch_size,
                               pad_multiple=16, sort_by_length=True,
                               mesh=self.mesh)
        out.update({f"eval/{name}/{k}": float(v)
                    for k, v in result.metrics.items()})
    return out


class _RerankRunner:
  """A cross-encoder's evaluations: re-rank each eval's first stage.

  The first stage (config.evals.<name>.first_stage: the pretrained
  bi-encoder `config.model.pretrained`, or BM25) is ranked once and kept
  in <workdir>/first_stage_<name>.json, keyed by the settings that decide
  it; its own metrics are reported as "first_stage/<name>/<measure>".
  """

  def __init__(self, config, model_def, tokenizer, mesh, workdir):
    self.config, self.model_def = config, model_def
    self.tokenizer, self.mesh = tokenizer, mesh
    self.evals, self.first_stage_metrics = {}, {}
    for name, ev in config.evals.items():
      collection = beir.load_beir(ev.path, split=ev.split, on_unknown="warn")
      candidates, metrics = self._first_stage(
          name, ev, collection, workdir / f"first_stage_{name}.json")
      self.evals[name] = evaluators.RerankEvaluator(
          collection, candidates, depth=ev.rerank_depth,
          measures=ev.measures, name=name)
      self.first_stage_metrics.update(
          {f"first_stage/{name}/{k}": v for k, v in metrics.items()})

  def _first_stage(self, name, ev, collection, path):
    key = {"kind": ev.first_stage, "path": str(ev.path), "split": ev.split,
           "depth": max(ev.rerank_depth, ev.top_k),
           "max_queries": ev.max_queries, "measures": list(ev.measures),
           "model": self.config.model.pretrained,
           "max_length": self.config.model.max_length}
    if path.exists():
      cached = json.loads(path.read_text())
      if cached.get("key") == key:
        logging.info("%s: first stage from %s", name, path)
        return cached["candidates"], cached["metrics"]
    encoder = None
    if ev.first_stage == "dense":
      loaded = pretrained.load_model(self.config.model)
      graphdef, state = nnx.split(loaded.model)
      encoder = encoding.TextEncoder(
          graphdef=graphdef, state=jax.device_put(
              state, NamedSharding(self.mesh, PartitionSpec())),
          tokenizer=self.tokenizer, pooling=loaded.pooling,
          normalize=loaded.normalize,
          max_length=self.config.model.max_length, mesh=self.mesh)
    candidates, metrics = evaluators.first_stage(
        ev.first_stage, collection, depth=key["depth"], measures=ev.measures,
        max_queries=ev.max_queries, encoder=encoder,
        batch_size=ev.batch_size, mesh=self.mesh)
    if jax.process_index() == 0:
      _write_json(path, {"key": key, "candidates": candidates,
                         "metrics": metrics})
    return candidates, metrics

  def run(self, params) -> dict[str, float]:
    """{"eval/<name>/<measure>": value} of the re-ranked runs."""
    from retrieval_jax.models import cross_encoder  # pylint: disable=g-import-not-at-top
    model = self.model_def.merge(params)
    out = {}
    with jax.default_matmul_precision(self.config.model.matmul_precision):
      for name, evaluator in self.evals.items():
        scorer = cross_encoder.PairScorer(
            model, self.tokenizer, evaluator.query_texts,
            evaluator.collection.doc_texts(),
            max_length=self.config.data.pair_max_length,
            batch_size=self.config.evals[name].batch_size, mesh=self.mesh,
            desc=f"{name}: re-rank")
        result = evaluator.run(scorer)
        out.update({f"eval/{name}/{k}": float(v)
                    for k, v in result.metrics.items()})
    return out


def _write_json(path: pathlib.Path, obj) -> None:
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(json.dumps(obj, indent=1) + "\n")
  tmp.replace(path)


def _resolve_model_settings(config, loaded) -> None:
  """Fills the checkpoint's own pooling / normalisation into the config."""
  with config.unlocked():
    if not config.model.pooling:
      config.model.pooling = loaded.pooling
    if config.model.normalize is None:
      config.model.normalize = loaded.normalize


# ---------------------------------------------------------------------------
# The job.


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str | pathlib.Path) -> dict[str, Any]:
  """Fine-tunes, checkpoints and evaluates as `config` says.

  Args:
    config: a `configs/train.py` config.
    workdir: outputs and checkpoints; rerunning on the same workdir resumes.

  Returns:
    {"before": eval metrics at step 0 (absent when resumed past it),
     "after": eval metrics at the end, "train": last train metrics,
     "steps": total steps, "source": where the state came from}.

  Raises:
    ConfigError: a bad config value (named).
    metric_logging.NonFiniteError: the loss went NaN/inf; the last good
      checkpoint is kept.
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  config = ml_collections.ConfigDict(config.to_dict())  # Unlocked copy.
  mesh = sharding.make_mesh(config.mesh.shape)
  prepare_long_documents(config, workdir)
  validate(config, mesh)
  loss_spec = _get_loss(config)
  is_primary = jax.process_index() == 0

  loaded = pretrained.load_model(config.model,
                                 dtype=jnp.dtype(config.model.dtype))
  _resolve_model_settings(config, loaded)
  tokenizer = tokenizers.WordPieceTokenizer.from_pretrained_dir(
      loaded.model_dir)
  cross = is_cross_encoder(config)
  kind = config.model.get("kind", "bi_encoder")
  if cross:
    from retrieval_jax.models import cross_encoder  # pylint: disable=g-import-not-at-top
    # The head (if any) starts from BERT's init, seeded by the run's seed.
    model_def, params = train_state.split_model(builder.build(
        config.model, loaded, tokenizer, seed=config.train.seed))
    eval_runner = _RerankRunner(config, model_def, tokenizer, mesh, workdir)
    evals = eval_runner.evals
    encoder_fn = None
  elif kind in REPRESENTATION_KINDS:
    model_def, params = train_state.split_model(builder.build(
        config.model, loaded, tokenizer, seed=config.train.seed))
    evals, eval_runner, encoder_fn = {}, None, None
  else:
    model_def, params = train_state.split_model(loaded.model)
    evals = _make_evaluators(config, workdir)
    eval_runner = _EvalRunner(config, model_def, tokenizer, mesh, evals)

    def encoder_fn():
      # Dense negative mining uses the starting (pretrained) encoder.
      return eval_runner._encoder(params)  # pylint: disable=protected-access

  _, loader = _training_data(config, workdir, tokenizer, loss_spec,
                                encoder_fn)
  logging.info("training data: %s", loader.describe())
  if config.train.num_steps:
    total_steps = int(config.train.num_steps)
  else:
    total_steps = max(1, int(round(config.train.num_epochs *
                                   loader.steps_per_epoch)))

  tx, schedule = optimizers.make_optimizer(config.optim, total_steps)
  layout = train_state.state_layout(model_def, params, tx, mesh)
  checkpointer = checkpointing.Checkpointer(
      workdir / "checkpoints",
      save_interval_steps=config.checkpoint.every_steps,
      max_to_keep=config.checkpoint.max_to_keep or None,
      async_save=config.checkpoint.async_save)
  state, data_position, source = checkpointing.resume_or_init(
      checkpointer, layout.abstract,
      init_fn=lambda: train_state.create(params, tx, layout),
      init_from=config.checkpoint.init_from)
  start_step = int(jax.device_get(state["step"]))
  if data_position is not None and (
      data_position.get("seed") != config.data.seed or
      data_position.get("step") != start_step):
    raise ConfigError(
        f"checkpoint at step {start_step} was written with data position "
        f"{data_position}; config.data.seed={config.data.seed} differs, so "
        "resuming would not replay the same batches (use a new workdir)")
  logging.info("state from %s; %d parameters; step %d of %d", source,
               train_state.num_params(params), start_step, total_steps)

  if cross:

    def device_batch(step, host_batch):
      # (query, passage) rows tokenised together, at one fixed width.
      queries, passages = loader.texts_at(step, host_batch)
      pairs = cross_encoder.encode_pairs(
          tokenizer, queries, passages, config.data.pair_max_length,
          config.model.head, pad_to_multiple_of=config.data.pair_max_length)
      markers = pairs.get("markers",
                          np.zeros((len(queries), 2), np.int32))
      batch = {"pair_ids": pairs["input_ids"],
               "pair_mask": pairs["attention_mask"],
               "pair_types": pairs["token_type_ids"], "pair_markers": markers,
               "positive_counts": host_batch["positive_counts"],
               "passage_doc": host_batch["passage_doc"]}
      if teacher is not None:
        # The teacher's score of every (query, passage) row, as the list
        # loss's targets (distillation); padding rows are masked there.
        batch["teacher_scores"] = config.loss.teacher_scale * (
            teacher.pair_scores(queries, host_batch["passage_doc"]))
      return batch

    teacher = None
    if config.loss.get("teacher", ""):
      # BM25 over the training corpus: a passage row indexes its documents.
      teacher = bm25.Bm25Index.build(loader.data.doc_texts)
      logging.info("distillation teacher: BM25 over %d docs (%.1f s), "
                   "scores x %g", teacher.num_docs, teacher.build_s,
                   config.loss.teacher_scale)

    step_kwargs = dict(step_fn=steps.cross_encoder_train_step,
                       loss_name=config.loss.name)
  elif kind in REPRESENTATION_KINDS:
    device_batch, step_kwargs = _representation_batches(
        config, kind, loader, tokenizer, loss_spec)
  else:

    def device_batch(step, host_batch):
      del step
      return {k: host_batch[k] for k in STEP_KEYS}

    step_kwargs = dict(
        loss_fn=loss_spec.fn, temperature=config.loss.temperature,
        pooling=config.model.pooling, normalize=config.model.normalize,
        share_hard_negatives=config.loss.share_hard_negatives,
        grad_cache_chunks=(tuple(config.train.grad_cache_chunks)
                           if config.train.grad_cache_chunks[0] else None))
  batch_spec = {k: v.shape for k, v in
                device_batch(0, loader.batch_at(0)).items()}
  step_fn = steps.make_train_step(
      mesh, layout.shardings, batch_spec, model_def=model_def, tx=tx,
      dropout=config.model.dropout, learning_rate_fn=schedule, **step_kwargs)
  in_batch_shardings = steps.batch_shardings(mesh, batch_spec)
  rng = jax.device_put(jax.random.PRNGKey(config.train.seed),
                       NamedSharding(mesh, PartitionSpec()))
  logger = metric_logging.MetricLogger(workdir, is_primary=is_primary)
  config_json = json.loads(config.to_json_best_effort())
  if start_step == 0:
    logger.write_hparams({k: v for k, v in _flat(config_json).items()
                          if isinstance(v, (int, float, str, bool))})

  results: dict[str, Any] = {"source": source, "steps": total_steps}
  if cross and eval_runner.first_stage_metrics:
    results["first_stage"] = eval_runner.first_stage_metrics
    _print_metrics("first stage (re-ranked below)",
                   eval_runner.first_stage_metrics)
  if start_step == 0 and evals and config.train.eval_before:
    results["before"] = eval_runner.run(state["params"])
    logger.write(0, results["before"])
    _print_metrics("before training", results["before"])

  def save(step, force=False):
    checkpointer.save(step, state, data={"step": step,
                                         "seed": config.data.seed},
                      metadata={"config": config_json}, force=force)

  examples_per_step = config.train.batch_size
  last_metrics: dict[str, float] = {}
  bar = tqdm.tqdm(total=total_steps, initial=start_step, desc="train",
                  unit="step", disable=not is_primary, mininterval=2.0)
  window_start, window_steps = time.perf_counter(), 0
  try:
    batches = loader.iterate(start_step)
    for step in range(start_step, total_steps):
      batch = steps.put_batch(device_batch(step, next(batches)),
                              in_batch_shardings)
      # Implicit host<->device copies inside the loop are bugs (a stray
      # numpy array re-uploaded every step); explicit ones are allowed.
      with jax.transfer_guard("disallow"):
        state, metrics = step_fn(state, batch, rng)
      window_steps += 1
      done = step + 1
      log_now = (done % config.train.log_every == 0 or done == total_steps or
                 checkpointer.should_save(done))
      if log_now:
        metrics = {f"train/{k}": float(v)
                   for k, v in jax.device_get(metrics).items()}
        # Checked before any save, so a diverged state never overwrites
        # the last good checkpoint.
        metric_logging.check_finite(metrics, done)
        elapsed = time.perf_counter() - window_start
        metrics["perf/examples_per_s"] = (window_steps * examples_per_step /
                                          max(elapsed, 1e-9))
        metrics["perf/step_time_s"] = elapsed / max(window_steps, 1)
        window_start, window_steps = time.perf_counter(), 0
        logger.write(done, metrics)
        last_metrics = metrics
        bar.set_postfix(loss=f"{metrics['train/loss']:.4f}",
                        ex_s=f"{metrics['perf/examples_per_s']:.1f}")
      bar.update(1)
      if checkpointer.should_save(done) or done == total_steps:
        save(done, force=True)
      every = config.train.eval_every
      if evals and every and done % every == 0 and done != total_steps:
        logger.write(done, eval_runner.run(state["params"]))
      if checkpointer.reached_preemption(done):
        save(done, force=True)
        logging.warning("preemption signal at step %d: saved and stopping",
                        done)
        break
  finally:
    bar.close()
    checkpointer.wait_until_finished()
  if evals and config.train.eval_after:
    results["after"] = eval_runner.run(state["params"])
    logger.write(int(jax.device_get(state["step"])), results["after"])
    _print_metrics("after training", results["after"])
  results["train"] = last_metrics
  checkpointer.close()
  logger.close()
  if is_primary:
    _write_json(workdir / "results.json", results)
  if "before" in results and "after" in results:
    _print_before_after(results["before"], results["after"])
  return results


def _representation_batches(config, kind, loader, tokenizer, loss_spec):
  """`device_batch` and step arguments of a SPLADE / ColBERT run."""
  kwargs = dict(step_fn=steps.representation_train_step, loss_fn=loss_spec.fn,
                kind=kind,
                share_hard_negatives=config.loss.share_hard_negatives)
  if kind == "colbert":
    from retrieval_jax.models import colbert  # pylint: disable=g-import-not-at-top
    g = config.data.group_size

    def device_batch(step, host_batch):
      # ColBERT's own layout: [Q]/[D] markers, [MASK]-augmented queries at
      # a fixed width, documents padded to the full passage width.
      queries, passages = loader.texts_at(step, host_batch)
      q_ids, q_mask, q_score = colbert.encode_queries(
          tokenizer, queries[::g], query_maxlen=config.data.query_max_length,
          augment=config.model.colbert_augment)
      p_ids, p_mask, p_score = colbert.encode_docs(
          tokenizer, passages, doc_maxlen=config.data.passage_max_length,
          pad_multiple=config.data.passage_max_length)
      return {"query_ids": q_ids, "query_mask": q_mask,
              "query_score_mask": q_score, "passage_ids": p_ids,
              "passage_mask": p_mask, "passage_score_mask": p_score,
              **{k: host_batch[k] for k in ("positive_counts", "passage_doc",
                                            "relevant_doc")}}

    return device_batch, kwargs

  kwargs.update(flops_q=config.loss.flops_q, flops_d=config.loss.flops_d,
                flops_warmup_steps=config.loss.flops_warmup_steps)
  if kind == "inference_free":
    from retrieval_jax.models import splade  # pylint: disable=g-import-not-at-top
    # The query side's idf comes from the training corpus.
    idf_v = splade.idf_from_corpus(
        [tokenizer.tokenize_to_ids(t) for t in loader.data.doc_texts],
        tokenizer.vocab_size)
    kwargs.update(idf_v=idf_v,
                  special_ids=builder.special_ids(tokenizer))

  def device_batch(step, host_batch):
    del step
    return {k: host_batch[k] for k in STEP_KEYS}

  return device_batch, kwargs


def _flat(obj, prefix=""):
  out = {}
  for k, v in obj.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flat(v, key + "."))
    else:
      out[key] = v
  return out


def _print_metrics(title: str, metrics: dict[str, float]) -> None:
  print(title)
  for k, v in metrics.items():
    print(f"  {k:<36} {v:.4f}")


def _print_before_after(before: dict[str, float],
                        after: dict[str, float]) -> None:
  width = max(len(k) for k in after)
  print(f"{'measure':<{width}}  before   after    change")
  for k in after:
    b = before.get(k, float("nan"))
    print(f"{k:<{width}}  {b:.4f}   {after[k]:.4f}   {after[k] - b:+.4f}")
