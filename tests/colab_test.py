"""The Colab notebooks run headless, in smoke mode, from a fresh process.

The TPU notebook cannot train here: on CPU it must stop with its message,
and its config and mesh must pass the train mode's checks on 8 CPU devices.
Each notebook's first code cell installs the repository on Colab (clone into
/content, `%cd` there, install with the runtime's JAX pinned); its shell lines
are checked here, and its Python finds the repository from either folder.
"""

import importlib.metadata
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import textwrap

from absl.testing import absltest
from absl.testing import parameterized
import pytest

_ROOT = pathlib.Path(__file__).resolve().parent.parent
_NOTEBOOKS = sorted((_ROOT / "colab").glob("*.ipynb"))
# Notebooks for a TPU runtime cannot train here; they are run up to the
# training cell (see TpuNotebookTest).
_TPU_NOTEBOOKS = [p for p in _NOTEBOOKS if "tpu" in p.name]
_CPU_NOTEBOOKS = [p for p in _NOTEBOOKS if p not in _TPU_NOTEBOOKS]


def raw_cells(path: pathlib.Path) -> list[str]:
  """The notebook's code cells as written, IPython's `!` and `%` lines too."""
  cells = json.loads(path.read_text())["cells"]
  return ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]


def _python_line(line: str) -> str:
  # A shell `!` or magic `%` line becomes `pass` at its indentation, so an
  # `if` block of them stays valid Python.
  body = line.lstrip()
  if body.startswith(("!", "%")):
    return line[: len(line) - len(body)] + "pass"
  return line


def notebook_cells(path: pathlib.Path) -> list[str]:
  """The notebook's code cells (shell `!` and magic `%` lines made `pass`)."""
  return [
      "\n".join(_python_line(l) for l in cell.splitlines())
      for cell in raw_cells(path)
  ]


def notebook_code(path: pathlib.Path) -> str:
  """The notebook's code cells as one script."""
  return "\n".join(notebook_cells(path)) + "\n"


def _run_code(code: str, **env):
  return subprocess.run(
      [sys.executable, "-c", code],
      cwd=_ROOT / "colab",
      env=dict(
          os.environ,
          RETRIEVAL_JAX_SMOKE="1",
          RETRIEVAL_JAX_ROOT=str(_ROOT),
          **env,
      ),
      capture_output=True,
      text=True,
      timeout=600,
  )


class TpuNotebookTest(parameterized.TestCase):

  @parameterized.parameters(*[(p.name,) for p in _TPU_NOTEBOOKS])
  def test_stops_on_a_cpu_runtime(self, name):
    # As its first cell says: on CPU it stops with a clear message.
    proc = _run_code(notebook_code(_ROOT / "colab" / name))
    self.assertNotEqual(proc.returncode, 0)
    self.assertIn(
        "this notebook needs a TPU runtime; JAX sees cpu devices", proc.stderr
    )

  @parameterized.parameters(*[(p.name,) for p in _TPU_NOTEBOOKS])
  def test_config_is_valid_on_8_devices(self, name):
    # Its cells up to the training one, on 8 CPU devices standing in for a
    # v2-8 / v3-8 runtime (the platform check dropped): the config and the
    # mesh it builds pass the train mode's start-up checks.
    cells = notebook_cells(_ROOT / "colab" / name)
    train_cell = next(
        i for i, c in enumerate(cells) if "train_and_evaluate(" in c
    )
    code = "\n".join(
        c for c in cells[:train_cell] if "raise SystemExit" not in c
    )
    code += textwrap.dedent("""
        from retrieval_jax import train_checks
        train_checks.validate(config, mesh)
        print(json.dumps({"mesh": dict(mesh.shape),
                          "batch_size": config.train.batch_size}))
        """)
    # (The dropped cell's import of jax comes first.)
    proc = _run_code(
        "import json\nimport jax\n" + code,
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
    )
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    # data x fsdp = 4 x 2, and a per-chip batch of 16.
    self.assertEqual(
        got, {"mesh": {"data": 4, "fsdp": 2, "model": 1}, "batch_size": 128}
    )


class ColabTest(parameterized.TestCase):

  def _run_notebook(self, name):
    proc = _run_code(notebook_code(_ROOT / "colab" / name))
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])

  @parameterized.parameters(
      *[(p.name,) for p in _CPU_NOTEBOOKS if "train" not in p.name]
  )
  def test_notebook_runs(self, name):
    self._run_notebook(name)

  # Over a minute; tests/e2e/train_test.py (also slow) runs the same smoke
  # training through the command line.
  @pytest.mark.slow
  def test_train_notebook_runs(self):
    names = [p.name for p in _CPU_NOTEBOOKS if "train" in p.name]
    self.assertNotEmpty(names)
    for name in names:
      self._run_notebook(name)


