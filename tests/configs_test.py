"""Every config loads, is locked, has a smoke variant and comments its fields.

The library's configs/<name>.py and the experiments'
experiments/<name>/config.py alike; each docstring holds its command.
"""

import ast
import importlib
import os
import pathlib
import subprocess
import sys
import tempfile

from absl.testing import absltest
from absl.testing import parameterized

from configs import common

_CONFIG_DIR = pathlib.Path(common.__file__).parent
# module name -> (file, the command its docstring must show).
_CONFIGS = {
    f"configs.{p.stem}": (p, "python -m retrieval_jax.main")
    for p in sorted(_CONFIG_DIR.glob("*.py"))
    if p.stem not in ("__init__", "common")
}
_CONFIGS.update({
    f"experiments.{p.parent.name}.config": (
        p,
        f"python -m experiments.{p.parent.name}.run",
    )
    for p in sorted((common.REPO_ROOT / "experiments").glob("*/config.py"))
})


def _assigned_fields(path: pathlib.Path):
  """(line number, dotted name) of every `config.x.y = ...` in a file."""
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Assign):
      for target in node.targets:
        if isinstance(target, ast.Attribute):
          yield node.lineno, ast.unparse(target)


class ConfigsTest(parameterized.TestCase):

  def test_experiment_configs_are_found(self):
    self.assertContainsSubset(
        {
            "experiments.cur_knn.config",
            "experiments.kv_memory.config",
            "experiments.limit_critical_n.config",
            "configs.train",
        },
        set(_CONFIGS),
    )

  @parameterized.parameters(*[(c,) for c in _CONFIGS])
  def test_default_and_smoke_load_locked(self, name):
    module = importlib.import_module(name)
    for arg in (None, "smoke"):
      config = module.get_config(arg)
      self.assertTrue(config.is_locked)
      with self.assertRaises(AttributeError):
        config.no_such_field = 1  # Typos fail loudly.
    self.assertIn(_CONFIGS[name][1], module.__doc__)

  @parameterized.parameters(*[(c,) for c in [*_CONFIGS, "configs.common"]])
  def test_every_field_has_a_comment(self, name):
    path = _CONFIGS.get(name, (_CONFIG_DIR / "common.py",))[0]
    lines = path.read_text().splitlines()
    for lineno, field in _assigned_fields(path):
      line = lines[lineno - 1]
      indent = len(line) - len(line.lstrip())
      # Fields are declared at the top of a function body; deeper lines are
      # variant overrides of fields declared (and commented) above. Lines
      # creating sub-dicts or pulling in shared blocks need no comment.
      if indent != 2 or "ConfigDict()" in line or "_block()" in line:
        continue
      self.assertTrue(
          lines[lineno - 2].strip().startswith("#"),
          f"{path.name}:{lineno}: field {field} has no comment above it",
      )

  def test_every_config_loads_from_another_directory(self):
    # `--config /abs/path/configs/x.py` from any current directory: the
    # command line puts the config's package root on sys.path first.
    script = (
        "import sys\n"
        "from absl import flags\n"
        "from ml_collections import config_flags\n"
        "from retrieval_jax import io\n"
        "config_flags.DEFINE_config_file('config')\n"
        "for path in sys.argv[1:]:\n"
        "  argv = ['prog', '--config', path]\n"
        "  io.add_config_package_root(argv)\n"
        "  flags.FLAGS.unparse_flags()\n"
        "  flags.FLAGS(argv)\n"
        "  print(path, type(flags.FLAGS.config).__name__)\n"
    )
    paths = [str(path) for path, _ in _CONFIGS.values()]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cwd = tempfile.mkdtemp()
    result = subprocess.run(
        [sys.executable, "-c", script, *paths],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    self.assertEqual(result.returncode, 0, result.stderr[-2000:])
    self.assertLen(result.stdout.splitlines(), len(paths))
    # Without the package root on the path the same load fails (the test
    # can fail): `configs` is not an installed package.
    bare = subprocess.run(
        [sys.executable, "-c", "import configs"],
        cwd=cwd,
        env=env,
        capture_output=True,
        check=False,
    )
    self.assertNotEqual(bare.returncode, 0)

  def test_parse_arg(self):
    arg = common.parse_arg("smoke,n=3,name=x", smoke=False, n=1, name="")
    self.assertEqual((arg.smoke, arg.n, arg.name), (True, 3, "x"))
    with self.assertRaisesRegex(ValueError, "unknown config argument 'bad'"):
      common.parse_arg("bad", smoke=False)


if __name__ == "__main__":
  absltest.main()
