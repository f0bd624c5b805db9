"""Data flows one way: exporter -> graphs -> artifact -> runtime, enforced on the source (every import, also the
ones inside functions) and in a fresh interpreter.

- graphs/ imports neither the exporter nor the runtime (it rewrites graphs; the exporter writes artifacts), and
  never torch or transformers;
- runtime/ imports neither the exporter nor graphs, nor torch, transformers, onnx, onnx_ir or onnxscript;
- the exporter's modules import each other without a cycle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"exporter": "gptexport.exporter", "graphs": "gptexport.graphs", "runtime": "gptexport.runtime"}
FORBIDDEN = {
    "graphs": ("gptexport.exporter", "gptexport.runtime", "torch", "transformers"),
    "runtime": ("gptexport.exporter", "gptexport.graphs", "torch", "transformers", "onnx", "onnx_ir", "onnxscript"),
}


def _module_name(path: Path) -> str:
    folder = path.relative_to(ROOT).parts[0]
    parts = [PACKAGES[folder], *path.relative_to(ROOT / folder).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(folder: str) -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((ROOT / folder).rglob("*.py"))}


def imports_of(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module `source` imports, anywhere in it, as absolute names; `from . import x` gives `pkg.x`."""
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # a submodule or a name in it
    return found


def _imports(path: Path) -> set[str]:
    return imports_of(path.read_text(), _module_name(path), path.name == "__init__.py")


def _hits(names: set[str], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(n for n in names if any(n == f or n.startswith(f + ".") for f in forbidden))


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the directed graph `edges` (node -> nodes it imports) as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_source_imports_follow_the_direction(folder):
    bad = {name: hits for name, path in _modules(folder).items()
           if (hits := _hits(_imports(path), FORBIDDEN[folder]))}
    assert not bad, f"{folder}/ must not import {FORBIDDEN[folder]}: {bad}"


def test_exporter_modules_import_each_other_without_a_cycle():
    modules = _modules("exporter")
    edges = {name: {m for m in _imports(path) if m in modules and m != name and m != "gptexport.exporter"}
             for name, path in modules.items()}
    assert find_cycle(edges) is None, f"import cycle between exporter modules: {' -> '.join(find_cycle(edges))}"


def test_the_checks_see_what_they_must():
    """Not vacuous: a function-level relative import is resolved, a forbidden one is seen, a cycle is found."""
    names = imports_of("def f():\n    from .build import export\n    from . import stream\n",
                       "gptexport.exporter.validate")
    assert {"gptexport.exporter.build", "gptexport.exporter.stream"} <= names
    names = imports_of("def f():\n    from ..exporter import build\n", "gptexport.graphs.shared_kv")
    assert _hits(names, FORBIDDEN["graphs"]) == ["gptexport.exporter", "gptexport.exporter.build"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


_PROBE = """
import sys
class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers") or name.startswith(("gptexport.exporter",
                                                                                "gptexport.runtime")):
            raise ImportError(f"blocked: {name}")
sys.meta_path.insert(0, Blocked())
import pkgutil, importlib, gptexport.graphs
for info in pkgutil.walk_packages(gptexport.graphs.__path__, "gptexport.graphs."):
    importlib.import_module(info.name)
leaked = [m for m in sys.modules if m.split(".")[0] in ("torch", "transformers")
          or m.startswith(("gptexport.exporter", "gptexport.runtime"))]
assert not leaked, leaked
print("ok")
"""


def test_graphs_import_without_torch_exporter_or_runtime():
    done = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
