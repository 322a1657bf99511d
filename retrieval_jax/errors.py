"""The library's two error types (ValueError subclasses) for deliberate errors.

`ConfigError` messages name the key ("config.optim.decay='step': ...");
`DataError` messages start with "path:line: " (or "path: ").
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
