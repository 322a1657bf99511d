"""Metric logging: TensorBoard events, an append-only metrics.jsonl, a NaN guard.

Scalars go to the INFO log and, from process 0, to TensorBoard event files
through `tensorboard.summary.Writer` (pure Python: no TensorFlow, so the run
path works on accelerator images without it) and to
`<workdir>/metrics.jsonl`: one
flushed line `{"step": 120, "train/loss": 0.71, ...}` per `write`. A record cut
by a crash is dropped on reopen. A resumed run (`rerun_from`) first drops the
records of the steps it logs again, so each (step, metric) appears once; in
TensorBoard a restart marker makes the reader drop the old values likewise.
"""

from collections.abc import Iterable, Mapping
import glob
import json
import os
import time
from typing import Any

from absl import logging
import jax
import numpy as np

from retrieval_jax import checkpointing
from retrieval_jax import io

try:
  from tensorboard import summary as tb_summary  # pylint: disable=g-import-not-at-top
  from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
  from tensorboard.summary.writer import event_file_writer  # pylint: disable=g-import-not-at-top

  _WRITERS_IMPORT_ERROR = None
except ImportError as e:
  tb_summary = None
  _WRITERS_IMPORT_ERROR = e

METRICS_FILE = "metrics.jsonl"
STEP_KEY = "step"  # no metric may use it


def tensorboard_available() -> bool:
  """Whether TensorBoard event files can be written in this environment."""
  return tb_summary is not None


class NonFiniteError(FloatingPointError):
  """A metric is NaN or infinite; `step` and `names` say which and when."""

  def __init__(self, message: str, *, step: int, names: list[str]):
    super().__init__(message)
    self.step = step
    self.names = names


def _to_host(metrics: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """numpy copies, in one explicit transfer (allowed under transfer_guard)."""
  if not isinstance(metrics, Mapping):
    raise TypeError(
        "metrics must be a dict of name -> scalar, got"
        f" {type(metrics).__name__}"
    )
  host = jax.device_get(dict(metrics))
  # device_get sorts dict keys; keep the caller's order for the records.
  return {k: np.asarray(host[k]) for k in metrics}


def _to_scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
  """Metric values as python floats; checks names and that each is scalar."""
  scalars = {}
  for name, value in _to_host(metrics).items():
    if not isinstance(name, str) or not name:
      raise ValueError(f"metric names must be non-empty strings, got {name!r}")
    if name == STEP_KEY:
      raise ValueError(
          f"{STEP_KEY!r} is the step of each record, not a metric name; use"
          " e.g. 'train/step'"
      )
    if value.size != 1 or not (
        np.issubdtype(value.dtype, np.number) or value.dtype == np.bool_
    ):
      raise ValueError(
          f"metric {name!r} must be a numeric scalar, got"
          f" {value.dtype}{list(value.shape)}"
      )
    scalars[name] = float(value.reshape(()))  # json cannot encode numpy
  return scalars


def _parse_record(line: str) -> dict | None:
  """The JSON object on `line`, or None (a line cut mid-record)."""
  try:
    record = json.loads(line)
  except json.JSONDecodeError:
    return None
  return record if isinstance(record, dict) else None


def _drop_partial_last_line(path: str) -> None:
  """Adds a missing final newline, or cuts a partial last record."""
  with open(path, "rb+") as f:
    size = f.seek(0, os.SEEK_END)
    if size == 0:
      return
    f.seek(size - 1)
    if f.read(1) == b"\n":
      return
    start, pos = 0, size
    while pos > 0:
      block_start = max(0, pos - 65536)
      f.seek(block_start)
      newline = f.read(pos - block_start).rfind(b"\n")
      if newline >= 0:
        start = block_start + newline + 1
        break
      pos = block_start
    f.seek(start)
    tail = f.read()  # leaves the position at the end
    if _parse_record(tail.decode("utf-8", errors="replace")) is not None:
      f.write(b"\n")
    else:
      logging.warning(
          "%s: dropping a partial last record (%d bytes)", path, len(tail)
      )
      f.truncate(start)


def _roll_back(path: str, rerun_from: int) -> None:
  """Rewrites metrics.jsonl without the records of steps >= `rerun_from`.

  Atomic (a temp file replaces it): a crash here leaves the old file.
  """
  with open(path, encoding="utf-8") as f:
    lines = f.read().split("\n")
  kept, dropped = [], 0
  for lineno, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    record = _parse_record(line)
    if record is None and lineno == len(lines):
      logging.warning("%s: dropping a partial last record", path)
      dropped += 1
      continue
    step = record.get(STEP_KEY) if record is not None else None
    if isinstance(step, int) and step >= rerun_from:
      dropped += 1
      continue
    kept.append(line)  # as written; an unreadable one is kept, not judged
  if dropped:
    io.write_text_atomic(path, "".join(line + "\n" for line in kept))
    logging.info(
        "%s: dropped %d records of steps >= %d (logged again by this run)",
        path,
        dropped,
        rerun_from,
    )


def _mark_restart(events_dir: str, step: int) -> None:
  """Tells TensorBoard to forget the earlier files' events from `step` on.

  Its readers drop the values of steps >= `step` seen so far at a SessionLog
  START event; files are read in name order, and this one sorts after the
  earlier runs' and before the writer's file created next. The server's
  reader takes the first START of a run for its beginning, not a restart:
  a second one at the same step purges in every reader.
  """
  if not glob.glob(os.path.join(events_dir, "events.out.tfevents.*")):
    return  # nothing logged before
  writer = event_file_writer.EventFileWriter(events_dir)
  for _ in range(2):
    writer.add_event(
        event_pb2.Event(
            wall_time=time.time(),
            step=step,
            session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START),
        )
    )
  writer.close()


