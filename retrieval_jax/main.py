r"""Entry point: set-up, then dispatch on --mode.

  python -m retrieval_jax.main --config configs/evaluate.py[:variant] \
      --workdir DIR [--mode MODE] [--config.a.b=value ...]

MODE (default: `train` for a config with a `train` block, else `evaluate`):
  train     fine-tune (configs/train.py); resumes from <workdir>/checkpoints
  evaluate  zero-shot retrieval metrics (configs/evaluate.py)
  encode    corpus embeddings to .npy (configs/evaluate.py)
  export    serving towers of the latest checkpoint, to <workdir>/export

Each mode is a library function. Experiments run as
`python -m experiments.<name>.run --config experiments/<name>/config.py`.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Experiment config file (configs/<x>.py[:variant]).",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for outputs (created if missing)."
)

# pylint: disable=g-import-not-at-top
# The imports are inside so that they follow the device set-up in main().


def _train(config, workdir):
  from retrieval_jax import train

  return train.train_and_evaluate(config, workdir)


def _evaluate(config, workdir):
  from retrieval_jax import evaluate

  return evaluate.evaluate(config, workdir)


def _encode(config, workdir):
  from retrieval_jax import evaluate

  return evaluate.encode(config, workdir)


def _export(config, workdir):
  from retrieval_jax import export

  return export.export_from_workdir(config, workdir)


# pylint: enable=g-import-not-at-top

# mode -> (the config block it needs, the config file that has it, its job).
MODES = {
    "train": ("train", "configs/train.py", _train),
    "evaluate": ("search", "configs/evaluate.py", _evaluate),
    "encode": ("search", "configs/evaluate.py", _encode),
    "export": ("train", "configs/train.py", _export),
}
_MODE = flags.DEFINE_enum(
    "mode",
    None,
    list(MODES),
    "What to run; by default `train` for a config with a `train` block "
    "(configs/train.py), else `evaluate`.",
)

_MULTIPROCESS_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")


def initialize_distributed() -> bool:
  """Joins a multi-process run if `JAX_COORDINATOR_ADDRESS` is set; returns so.

  `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID` may be left out on TPU pods and SLURM.
  """
  import jax  # pylint: disable=g-import-not-at-top

  if not any(os.environ.get(k) for k in _MULTIPROCESS_ENV):
    return False
  num = os.environ.get("JAX_NUM_PROCESSES")
  pid = os.environ.get("JAX_PROCESS_ID")
  jax.distributed.initialize(
      coordinator_address=(
          os.environ.get("JAX_COORDINATOR_ADDRESS")
          or os.environ.get("COORDINATOR_ADDRESS")
      ),
      num_processes=int(num) if num else None,
      process_id=int(pid) if pid else None,
  )
  return True


class _QuietLibraries(logging.logging.Filter):
  """Drops INFO records of Orbax's internals (several per save)."""

  def filter(self, record) -> bool:
    return not (
        record.levelno <= logging.logging.INFO and "/orbax/" in record.pathname
    )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  path = config_flags.get_config_filename(flags.FLAGS["config"])
  parts = os.path.normpath(path).split(os.sep)
  if len(parts) >= 3 and parts[-3] == "experiments":
    name = parts[-2]
    sys.exit(
        f"error: {path} is an experiment's config; run it with "
        f"python -m experiments.{name}.run --config {path} ..."
    )
  config = _CONFIG.value
  logging.get_absl_handler().addFilter(_QuietLibraries())
  # pylint: disable=g-import-not-at-top
  from retrieval_jax import sharding
  import jax
  # pylint: enable=g-import-not-at-top

  # Before the first device query: on CPU, one XLA device per core.
  sharding.use_cpu_cores_as_devices(config.mesh.cpu_devices)
  initialize_distributed()
  # Random bits that do not depend on how arrays are sharded.
  jax.config.update("jax_threefry_partitionable", True)
  logging.info(
      "process %d of %d; %d local / %d global devices (%s)",
      jax.process_index(),
      jax.process_count(),
      jax.local_device_count(),
      jax.device_count(),
      jax.devices()[0].platform,
  )
  logging.info("config:\n%s", config)

  # pylint: disable=g-import-not-at-top
  from retrieval_jax import errors
  from retrieval_jax import metric_logging
  # pylint: enable=g-import-not-at-top
  mode = _MODE.value or ("train" if "train" in config else "evaluate")
  block, config_file, job = MODES[mode]
  if block not in config:
    sys.exit(
        f"error: --mode={mode} needs a config with a `{block}` block "
        f"({config_file})"
    )
  try:
    job(config, _WORKDIR.value)
  except metric_logging.NonFiniteError as e:
    logging.error("%s", e)
    sys.exit(
        f"error: {e}; the last good checkpoint is in "
        f"{_WORKDIR.value}/checkpoints"
    )
  except (errors.ConfigError, errors.DataError, FileNotFoundError) as e:
    # The user's to fix: one line naming the key or file:line, no traceback.
    logging.error("%s", e)
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
