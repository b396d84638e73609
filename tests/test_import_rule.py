"""Import rules: the engine imports no orchestration or tracking package, and no module circles.

1. ``leapcore/`` imports no orchestration or tracking package, not even lazily.

An AST walk over every ``.py`` file under ``leapcore/``: every ``import`` / ``from ... import`` node
(module level, inside functions, classes, ``try`` and ``if`` blocks alike) and every
``importlib.import_module("...")`` / ``__import__("...")`` with a literal name. The one exception is
named here: :data:`ALLOWED` (the MLflow model source reads the registry, so it imports ``mlflow``).
Registry *writing* (``tasks.mlflow_models``), the CLI (``leapcli``), tasks, flows and deployments
are the pipeline side.

2. No import cycle among the project's modules (``leapcore``, ``tasks``, ``flows``, ``leapcli``,
``deployments``): the same walk, function-local imports included (a cycle hidden in a function is
still a cycle, and only works because of the order modules happen to load in). Not edges: imports
under ``if TYPE_CHECKING:`` (never run) and the implicit import of a parent package, as in grimp.
Registries that load their plug-ins by a name held in data (``SECTION_MODULES``, attribution's
``BUILTIN_MODULES``, ``importlib.import_module(name)`` over a tuple) are late binding, not edges; a
literal ``import_module("x.y")`` is an edge.
"""

from __future__ import annotations

import ast
import shutil
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FORBIDDEN = frozenset(
    {"tasks", "flows", "deployments", "leapcli", "prefect", "prefect_dask", "wandb", "mlflow"}
)
#: (file relative to the repository root, top-level package) pairs that may import it anyway.
ALLOWED = frozenset({("leapcore/sources/mlflow.py", "mlflow")})
_DYNAMIC = {"import_module", "__import__"}


