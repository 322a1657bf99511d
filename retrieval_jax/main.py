r"""Entry point: set-up, then dispatch on --mode.

  python -m retrieval_jax.main --config configs/evaluate.py[:variant] \
      --workdir DIR [--mode evaluate|encode] [--config.a.b=value ...]

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
    "mode", "evaluate", ["evaluate", "encode"], "What to run.")

# Environment variables that mean "one of several cooperating processes".
_MULTIPROCESS_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  # pylint: disable=g-import-not-at-top
  from retrieval_jax import sharding
  import jax
  # pylint: enable=g-import-not-at-top

  # Before the first device query: on CPU, one XLA device per core.
  sharding.use_cpu_cores_as_devices(config.mesh.cpu_devices)
  if any(os.environ.get(k) for k in _MULTIPROCESS_ENV):
    jax.distributed.initialize()
  # Random bits that do not depend on how arrays are sharded.
  jax.config.update("jax_threefry_partitionable", True)
  logging.info("process %d of %d; %d local / %d global devices (%s)",
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
  logging.info("config:\n%s", config)

  # pylint: disable=g-import-not-at-top
  from retrieval_jax import evaluate
  from retrieval_jax.data import beir
  # pylint: enable=g-import-not-at-top
  try:
    if _MODE.value == "evaluate":
      evaluate.evaluate(config, _WORKDIR.value)
    elif _MODE.value == "encode":
      evaluate.encode(config, _WORKDIR.value)
  except (evaluate.ConfigError, beir.BeirFormatError) as e:
    # Bad config values and bad input files are the user's to fix: one line
    # naming the key, or the file and line, and no traceback.
    logging.error("%s", e)
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
