"""No import circle inside psipo_jax, at module level or inside functions.

The graph is read from the source with `ast` (nothing is imported): an edge
a → b for every `import psipo_jax.b`, `from psipo_jax.b import x` and
`from psipo_jax import b` (b a module or package) anywhere in module a,
relative imports resolved. A circle is reported as the path that closes it.
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "psipo_jax"


def _modules() -> dict[str, pathlib.Path]:
  modules = {}
  for path in sorted((ROOT / PACKAGE).rglob("*.py")):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    modules[".".join(parts)] = path
  return modules


def _imports(name: str, path: pathlib.Path, modules: dict) -> set[str]:
  is_package = path.name == "__init__.py"
  targets = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      candidates = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      if node.level:  # Relative: resolve against this module's package.
        base = name.split(".")
        base = base if is_package else base[:-1]
        base = base[: len(base) - node.level + 1]
        module = ".".join(base + ([node.module] if node.module else []))
      else:
        module = node.module or ""
      candidates = [f"{module}.{alias.name}" for alias in node.names] + [module]
    else:
      continue
    for candidate in candidates:
      # The longest known module the name refers to (a submodule, else its package).
      while candidate and candidate not in modules:
        candidate = candidate.rpartition(".")[0]
      if candidate and candidate != name:
        targets.add(candidate)
        break
  return targets


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == "open":
        return stack[stack.index(nxt) :] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    stack.pop()
    state[node] = "done"
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_the_checker_finds_a_planted_circle():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
  assert _find_cycle(graph) == ["a", "b", "c", "a"]
  assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_graph_sees_every_kind_of_import(tmp_path):
  modules = {
    "psipo_jax": None,
    "psipo_jax.x": None,
    "psipo_jax.pkg": None,
    "psipo_jax.pkg.y": None,
  }
  source = tmp_path / "m.py"
  source.write_text(
    "import psipo_jax.x\n"
    "def f():\n  from psipo_jax.pkg import y\n"
    "from . import x\n"
  )
  assert _imports("psipo_jax.m", source, modules) == {
    "psipo_jax.x",
    "psipo_jax.pkg.y",
  }


def test_no_import_circle_in_the_package():
  modules = _modules()
  graph = {
    name: _imports(name, path, modules) for name, path in modules.items()
  }
  assert len(graph) > 30  # The walk found the package.
  cycle = _find_cycle(graph)
  assert cycle is None, "import circle: " + " -> ".join(cycle)
