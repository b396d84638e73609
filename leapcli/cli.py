"""``leap``: audit a model, explain images, run the demo, serve the deployments.

    leap audit MODEL_URI --classes 1 2 tabby --config cfg.json
    leap explain MODEL_URI photo.jpg photos/ --classes tabby
    leap demo
    leap serve          # the deployments of deployments/prefect.yaml, from one process
    leap services       # how to start Prefect and MLflow servers on 127.0.0.1 (was: leap server)

The pipeline side of the project (the engine, :mod:`leapcore`, imports nothing from here).
Prefect, MLflow and W&B are imported inside the subcommands only, so ``leap --help`` stays fast.
Without ``PREFECT_API_URL`` Prefect starts a temporary local server; without
``MLFLOW_TRACKING_URI`` MLflow uses ``mlflow.db`` in the working folder; without a W&B key, W&B
runs offline.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from leapcli.demo import DEMO_CLASSES, DEMO_CONFIG, register_demo_model
from leapcli.diff import add_diff_parser
from leapcli.progress import ProgressDisplay, say
from leapcli.skip import EXPLAIN_SKIP, skip_help
from leapcore import __version__

log = logging.getLogger(__name__)

STARTED = time.perf_counter()  # the console script imports this module first: wall time from here


class _Formatter(argparse.HelpFormatter):
    """Wraps help text like argparse, but keeps its line breaks (the list of --skip stages)."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        import textwrap

        lines: list[str] = []
        for line in text.splitlines():
            indent = " " * (len(line) - len(line.lstrip()))
            lines += textwrap.wrap(line, width, subsequent_indent=indent + "  ") or [""]
        return lines


# Loggers of the services whose INFO lines (MLflow's "Created version", alembic's migrations of a
# new SQLite store, Prefect's temporary-server banner) belong to --verbose only.
FOREIGN_LOGGERS = ("mlflow", "alembic", "prefect", "httpx", "urllib3", "wandb", "distributed")


def _add_run_options(
    parser: argparse.ArgumentParser,
    skip_names: tuple[str, ...] | None = None,
    classes_default: str = "class 0, as leap-ie's generate",
) -> None:
    parser.add_argument(
        "--classes",
        nargs="+",
        metavar="CLASS",
        help="target classes: indices or names, separated by spaces or commas (--classes 1 2 or "
        "--classes 1,2); quote a name with spaces (--classes \"golden retriever\" tabby); 'a+b' "
        f"for a hybrid of two classes. Default: {classes_default}",
    )
    parser.add_argument("--config", metavar="FILE", help="JSON file of engine options")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="OPTION=VALUE",
        help="set one engine option (value in JSON, e.g. --set max_steps=200); repeatable",
    )
    parser.add_argument(
        "--skip", nargs="+", default=[], metavar="STAGE", help=skip_help(skip_names)
    )
    parser.add_argument("--store", metavar="URI", help="artifact store (folder or s3://, gs://)")
    parser.add_argument("--experiment", help="MLflow experiment (default leapcore-audits)")
    parser.add_argument("--wandb-project", help="W&B project (default the config's project_name)")
    parser.add_argument(
        "--class-list", metavar="FILE", help="class names (one a line, or a JSON list)"
    )
    parser.add_argument(
        "--trusted", action="store_true", help="allow loading pickled models (runs their code)"
    )
    parser.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: the best available)")
    parser.add_argument("--output-dir", help="where the report, tables and images are written")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show Prefect's, MLflow's and W&B's own log lines and full tracebacks",
    )


