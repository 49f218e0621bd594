"""Who may import whom: the worker never imports the trainer, Keras or export code (its image
serves models, it does not make them), and no import cycle runs through the worker or trainer."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _modules(package: str) -> list[str]:
    root = REPO / package
    return sorted(".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
                  for p in root.rglob("*.py"))


def _imports(module: str) -> set[str]:
    """Every module ``module`` imports, at module level or inside a function (lazy imports close
    cycles just the same)."""
    path = REPO / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = REPO / module.replace(".", "/") / "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # `from worker import runtimes`
    return found


def _graph(packages=("worker", "trainer")) -> dict[str, set[str]]:
    known = {m for p in packages for m in _modules(p)}
    graph = {}
    for m in known:
        edges = {i for i in _imports(m) if i in known and i != m}
        # importing a.b.c runs a/__init__ and a/b/__init__ first
        edges |= {".".join(i.split(".")[:n]) for i in set(edges) for n in range(1, i.count(".") + 1)} & known
        graph[m] = edges - {m} - {".".join(m.split(".")[:n]) for n in range(1, m.count(".") + 1)}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = "done"
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycle_in_worker_or_trainer():
    assert _cycle(_graph()) is None, " -> ".join(_cycle(_graph()))


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("module", _modules("worker"))
def test_worker_module_never_imports_trainer_or_keras(module):
    """In a fresh interpreter (so nothing imported by another test hides it)."""
    code = (f"import sys, {module}; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('trainer', 'keras', 'tensorflow')); "
            "assert not bad, bad")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, timeout=120, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_worker_source_holds_no_trainer_keras_or_export_code():
    """Lazy imports too: no worker module imports trainer or keras anywhere, nor exports a model."""
    for module in _modules("worker"):
        imports = _imports(module)
        assert not {i for i in imports if i.split(".")[0] in ("trainer", "keras")}, module
        source = (REPO / (module.replace(".", "/") + ".py")).read_text(encoding="utf-8") \
            if (REPO / (module.replace(".", "/") + ".py")).exists() else ""
        assert "saved_model.save(" not in source and ".export(" not in source, module
