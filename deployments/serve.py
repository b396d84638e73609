"""``leap serve``: serve the deployments of ``deployments/prefect.yaml`` from one local process.

For teams without a work pool: the schedules (nightly alias audit, registry watcher) and the event
trigger of the audit deployment run against the Prefect server named by ``PREFECT_API_URL``, and
flow runs execute in subprocesses of this process. ``prefect.yaml`` stays the one description of
the deployments: this module reads it and only turns its entries into ``RunnerDeployment`` objects;
work pool settings are ignored (serving is its own infrastructure). Optionally the MLflow webhook
endpoint runs in the same process (``--webhook-port``).

    export PREFECT_API_URL=http://127.0.0.1:4200/api MLFLOW_TRACKING_URI=http://127.0.0.1:5000
    leap serve                                   # all three deployments
    leap serve --only audit registry-watch --watch-interval 30 --audit-config tiny.json
    LEAP_WEBHOOK_SECRET=... leap serve --webhook-port 8790
    leap serve --deploy-to leap-process          # register on a work pool instead (then a worker runs them)
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PREFECT_YAML = Path(__file__).with_name("prefect.yaml")
PROJECT_ROOT = Path(__file__).resolve().parents[1]


class DeploymentSpecError(ValueError):
    """prefect.yaml holds an entry this module cannot serve (the message names it)."""


def load_specs(path: str | os.PathLike = PREFECT_YAML) -> list[dict[str, Any]]:
    """The ``deployments`` entries of a prefect.yaml (YAML anchors and merge keys resolved)."""
    import yaml

    data = yaml.safe_load(Path(path).read_text())
    specs = (data or {}).get("deployments") or []
    if not isinstance(specs, list) or not all(isinstance(s, dict) and s.get("name") for s in specs):
        raise DeploymentSpecError(f"{path}: 'deployments' must be a list of entries with a name.")
    return specs


def import_entrypoint(entrypoint: str) -> Any:
    """The flow named by ``path/to/module.py:flow_name`` (imported as a module of this project)."""
    try:
        path, attr = entrypoint.rsplit(":", 1)
    except ValueError:
        raise DeploymentSpecError(
            f"entrypoint {entrypoint!r} is not 'path/module.py:flow'."
        ) from None
    module = path.removesuffix(".py").replace("/", ".").replace("\\", ".")
    return getattr(importlib.import_module(module), attr)


def schedule_of(spec: dict[str, Any]) -> Any:
    """A ``prefect.schedules`` object from one ``schedules`` entry (cron, interval or rrule)."""
    from prefect.schedules import Cron, Interval, RRule

    common = {k: spec[k] for k in ("timezone", "parameters", "active", "slug") if k in spec}
    if "cron" in spec:
        return Cron(spec["cron"], day_or=spec.get("day_or", True), **common)
    if "interval" in spec:
        return Interval(timedelta(seconds=float(spec["interval"])), **common)
    if "rrule" in spec:
        return RRule(spec["rrule"], **common)
    raise DeploymentSpecError(f"schedule {spec!r} has none of cron, interval, rrule.")


def trigger_of(spec: dict[str, Any], deployment: str, index: int) -> Any:
    """A ``DeploymentEventTrigger`` from one ``triggers`` entry (what ``prefect deploy`` builds)."""
    from prefect.events import DeploymentEventTrigger

    body = {k: v for k, v in spec.items() if k != "type"}
    if spec.get("type", "event") != "event":
        raise DeploymentSpecError(
            f"{deployment}: only event triggers are served, not {spec['type']!r}."
        )
    body.setdefault("name", f"{deployment}__automation_{index}")
    return DeploymentEventTrigger.model_validate(body)


def build_deployments(
    specs: list[dict[str, Any]],
    only: list[str] | None = None,
    parameters: dict[str, dict[str, Any]] | None = None,
    watch_interval: float | None = None,
    work_pool: str | None = None,
    working_dir: str | os.PathLike | None = None,
) -> list[Any]:
    """``RunnerDeployment`` objects for the entries named in ``only`` (default: all).

    Args:
        parameters: per deployment name, default parameters that replace those of the file.
        watch_interval: seconds between registry polls (replaces interval schedules of
            ``registry-watch``).
        work_pool: build them for this work pool (with the entry's queue and job variables)
            instead of for serving.
        working_dir: the flow runs' working directory on a process pool (the checkout).
    """
    from prefect.deployments.runner import EntrypointType

    names = [s["name"] for s in specs]
    unknown = sorted(set(only or []) - set(names))
    if unknown:
        raise DeploymentSpecError(f"unknown deployment(s) {unknown}; prefect.yaml has {names}.")
    out = []
    for spec in specs:
        name = spec["name"]
        if only and name not in only:
            continue
        flow = import_entrypoint(spec["entrypoint"])
        params = {**(spec.get("parameters") or {}), **(parameters or {}).get(name, {})}
        schedules = []
        for entry in spec.get("schedules") or []:
            if watch_interval is not None and name == "registry-watch" and "interval" in entry:
                entry = {**entry, "interval": watch_interval}
            schedules.append(schedule_of(entry))
        triggers = [trigger_of(t, name, i) for i, t in enumerate(spec.get("triggers") or [], 1)]
        pool: dict[str, Any] = {}
        if work_pool is not None:
            entry = spec.get("work_pool") or {}
            variables = dict(entry.get("job_variables") or {})
            if working_dir is not None:
                variables.setdefault("working_dir", str(working_dir))
            pool = {
                "work_pool_name": work_pool,
                "work_queue_name": entry.get("work_queue_name"),
                "job_variables": variables,
            }
        out.append(
            flow.to_deployment(
                name=name,
                description=spec.get("description"),
                tags=spec.get("tags"),
                parameters=params,
                schedules=schedules or None,
                triggers=triggers or None,
                concurrency_limit=spec.get("concurrency_limit"),
                entrypoint_type=EntrypointType.MODULE_PATH,
                **pool,
            )
        )
    return out


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="leap serve",
        description="Serve the leapcore deployments (prefect.yaml) against PREFECT_API_URL.",
    )
    parser.add_argument("--file", default=str(PREFECT_YAML), help="prefect.yaml to read")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="serve only these deployments")
    parser.add_argument("--limit", type=int, default=2, help="most flow runs at once (default 2)")
    parser.add_argument("--audit-config", metavar="JSON", help="engine config file for audits")
    parser.add_argument(
        "--audit-param",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="default parameter of the audit deployments, e.g. task_runner='\"dask\"' (repeatable)",
    )
    parser.add_argument("--alias-uri", help="model URI of the scheduled alias audit")
    parser.add_argument("--watch-interval", type=float, help="seconds between registry polls")
    parser.add_argument("--watch-models", nargs="+", metavar="NAME", help="models to watch")
    parser.add_argument(
        "--deploy-to",
        metavar="POOL",
        help="register the deployments on this work pool and exit, instead of serving them",
    )
    parser.add_argument("--webhook-port", type=int, help="also run the MLflow webhook endpoint")
    parser.add_argument("--webhook-host", default="127.0.0.1")
    return parser.parse_args(argv)


def _overrides(args: argparse.Namespace, specs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    audit: dict[str, Any] = {}
    if args.audit_config:
        audit["config"] = json.loads(Path(args.audit_config).read_text())
    for item in args.audit_param:
        key, _, value = item.partition("=")
        if not key or not _:
            raise SystemExit(f"--audit-param {item!r}: expected KEY=JSON.")
        try:
            audit[key] = json.loads(value)
        except json.JSONDecodeError:
            audit[key] = value
    out: dict[str, dict[str, Any]] = {}
    for spec in specs:
        if spec["entrypoint"].endswith(":audit_model"):
            out[spec["name"]] = dict(audit)
            if args.alias_uri and spec.get("schedules"):
                out[spec["name"]]["model_uri"] = args.alias_uri
    if args.watch_models:
        out["registry-watch"] = {"models": args.watch_models}
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``leap serve`` (``python -m deployments.serve``); blocks until interrupted."""
    from prefect import serve
    from prefect.settings import get_current_settings

    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not get_current_settings().api.url:
        raise SystemExit(
            "PREFECT_API_URL is not set. Start a server (prefect server start --host 127.0.0.1) and "
            "export PREFECT_API_URL=http://127.0.0.1:4200/api; see deployments/README.md."
        )
    specs = load_specs(args.file)
    working_dir = None
    if args.deploy_to:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            pool_type = client.read_work_pool(args.deploy_to).type
        # A process worker runs flows from this checkout; other pools bring the code in an image.
        working_dir = PROJECT_ROOT if pool_type == "process" else None
    deployments = build_deployments(
        specs,
        args.only,
        _overrides(args, specs),
        args.watch_interval,
        args.deploy_to,
        working_dir,
    )
    if args.deploy_to:
        for deployment in deployments:
            deployment_id = deployment.apply()
            log.info(
                "registered %s on work pool %s (%s)",
                deployment.full_name,
                args.deploy_to,
                deployment_id,
            )
        return 0
    webhook = None
    if args.webhook_port is not None:
        from deployments.webhook import create_app, run_in_thread, secret_from_env

        webhook, _ = run_in_thread(
            create_app(secret_from_env()), args.webhook_host, args.webhook_port
        )
        log.info(
            "MLflow webhook endpoint on http://%s:%d/mlflow", args.webhook_host, args.webhook_port
        )
    try:
        serve(*deployments, limit=args.limit)
    finally:
        if webhook is not None:
            webhook.should_exit = True
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
