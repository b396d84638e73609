"""The engine rule: ``leapcore/`` imports no orchestration or tracking package, not even lazily.

An AST walk over every ``.py`` file under ``leapcore/``: every ``import`` / ``from ... import`` node
(module level, inside functions, classes, ``try`` and ``if`` blocks alike) and every
``importlib.import_module("...")`` / ``__import__("...")`` with a literal name. The one exception is
named here: :data:`ALLOWED` (the MLflow model source reads the registry, so it imports ``mlflow``).
Registry *writing* (``tasks.mlflow_models``), the CLI (``leapcli``), tasks, flows and deployments
are the pipeline side.
"""

from __future__ import annotations

import ast
import shutil
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