def _config(args: argparse.Namespace, base: dict[str, Any] | None = None) -> dict[str, Any]:
    config: dict[str, Any] = dict(base or {})
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise SystemExit(f"leap: config file {args.config!r} does not exist.")
        try:
            loaded = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise SystemExit(
                f"leap: {args.config} is not valid JSON: {err.msg} at line {err.lineno}."
            ) from None
        if not isinstance(loaded, dict):
            raise SystemExit(f"leap: {args.config} must hold a JSON object of options.")
        config.update(loaded)
    for item in args.set:
        if "=" not in item:
            raise SystemExit(f"leap: --set takes OPTION=VALUE, not {item!r}.")
        key, raw = item.split("=", 1)
        try:
            config[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            config[key.strip()] = raw
    return config


def _model_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if args.class_list:
        options["class_list"] = args.class_list
    if args.trusted:
        options["trusted"] = True
    return options


def _classes(values: list[str] | None) -> list[Any] | None:
    """``--classes`` values: split at commas, indices as ints, names as they are."""
    if not values:
        return None
    items = [part.strip() for value in values for part in value.split(",")]
    return [int(v) if v.lstrip("-").isdigit() else v for v in items if v]


def _announce_classes(values: list[str] | None, command: str) -> None:
    """Say which classes an audit targets when the user named none, and why."""
    if values:
        return
    if command == "audit":
        say(
            "No --classes given: auditing class 0, the default of leap-ie's generate. Name the "
            "classes to audit with --classes (indices or names)."
        )


def _hint(err: BaseException, values: list[str] | None) -> str:
    """A hint for a class name split at its spaces (``--classes golden retriever``)."""
    words = [v for v in (values or []) if not v.lstrip("-").isdigit()]
    if "no class named" in str(err) and len(words) > 1:
        joined = " ".join(words[:2])
        return f'\nhint: a class name with spaces needs quotes: --classes "{joined}"'
    return ""


def _quiet(verbose: bool) -> None:
    """Keep the terminal for progress and results (set before Prefect is imported)."""
    if not verbose:
        # Prefect's console handler only (the Prefect UI still gets every log line): an error is
        # reported once, plainly, by `leap`; -v shows Prefect's own lines and tracebacks.
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # The temporary server's telemetry heartbeat races its own SQLite database at start-up and
    # prints "database is locked" tracebacks; nothing is lost without it.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The temporary server can take over 30 s to start on a busy 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("WANDB_SILENT", "true")
    if not verbose:
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        for name in FOREIGN_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)


def _wall() -> float:
    return time.perf_counter() - STARTED


def _predictions(result: Any, top: int = 3) -> list[str]:
    """``name: class (p), class (p), class (p)`` per explained image, from its samples table."""
    folder = Path(result.output_dir or ".")
    path = folder / "tables" / "samples.parquet"
    model = folder / "tables" / "model.parquet"
    if not path.is_file():
        return []
    import numpy as np
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    if "logits" not in table.column_names:
        return []
    names: list[str] = []
    if model.is_file():
        card = pq.read_table(model)
        if "class_name" in card.column_names:
            names = [str(n) for n in card.column("class_name").to_pylist()]
    lines = []
    for name, logits in zip(table.column("name").to_pylist(), table.column("logits").to_pylist()):
        values = np.asarray(logits, dtype=np.float64)
        probs = np.exp(values - values.max())
        probs /= probs.sum()
        best = np.argsort(-probs)[:top]
        shown = ", ".join(
            f"{names[i] if i < len(names) else i} ({probs[i]:.3f})" for i in best.tolist()
        )
        lines.append(f"{name}: {shown}")
    return lines


def _report(result: Any, as_json: bool, kind: str = "audit") -> None:
    if as_json:
        say(
            json.dumps(
                {
                    "flow_run_id": result.flow_run_id,
                    "model_uri": result.model_uri,
                    "model_digest": result.model_digest,
                    "targets": result.targets,
                    "stages": result.stages,
                    "metrics": result.metrics,
                    "report_path": result.report_path,
                    "output_dir": result.output_dir,
                    "mlflow_run_id": result.mlflow_run_id,
                    "mlflow_tracking_uri": result.mlflow_tracking_uri,
                    "wandb_run_dir": result.wandb_run_dir,
                    "wandb_sync_command": result.wandb_sync_command,
                    "seconds": result.seconds,
                    "wall_seconds": _wall(),
                },
                indent=2,
            )
        )
        return
    say()
    if kind == "explain":
        lines = _predictions(result)
        if lines:
            say("Top classes per image:")
            for line in lines:
                say(f"  {line}")
    elif result.target_names:
        say(f"Audited: {', '.join(result.target_names)}.")
    say(f"Done in {_wall():.0f} s (wall time). Where to look:")
    for line in result.where_to_look():
        say(f"  {line}")


