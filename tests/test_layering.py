"""The package layering of docs/ARCHITECTURE.md, checked on the source (imports anywhere in a module,
including those inside functions): no import cycles among vitscale/, data_tools/ and launch/ modules;
vitscale.models imports no deepspeed/mlflow/ray/hydra; vitscale.engine imports no CLI module and no mlflow.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("vitscale", "data_tools", "launch")
CLI_MODULES = {"vitscale.train", "vitscale.evaluate", "vitscale.plan.__main__", "launch.sweep", "data_tools.shard",
               "data_tools.verify"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module name imported by ``path`` (absolute and relative, top level or inside functions);
    imports under ``if TYPE_CHECKING:`` are for the type checker only and are left out."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for child in node.body for n in ast.walk(child))
    me = module_name(path).split(".")
    package = me if path.name == "__init__.py" else me[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return found


def graph(root: Path = REPO) -> dict[str, set[str]]:
    modules = {module_name(p): p for pkg in PACKAGES for p in (root / pkg).rglob("*.py")}
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for imp in imports_of(path):
            while imp and imp not in modules:  # `from pkg import name` may name an attribute
                imp = imp.rpartition(".")[0]
            if imp and imp != name and not name.startswith(imp + "."):  # a package's own __init__
                targets.add(imp)
        edges[name] = targets
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles() -> None:
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def _imports_under(package: str) -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in (REPO / package.replace(".", "/")).rglob("*.py")}


def test_models_know_nothing_of_the_engine_or_the_infrastructure() -> None:
    banned = ("deepspeed", "mlflow", "ray", "hydra", "omegaconf", "vitscale.engine", "vitscale.tracking")
    for module, imps in _imports_under("vitscale.models").items():
        bad = {i for i in imps if i.split(".")[0] in banned or i.startswith(banned)}
        assert not bad, f"{module} imports {sorted(bad)}"


def test_engine_imports_no_cli_and_no_mlflow() -> None:
    """The engine receives local paths and the Tracker it is given: of vitscale.tracking it may import
    the interface (vitscale.tracking.base, which imports no MLflow) and nothing else; of the entry
    level (vitscale.start, the CLIs) nothing; and no omegaconf / hydra (it takes a typed JobConfig)."""
    for module, imps in _imports_under("vitscale.engine").items():
        bad = {i for i in imps if i.split(".")[0] in ("mlflow", "hydra", "omegaconf") or i in CLI_MODULES
               or i.startswith("vitscale.start")
               or (i.startswith("vitscale.tracking") and not i.startswith("vitscale.tracking.base"))}
        assert not bad, f"{module} imports {sorted(bad)}"


def test_the_tracking_interface_imports_no_mlflow() -> None:
    imps = imports_of(REPO / "vitscale" / "tracking" / "base.py")
    assert not {i for i in imps if i.split(".")[0] == "mlflow" or i.startswith("vitscale.tracking.registry")}
