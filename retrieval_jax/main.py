r"""Entry point: set-up, then dispatch on --mode.

  python -m retrieval_jax.main --config configs/evaluate.py[:variant] \
      --workdir DIR [--mode MODE] [--config.a.b=value ...]

MODE (by default chosen from the config's blocks):

  train     fine-tune (configs/train.py); resumes from <workdir>/checkpoints
  evaluate  zero-shot retrieval metrics (configs/evaluate.py)
  encode    corpus embeddings to .npy (configs/evaluate.py)
  export    query / passage towers of the latest checkpoint in <workdir>
            (configs/train.py) for serving, to <workdir>/export
  critical_n  free-embedding critical n against the embedding dimension
            (configs/limit.py)
  cur_knn   CUR k-NN search for a trained cross-encoder: recall of the
            exact top-k against the CE-call budget (configs/cur_knn.py)
  kv_memory discrete key-value bottleneck experiments (configs/kv_memory.py)

Set-up only: multi-process initialisation, partitionable PRNG, logging of the
process and device counts; every mode is a library function that Colab and
tests call the same way.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/<x>.py[:variant]).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for outputs (created if missing).")
_MODE = flags.DEFINE_enum(
    "mode", None,
    ["train", "evaluate", "encode", "export", "critical_n", "cur_knn",
     "kv_memory"],
    "What to run; by default `train` for a config with a `train` block "
    "(configs/train.py), `critical_n` for one with a `protocol` block "
    "(configs/limit.py), `cur_knn` for one with a `subset` block "
    "(configs/cur_knn.py), `kv_memory` for one with a `kv` block "
    "(configs/kv_memory.py), else `evaluate`.")

# Environment variables that mean "one of several cooperating processes".
_MULTIPROCESS_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")


def initialize_distributed() -> bool:
  """Joins a multi-process run when the environment describes one.

  `JAX_COORDINATOR_ADDRESS` (host:port of process 0) turns it on;
  `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` give the layout explicitly (as
  on a CPU cluster or in tests); on TPU pods and SLURM they may be left out
  and JAX detects them. Returns whether initialisation happened.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if not any(os.environ.get(k) for k in _MULTIPROCESS_ENV):
    return False
  num = os.environ.get("JAX_NUM_PROCESSES")
  pid = os.environ.get("JAX_PROCESS_ID")
  jax.distributed.initialize(
      coordinator_address=(os.environ.get("JAX_COORDINATOR_ADDRESS") or
                           os.environ.get("COORDINATOR_ADDRESS")),
      num_processes=int(num) if num else None,
      process_id=int(pid) if pid else None)
  return True


class _QuietLibraries(logging.logging.Filter):
  """Drops INFO records of Orbax's internals (several per save)."""

  def filter(self, record) -> bool:
    return not (record.levelno <= logging.logging.INFO and
                "/orbax/" in record.pathname)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
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
  logging.info("process %d of %d; %d local / %d global devices (%s)",
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
  logging.info("config:\n%s", config)

  # pylint: disable=g-import-not-at-top
  from retrieval_jax import evaluate
  from retrieval_jax import metric_logging
  from retrieval_jax import optimizers
  from retrieval_jax.data import beir
  # pylint: enable=g-import-not-at-top
  mode = _MODE.value or ("train" if "train" in config else "critical_n"
                         if "protocol" in config else "cur_knn"
                         if "subset" in config else "kv_memory"
                         if "kv" in config else "evaluate")
  if mode in ("train", "export") and "train" not in config:
    sys.exit(f"error: --mode={mode} needs a training config "
             "(configs/train.py), got one without a `train` block")
  if mode in ("evaluate", "encode") and "search" not in config:
    sys.exit(f"error: --mode={mode} needs configs/evaluate.py (a `search` "
             "block); use --mode=train with configs/train.py")
  if mode == "critical_n" and "protocol" not in config:
    sys.exit("error: --mode=critical_n needs configs/limit.py (a `protocol` "
             "block)")
  if mode == "kv_memory" and "kv" not in config:
    sys.exit("error: --mode=kv_memory needs configs/kv_memory.py (a `kv` "
             "block)")
  if mode == "cur_knn" and "subset" not in config:
    sys.exit("error: --mode=cur_knn needs configs/cur_knn.py (a `subset` "
             "block)")
  try:
    if mode == "train":
      from retrieval_jax import train  # pylint: disable=g-import-not-at-top
      train.train_and_evaluate(config, _WORKDIR.value)
    elif mode == "export":
      from retrieval_jax import export  # pylint: disable=g-import-not-at-top
      export.export_from_workdir(config, _WORKDIR.value)
    elif mode == "evaluate":
      evaluate.evaluate(config, _WORKDIR.value)
    elif mode == "encode":
      evaluate.encode(config, _WORKDIR.value)
    elif mode == "critical_n":
      # pylint: disable-next=g-import-not-at-top
      from retrieval_jax.analysis import embedding_dimension
      try:
        embedding_dimension.run(config, _WORKDIR.value)
      except embedding_dimension.ConfigError as e:
        logging.error("%s", e)
        sys.exit(f"error: {e}")
    elif mode == "cur_knn":
      # pylint: disable-next=g-import-not-at-top
      from retrieval_jax.search import cur_experiment
      cur_experiment.run(config, _WORKDIR.value)
    elif mode == "kv_memory":
      # pylint: disable=g-import-not-at-top
      from retrieval_jax.analysis import class_incremental
      from retrieval_jax.analysis import memory_adapter
      # pylint: enable=g-import-not-at-top
      if config.experiment == "retrieval":
        memory_adapter.run(config, _WORKDIR.value)
      elif config.experiment in ("digits", "toy"):
        class_incremental.run_experiment(config, _WORKDIR.value)
      else:
        sys.exit(f"error: config.experiment={config.experiment!r}: expected "
                 "'digits', 'toy' or 'retrieval'")
  except metric_logging.NonFiniteError as e:
    # The last good checkpoint is untouched; say where it is.
    logging.error("%s", e)
    sys.exit(f"error: {e}; the last good checkpoint is in "
             f"{_WORKDIR.value}/checkpoints")
  except (evaluate.ConfigError, optimizers.OptimizerConfigError,
          beir.BeirFormatError, FileNotFoundError) as e:
    # Bad config values and bad input files are the user's to fix: one line
    # naming the key, or the file and line, and no traceback.
    logging.error("%s", e)
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