def _fail(err: BaseException, verbose: bool, classes: list[str] | None = None) -> int:
    if verbose:
        raise err
    sys.stderr.write(f"leap: {type(err).__name__}: {err}{_hint(err, classes)}\n")
    return 1


# ---------------------------------------------------------------------------------------------- #
# Subcommands
# ---------------------------------------------------------------------------------------------- #
def _run_flow(
    args: argparse.Namespace, flow: Any, *positional: Any, check: Any = None, **options: Any
) -> int:
    """Run ``flow`` with the options ``audit`` and ``explain`` share, then print where results went.

    ``check()`` validates the input first, before Prefect starts a temporary server or an
    MLflow run opens, so a typo costs seconds and leaves nothing behind.
    """
    from leapcli.signals import say_stopped, stop_on_signals

    stopped_by: list[str] = []
    kind = "explain" if "images" in args else "audit"
    if not args.json:
        _announce_classes(args.classes, kind)
    try:
        if check is not None:
            check()
        stopped_by = stop_on_signals()
        with ProgressDisplay(not args.no_progress and not args.json):
            result = flow(
                *positional,
                target_classes=_classes(args.classes),
                config=_config(args),
                skip=args.skip,
                artifact_store=args.store,
                experiment=args.experiment,
                wandb_project=args.wandb_project,
                model_options=_model_options(args),
                device=args.device,
                output_dir=args.output_dir,
                **options,
            )
    except BaseException as err:
        from leapcore import stopping

        # SIGTERM, SIGINT (KeyboardInterrupt) or Prefect's TerminationSignal. What follows a signal
        # may fail too (Ctrl-C also stops Prefect's server): the signal is what the user must hear.
        signalled = stopped_by or type(err).__name__ in ("KeyboardInterrupt", "TerminationSignal")
        if signalled:
            # Stages still running in worker threads end at their next step, so the process can
            # exit. Only for a signal: an ordinary error must not stop later runs of this process.
            stopping.request_stop("the CLI is exiting")
        if not signalled:
            if isinstance(err, Exception):
                return _fail(err, args.verbose, args.classes)
            raise
        term = type(err).__name__ == "TerminationSignal"
        name = stopped_by[0] if stopped_by else ("SIGTERM" if term else "SIGINT")
        say_stopped(name)
        return 128 + int(getattr(signal, name, signal.SIGINT))
    _report(result, args.json, kind)
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    _quiet(args.verbose)
    if args.no_scan:
        args.skip = [*args.skip, "scan_spurious"]
    from flows.audit import audit_model, check_inputs

    return _run_flow(
        args,
        audit_model,
        args.model_uri,
        check=lambda: check_inputs(
            args.model_uri,
            _config(args),
            args.skip,
            args.store,
            _model_options(args),
            args.task_runner,
            args.output_dir,
            args.samples,
            args.methods,
        ),
        class_chunk_size=args.chunk_size,
        task_runner=args.task_runner,
        samples=args.samples,
        methods=args.methods,
    )


def cmd_explain(args: argparse.Namespace) -> int:
    _quiet(args.verbose)
    from flows.explain import check_inputs, check_relmax, explain_samples
    from tasks.attribution import check_methods

    def check() -> None:
        # an unknown method, or RelMax without CRP, is refused before anything starts too
        check_relmax(args.relmax, check_methods(args.methods), args.relmax_count)
        check_inputs(
            args.model_uri,
            args.images,
            _config(args),
            args.skip,
            args.store,
            _model_options(args),
            args.output_dir,
        )

    options = {"methods": args.methods, "relmax": args.relmax, "relmax_count": args.relmax_count}
    return _run_flow(args, explain_samples, args.model_uri, args.images, check=check, **options)


