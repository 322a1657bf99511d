"""Start-up checks of the train mode: every bad value fails here, naming its key.

`validate_settings` checks the loop's own settings before the workdir is
touched, `validate` the rest against the mesh and the file system (the kind's
own `validate` included), `check_resume_config` a resumed run's config
against its checkpoint's. Each raises `errors.ConfigError`.
"""

import pathlib

from absl import logging
import ml_collections
from flax import traverse_util

from retrieval_jax import kinds
from retrieval_jax import pretrained
from retrieval_jax import sharding
from retrieval_jax.errors import ConfigError

# ---------------------------------------------------------------------------
# Start-up checks: every bad value fails here, naming its key.


def check_path(
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


def _check_int(config, key: str, minimum: int) -> None:
  value = config
  for part in key.split("."):
    value = value[part]
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ConfigError(
        f"config.{key}={value!r}: must be an integer >= {minimum}"
    )


def check_mesh(config) -> None:
  """`config.mesh.shape` and `cpu_devices`; before the first device query."""
  shape = config.mesh.shape
  if (
      not isinstance(shape, (tuple, list))
      or len(shape) != len(sharding.MESH_AXES)
      or any(
          isinstance(s, bool) or not isinstance(s, int) or (s < 1 and s != -1)
          for s in shape
      )
      or list(shape).count(-1) > 1
  ):
    raise ConfigError(
        f"config.mesh.shape={shape!r}: expected {len(sharding.MESH_AXES)} "
        f"sizes for the axes {sharding.MESH_AXES}, each >= 1, or -1 (once) "
        "for the remaining devices"
    )
  _check_int(config, "mesh.cpu_devices", 0)


def validate_settings(config: ml_collections.ConfigDict) -> None:
  """The loop's own settings, checked before the workdir is touched.

  Raises:
    ConfigError: naming the offending key.
  """
  _check_int(config, "train.num_steps", 0)
  if not config.train.num_steps and not config.train.num_epochs > 0:
    raise ConfigError(
        f"config.train.num_epochs={config.train.num_epochs!r}: must be > 0"
        " when config.train.num_steps is 0"
    )
  _check_int(config, "train.batch_size", 1)
  _check_int(config, "train.log_every", 1)
  _check_int(config, "train.eval_every", 0)
  _check_int(config, "checkpoint.every_steps", 1)
  _check_int(config, "checkpoint.max_to_keep", 0)
  metric = config.train.get("select_metric", "")
  if metric:
    if not metric.startswith("eval/") or metric.count("/") != 2:
      raise ConfigError(
          f"config.train.select_metric={metric!r}: expected"
          " 'eval/<config.evals name>/<measure>'"
      )
    _, name, measure = metric.split("/")
    if name not in config.evals or measure not in config.evals[name].measures:
      raise ConfigError(
          f"config.train.select_metric={metric!r}: config.evals has no block"
          f" {name!r} measuring {measure!r}"
      )
    if not config.train.eval_every:
      raise ConfigError(
          f"config.train.select_metric={metric!r} selects among periodic"
          " evaluations: set config.train.eval_every > 0"
      )
    # The selected step is the run's model (kinds.load_run): keep them all.
    if (
        config.checkpoint.max_to_keep
        or config.train.eval_every % config.checkpoint.every_steps
    ):
      raise ConfigError(
          f"config.train.select_metric={metric!r}: every evaluated step"
          " needs a kept checkpoint; set config.checkpoint.max_to_keep=0 and"
          " config.checkpoint.every_steps to a divisor of"
          f" config.train.eval_every={config.train.eval_every}"
      )
  check_mesh(config)


def make_mesh(config):
  """The mesh of `config.mesh.shape` over this job's devices."""
  try:
    return sharding.make_mesh(config.mesh.shape)
  except ValueError as e:
    raise ConfigError(
        f"config.mesh.shape={tuple(config.mesh.shape)}: {e}"
    ) from e


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
    check_path(
        "data.path",
        config.data.path,
        is_dir=True,
        needs=(
            "corpus.jsonl",
            "queries.jsonl",
            f"qrels/{config.data.train_split}.tsv",
        ),
    )
  elif config.data.format in ("pairs", "tevatron"):
    check_path("data.path", config.data.path, is_dir=False)
    # Pairs name documents of a corpus; a Tevatron file may carry its texts.
    if config.data.format == "pairs" or config.data.corpus_path:
      check_path(
          "data.corpus_path",
          config.data.corpus_path,
          is_dir=True,
          needs=("corpus.jsonl",),
      )
  elif config.data.format == "corpus":
    _validate_spans(config)
  else:
    raise ConfigError(
        f"config.data.format={config.data.format!r}: expected 'beir', "
        "'pairs', 'tevatron' or 'corpus'"
    )
  if config.data.negatives not in ("bm25", "dense", "none", "file"):
    raise ConfigError(
        f"config.data.negatives={config.data.negatives!r}: "
        "expected 'bm25', 'dense', 'none' or 'file'"
    )
  if config.data.negatives == "file" and config.data.format != "tevatron":
    raise ConfigError(
        "config.data.negatives='file' takes the negatives a Tevatron file "
        f"gives; config.data.format is {config.data.format!r}"
    )
  if config.loss.get("teacher", "") and config.data.format == "corpus":
    raise ConfigError(
        f"config.loss.teacher={config.loss.teacher!r} scores query groups;"
        " config.data.format='corpus' has no queries"
    )
  refresh = config.data.get("refresh_epochs", 0.0)
  if not isinstance(refresh, (int, float)) or refresh < 0:
    raise ConfigError(
        f"config.data.refresh_epochs={refresh!r}: must be >= 0 (0: mine once)"
    )
  refresh_steps = config.data.get("refresh_steps", 0)
  if (
      isinstance(refresh_steps, bool)
      or not isinstance(refresh_steps, int)
      or refresh_steps < 0
  ):
    raise ConfigError(
        f"config.data.refresh_steps={refresh_steps!r}: must be an integer >="
        " 0 (0: config.data.refresh_epochs decides)"
    )
  if refresh and refresh_steps:
    raise ConfigError(
        f"config.data.refresh_epochs={refresh} and refresh_steps="
        f"{refresh_steps} both set when to re-mine; set one of them to 0"
    )
  if (refresh or refresh_steps) and config.data.negatives != "dense":
    key = "refresh_epochs" if refresh else "refresh_steps"
    raise ConfigError(
        f"config.data.{key}={refresh or refresh_steps}: re-mines with the"
        " model being trained, so config.data.negatives must be 'dense', not "
        f"{config.data.negatives!r}"
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
    check_path(
        f"evals.{name}.path",
        ev.path,
        is_dir=True,
        needs=("corpus.jsonl", "queries.jsonl", f"qrels/{ev.split}.tsv"),
    )


def _validate_spans(config) -> None:
  """Format "corpus": pairs cut from a corpus (`config.data.spans`)."""
  # pylint: disable=g-import-not-at-top
  from retrieval_jax.data import chunks
  from retrieval_jax.data import spans

  # pylint: enable=g-import-not-at-top
  check_path(
      "data.path", config.data.path, is_dir=True, needs=("corpus.jsonl",)
  )
  if config.data.get("spans") is None:
    raise ConfigError("config.data.format='corpus' needs config.data.spans")
  tasks = spans.TASKS + (chunks.TASK,)
  if config.data.spans.task not in tasks:
    raise ConfigError(
        f"config.data.spans.task={config.data.spans.task!r}: expected one "
        f"of {tasks}"
    )
  if config.data.spans.task == chunks.TASK and config.model.kind != "revela":
    raise ConfigError(
        f"config.data.spans.task={chunks.TASK!r}: chunk batches (no query/"
        "passage pairs) train config.model.kind='revela' only"
    )
  if config.data.group_size != 1 or config.data.negatives != "none":
    raise ConfigError(
        "config.data.format='corpus' makes one positive per example: set "
        "config.data.group_size=1 and config.data.negatives='none'"
    )


# ---------------------------------------------------------------------------
# Resuming with a changed config.

# Keys a resumed run may change: when it evaluates, logs and saves, where it
# stops, how it shards and computes. Logged.
RESUME_SAFE = (
    "train.num_steps",
    "train.num_epochs",
    "train.log_every",
    "train.eval_every",
    "train.select_metric",
    "train.eval_before",
    "train.eval_after",
    "checkpoint.",
    "evals.",
    "export.",
    "mesh.",
    "model.dtype",
    "model.matmul_precision",
)
# Keys that say what the saved state is (another model, another data order):
# refused. Changes that alter the saved arrays' structure or shapes (e.g.
# optim.clip_norm on/off) are refused by the checkpoint's own tree check.
RESUME_REFUSED = ("model.", "data.seed")


def _matches(key: str, prefixes: tuple[str, ...]) -> bool:
  return any(
      key == p or (p.endswith(".") and key.startswith(p)) for p in prefixes
  )


def state_defining(config_json: dict) -> dict:
  """{dotted key: value} of the keys outside `RESUME_SAFE`."""
  flat = traverse_util.flatten_dict(config_json, sep=".")
  return {k: v for k, v in flat.items() if not _matches(k, RESUME_SAFE)}


def config_changes(saved: dict, current: dict) -> dict[str, tuple]:
  """{dotted key: (saved value, current value)} of two config dicts."""
  missing = "<absent>"
  saved = traverse_util.flatten_dict(saved, sep=".")
  current = traverse_util.flatten_dict(current, sep=".")
  return {
      k: (saved.get(k, missing), current.get(k, missing))
      for k in sorted(set(saved) | set(current))
      if saved.get(k, missing) != current.get(k, missing)
  }


def describe(changes: dict[str, tuple]) -> str:
  return ", ".join(
      f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items()
  )


def check_resume_config(saved: dict, current: dict, step: int) -> dict:
  """Refuses state-defining changes since checkpoint `step`; logs the rest.

  Returns the changes outside `RESUME_SAFE` (named if the state then does
  not fit).

  Raises:
    ConfigError: a `RESUME_REFUSED` key changed; names each.
  """
  changes = config_changes(saved, current)
  refused = {k: v for k, v in changes.items() if _matches(k, RESUME_REFUSED)}
  refused = {k: v for k, v in refused.items() if not _matches(k, RESUME_SAFE)}
  if refused:
    raise ConfigError(
        f"the checkpoint at step {step} was trained with another config: "
        f"{describe(refused)}; a resumed run must keep these (rerun with "
        "the saved values, or use a new --workdir)"
    )
  safe = {k: v for k, v in changes.items() if _matches(k, RESUME_SAFE)}
  other = {k: v for k, v in changes.items() if k not in safe}
  if safe:
    logging.info("resuming from step %d with %s", step, describe(safe))
  if other:
    logging.warning(
        "resuming from step %d with changed training settings (they apply "
        "from step %d on): %s",
        step,
        step + 1,
        describe(other),
    )
  return other