class _Writer:
  """INFO log everywhere; TensorBoard events where `events_dir` is given."""

  def __init__(self, events_dir: str | None, rerun_from: int | None = None):
    self._events = None
    if events_dir is not None and tb_summary is not None:
      if rerun_from is not None:
        _mark_restart(events_dir, rerun_from)
      self._events = tb_summary.Writer(events_dir)

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    values = ", ".join(f"{k}={v:.6g}" for k, v in sorted(scalars.items()))
    logging.info("[%d] %s", step, values)
    if self._events is not None:
      for name, value in scalars.items():
        self._events.add_scalar(name, value, step)

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    # Logged only: the resolved config is saved with every checkpoint.
    logging.info("[Hyperparameters] %s", hparams)

  def flush(self) -> None:
    if self._events is not None:
      self._events.flush()

  def close(self) -> None:
    if self._events is not None:
      self._events.close()


class MetricLogger:
  """Writes scalars to the log, TensorBoard and metrics.jsonl; a context manager."""

  def __init__(
      self,
      workdir: str | os.PathLike,
      *,
      is_primary: bool = True,
      rerun_from: int | None = None,
  ):
    """Opens the writers; only the `is_primary` process (0) writes files.

    `rerun_from`: a resumed run's first step to log (0: a fresh start);
    earlier records of steps >= it are dropped. None: append to all.
    """
    if rerun_from is not None:
      rerun_from = checkpointing.check_step(rerun_from)
    self._workdir = os.fspath(workdir)
    self._file = None
    self._closed = False
    if is_primary:
      os.makedirs(self._workdir, exist_ok=True)
    if is_primary and tb_summary is None:
      logging.warning(
          "TensorBoard summaries are off: %s; install tensorboard. Writing the"
          " log and %s only.",
          _WRITERS_IMPORT_ERROR,
          METRICS_FILE,
      )
    self._writer = _Writer(
        self._workdir if is_primary else None, rerun_from=rerun_from
    )
    if is_primary:
      path = os.path.join(self._workdir, METRICS_FILE)
      # Append: a resumed run keeps its history in the same file.
      if os.path.exists(path):
        if rerun_from is None:
          _drop_partial_last_line(path)
        else:
          _roll_back(path, rerun_from)
      self._file = open(path, "a", encoding="utf-8")

  @property
  def path(self) -> str | None:
    """The metrics.jsonl this logger appends to; None off the primary."""
    return self._file.name if self._file is not None else None

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Writes one step's scalars (python, numpy or jax; size 1) everywhere.

    NaN and inf are written as they are (JSON `NaN`/`Infinity`, which Python's
    json reads back); `check_finite` is the guard.
    """
    if self._closed:
      raise ValueError("MetricLogger is closed")
    step = checkpointing.check_step(step)
    scalars = _to_scalars(metrics)  # before writing: no half records
    if not scalars:
      return
    self._writer.write_scalars(step, scalars)
    if self._file is not None:
      # One write per record, flushed before training goes on.
      self._file.write(json.dumps({STEP_KEY: step, **scalars}) + "\n")
      self._file.flush()

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """Records hyperparameters (nested dicts flattened): `config.to_dict()`."""
    if self._closed:
      raise ValueError("MetricLogger is closed")
    self._writer.write_hparams(dict(hparams))

  def flush(self) -> None:
    """Pushes buffered summaries to disk."""
    self._writer.flush()
    if self._file is not None:
      self._file.flush()

  def close(self) -> None:
    """Flushes and closes the writers; further writes raise. Idempotent."""
    if self._closed:
      return
    self._closed = True
    self._writer.flush()
    self._writer.close()
    if self._file is not None:
      self._file.close()

  def __enter__(self) -> "MetricLogger":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def check_finite(
    metrics: Mapping[str, Any], step: int, keys: Iterable[str] | None = None
) -> None:
  """Raises `NonFiniteError` naming NaN/inf metrics among `keys` (None: all).

  Write the metrics first, so diverged values are on record.
  """
  names = list(metrics) if keys is None else list(keys)
  missing = [k for k in names if k not in metrics]
  if missing:
    raise KeyError(
        f"check_finite: no metrics named {missing}; have {sorted(metrics)}"
    )
  values = _to_host({k: metrics[k] for k in names})  # one transfer per step
  bad = []
  for name, value in values.items():
    if not (np.issubdtype(value.dtype, np.number) or value.dtype == np.bool_):
      raise TypeError(f"metric {name!r} is not numeric: {value.dtype}")
    if not np.all(np.isfinite(value)):
      bad.append(name)
  if bad:
    shown = ", ".join(
        f"{k}={values[k] if values[k].size == 1 else '<array>'}" for k in bad
    )
    raise NonFiniteError(
        f"non-finite metrics at step {step}: {shown}", step=step, names=bad
    )


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
  """The `{"step": int, name: float}` records of a metrics.jsonl (or workdir).

  A partial last line (a crash mid-write) is skipped; another bad line is a
  ValueError (the file is corrupt, not merely cut short).
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    path = os.path.join(path, METRICS_FILE)
  # split("\n"): a non-empty last element is an unterminated, maybe cut line.
  with open(path, encoding="utf-8") as f:
    lines = f.read().split("\n")
  records = []
  for lineno, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    record = _parse_record(line)
    if record is None:
      if lineno == len(lines):
        logging.warning("%s: skipping a partial last line", path)
        continue
      raise ValueError(f"{path}:{lineno}: not a JSON object: {line[:80]!r}")
    records.append(record)
  return records


