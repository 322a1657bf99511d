"""The train mode: fine-tune any retriever kind, checkpoint, evaluate.

`train_and_evaluate(config, workdir)` is the whole job; `main.py --mode=train`
and the notebooks call it the same way. The kind (`config.model.kind`,
`kinds.KINDS`) supplies the model, the featurizer and loss of the one
generic `steps.train_step`, and the evaluations; this module only wires the
loader, optimizer, checkpoints and logging around them.

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
  eval/step_<n>/<name>/ run.trec and metrics_per_query.json of each eval
  negatives/            mined hard negatives (cache keyed by content)
"""

import functools
import json
import pathlib
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import tqdm
from flax import nnx
from flax import traverse_util

from retrieval_jax import checkpointing
from retrieval_jax import io
from retrieval_jax import kinds
from retrieval_jax import metric_logging
from retrieval_jax import optimizers
from retrieval_jax import pretrained
from retrieval_jax import sharding
from retrieval_jax import steps
from retrieval_jax import train_state
from retrieval_jax.data import tokenizers
from retrieval_jax.errors import ConfigError

# ---------------------------------------------------------------------------
# Start-up checks: every bad value fails here, naming its key.


def _check_path(
    key: str, value: str, *, is_dir: bool, needs: tuple[str, ...] = ()
) -> pathlib.Path:
  path = pathlib.Path(value).expanduser()
  if not value:
    raise ConfigError(
        f"config.{key} is empty: set it to a "
        f"{'directory' if is_dir else 'file'}"
    )
  if is_dir and not path.is_dir():
    raise ConfigError(f"config.{key}={value!r}: no such directory")
  if not is_dir and not path.is_file():
    raise ConfigError(f"config.{key}={value!r}: no such file")
  missing = [n for n in needs if not (path / n).is_file()]
  if missing:
    raise ConfigError(f"config.{key}={value!r} lacks {missing}")
  return path


def _validate_model(config) -> None:
  """The encoder settings every kind shares."""
  from retrieval_jax.models import m2_encoder  # pylint: disable=g-import-not-at-top

  model = config.model
  architecture = model.get("architecture", "bert")
  if architecture not in pretrained.ARCHITECTURES:
    raise ConfigError(
        f"config.model.architecture={architecture!r}: expected "
        f"one of {pretrained.ARCHITECTURES}"
    )
  poolings = (
      m2_encoder.POOLING_KINDS if architecture == "m2" else ("cls", "mean")
  )
  if model.pooling not in ("",) + tuple(poolings):
    raise ConfigError(
        f"config.model.pooling={model.pooling!r}: expected one "
        f"of {poolings} or '' (the model's default)"
    )
  if model.dtype not in ("float32", "bfloat16"):
    raise ConfigError(
        f"config.model.dtype={model.dtype!r}: expected 'float32' or 'bfloat16'"
    )
  if architecture == "m2":
    try:
      m2 = m2_encoder.config_from_block(model.m2)
    except (ValueError, KeyError, AttributeError) as e:
      raise ConfigError(f"config.model.m2: {e}") from e
    if model.max_length > m2.max_position_embeddings:
      raise ConfigError(
          f"config.model.max_length={model.max_length} exceeds the M2 "
          f"encoder's max_position_embeddings {m2.max_position_embeddings} "
          "(config.model.m2)"
      )


