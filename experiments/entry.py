r"""The experiments' command line: --config, --workdir, set-up, clean errors.

Each `experiments/<name>/run.py` ends with `entry.main(run)`; then

  python -m experiments.<name>.run --config experiments/<name>/config.py[:arg] \
      --workdir DIR [--config.a.b=value ...]

sets up JAX as `retrieval_jax.main` does on one host (CPU devices from
`config.mesh.cpu_devices`, partitionable PRNG) and calls `run(config,
workdir)`; a bad config value or input file ends the job with one line.
"""

from collections.abc import Callable
import sys

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags


def main(run: Callable[[ml_collections.ConfigDict, str], object]) -> None:
  """Defines the flags, parses them and runs `run(config, workdir)`."""
  config_flag = config_flags.DEFINE_config_file(
      "config",
      None,
      "Experiment config (experiments/<name>/config.py[:variant]).",
      lock_config=True,
  )
  workdir_flag = flags.DEFINE_string(
      "workdir", None, "Directory for outputs (created if missing)."
  )
  flags.mark_flags_as_required(["config", "workdir"])

  def _main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = config_flag.value
    # pylint: disable=g-import-not-at-top
    from retrieval_jax import errors
    from retrieval_jax import sharding
    import jax
    # pylint: enable=g-import-not-at-top
    # Before the first device query: on CPU, one XLA device per core.
    sharding.use_cpu_cores_as_devices(config.mesh.cpu_devices)
    jax.config.update("jax_threefry_partitionable", True)
    logging.info(
        "%d devices (%s); config:\n%s",
        jax.device_count(),
        jax.devices()[0].platform,
        config,
    )
    try:
      run(config, workdir_flag.value)
    except (errors.ConfigError, errors.DataError, FileNotFoundError) as e:
      # The user's to fix: one line naming the key or the file, no traceback.
      logging.error("%s", e)
      sys.exit(f"error: {e}")

  # pylint: disable-next=g-import-not-at-top
  from retrieval_jax import io as rj_io

  rj_io.add_config_package_root(sys.argv)
  app.run(_main)