# <workdir>/SELECTION_FILE: a run's model selection (`Selection`).
SELECTION_FILE = "selection.json"


def read_selection(workdir: str | os.PathLike) -> tuple[int, str] | None:
  """(best step, metric) of a run's `Selection`; None without one."""
  path = os.path.join(workdir, SELECTION_FILE)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    record = json.load(f)
  if record.get("best_step") is None:
    return None
  return int(record["best_step"]), record["metric"]


def selected_step(workdir: str | os.PathLike) -> int | None:
  """The step a run's `config.train.select_metric` picked, or None (the
  latest) for a run without model selection."""
  picked = read_selection(workdir)
  if picked is None:
    return None
  step, metric = picked
  logging.info("%s: step %d, selected by %s", workdir, step, metric)
  return step


class Selection:
  """Model selection on one evaluation metric (higher is better).

  Every evaluation of the run goes through `update`; the history and the
  best step's metrics (all of them, e.g. the test collections' at that step)
  are kept in `path` (JSON), so a resumed run continues the record. Entries
  after the step a run resumes from are dropped: that run evaluates them
  again.
  """

  def __init__(
      self,
      path: str | os.PathLike,
      metric: str,
      *,
      resume_step: int = 0,
      is_primary: bool = True,
  ):
    self.path, self.metric, self._is_primary = path, metric, is_primary
    self.history: dict[int, float] = {}
    self._metrics: dict[int, dict[str, float]] = {}
    if resume_step and os.path.exists(path):
      with open(path) as f:
        record = json.load(f)
      if record.get("metric") == metric:
        for step, metrics in record.get("evaluations", {}).items():
          if int(step) <= resume_step:
            self._metrics[int(step)] = metrics
            self.history[int(step)] = metrics[metric]

  def update(self, step: int, metrics: Mapping[str, float]) -> bool:
    """Records the evaluation of `step`; returns whether it is the best."""
    if self.metric not in metrics:
      raise KeyError(
          f"config.train.select_metric={self.metric!r} is not among the "
          f"evaluation's metrics: {sorted(metrics)}"
      )
    self._metrics[step] = {k: float(v) for k, v in metrics.items()}
    self.history[step] = float(metrics[self.metric])
    if self._is_primary:
      io.write_json_atomic(self.path, self.summary())
    return self.best_step == step

  @property
  def best_step(self) -> int | None:
    """The best step so far (the earliest among ties); None before any."""
    if not self.history:
      return None
    return max(sorted(self.history), key=lambda s: self.history[s])

  def summary(self) -> dict[str, Any]:
    """{metric, best_step, best (its metrics), history, evaluations}."""
    best = self.best_step
    return {
        "metric": self.metric,
        "best_step": best,
        "best": self._metrics.get(best, {}),
        "history": {str(s): v for s, v in sorted(self.history.items())},
        "evaluations": {str(s): m for s, m in sorted(self._metrics.items())},
    }
