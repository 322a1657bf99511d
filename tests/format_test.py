"""One code formatter: every Python file is as pyink (pyproject.toml) writes it.

Fix a failure with `pyink .` from the repository root.
"""

import subprocess
import sys

from absl.testing import absltest

import test_util


class FormatTest(absltest.TestCase):

  def test_pyink_leaves_every_file_unchanged(self):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pyink",
            "--check",
            "retrieval_jax",
            "tests",
            "experiments",
            "configs",
        ],
        cwd=test_util.REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    self.assertEqual(
        proc.returncode,
        0,
        f"not formatted (run `pyink .`):\n{proc.stderr[-3000:]}",
    )


if __name__ == "__main__":
  absltest.main()