def cmd_demo(args: argparse.Namespace) -> int:
    _quiet(args.verbose)
    began = time.perf_counter()
    from flows.audit import audit_model

    config = dict(DEMO_CONFIG)
    if args.max_steps is not None:
        config["max_steps"] = args.max_steps
    if args.isolation_steps is not None:
        config["isolation_steps"] = args.isolation_steps
    try:
        uri = register_demo_model()
        classes = args.classes or DEMO_CLASSES
        say(f"Auditing {uri} for {', '.join(map(str, classes))} ({config['max_steps']} steps) ...")
        with ProgressDisplay(not args.no_progress):
            result = audit_model(
                uri,
                target_classes=_classes(classes),
                config=config,
                skip=args.skip,
                artifact_store=args.store,
                output_dir=args.output_dir,
            )
    except Exception as err:
        return _fail(err, args.verbose, args.classes)
    result.seconds = time.perf_counter() - began
    _report(result, False)
    return 0


def cmd_serve(args: argparse.Namespace, rest: list[str]) -> int:
    try:
        from deployments.serve import main as serve_main
    except ImportError as err:
        sys.stderr.write(
            "leap serve needs deployments/serve.py (the deployments of deployments/prefect.yaml), "
            f"which is not available here ({err}). Run it from a checkout of the leapcore "
            "repository, or start the flows from Python: from flows import audit_model.\n"
        )
        return 2
    return int(serve_main(rest) or 0)


SERVER_HELP = """Long-running servers on this machine (127.0.0.1 only):

  Prefect (flow runs, schedules, the UI on http://127.0.0.1:4200):
    prefect server start --host 127.0.0.1 --port 4200
    export PREFECT_API_URL=http://127.0.0.1:4200/api

  MLflow (tracking, registry, the UI on http://127.0.0.1:5000), on the same store leap uses:
    mlflow server --host 127.0.0.1 --port 5000 \\
        --backend-store-uri sqlite:///$PWD/mlflow.db --artifacts-destination $PWD/mlartifacts
    export MLFLOW_TRACKING_URI=http://127.0.0.1:5000

Then `leap serve` runs the deployments (nightly audit, registry watcher, audit trigger) against
them. Without these servers, `leap audit` uses a temporary Prefect server and the local
mlflow.db; `mlflow ui --backend-store-uri sqlite:///$PWD/mlflow.db` browses the results.
"""


def cmd_services(args: argparse.Namespace) -> int:
    say(SERVER_HELP)
    return 0


def cmd_server(args: argparse.Namespace) -> int:
    """The old name of ``leap services`` (hidden; says the new name)."""
    sys.stderr.write("leap: `leap server` is now `leap services` (next to `leap serve`).\n")
    return cmd_services(args)


