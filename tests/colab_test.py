"""The Colab notebooks run headless, in smoke mode, from a fresh process.

The TPU notebook cannot train here: on CPU it must stop with its message,
and its config and mesh must pass the train mode's checks on 8 CPU devices.
"""

import json
import os
import pathlib
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


def notebook_cells(path: pathlib.Path) -> list[str]:
  """The notebook's code cells (shell `!` and magic `%` lines dropped)."""
  cells = json.loads(path.read_text())["cells"]
  return [
      "\n".join(
          l
          for l in "".join(cell["source"]).splitlines()
          if not l.lstrip().startswith(("!", "%"))
      )
      for cell in cells
      if cell["cell_type"] == "code"
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
          **env
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
        train.validate(config, mesh)
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


if __name__ == "__main__":
  absltest.main()