def validate(config: ml_collections.ConfigDict, mesh) -> None:
  """Checks the config against the mesh and the file system.

  Raises:
    ConfigError: naming the offending key.
  """
  kind = kinds.get(config.model)
  _validate_model(config)
  kind.validate(config)
  batch_size = config.train.batch_size
  if batch_size < 1:
    raise ConfigError(f"config.train.batch_size={batch_size}: must be >= 1")
  shards = sharding.data_size(mesh)
  if batch_size % shards:
    raise ConfigError(
        f"config.train.batch_size={batch_size} is not divisible by the "
        f"{shards} data shards of config.mesh.shape={tuple(config.mesh.shape)}"
        f" ({len(mesh.devices.flat)} devices)"
    )
  if config.data.format == "beir":
    _check_path(
        "data.path",
        config.data.path,
        is_dir=True,
        needs=(
            "corpus.jsonl",
            "queries.jsonl",
            f"qrels/{config.data.train_split}.tsv",
        ),
    )
  elif config.data.format == "pairs":
    _check_path("data.path", config.data.path, is_dir=False)
    _check_path(
        "data.corpus_path",
        config.data.corpus_path,
        is_dir=True,
        needs=("corpus.jsonl",),
    )
  else:
    raise ConfigError(
        f"config.data.format={config.data.format!r}: expected 'beir' or 'pairs'"
    )
  if config.data.negatives not in ("bm25", "dense", "none"):
    raise ConfigError(
        f"config.data.negatives={config.data.negatives!r}: "
        "expected 'bm25', 'dense' or 'none'"
    )
  positives = (
      1
      if kind.loss_spec(config).positives == "one"
      else config.data.max_positives
  )
  if config.data.negatives == "none" and config.data.group_size > positives:
    raise ConfigError(
        f"config.data.group_size={config.data.group_size} leaves room for "
        "hard negatives but config.data.negatives='none'; lower group_size "
        f"to {positives} or mine negatives ('bm25')"
    )
  for name, ev in config.evals.items():
    _check_path(
        f"evals.{name}.path",
        ev.path,
        is_dir=True,
        needs=("corpus.jsonl", "queries.jsonl", f"qrels/{ev.split}.tsv"),
    )


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
  _check_path(
      "long_docs.source",
      cfg.source,
      is_dir=True,
      needs=("corpus.jsonl", "queries.jsonl"),
  )
  tokenizer_dir = pretrained.resolve_model_dir(config.model.pretrained)
  tokenizer = tokenizers.WordPieceTokenizer.from_pretrained_dir(tokenizer_dir)
  try:
    path, summary = long_documents.ensure_long_documents(
        cfg.source,
        cfg.out_dir or workdir / "long_docs",
        splits=tuple(cfg.splits),
        min_tokens=cfg.min_tokens,
        max_tokens=cfg.max_tokens,
        seed=cfg.seed,
        # Counted without [CLS]/[SEP], by the model's own tokenizer.
        count_tokens=lambda text: len(tokenizer.encode(text, 1 << 30)) - 2,
    )
  except ValueError as e:
    raise ConfigError(f"config.long_docs: {e}") from e
  logging.info("long documents: %s", summary.get("description", summary))
  if not config.data.path:
    config.data.path = str(path)
  for ev in config.evals.values():
    if not ev.path:
      ev.path = str(path)


def _training_data(
    config, workdir: pathlib.Path, tokenizer, loss_spec, encoder_fn
):
  """Training groups with mined negatives, and the loader over them."""
  from retrieval_jax.data import negatives as negatives_lib  # pylint: disable=g-import-not-at-top
  from retrieval_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  data_cfg = config.data
  if data_cfg.format == "beir":
    data = pipeline.TrainingData.from_beir(
        data_cfg.path,
        split=data_cfg.train_split,
        corpus_dir=data_cfg.corpus_path or None,
    )
  else:
    data = pipeline.TrainingData.from_pairs(data_cfg.path, data_cfg.corpus_path)
  if data_cfg.negatives != "none":
    encode_fn = encoder_key = None
    if data_cfg.negatives == "dense":
      # Built even on a cache hit: its weights are part of the cache key.
      encoder = encoder_fn()
      encode_fn = functools.partial(
          encoder.encode, batch_size=64, desc="negatives", progress=False
      )
      encoder_key = negatives_lib.encoder_key(
          encoder.state.filter(nnx.Param),
          pooling=encoder.pooling,
          normalize=bool(encoder.normalize),
          max_length=int(encoder.max_length),
      )
    data = negatives_lib.mine(
        data,
        method=data_cfg.negatives,
        depth=data_cfg.negative_depth,
        cache_dir=workdir / "negatives",
        encode_fn=encode_fn,
        encoder_key=encoder_key,
    )
  loader = pipeline.TrainLoader(
      data,
      tokenizer,
      batch_size=config.train.batch_size,
      group_size=data_cfg.group_size,
      unit=loss_spec.unit,
      positives=loss_spec.positives,
      max_positives=data_cfg.max_positives,
      query_max_length=data_cfg.query_max_length,
      passage_max_length=data_cfg.passage_max_length,
      seed=data_cfg.seed,
      negative_depth=data_cfg.negative_depth,
      max_relevant=data_cfg.max_relevant,
  )
  return data, loader


