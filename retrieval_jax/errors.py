"""The library's error types for deliberate, one-line failures.

`ConfigError` messages name the key ("config.optim.decay='step': ...");
`DataError` messages start with "path:line: " (or "path: "). The entry point
prints any of these as one `error: ...` line; see `main.py` for exit codes.
"""


class ConfigError(ValueError):
  """A config value is missing or wrong; the message names the key."""


class DataError(ValueError):
  """An input file is missing or malformed.

  Attributes: `path` (str), `line` (1-based int; None: the whole file).
  """

  def __init__(self, path: str, line: int | None, message: str):
    self.path = str(path)
    self.line = line
    where = self.path if line is None else f"{self.path}:{line}"
    super().__init__(f"{where}: {message}")


class CheckpointError(RuntimeError):
  """A checkpoint could not be saved or restored; names the step and cause."""


class WorkdirBusyError(RuntimeError):
  """Another live process holds the workdir's lock; names its pid and host."""


class Interrupted(Exception):
  """SIGTERM/SIGINT stopped training after saving; rerunning resumes.

  Attributes: `signal_name` ("SIGTERM"), `step` (the saved step).
  """

  def __init__(self, signal_name: str, step: int, message: str):
    self.signal_name = signal_name
    self.step = step
    super().__init__(message)
