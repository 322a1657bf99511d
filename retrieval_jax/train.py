"""The train mode: fine-tune any retriever kind, checkpoint, evaluate.

`train_and_evaluate(config, workdir)` is the whole job; `main.py --mode=train`
and the notebooks call it the same way. The kind (`config.model.kind`,
`kinds.KINDS`) supplies the model, the featurizer and loss of the one
generic `steps.train_step`, and the evaluations; this module only wires the
loader, optimizer, checkpoints and logging around them (start-up checks:
`train_checks`).

Resume order: the newest checkpoint in <workdir>/checkpoints that restores
(bad ones renamed <step>.corrupt; the run continues as if never stopped),
else `config.checkpoint.init_from` (params only), else the pretrained
weights. SIGTERM/SIGINT: the step finishes, is saved, errors.Interrupted.
The workdir's files are listed in the README ("What the quick start does").
"""

import contextlib
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
from retrieval_jax import errors
from retrieval_jax import io
from retrieval_jax import kinds
from retrieval_jax import metric_logging
from retrieval_jax import optimizers
from retrieval_jax import pretrained
from retrieval_jax import sharding
from retrieval_jax import steps
from retrieval_jax import train_checks
from retrieval_jax import train_state
from retrieval_jax.data import tokenizers
from retrieval_jax.errors import ConfigError

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
  train_checks.check_path(
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
    config, workdir: pathlib.Path, tokenizer, loss_spec, encoder_fn, mesh
):
  """Training groups with mined negatives and teacher scores, the loader
  over them, and the teacher (`teachers.build`; None: none to run)."""
  from retrieval_jax import teachers  # pylint: disable=g-import-not-at-top
  from retrieval_jax.data import negatives as negatives_lib  # pylint: disable=g-import-not-at-top
  from retrieval_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  data_cfg = config.data
  if data_cfg.format == "corpus":
    return None, _span_loader(config, tokenizer), None
  if data_cfg.format == "beir":
    data = pipeline.TrainingData.from_beir(
        data_cfg.path,
        split=data_cfg.train_split,
        corpus_dir=data_cfg.corpus_path or None,
    )
  elif data_cfg.format == "tevatron":
    data = pipeline.TrainingData.from_tevatron(
        data_cfg.path,
        data_cfg.corpus_path or None,
        teacher_scores=config.loss.get("teacher", "") == "file",
    )
    if data_cfg.negatives == "none":
      data = data.with_negatives([()] * len(data.examples))
  else:
    data = pipeline.TrainingData.from_pairs(data_cfg.path, data_cfg.corpus_path)
  held_out = kinds.base.holdout_query_ids(config)
  if held_out:
    data = _hold_out(data, held_out, data_cfg.holdout_queries)
  if data_cfg.negatives not in ("none", "file"):
    encode_fn = encoder_key = None
    if data_cfg.negatives == "dense":
      # Built even on a cache hit: its weights are part of the cache key.
      encoder = encoder_fn()
      encode_fn = functools.partial(
          encoder.encode, batch_size=64, desc="negatives", progress=True
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
  teacher = teachers.build(config, data.doc_texts, mesh)
  data = teachers.score_data(data, teacher, workdir / "teacher")
  return data, make_loader(config, data, tokenizer, loss_spec), teacher


def _hold_out(data, held_out, num: int):
  """`data` without the held-out queries; all of them must be in it."""
  kept = data.without_queries(held_out)
  dropped = len(data.examples) - len(kept.examples)
  if dropped != len(held_out):
    raise ConfigError(
        f"config.data.holdout_queries={num}: only {dropped} of the"
        f" {len(held_out)} held-out queries are training queries of"
        f" {data.source}; the eval block with queries='holdout' must read"
        " the training queries' qrels split"
    )
  logging.info(
      "held out %d of %d training queries for model selection",
      dropped,
      len(data.examples),
  )
  return kept


def make_loader(config, data, tokenizer, loss_spec):
  """The `TrainLoader` of `data` with the run's settings."""
  from retrieval_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  data_cfg = config.data
  return pipeline.TrainLoader(
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


class NegativeRefresher:
  """Re-mines dense negatives with the params being trained, every `every`
  steps (`config.data.refresh_steps`, or `refresh_epochs` epochs), and
  rescores the teacher.

  Round r (steps r*every .. (r+1)*every - 1) uses the candidates the params
  at step r*every mine, cached in <workdir>/negatives/refresh_<r>/ under a
  key of the run (its start weights, its non-resume-safe config, `every`)
  and r: a resumed run reads its round's back, so its batches equal an
  uninterrupted run's. Round 0 is the start's mining.
  """

  def __init__(
      self, config, workdir, data, teacher, new_loader, encoder_fn, run_key
  ):
    self.config, self.workdir, self.data = config, workdir, data
    self.teacher, self.new_loader = teacher, new_loader
    self.encoder_fn, self.run_key = encoder_fn, run_key
    self.every = int(run_key["every_steps"])

  def starts_round(self, step: int) -> bool:
    return step > 0 and step % self.every == 0

  def loader(self, step: int, params):
    """The loader of `step`'s round, mined by `params` unless cached."""
    from retrieval_jax import teachers  # pylint: disable=g-import-not-at-top
    from retrieval_jax.data import negatives as negatives_lib  # pylint: disable=g-import-not-at-top

    r = step // self.every
    cache_dir = self.workdir / "negatives" / f"refresh_{r}"
    if step % self.every and not (cache_dir / "dense.json").is_file():
      logging.warning(
          "round %d's negatives are not cached: mining them with the step %d"
          " params (an uninterrupted run mined at step %d)",
          r,
          step,
          r * self.every,
      )
    encoder = self.encoder_fn(params)
    logging.info("refreshing hard negatives: round %d at step %d", r, step)
    data = negatives_lib.mine(
        self.data,
        method="dense",
        depth=self.config.data.negative_depth,
        cache_dir=cache_dir,
        encode_fn=functools.partial(
            encoder.encode, batch_size=64, desc="negatives", progress=True
        ),
        encoder_key=dict(self.run_key, round=r),
    )
    data = teachers.score_data(data, self.teacher, self.workdir / "teacher")
    return self.new_loader(data)


def _span_loader(config, tokenizer):
  """Self-supervised pairs (`data/spans.py`) or document chunks
  (`data/chunks.py`) of `data.path`'s corpus."""
  # pylint: disable=g-import-not-at-top
  from retrieval_jax.data import chunks
  from retrieval_jax.data import spans

  # pylint: enable=g-import-not-at-top

  cfg = config.data.spans
  if cfg.task == chunks.TASK:
    try:
      # Document chunks, several per document in a batch (Revela).
      return chunks.ChunkLoader.from_beir(
          config.data.path,
          tokenizer,
          batch_size=config.train.batch_size,
          chunk_length=config.data.passage_max_length,
          chunks_per_doc=cfg.chunks_per_doc,
          seed=config.data.seed,
      )
    except ValueError as e:
      raise ConfigError(f"config.data.spans: {e}") from e
  try:
    return spans.SpanLoader.from_beir(
        config.data.path,
        tokenizer,
        task=cfg.task,
        batch_size=config.train.batch_size,
        query_max_length=config.data.query_max_length,
        passage_max_length=config.data.passage_max_length,
        seed=config.data.seed,
        keep_prob=cfg.keep_prob,
        min_crop=cfg.min_crop,
        max_crop=cfg.max_crop,
    )
  except ValueError as e:
    raise ConfigError(f"config.data.spans: {e}") from e


def _resolve_model_settings(config, loaded) -> None:
  """Fills the checkpoint's own pooling / normalisation into the config."""
  with config.unlocked():
    if not config.model.pooling:
      config.model.pooling = loaded.pooling
    if config.model.normalize is None:
      config.model.normalize = loaded.normalize


# ---------------------------------------------------------------------------
# The job.


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str | pathlib.Path
) -> dict[str, Any]:
  """Fine-tunes, checkpoints and evaluates as `config` says.

  Args:
    config: a `configs/train.py` config.
    workdir: outputs and checkpoints; rerunning on the same workdir resumes.
      Locked for the run (`io.lock_workdir`, by process 0).

  Returns:
    {"before": eval metrics at step 0 (absent when resumed past it),
     "after": eval metrics at the end, "train": last train metrics,
     "steps": total steps, "source": where the state came from}.

  Raises:
    ConfigError: a bad config value, or a resume with an incompatible one
      (named).
    errors.WorkdirBusyError: another process is using `workdir`.
    errors.CheckpointError: no checkpoint restores, or a save failed.
    errors.Interrupted: SIGTERM/SIGINT; the step reached is saved.
    metric_logging.NonFiniteError: the loss went NaN/inf; names the last
      good checkpoint (if any).
  """
  if not str(workdir).strip():
    raise ConfigError("the workdir is empty: name a directory for the run")
  train_checks.validate_settings(config)  # before anything is written
  workdir = pathlib.Path(workdir)
  # One lock per run, held by the primary process (as main.py does): the
  # other processes of a multi-process run share its workdir (one checkpoint
  # directory for all), and on one host their flock would refuse them.
  lock = (
      io.lock_workdir(workdir)
      if jax.process_index() == 0
      else contextlib.nullcontext()
  )
  with lock:
    return _train_and_evaluate(config, workdir)


def init_from_step(init_from: str) -> int | None:
  """The step to read from `checkpoint.init_from` (a run's checkpoints
  directory): the one its run's model selection picked, else None (the
  latest)."""
  if not init_from:
    return None
  return metric_logging.selected_step(pathlib.Path(init_from).parent)


def _resume(config, config_json, checkpointer, layout, init_fn):
  """`(state, start step, source)`: `resume_or_init` with the config checks."""
  changed = {}

  def check_metadata(step, metadata):
    changed.clear()
    changed.update(
        train_checks.check_resume_config(
            metadata.get("config", {}), config_json, step
        )
    )

  try:
    state, data_position, source = checkpointing.resume_or_init(
        checkpointer,
        layout.abstract,
        init_fn=init_fn,
        init_from=config.checkpoint.init_from,
        init_step=init_from_step(config.checkpoint.init_from),
        check_metadata=check_metadata,
    )
  except checkpointing.IncompatibleStateError as e:
    if checkpointer.latest_step() is None:
      raise  # init_from's checkpoint lacks the params
    hint = (
        f"changed since it was saved: {train_checks.describe(changed)}"
        if changed
        else "the code's state layout changed since it was saved"
    )
    raise ConfigError(
        f"{e}; {hint}; undo the change or use a new --workdir"
    ) from None
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
  return state, start_step, source


@sharding.uses_config_rules
def _train_and_evaluate(config, workdir: pathlib.Path) -> dict[str, Any]:
  """`train_and_evaluate` inside the workdir lock."""
  config = ml_collections.ConfigDict(config.to_dict())  # Unlocked copy.
  mesh = train_checks.make_mesh(config)
  prepare_long_documents(config, workdir)
  train_checks.validate(config, mesh)
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
  # Warm starts (AR2's two models), before dense negatives are mined.
  params = kind.initial_params(config, model_def, params, mesh)
  eval_runner = kind.train_evaluator(
      config, model_def, tokenizer, mesh, workdir
  )
  evals = eval_runner.evals if eval_runner is not None else {}
  encoder_fn = None
  if config.data.negatives == "dense":
    # Dense negative mining uses the starting (pretrained) encoder; with
    # config.data.refresh_epochs, `NegativeRefresher` re-mines later.
    encoder_fn = functools.partial(eval_runner.encoder, params)
  data, loader, teacher = _training_data(
      config, workdir, tokenizer, loss_spec, encoder_fn, mesh
  )
  logging.info("training data: %s", loader.describe())
  if config.train.num_steps:
    total_steps = int(config.train.num_steps)
  else:
    total_steps = max(
        1, int(round(config.train.num_epochs * loader.steps_per_epoch))
    )

  tx, schedule = optimizers.make_optimizer(config.optim, total_steps)
  spec = kind.train_spec(
      config,
      loader=loader,
      tokenizer=tokenizer,
      loss_spec=loss_spec,
      mesh=mesh,
  )
  if spec.optimizer is not None:
    tx, schedule = spec.optimizer(total_steps)
  layout = train_state.state_layout(
      model_def, params, tx, mesh, extra=spec.extra
  )
  config_json = json.loads(config.to_json_best_effort())
  refresher = None
  if config.data.get("refresh_epochs", 0.0) or config.data.get(
      "refresh_steps", 0
  ):
    from retrieval_jax.data import negatives as negatives_lib  # pylint: disable=g-import-not-at-top

    every = config.data.get("refresh_steps", 0) or max(
        1, int(round(config.data.refresh_epochs * loader.steps_per_epoch))
    )
    run_key = {
        "start": negatives_lib.encoder_key(params),
        "config": io.fingerprint(
            json.dumps(train_checks.state_defining(config_json), sort_keys=True)
        ),
        "every_steps": every,
    }
    refresher = NegativeRefresher(
        config,
        workdir,
        data,
        teacher,
        functools.partial(
            make_loader, config, tokenizer=tokenizer, loss_spec=loss_spec
        ),
        eval_runner.encoder,
        run_key,
    )
    logging.info("hard negatives re-mined every %d steps", every)
  # Closed in reverse on any exit; a failing close never hides the error.
  with contextlib.ExitStack() as stack:
    checkpointer = stack.enter_context(
        checkpointing.Checkpointer(
            workdir / "checkpoints",
            save_interval_steps=config.checkpoint.every_steps,
            max_to_keep=config.checkpoint.max_to_keep or None,
            async_save=config.checkpoint.async_save,
        )
    )
    state, start_step, source = _resume(
        config,
        config_json,
        checkpointer,
        layout,
        lambda: train_state.create(params, tx, layout),
    )
    logging.info(
        "state from %s; %d parameters; step %d of %d",
        source,
        train_state.num_params(params),
        start_step,
        total_steps,
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
    # metrics.jsonl and TensorBoard drop what the killed run logged after
    # its checkpoint: this run logs those steps again.
    logger = stack.enter_context(
        metric_logging.MetricLogger(
            workdir,
            is_primary=is_primary,
            rerun_from=start_step + 1 if start_step else 0,
        )
    )
    if start_step == 0:
      logger.write_hparams({
          k: v
          for k, v in traverse_util.flatten_dict(config_json, sep=".").items()
          if isinstance(v, (int, float, str, bool))
      })

    results: dict[str, Any] = {"source": source, "steps": total_steps}
    selection = None
    if config.train.get("select_metric", ""):
      selection = metric_logging.Selection(
          workdir / metric_logging.SELECTION_FILE,
          config.train.select_metric,
          resume_step=start_step,
          is_primary=is_primary,
      )

    def evaluate(step):
      metrics = eval_runner.run(
          state["params"], workdir / "eval" / f"step_{step}"
      )
      logger.write(step, metrics)
      if selection is not None:
        selection.update(step, metrics)
      return metrics

    if getattr(eval_runner, "first_stage_metrics", None):
      results["first_stage"] = eval_runner.first_stage_metrics
      _print_metrics(
          "first stage (re-ranked below)", eval_runner.first_stage_metrics
      )
    if start_step == 0 and evals and config.train.eval_before:
      results["before"] = evaluate(0)
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
    bar = stack.enter_context(
        tqdm.tqdm(
            total=total_steps,
            initial=start_step,
            desc="train",
            unit="step",
            disable=not is_primary,
            mininterval=2.0,
        )
    )
    # SIGTERM/SIGINT from here on: finish the step, save, stop.
    signals = stack.enter_context(checkpointing.StopSignals())
    window_start, window_steps = time.perf_counter(), 0
    if refresher is not None and start_step >= refresher.every:
      loader = refresher.loader(start_step, state["params"])
    batches = loader.iterate(start_step)
    for step in range(start_step, total_steps):
      if (
          refresher is not None
          and step != start_step
          and refresher.starts_round(step)
      ):
        batches.close()
        refresh_start = time.perf_counter()
        loader = refresher.loader(step, state["params"])
        refresh_s = time.perf_counter() - refresh_start
        logging.info("negatives re-mined at step %d in %.1f s", step, refresh_s)
        logger.write(step, {"perf/negatives_refresh_s": refresh_s})
        window_start += refresh_s  # not part of the steps' time
        batches = loader.iterate(step)
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
        _check_finite(metrics, done, checkpointer)
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
        evaluate(done)
      # Every process gets the same answer at the same step (several
      # processes: a signal to any one is announced to all, see StopSignals).
      stop = signals.requested() or (
          checkpointing.stop_reason()
          if checkpointer.reached_preemption(done)
          else None
      )
      if stop:
        save(done, force=True)
        checkpointer.wait_until_finished()  # committed before the exit
        raise errors.Interrupted(
            stop,
            done,
            f"interrupted, resumable: {stop} at step {done} of {total_steps};"
            f" saved checkpoint {done} in {checkpointer.directory}; rerun the"
            " same command to resume",
        )
    bar.close()
    signals.restore()  # evaluation: Ctrl-C stops at once again
    if evals and config.train.eval_after:
      end_step = int(jax.device_get(state["step"]))
      results["after"] = evaluate(end_step)
      _print_metrics("after training", results["after"])
    if selection is not None and selection.best_step is not None:
      summary = selection.summary()
      results["selected"] = {
          k: summary[k] for k in ("metric", "best_step", "best", "history")
      }
      _print_metrics(
          f"selected: step {summary['best_step']} by {selection.metric}",
          summary["best"],
      )
    results["train"] = last_metrics
  if is_primary:
    io.write_json_atomic(workdir / "results.json", results)
  if "before" in results and "after" in results:
    _print_before_after(results["before"], results["after"])
  return results


def _check_finite(metrics, step: int, checkpointer) -> None:
  """`metric_logging.check_finite`, saying which checkpoint is still good."""
  try:
    metric_logging.check_finite(metrics, step)
  except metric_logging.NonFiniteError as e:
    latest = checkpointer.latest_step()
    where = (
        f"the last good checkpoint is step {latest} in {checkpointer.directory}"
        if latest is not None
        else "no checkpoint was saved before it, so a rerun starts over"
    )
    raise metric_logging.NonFiniteError(
        f"{e}; {where}", step=e.step, names=e.names
    ) from None


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
