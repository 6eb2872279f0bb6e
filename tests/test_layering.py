"""The library's imports point one way: pi_jax/ never imports the tools built on it, and its
modules import each other without a cycle. Read from the source with `ast` (nothing imported)."""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "pi_jax")
# Top-level modules and packages of the repository that sit above the library.
FORBIDDEN = ("convert", "train", "eval", "demo", "benchmarks", "configs", "tests")


def _module_name(path: str) -> str:
  rel = os.path.relpath(path, ROOT)[:-len(".py")].split(os.sep)
  return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)


def _modules() -> dict[str, str]:
  out = {}
  for dirpath, _, files in os.walk(PACKAGE):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(dirpath, f)
        out[_module_name(path)] = path
  return out


MODULES = _modules()


def _imports(name: str, path: str) -> list[tuple[str, int]]:
  """(imported module name, line) for every import in the file, at any depth (lazy ones too)."""
  with open(path) as f:
    tree = ast.parse(f.read(), filename=path)
  is_package = path.endswith("__init__.py")
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out += [(alias.name, node.lineno) for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative: resolve against this module's package
        parts = name.split(".")
        parts = parts if is_package else parts[:-1]
        parts = parts[:len(parts) - (node.level - 1)]
        base = ".".join(parts + ([base] if base else []))
      # `from pkg import sub` imports pkg.sub when that is a module, else names in pkg
      for alias in node.names:
        sub = f"{base}.{alias.name}"
        out.append((sub if sub in MODULES else base, node.lineno))
  return out


def _graph() -> dict[str, set[str]]:
  graph = {}
  for name, path in MODULES.items():
    deps = set()
    for imported, _ in _imports(name, path):
      # the most specific pi_jax module the import names
      parts = imported.split(".")
      while parts and ".".join(parts) not in MODULES:
        parts.pop()
      if parts and ".".join(parts) != name:
        deps.add(".".join(parts))
    graph[name] = deps
  return graph


def test_the_package_is_found():
  assert {"pi_jax", "pi_jax.model", "pi_jax.attention", "pi_jax.attention.ring",
          "pi_jax.train.trainer"} <= set(MODULES)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_library_imports_no_tool_above_it(name):
  bad = [(imported, line) for imported, line in _imports(name, MODULES[name])
         if imported.split(".")[0] in FORBIDDEN]
  assert not bad, f"{MODULES[name]} imports {bad} (pi_jax/ must not import {FORBIDDEN})"


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  state: dict[str, int] = {}  # 1 on the stack, 2 done
  stack: list[str] = []

  def visit(node):
    state[node] = 1
    stack.append(node)
    for dep in sorted(graph[node]):
      if state.get(dep) == 1:
        return stack[stack.index(dep):] + [dep]
      if dep not in state:
        found = visit(dep)
        if found:
          return found
    stack.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_no_import_cycle_in_the_library():
  graph = _graph()
  # The package's __init__ re-exports the public API, so no submodule may import it.
  cycle = _find_cycle(graph)
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
  assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert _find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
