r"""Entry point: set-up, then dispatch on --mode.

  python -m retrieval_jax.main --config configs/evaluate.py[:variant] \
      --workdir DIR [--mode MODE] [--config.a.b=value ...]

MODE (default: `train` for a config with a `train` block, else `evaluate`):
  train     fine-tune (configs/train.py); resumes from <workdir>/checkpoints
  evaluate  zero-shot retrieval metrics (configs/evaluate.py)
  encode    corpus embeddings to .npy (configs/evaluate.py)
  export    the latest checkpoint for serving: jax.export towers of any kind
            (<workdir>/export), or `--config.export.format=hf` for a
            sentence-transformers bi-encoder (<workdir>/export_hf)

Each mode is a library function. Experiments run as
`python -m experiments.<name>.run --config experiments/<name>/config.py`.
"""

import contextlib
import os
import sys
import threading

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from retrieval_jax import io as rj_io

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Experiment config file (configs/<x>.py[:variant]).",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for outputs (created if missing); required."
)
flags.register_validator(
    "workdir",
    lambda value: value is None or bool(value.strip()),
    message="--workdir is empty: name a directory for the run's outputs",
)
_DEBUG = flags.DEFINE_bool(
    "debug", False, "Show tracebacks instead of one-line errors."
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


# Exit statuses besides 0; each failure prints one `error: ...` line.
EXIT_ERROR = 1  # a bad value, file or checkpoint, a busy workdir, a NaN
EXIT_USAGE = 2  # bad flags, an unknown --config.<key>, no such config file
# SIGTERM/SIGINT in training: the step reached is saved, rerun to resume.
# sysexits' EX_TEMPFAIL ("try again later"), distinct from the 130/143 of a
# process the signal killed outright (a second signal, or SIGTERM in set-up:
# work since the last checkpoint is lost there).
EXIT_INTERRUPTED = 75
EXIT_SIGINT = 130  # Ctrl-C outside the training loop (128 + SIGINT)


def _fail(message: str, status: int) -> None:
  sys.stderr.write(f"error: {message}\n")
  sys.exit(status)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing; any failure is one line and exit 2 (not --debug)."""
  debug = any(a in ("--debug", "--debug=true", "--debug=1") for a in argv)
  rj_io.add_config_package_root(argv)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    if debug:
      raise
    # A config's own error arrives as its whole traceback: keep the last line.
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    _fail(
        " ".join(lines[:1] + lines[-1:] if len(lines) > 1 else lines),
        EXIT_USAGE,
    )
  except (AttributeError, KeyError) as e:
    if debug:
      raise
    # ml_collections: an override of a key the config does not have.
    key = str(e).strip("\"'")
    named = [
        a.split("=", 1)[0]
        for a in argv[1:]
        if a.startswith("--config.") and key in a.split("=", 1)[0].split(".")
    ]
    _fail(
        f"{named[0] if named else '--config.<key>'}: the config has no key "
        f"{key!r}",
        EXIT_USAGE,
    )
  except (ImportError, OSError) as e:
    if debug:
      raise
    # A config file that failed to load, met by a --config.<key> override.
    given = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")]
    given += [v for a, v in zip(argv[1:], argv[2:]) if a == "--config"]
    path = given[-1].split(":", 1)[0] if given else ""
    if path and not os.path.isfile(path):
      _fail(f"--config={given[-1]}: no such file", EXIT_USAGE)
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    _fail(f"--config: {lines[-1] if lines else e!r}", EXIT_USAGE)


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments: {argv[1:]}", EXIT_USAGE)
  debug = _DEBUG.value
  path = config_flags.get_config_filename(flags.FLAGS["config"])
  if not os.path.isfile(path.split(":", 1)[0]):
    _fail(f"--config={path}: no such file", EXIT_USAGE)
  parts = os.path.normpath(path).split(os.sep)
  if len(parts) >= 3 and parts[-3] == "experiments":
    name = parts[-2]
    sys.exit(
        f"error: {path} is an experiment's config; run it with "
        f"python -m experiments.{name}.run --config {path} ..."
    )
  config = _CONFIG.value
  try:
    config.keys()
  except OSError as e:  # the config file failed to load
    if debug:
      raise
    _fail(f"--config={path}: {e}".splitlines()[0], EXIT_USAGE)
  handler = logging.get_absl_handler()
  handler.addFilter(_QuietLibraries())
  # pylint: disable=g-import-not-at-top
  from retrieval_jax import checkpointing
  from retrieval_jax import errors
  from retrieval_jax import io
  from retrieval_jax import metric_logging
  from retrieval_jax import sharding
  from retrieval_jax import train
  import jax
  # pylint: enable=g-import-not-at-top

  if not debug:
    # Orbax's background threads log each failure with a traceback, and
    # asyncio leftovers print more at exit; the error that stops the run
    # names the cause, so these shrink to one line each.
    def one_line(record):
      if "/orbax/" in record.pathname and record.levelno > logging.INFO:
        first = record.getMessage().strip().splitlines()[:1]
        record.msg, record.args = (first[0] if first else "")[:300], None
        record.exc_info = record.exc_text = None
      return True

    shown = set()

    def background(name, exc):
      try:
        line = f"{name}: {checkpointing.cause(exc)}"
        if line not in shown:  # asyncio repeats its "Event loop is closed"
          shown.add(line)
          sys.stderr.write(f"{line} (--debug shows the traceback)\n")
      except Exception:  # pylint: disable=broad-exception-caught
        pass  # interpreter shutdown

    handler.addFilter(one_line)
    default_excepthook = sys.excepthook
    # C++ threads (TensorStore callbacks) report through sys.excepthook.
    sys.excepthook = lambda t, e, tb: (
        default_excepthook(t, e, tb)
        if threading.current_thread() is threading.main_thread()
        else background("background error", e)
    )
    threading.excepthook = lambda a: background(
        f"thread {a.thread.name if a.thread else '?'}", a.exc_value
    )
    sys.unraisablehook = lambda u: background("ignored", u.exc_value)

  try:
    if "mesh" in config:  # before the first device query
      train.check_mesh(config)
  except errors.ConfigError as e:
    if debug:
      raise
    _fail(str(e), EXIT_ERROR)
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

  mode = _MODE.value or ("train" if "train" in config else "evaluate")
  block, config_file, job = MODES[mode]
  if block not in config:
    sys.exit(
        f"error: --mode={mode} needs a config with a `{block}` block "
        f"({config_file})"
    )
  try:  # the values checked before the workdir is touched
    if mode == "train":
      train.validate_settings(config)
    if mode != "export" and "mesh" in config:  # export uses one device
      train.make_mesh(config)
  except errors.ConfigError as e:
    if debug:
      raise
    _fail(str(e), EXIT_ERROR)
  workdir = _WORKDIR.value
  if mode == "export" and not os.path.isdir(workdir):
    _fail(
        f"--workdir={workdir} does not exist: nothing to export (train "
        "first, with the same --workdir)",
        EXIT_ERROR,
    )
  try:
    # One run per workdir: two would interleave checkpoints and metrics.
    with contextlib.ExitStack() as stack:
      if jax.process_index() == 0:
        stack.enter_context(io.lock_workdir(workdir))
      job(config, workdir)
  except errors.Interrupted as e:
    logging.warning("%s", e)
    sys.stderr.write(f"{e}\n")
    sys.exit(EXIT_INTERRUPTED)
  except KeyboardInterrupt:
    if debug:
      raise
    _fail(
        "interrupted (SIGINT) outside the training loop; nothing was lost"
        " that a rerun of the same command does not redo",
        EXIT_SIGINT,
    )
  except (
      errors.ConfigError,
      errors.DataError,
      errors.CheckpointError,
      errors.WorkdirBusyError,
      metric_logging.NonFiniteError,
      OSError,
  ) as e:
    if debug:
      raise
    # The user's to fix: one line naming the key, file:line or cause.
    logging.error("%s", e)
    _fail(str(e), EXIT_ERROR)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=_parse_flags)
