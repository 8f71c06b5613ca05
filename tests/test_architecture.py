"""The package's imports run one way: no cycles, and inference never reaches training.

Read from the source with ``ast`` (nothing is imported), counting imports inside functions too: a
lazy import is still a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "posterfusion"
INFERENCE = ("predict", "explain", "evaluate", "serve", "annotate", "report", "audit", "audit_report")
TRAINING = ("train", "finetune")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that ``path`` imports (a name imported from a package counts as its
    submodule where there is one)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {m for m in found if m in modules and m != name}


def graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, modules) for p in paths}


def reachable(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, stack = set(), [start]
    while stack:
        for nxt in edges[stack.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def test_the_graph_is_read() -> None:
    edges = graph()
    assert "posterfusion.model" in edges["posterfusion.predict"]
    assert "posterfusion.finetune" in edges["posterfusion.train"]  # a lazy import, inside a function
    assert "posterfusion.detectors.schema" in edges["posterfusion.train"]


def test_no_import_cycles() -> None:
    edges = graph()
    cycles = sorted(m for m in edges if m in reachable(edges, m))
    assert cycles == [], f"modules that import themselves through others: {cycles}"


@pytest.mark.parametrize("module", INFERENCE)
def test_inference_never_reaches_training(module: str) -> None:
    edges = graph()
    reached = reachable(edges, f"posterfusion.{module}")
    assert not reached & {f"posterfusion.{m}" for m in TRAINING}, f"{module} reaches {sorted(reached & {f'posterfusion.{m}' for m in TRAINING})}"
