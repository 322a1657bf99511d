r"""Entry point: set-up, then dispatch on --mode.

  python -m retrieval_jax.main --config configs/evaluate.py[:variant] \
      --workdir DIR [--mode MODE] [--config.a.b=value ...]

MODE (default: `train` for a config with a `train` block, else `evaluate`):
train (configs/train.py; resumes from <workdir>/checkpoints), evaluate,
encode (resumable corpus embedding shards, then one .npy) and export
(jax.export towers of any kind, or `--config.export.format=hf`). Each mode
is a library function. Several processes (each runs the same command) join
through `initialize_distributed`: an explicit coordinator
(JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), an srun step
of SLURM_NTASKS > 1 tasks, or a TPU pod. Experiments run as
`python -m experiments.<name>.run --config experiments/<name>/config.py`.
"""

from collections.abc import Mapping
import contextlib
import dataclasses
import os
import sys
import threading
from typing import Any

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from retrieval_jax import errors
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

_COORDINATOR_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")
# What JAX's SLURM detection reads; srun sets them, a batch script alone has
# no SLURM_STEP_NODELIST.
_SLURM_STEP_ENV = (
    "SLURM_JOB_ID",
    "SLURM_STEP_NODELIST",
    "SLURM_PROCID",
    "SLURM_LOCALID",
)


@dataclasses.dataclass(frozen=True)
class Cluster:
  """How this process joins a multi-process run (see `detect_cluster`).

  Attributes:
    name: "coordinator", "slurm", "tpu_pod" or "tpu_vm".
    description: what was detected, for the log.
    kwargs: `jax.distributed.initialize` arguments; {}: JAX detects them.
    num_processes: the process count the environment promises (checked
      after initialisation), None where only JAX knows it.
    required: whether a failed initialisation stops the run (False only for
      "tpu_vm", where a single host is as likely as a pod).
  """

  name: str
  description: str
  kwargs: dict[str, Any]
  num_processes: int | None
  required: bool = True


def _env_int(env: Mapping[str, str], key: str) -> int | None:
  value = env.get(key, "").strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise errors.ConfigError(
        f"environment variable {key}={value!r}: expected an integer"
    ) from None


def _hosts(value: str) -> list[str]:
  return [h for h in value.split(",") if h.strip()]


def detect_cluster(
    env: Mapping[str, str], *, tpu_vm: bool = False
) -> Cluster | None:
  """The multi-process environment `env` describes; None: one process.

  In order: an explicit coordinator (`JAX_COORDINATOR_ADDRESS`, with
  `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID` where JAX cannot detect them), a
  SLURM job step of several tasks (`SLURM_NTASKS` > 1), a multi-host TPU
  slice (`TPU_WORKER_HOSTNAMES` / `TPU_PROCESS_ADDRESSES` naming several
  hosts, or multislice's `MEGASCALE_COORDINATOR_ADDRESS`), and with
  `tpu_vm` (TPU chips on this host) any Cloud TPU VM, whose workers JAX reads
  from the metadata server.

  Raises:
    errors.ConfigError: SLURM_NTASKS > 1 outside an `srun` step, or a
      malformed count; names the variable.
  """
  address = next((env[k] for k in _COORDINATOR_ENV if env.get(k)), "")
  if address:
    num = _env_int(env, "JAX_NUM_PROCESSES")
    pid = _env_int(env, "JAX_PROCESS_ID")
    return Cluster(
        "coordinator",
        f"coordinator {address}, process"
        f" {'?' if pid is None else pid} of {'?' if num is None else num}",
        {
            "coordinator_address": address,
            "num_processes": num,
            "process_id": pid,
        },
        num,
    )
  tasks = _env_int(env, "SLURM_NTASKS")
  if tasks is not None and tasks > 1:
    missing = [k for k in _SLURM_STEP_ENV if k not in env]
    if missing:
      raise errors.ConfigError(
          f"SLURM_NTASKS={tasks} but {', '.join(missing)} unset: this process"
          " was not started by srun, and alone it would run one of"
          f" {tasks} independent copies of the job on the same workdir;"
          " launch every task with `srun python -m retrieval_jax.main ...`,"
          " or ask for one task (--ntasks=1)"
      )
    return Cluster(
        "slurm",
        f"SLURM job {env['SLURM_JOB_ID']}, task {env['SLURM_PROCID']} of"
        f" {tasks} (nodes {env['SLURM_STEP_NODELIST']})",
        {},
        tasks,
    )
  hosts = _hosts(
      env.get("TPU_PROCESS_ADDRESSES", "")
      or env.get("TPU_WORKER_HOSTNAMES", "")
  )
  slices = _env_int(env, "MEGASCALE_NUM_SLICES") or 1
  if len(hosts) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    total = len(hosts) * slices if hosts else None
    return Cluster(
        "tpu_pod",
        f"TPU pod, worker {env.get('TPU_WORKER_ID', '?')} of"
        f" {len(hosts) or '?'} hosts x {slices} slice(s)",
        {},
        total,
    )
  if tpu_vm:
    return Cluster(
        "tpu_vm",
        "Cloud TPU VM (workers from JAX's TPU detection)",
        {},
        None,
        required=False,
    )
  return None


