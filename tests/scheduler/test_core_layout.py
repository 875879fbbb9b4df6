"""The scheduler core's shape: standard library only (and the pure sampling module), imports
that form a DAG, and no duck typing of policies."""

from __future__ import annotations

import ast
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

CORE = Path(__file__).resolve().parents[2] / "services" / "scheduler" / "core"
PACKAGE = "services.scheduler.core"
ALLOWED_OUTSIDE = {"services.common.sampling"}


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports, TYPE_CHECKING blocks included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def core_modules() -> dict[str, set[str]]:
    return {path.stem: imports_of(path) for path in CORE.glob("*.py") if path.stem != "__init__"}


def test_core_imports_only_the_standard_library_and_itself():
    for name, imports in core_modules().items():
        for module in imports:
            top = module.split(".")[0]
            inside = module.startswith(PACKAGE + ".") or module in ALLOWED_OUTSIDE
            assert inside or top in sys.stdlib_module_names, f"{name} imports {module}"


def test_core_imports_form_a_dag():
    graph = {
        name: {m.removeprefix(PACKAGE + ".") for m in imports if m.startswith(PACKAGE + ".")}
        for name, imports in core_modules().items()
    }
    try:
        order = list(TopologicalSorter(graph).static_order())
    except CycleError as exc:
        raise AssertionError(f"import cycle in the core: {exc.args[1]}") from exc
    assert order.index("job") < order.index("policy") < order.index("scheduler")


def test_core_asks_policies_through_the_protocol_not_getattr():
    for path in CORE.glob("*.py"):
        assert "getattr(" not in path.read_text(), f"{path.name} uses getattr"
