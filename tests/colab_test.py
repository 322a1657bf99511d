"""The Colab notebooks run headless, in smoke mode, from a fresh process."""

import json
import os
import pathlib
import subprocess
import sys

from absl.testing import absltest
from absl.testing import parameterized
import pytest

_ROOT = pathlib.Path(__file__).resolve().parent.parent
_NOTEBOOKS = sorted((_ROOT / "colab").glob("*.ipynb"))
# Notebooks for a TPU runtime cannot run here; they are only parsed.
_TPU_NOTEBOOKS = [p for p in _NOTEBOOKS if "tpu" in p.name]
_CPU_NOTEBOOKS = [p for p in _NOTEBOOKS if p not in _TPU_NOTEBOOKS]


def notebook_code(path: pathlib.Path) -> str:
  """The notebook's code cells as one script (shell `!` lines dropped)."""
  cells = json.loads(path.read_text())["cells"]
  lines = []
  for cell in cells:
    if cell["cell_type"] == "code":
      lines += [l for l in "".join(cell["source"]).splitlines()
                if not l.lstrip().startswith(("!", "%"))]
  return "\n".join(lines) + "\n"


class ColabTest(parameterized.TestCase):

  @parameterized.parameters(*[(p.name,) for p in _TPU_NOTEBOOKS])
  def test_tpu_notebook_parses(self, name):
    compile(notebook_code(_ROOT / "colab" / name), name, "exec")

  def _run_notebook(self, name):
    env = dict(os.environ, RETRIEVAL_JAX_SMOKE="1",
               RETRIEVAL_JAX_ROOT=str(_ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", notebook_code(_ROOT / "colab" / name)],
        cwd=_ROOT / "colab", env=env, capture_output=True, text=True,
        timeout=600)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])

  @parameterized.parameters(*[(p.name,) for p in _CPU_NOTEBOOKS
                              if "train" not in p.name])
  def test_notebook_runs(self, name):
    self._run_notebook(name)

  # Over a minute; the smoke training it runs is also covered by
  # tests/e2e/train_test.py in the default run.
  @pytest.mark.slow
  def test_train_notebook_runs(self):
    names = [p.name for p in _CPU_NOTEBOOKS if "train" in p.name]
    self.assertNotEmpty(names)
    for name in names:
      self._run_notebook(name)


if __name__ == "__main__":
  absltest.main()