def _on_tpu_vm() -> bool:
  """TPU chips on this host (their device files) and libtpu installed."""
  import glob  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top

  chips = glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*")
  return bool(chips) and importlib.util.find_spec("libtpu") is not None


def initialize_distributed(env: Mapping[str, str] | None = None) -> bool:
  """Joins the multi-process run `detect_cluster` finds; returns whether.

  Raises:
    errors.ConfigError: a detected run could not start, or started with
      another process count than the environment names: one line saying
      which environment and why, rather than N independent runs sharing
      one workdir.
  """
  import jax  # pylint: disable=g-import-not-at-top

  env = os.environ if env is None else env
  cluster = detect_cluster(
      env,
      # JAX_PLATFORMS=cpu (tests, CPU jobs on a TPU host) rules TPUs out.
      tpu_vm="tpu" in env.get("JAX_PLATFORMS", "tpu") and _on_tpu_vm(),
  )
  if cluster is None:
    return False
  logging.info("multi-process run (%s): %s", cluster.name, cluster.description)
  try:
    jax.distributed.initialize(**cluster.kwargs)
  except Exception as e:  # pylint: disable=broad-exception-caught
    # JAX raises ValueError, RuntimeError or XlaRuntimeError (timeouts).
    cause = (str(e).strip().splitlines() or [""])[0][:300]
    message = (
        f"{cluster.description}: jax.distributed.initialize failed"
        f" ({type(e).__name__}: {cause})"
    )
    if not cluster.required:
      logging.warning("%s; running as one process", message)
      return False
    raise errors.ConfigError(message) from e
  if cluster.num_processes and jax.process_count() != cluster.num_processes:
    raise errors.ConfigError(
        f"{cluster.description}: JAX formed a run of {jax.process_count()}"
        f" processes, the environment names {cluster.num_processes}"
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
  from retrieval_jax import io
  from retrieval_jax import metric_logging
  from retrieval_jax import sharding
  from retrieval_jax import train_checks
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
      train_checks.check_mesh(config)
  except errors.ConfigError as e:
    if debug:
      raise
    _fail(str(e), EXIT_ERROR)
  # Before the first device query: on CPU, one XLA device per core.
  sharding.use_cpu_cores_as_devices(config.mesh.cpu_devices)
  try:
    initialize_distributed()
  except errors.ConfigError as e:
    if debug:
      raise
    _fail(str(e), EXIT_ERROR)
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
      train_checks.validate_settings(config)
    if mode != "export" and "mesh" in config:  # export uses one device
      train_checks.make_mesh(config)
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
