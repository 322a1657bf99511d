"""The package's layering, checked by walking every import with `ast`.

Layers, lowest first (a module imports its own layer and lower ones only):
  0 errors, io, sharding, optimizers, losses/
  1 layers/
  2 models/
  3 data/, pretrained, train_state, checkpointing, search/
  4 kinds/, encoding, steps, evaluation/, metric_logging
  5 train, evaluate, export, serving, main, analysis/, ...
Plus: no import circle; layers/ and models/ import no data/, pretrained,
checkpointing, train_state or evaluation; losses/ imports only losses/;
search/ and the library never import experiments/ or configs/.
"""

import ast
import pathlib

from absl.testing import absltest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "retrieval_jax"
LAYERS = (
    ("errors", "io", "sharding", "optimizers", "losses"),
    ("layers",),
    ("models",),
    ("data", "pretrained", "train_state", "checkpointing", "search"),
    ("kinds", "encoding", "steps", "evaluation", "metric_logging"),
)
# (importer prefix, imported prefix): edges that must not exist at all.
FORBIDDEN = [
    (low, high)
    for low in ("layers", "models")
    for high in (
        "data",
        "pretrained",
        "checkpointing",
        "train_state",
        "evaluation",
    )
]


def _top(module: str) -> str:
  """retrieval_jax.a.b -> a ("" for the package itself)."""
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else ""


def _layer(module: str) -> int:
  top = _top(module)
  for i, names in enumerate(LAYERS):
    if top in names:
      return i
  return len(LAYERS)


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: pathlib.Path = PACKAGE) -> dict[str, dict[str, int]]:
  """{module: {imported project module: line}} for every .py file.

  `from retrieval_jax.x import y` counts as importing retrieval_jax.x.y when
  y is a module, else retrieval_jax.x; imports of anything outside the
  project are left out, except experiments / configs (kept as top names).
  """
  graph = {}
  for path in sorted(package.rglob("*.py")):
    module = _module_name(path)
    edges = graph.setdefault(module, {})
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module:
        base = node.module
        if node.level:
          pkg = module.split(".")
          pkg = pkg if path.name == "__init__.py" else pkg[:-1]
          base = ".".join(pkg[: len(pkg) - node.level + 1] + [base])
        names = []
        for a in node.names:
          sub = package.parent / base.replace(".", "/") / a.name
          is_module = sub.with_suffix(".py").is_file() or sub.is_dir()
          names.append(f"{base}.{a.name}" if is_module else base)
      else:
        continue
      for name in names:
        if name.split(".")[0] in ("retrieval_jax", "experiments", "configs"):
          if name != module:
            edges.setdefault(name, node.lineno)
  return graph


def _circles(graph) -> list[list[str]]:
  """Strongly connected groups of more than one module (Tarjan)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph.get(v, {}):
      if w not in graph:
        continue
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      group = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        group.append(w)
        if w == v:
          break
      if len(group) > 1:
        out.append(sorted(group))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def violations(graph) -> list[str]:
  """Every forbidden edge of `graph`, as 'importer:line -> imported'."""
  bad = []
  for module, edges in graph.items():
    for target, line in edges.items():
      where = f"{module}:{line} -> {target}"
      if target.split(".")[0] in ("experiments", "configs"):
        bad.append(f"{where} (the library never imports {target})")
        continue
      if module.endswith("__init__"):
        continue
      if _top(module) == "losses" and _top(target) != "losses":
        bad.append(f"{where} (losses/ imports only itself)")
      elif any(
          _top(module) == low and _top(target) == high
          for low, high in FORBIDDEN
      ):
        bad.append(f"{where} (models and layers stay below the data side)")
      elif _layer(target) > _layer(module):
        bad.append(
            f"{where} (layer {_layer(module)} imports layer {_layer(target)})"
        )
  return sorted(bad)


class ArchitectureTest(absltest.TestCase):

  def test_no_forbidden_import(self):
    self.assertEqual(violations(import_graph()), [])

  def test_no_import_circle(self):
    self.assertEqual(_circles(import_graph()), [])

  def test_the_checks_catch_bad_edges(self):
    # The walker sees every kind of import, and each rule fires.
    graph = {
        "retrieval_jax.models.colbert": {"retrieval_jax.data.features": 3},
        "retrieval_jax.losses.listwise": {"retrieval_jax.layers.core": 4},
        "retrieval_jax.search.x": {"experiments.cur_knn.run": 5},
        "retrieval_jax.data.a": {
            "retrieval_jax.encoding": 6,
            "retrieval_jax.models.colbert": 7,
        },
    }
    self.assertLen(violations(graph), 4)
    self.assertEqual(
        _circles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {}}),
        [["a", "b", "c"]],
    )
    graph = import_graph()
    self.assertIn("retrieval_jax.kinds.base", graph["retrieval_jax.kinds"])
    self.assertIn("retrieval_jax.losses", graph["retrieval_jax.kinds.base"])


if __name__ == "__main__":
  absltest.main()