def _resolve_model_settings(config, loaded) -> None:
  """Fills the checkpoint's own pooling / normalisation into the config."""
  with config.unlocked():
    if not config.model.pooling:
      config.model.pooling = loaded.pooling
    if config.model.normalize is None:
      config.model.normalize = loaded.normalize


# ---------------------------------------------------------------------------
# The job.


@sharding.uses_config_rules
def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str | pathlib.Path
) -> dict[str, Any]:
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
  kind = kinds.get(config.model)
  loss_spec = kind.loss_spec(config)
  is_primary = jax.process_index() == 0

  loaded = pretrained.load_model(
      config.model, dtype=jnp.dtype(config.model.dtype)
  )
  _resolve_model_settings(config, loaded)
  tokenizer = tokenizers.WordPieceTokenizer.from_pretrained_dir(
      loaded.model_dir
  )
  model_def, params = train_state.split_model(
      kind.build(config.model, loaded, tokenizer, seed=config.train.seed)
  )
  eval_runner = kind.train_evaluator(
      config, model_def, tokenizer, mesh, workdir
  )
  evals = eval_runner.evals if eval_runner is not None else {}
  encoder_fn = None
  if config.data.negatives == "dense":
    # Dense negative mining uses the starting (pretrained) encoder.
    encoder_fn = functools.partial(eval_runner.encoder, params)
  _, loader = _training_data(config, workdir, tokenizer, loss_spec, encoder_fn)
  logging.info("training data: %s", loader.describe())
  if config.train.num_steps:
    total_steps = int(config.train.num_steps)
  else:
    total_steps = max(
        1, int(round(config.train.num_epochs * loader.steps_per_epoch))
    )

  tx, schedule = optimizers.make_optimizer(config.optim, total_steps)
  layout = train_state.state_layout(model_def, params, tx, mesh)
  checkpointer = checkpointing.Checkpointer(
      workdir / "checkpoints",
      save_interval_steps=config.checkpoint.every_steps,
      max_to_keep=config.checkpoint.max_to_keep or None,
      async_save=config.checkpoint.async_save,
  )
  state, data_position, source = checkpointing.resume_or_init(
      checkpointer,
      layout.abstract,
      init_fn=lambda: train_state.create(params, tx, layout),
      init_from=config.checkpoint.init_from,
  )
  start_step = int(jax.device_get(state["step"]))
  if data_position is not None and (
      data_position.get("seed") != config.data.seed
      or data_position.get("step") != start_step
  ):
    raise ConfigError(
        f"checkpoint at step {start_step} was written with data position "
        f"{data_position}; config.data.seed={config.data.seed} differs, so "
        "resuming would not replay the same batches (use a new workdir)"
    )
  logging.info(
      "state from %s; %d parameters; step %d of %d",
      source,
      train_state.num_params(params),
      start_step,
      total_steps,
  )

  spec = kind.train_spec(
      config, loader=loader, tokenizer=tokenizer, loss_spec=loss_spec, mesh=mesh
  )
  device_batch = spec.featurize
  batch_spec = {
      k: v.shape for k, v in device_batch(0, loader.batch_at(0)).items()
  }
  step_fn = steps.make_train_step(
      mesh,
      layout.shardings,
      batch_spec,
      model_def=model_def,
      tx=tx,
      loss_fn=spec.loss,
      value_and_grad_fn=spec.value_and_grad,
      dropout=config.model.dropout,
      learning_rate_fn=schedule,
  )
  in_batch_shardings = steps.batch_shardings(mesh, batch_spec)
  rng = jax.device_put(
      jax.random.PRNGKey(config.train.seed), sharding.replicated(mesh)
  )
  logger = metric_logging.MetricLogger(workdir, is_primary=is_primary)
  config_json = json.loads(config.to_json_best_effort())
  if start_step == 0:
    logger.write_hparams({
        k: v
        for k, v in traverse_util.flatten_dict(config_json, sep=".").items()
        if isinstance(v, (int, float, str, bool))
    })

  results: dict[str, Any] = {"source": source, "steps": total_steps}
  if getattr(eval_runner, "first_stage_metrics", None):
    results["first_stage"] = eval_runner.first_stage_metrics
    _print_metrics(
        "first stage (re-ranked below)", eval_runner.first_stage_metrics
    )
  if start_step == 0 and evals and config.train.eval_before:
    results["before"] = eval_runner.run(
        state["params"], workdir / "eval" / "step_0"
    )
    logger.write(0, results["before"])
    _print_metrics("before training", results["before"])

  def save(step, force=False):
    checkpointer.save(
        step,
        state,
        data={"step": step, "seed": config.data.seed},
        metadata={"config": config_json},
        force=force,
    )

  examples_per_step = config.train.batch_size
  last_metrics: dict[str, float] = {}
  bar = tqdm.tqdm(
      total=total_steps,
      initial=start_step,
      desc="train",
      unit="step",
      disable=not is_primary,
      mininterval=2.0,
  )
  window_start, window_steps = time.perf_counter(), 0
  try:
    batches = loader.iterate(start_step)
    for step in range(start_step, total_steps):
      batch = steps.put_batch(
          device_batch(step, next(batches)), in_batch_shardings
      )
      # Implicit host<->device copies inside the loop are bugs (a stray
      # numpy array re-uploaded every step); explicit ones are allowed.
      with jax.transfer_guard("disallow"):
        state, metrics = step_fn(state, batch, rng)
      window_steps += 1
      done = step + 1
      log_now = (
          done % config.train.log_every == 0
          or done == total_steps
          or checkpointer.should_save(done)
      )
      if log_now:
        metrics = {
            f"train/{k}": float(v) for k, v in jax.device_get(metrics).items()
        }
        # Checked before any save, so a diverged state never overwrites
        # the last good checkpoint.
        metric_logging.check_finite(metrics, done)
        elapsed = time.perf_counter() - window_start
        metrics["perf/examples_per_s"] = (
            window_steps * examples_per_step / max(elapsed, 1e-9)
        )
        metrics["perf/step_time_s"] = elapsed / max(window_steps, 1)
        window_start, window_steps = time.perf_counter(), 0
        logger.write(done, metrics)
        last_metrics = metrics
        bar.set_postfix(
            loss=f"{metrics['train/loss']:.4f}",
            ex_s=f"{metrics['perf/examples_per_s']:.1f}",
        )
      bar.update(1)
      if checkpointer.should_save(done) or done == total_steps:
        save(done, force=True)
      every = config.train.eval_every
      if evals and every and done % every == 0 and done != total_steps:
        logger.write(
            done,
            eval_runner.run(state["params"], workdir / "eval" / f"step_{done}"),
        )
      if checkpointer.reached_preemption(done):
        save(done, force=True)
        logging.warning(
            "preemption signal at step %d: saved and stopping", done
        )
        break
  finally:
    bar.close()
    checkpointer.wait_until_finished()
  if evals and config.train.eval_after:
    end_step = int(jax.device_get(state["step"]))
    results["after"] = eval_runner.run(
        state["params"], workdir / "eval" / f"step_{end_step}"
    )
    logger.write(end_step, results["after"])
    _print_metrics("after training", results["after"])
  results["train"] = last_metrics
  checkpointer.close()
  logger.close()
  if is_primary:
    io.write_json_atomic(workdir / "results.json", results)
  if "before" in results and "after" in results:
    _print_before_after(results["before"], results["after"])
  return results


def _print_metrics(title: str, metrics: dict[str, float]) -> None:
  print(title)
  for k, v in metrics.items():
    print(f"  {k:<36} {v:.4f}")


def _print_before_after(
    before: dict[str, float], after: dict[str, float]
) -> None:
  width = max(len(k) for k in after)
  print(f"{'measure':<{width}}  before   after    change")
  for k in after:
    b = before.get(k, float("nan"))
    print(f"{k:<{width}}  {b:.4f}   {after[k]:.4f}   {after[k] - b:+.4f}")
