"""The library's two error types; every error it raises on purpose is one.

`ConfigError`: a config value is missing or wrong; the message names the key
(e.g. "config.optim.decay='step': expected one of ...").
`DataError`: an input file is missing or malformed; the message starts with
"path:line: " (or "path: " when the file as a whole is at fault).

Both subclass ValueError, so callers that catch ValueError keep working.
"""


class ConfigError(ValueError):
  """A config value is missing or wrong; the message names the key."""


class DataError(ValueError):
  """An input file is missing or malformed.

  Attributes:
    path: str, the file or directory at fault.
    line: int or None, the 1-based line number.
  """

  def __init__(self, path: str, line: int | None, message: str):
    self.path = str(path)
    self.line = line
    where = self.path if line is None else f"{self.path}:{line}"
    super().__init__(f"{where}: {message}")