# ---------------------------------------------------------------------------------------------- #
# Parser
# ---------------------------------------------------------------------------------------------- #
def build_parser() -> argparse.ArgumentParser:
    """The ``leap`` argument parser (every subcommand has ``--help``)."""
    parser = argparse.ArgumentParser(
        prog="leap",
        description="Interpretability audits for image classifiers: prototypes, entanglement and "
        "feature isolation, registered in MLflow and W&B. No server or account needed.",
    )
    parser.add_argument("--version", action="version", version=f"leap (leapcore) {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    audit = sub.add_parser(
        "audit",
        formatter_class=_Formatter,
        help="audit a model: prototypes, entanglement, isolations -> MLflow, W&B, HTML report",
        description="Audit MODEL_URI (models:/name/version, models:/name@alias, runs:/<id>/<path>, "
        "a model file or folder, or a zoo name such as efficientnet_lite0).",
    )
    audit.add_argument("model_uri", metavar="MODEL_URI")
    _add_run_options(audit)
    audit.add_argument(
        "--chunk-size", type=int, metavar="N", help="classes per prototype/isolation task"
    )
    audit.add_argument(
        "--task-runner",
        default="threads",
        metavar="RUNNER",
        help="threads (default), dask, or a Dask scheduler address",
    )
    audit.add_argument(
        "--samples",
        nargs="+",
        metavar="IMAGE",
        help="your own images (files or folders, any class) for the analysis stages",
    )
    audit.add_argument("--no-scan", action="store_true", help="no spurious-feature scan")
    audit.add_argument(
        "--methods",
        metavar="M1,M2",
        help="attribution maps of the prototypes and samples, comma-separated (e.g. ig,lrp)",
    )
    audit.set_defaults(handler=cmd_audit)

    explain = sub.add_parser(
        "explain",
        formatter_class=_Formatter,
        help="isolate the features behind a model's predictions on your images",
        description="Feature isolation on IMAGE files and folders of images.",
    )
    explain.add_argument("model_uri", metavar="MODEL_URI")
    explain.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders")
    explain.add_argument(
        "--methods",
        metavar="M1,M2",
        help="attribution methods as well, comma-separated (e.g. ig,lrp,crp; see docs/attribution.md)",
    )
    explain.add_argument(
        "--relmax",
        metavar="DIR",
        action="append",
        help="reference images (a folder or files; repeatable): for each concept CRP finds, the "
        "images most relevant for it (RelMax; needs crp in --methods)",
    )
    explain.add_argument("--relmax-count", type=int, default=4, metavar="N", help="per concept")
    _add_run_options(explain, EXPLAIN_SKIP, "each image's top max_isolate_classes predictions")
    explain.set_defaults(handler=cmd_explain)

    demo = sub.add_parser(
        "demo",
        formatter_class=_Formatter,
        help="register the bundled EfficientNet-Lite0 in MLflow and audit a few ImageNet classes",
        description="The main job: register the bundled pretrained EfficientNet-Lite0 in the local "
        "MLflow registry and audit a few ImageNet classes (a few minutes on 2 CPU cores). No "
        "server or account needed.",
    )
    demo.add_argument(
        "--classes", nargs="+", metavar="CLASS", help=f"default: {', '.join(DEMO_CLASSES)}"
    )
    demo.add_argument("--max-steps", type=int, help=f"default {DEMO_CONFIG['max_steps']}")
    demo.add_argument(
        "--isolation-steps", type=int, help=f"default {DEMO_CONFIG['isolation_steps']}"
    )
    demo.add_argument("--skip", nargs="+", default=[], metavar="STAGE", help=skip_help())
    demo.add_argument("--store", metavar="URI", help="artifact store (default .leap/artifacts)")
    demo.add_argument("--output-dir", help="default leap_results/leapcore-demo/<model name>")
    demo.add_argument("--no-progress", action="store_true")
    demo.add_argument("-v", "--verbose", action="store_true")
    demo.set_defaults(handler=cmd_demo)

    serve = sub.add_parser(
        "serve",
        help="serve the deployments of deployments/prefect.yaml from this process",
        description="Serve the audit deployments (schedules, triggers, registry watcher); every "
        "further argument goes to deployments/serve.py (leap serve -- --help).",
        add_help=False,
    )
    serve.set_defaults(handler=None)

    services = sub.add_parser(
        "services",
        help="how to start Prefect and MLflow servers on 127.0.0.1 (for leap serve)",
        description="Print the commands that start Prefect and MLflow servers on 127.0.0.1.",
    )
    services.set_defaults(handler=cmd_services)
    add_diff_parser(sub, _Formatter)
    # The old name, left out of the help (no help=): it prints the new one.
    sub.add_parser("server").set_defaults(handler=cmd_server)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``leap`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "serve":
        rest = argv[1:]
        if rest[:1] == ["--"]:
            rest = rest[1:]
        return cmd_serve(argparse.Namespace(), rest)
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 0 if args.command is None else 2
    # The commands quieten foreign loggers for the terminal; a caller of main() in its own process
    # (a notebook, a test) gets its logging back afterwards.
    levels = {name: logging.getLogger(name).level for name in FOREIGN_LOGGERS}
    try:
        return int(args.handler(args) or 0)
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


if __name__ == "__main__":
    sys.exit(main())