def _imported(node: ast.AST) -> list[str]:
    """The absolute module names ``node`` imports (relative imports stay inside leapcore)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        return [node.module] if node.level == 0 and node.module else []
    if isinstance(node, ast.Call) and node.args:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        first = node.args[0]
        if name in _DYNAMIC and isinstance(first, ast.Constant) and isinstance(first.value, str):
            return [first.value]
    return []


def violations(root: Path) -> list[str]:
    """``file:line imports module`` for each forbidden import under ``root/leapcore``."""
    found = []
    for path in sorted((root / "leapcore").rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
        for node in ast.walk(tree):
            for module in _imported(node):
                top = module.split(".")[0]
                if top in FORBIDDEN and (rel, top) not in ALLOWED:
                    found.append(f"{rel}:{node.lineno} imports {module}")
    return sorted(found)


def test_the_engine_imports_no_orchestration_or_tracking_package() -> None:
    bad = violations(ROOT)
    assert not bad, "leapcore/ must not import these (move the code to the pipeline side):\n" + (
        "\n".join(bad)
    )


def test_the_named_exception_is_still_needed() -> None:
    """An exception that no longer matches an import would silently widen the rule."""
    for rel, top in ALLOWED:
        tree = ast.parse((ROOT / rel).read_text(encoding="utf-8"))
        modules = {m.split(".")[0] for node in ast.walk(tree) for m in _imported(node)}
        assert top in modules, f"{rel} no longer imports {top}: drop it from ALLOWED"


def test_the_walk_finds_lazy_imports_anywhere(tmp_path: Path) -> None:
    """The broken variants: forbidden imports hidden inside functions, classes, try blocks and
    ``importlib`` calls in a copy of leapcore/ are each reported with their file and line."""
    shutil.copytree(
        ROOT / "leapcore",
        tmp_path / "leapcore",
        ignore=shutil.ignore_patterns("__pycache__", "*.html", "*.json", "*.yaml"),
    )
    rng = tmp_path / "leapcore" / "rng.py"
    base = len(rng.read_text().splitlines())
    rng.write_text(
        rng.read_text()
        + "\n\ndef _log_to_wandb():\n"  # base + 3
        + "    import wandb\n"  # base + 4
        + "\n\nclass _Hidden:\n"  # base + 7
        + "    def go(self):\n"
        + "        try:\n"
        + "            from tasks.stages import run_stage\n"  # base + 10
        + "        except ImportError:\n"
        + "            pass\n"
        + "        import importlib\n"
        + "        importlib.import_module('prefect.deployments')\n"  # base + 14
        + "        return __import__('leapcli.cli')\n"  # base + 15
    )
    sources = tmp_path / "leapcore" / "sources" / "__init__.py"
    n = len(sources.read_text().splitlines())
    sources.write_text(sources.read_text() + "\n\ndef _f():\n    import mlflow.pyfunc\n")
    source_mlflow = tmp_path / "leapcore" / "sources" / "mlflow.py"
    m = len(source_mlflow.read_text().splitlines())
    source_mlflow.write_text(source_mlflow.read_text() + "\n\ndef _g():\n    import wandb\n")

    assert violations(tmp_path) == sorted(
        [
            f"leapcore/rng.py:{base + 4} imports wandb",
            f"leapcore/rng.py:{base + 10} imports tasks.stages",
            f"leapcore/rng.py:{base + 14} imports prefect.deployments",
            f"leapcore/rng.py:{base + 15} imports leapcli.cli",
            # mlflow is allowed in sources/mlflow.py only, and only mlflow is allowed there
            f"leapcore/sources/__init__.py:{n + 4} imports mlflow.pyfunc",
            f"leapcore/sources/mlflow.py:{m + 4} imports wandb",
        ]
    )


# --------------------------------------------------------------------------------------------- #
# 2. No import cycles
# --------------------------------------------------------------------------------------------- #
PACKAGES = ("leapcore", "tasks", "flows", "leapcli", "deployments")


def project_modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of :data:`PACKAGES` under ``root``."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return getattr(test, "id", None) == "TYPE_CHECKING" or getattr(test, "attr", None) == (
        "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST) -> list[tuple[ast.AST, bool]]:
    """Every import node (and literal dynamic import) with whether it sits inside a function."""
    found: list[tuple[ast.AST, bool]] = []

    def visit(node: ast.AST, local: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                for other in child.orelse:
                    visit_one(other, local)
                continue
            visit_one(child, local)

    def visit_one(child: ast.AST, local: bool) -> None:
        if isinstance(child, (ast.Import, ast.ImportFrom)) or _imported(child):
            found.append((child, local))
        inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        visit(child, inner)

    visit(tree, False)
    return found


def import_edges(root: Path) -> list[tuple[str, str, int, bool]]:
    """``(importer, imported, line, function_local)`` between project modules under ``root``."""
    modules = project_modules(root)
    edges = []
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node, local in _import_nodes(tree):
            targets = list(_imported(node))
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package[: len(package) - (node.level - 1)]
                    base = ".".join(parent + ([base] if base else []))
                # ``from a import b`` imports the module a.b when there is one, else names of a.
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                    for a in node.names
                ]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.append((name, target, node.lineno, local))
    return edges


def import_cycles(root: Path) -> list[list[str]]:
    """One cycle (``a -> b -> ... -> a``, with the lines) per strongly connected group of modules."""
    graph: dict[str, dict[str, str]] = defaultdict(dict)
    for a, b, line, local in import_edges(root):
        graph[a].setdefault(b, f"{b} (line {line}{', in a function' if local else ''})")
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(project_modules(root)):
        if v not in index:
            connect(v)
    cycles = []
    for group in groups:
        start, members = group[0], set(group)
        path, seen = [start], {start}
        while True:  # walk inside the group until the path returns to a module on it
            step = next(w for w in sorted(graph[path[-1]]) if w in members)
            if step in seen:
                loop = path[path.index(step) :] + [step]
                cycles.append(
                    [loop[0]] + [graph[a][b] for a, b in zip(loop, loop[1:], strict=False)]
                )
                break
            path.append(step)
            seen.add(step)
    return cycles


def test_no_import_cycles_among_the_projects_modules() -> None:
    cycles = import_cycles(ROOT)
    assert not cycles, "import cycles (move what both sides need into a module of its own):\n" + (
        "\n".join(" -> ".join(c) for c in cycles)
    )


def test_the_cycle_walk_sees_cycles_in_functions_and_across_packages(tmp_path: Path) -> None:
    """The broken variants: a function-local import closing a circle inside leapcore, a module-level
    one between tasks modules, a relative one, and a TYPE_CHECKING-only one (not a cycle)."""
    for package in PACKAGES:
        shutil.copytree(
            ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    assert import_cycles(tmp_path) == []

    def append(rel: str, text: str) -> None:
        path = tmp_path / rel
        path.write_text(path.read_text(encoding="utf-8") + text, encoding="utf-8")

    append("leapcore/naming.py", "\n\ndef _f():\n    from leapcore.report import audit_metrics\n")
    append("tasks/stage_outputs.py", "\nfrom tasks.stages import stage_task  # noqa\n")
    append("leapcore/sources/base.py", "\n\ndef _g():\n    from . import files  # noqa\n")
    append(
        "leapcore/isolation_methods.py",
        "\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import leapcore.hipe\n",
    )
    found = {c[0]: " -> ".join(c) for c in import_cycles(tmp_path)}
    assert set(found) == {"leapcore.naming", "leapcore.sources.base", "tasks.audit_io"}, found
    assert "in a function" in found["leapcore.naming"]
    assert "tasks.stage_outputs" in found["tasks.audit_io"]
    assert "leapcore.sources.files" in found["leapcore.sources.base"]