def _shell_lines(cell: str) -> list[str]:
  """The cell's `!` lines, without the `!`."""
  return [
      l.lstrip()[1:].strip() for l in cell.splitlines() if l.lstrip()[:1] == "!"
  ]


def _commands(shell_line: str) -> list[list[str]]:
  """The simple commands of a shell line (split at `&&`, `||`, `;`, `|`)."""
  lexer = shlex.shlex(shell_line, posix=True, punctuation_chars=True)
  commands = [[]]
  for token in lexer:
    if token in ("&&", "||", ";", "|"):
      commands.append([])
    else:
      commands[-1].append(token)
  return [c for c in commands if c]


class InstallCellTest(parameterized.TestCase):
  """The first code cell installs the repository on a Colab runtime."""

  @parameterized.parameters(*[(p.name,) for p in _NOTEBOOKS])
  def test_no_placeholder_and_no_shell_cd(self, name):
    for cell in raw_cells(_ROOT / "colab" / name):
      self.assertNotIn("<this repository>", cell)
      # `!cd` runs in a subshell and is gone by the next line.
      for line in _shell_lines(cell):
        for command in _commands(line):
          self.assertNotEqual(command[0], "cd", line)
      # Paths come from ROOT, not from a '..' that is / on Colab (/content).
      self.assertNotIn("'..'", cell)

  @parameterized.parameters(*[(p.name,) for p in _NOTEBOOKS])
  def test_clones_into_content_and_cds_there(self, name):
    cell = raw_cells(_ROOT / "colab" / name)[0]
    self.assertRegex(cell, r"(?m)^REPO_URL = ")
    (clone,) = [
        c
        for l in _shell_lines(cell)
        for c in _commands(l)
        if c[:2] == ["git", "clone"]
    ]
    self.assertIn("$REPO_URL", clone)
    target = clone[-1]
    self.assertTrue(target.startswith("/content/"), clone)
    self.assertRegex(cell, rf"(?m)^\s*%cd {re.escape(target)}$")

  @parameterized.parameters(*[(p.name,) for p in _NOTEBOOKS])
  def test_install_keeps_the_runtimes_jax(self, name):
    cell = raw_cells(_ROOT / "colab" / name)[0]
    lines = _shell_lines(cell)
    (pin_line,) = [l for l in lines if l.startswith("pip list")]
    listing, pin_file = (x.strip() for x in pin_line.split(">"))
    filter_cmd = listing.split("|", 1)[1]
    installs = [
        c for l in lines for c in _commands(l) if c[:2] == ["pip", "install"]
    ]
    self.assertNotEmpty(installs)
    for command in installs:
      # Every install is held to the pinned JAX, or installs nothing else.
      pinned = any(
          a == "-c" and b == pin_file for a, b in zip(command, command[1:])
      )
      self.assertTrue(pinned or "--no-deps" in command, command)
      self.assertNotIn("constraints.txt", command)
    # The filter keeps JAX and its backends (Colab's TPU runtime: jax[tpu],
    # i.e. jax, jaxlib and libtpu), and nothing else.
    listed = "\n".join([
        "flax==0.12.12",
        "jax==0.12.0",
        "jax-cuda12-plugin==0.12.0",
        "jaxlib==0.12.0",
        "libtpu==0.0.30",
        "numpy==2.4.6",
        "optax==0.2.8",
    ])
    kept = subprocess.run(
        ["bash", "-c", filter_cmd],
        input=listed,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    self.assertEqual(
        kept,
        [
            "jax==0.12.0",
            "jax-cuda12-plugin==0.12.0",
            "jaxlib==0.12.0",
            "libtpu==0.0.30",
        ],
    )
    # Run on this environment (its pip first on PATH), it pins what is here.
    env = dict(
        os.environ,
        PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
    )
    pins = subprocess.run(
        ["bash", "-c", listing],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for package in ("jax", "jaxlib"):
      self.assertIn(f"{package}=={importlib.metadata.version(package)}", pins)
    if name in [p.name for p in _TPU_NOTEBOOKS]:
      self.assertIn("jax[tpu]", cell)

  @parameterized.parameters(*[(p.name,) for p in _NOTEBOOKS])
  def test_finds_the_repository(self, name):
    # From the repository (Colab, after %cd) or from colab/ (local Jupyter).
    cell = notebook_cells(_ROOT / "colab" / name)[0]
    env = {k: v for k, v in os.environ.items() if k != "RETRIEVAL_JAX_ROOT"}
    for cwd in (_ROOT, _ROOT / "colab"):
      proc = subprocess.run(
          [sys.executable, "-c", cell + "\nprint(ROOT)"],
          cwd=cwd,
          env=env,
          capture_output=True,
          text=True,
          check=True,
      )
      self.assertEqual(
          pathlib.Path(proc.stdout.split()[-1]).resolve(), _ROOT, cwd
      )


if __name__ == "__main__":
  absltest.main()
