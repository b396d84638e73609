"""prefect.yaml as ``leap serve`` reads it, and the process work pool with a real worker."""

from __future__ import annotations

import json
import subprocess
from datetime import timedelta

import pytest
from deploy_support import BIN, REPO, wait_for

from deployments.serve import (
    DeploymentSpecError,
    build_deployments,
    load_specs,
    main,
)
from flows.hooks import AUDIT_REQUESTED_EVENT

NAMES = ["audit", "audit-champion-nightly", "registry-watch", "drift-alert"]


def test_prefect_yaml_describes_the_deployments():
    specs = {s["name"]: s for s in load_specs()}
    assert list(specs) == NAMES
    assert specs["audit"]["entrypoint"] == "flows/audit.py:audit_model"
    assert specs["registry-watch"]["entrypoint"] == "flows/registry_watch.py:watch_registry"
    assert all(s["work_pool"]["name"] == "leap-process" for s in specs.values())


def test_built_deployments_carry_the_trigger_and_the_schedules():
    audit, nightly, watch, _ = build_deployments(load_specs(), watch_interval=15)

    assert audit.name == "audit" and audit.flow_name == "audit-model"
    (trigger,) = audit.triggers
    assert trigger.expect == {AUDIT_REQUESTED_EVENT}
    assert trigger.match.model_dump()["prefect.resource.id"] == "leap.model.*"
    assert trigger.parameters == {"model_uri": "{{ event.payload.model_uri }}"}
    assert not audit.schedules

    (cron,) = nightly.schedules
    assert cron.schedule.cron == "0 3 * * *" and cron.schedule.timezone == "UTC"
    assert nightly.parameters["model_uri"] == "models:/leap-classifier@champion"

    (interval,) = watch.schedules
    assert interval.schedule.interval == timedelta(seconds=15)
    assert watch.concurrency_limit == 1
    assert watch.parameters == {"models": None, "max_requests": 20}


def test_unknown_deployment_names_are_listed():
    with pytest.raises(DeploymentSpecError, match=r"unknown deployment\(s\) \['audits'\]"):
        build_deployments(load_specs(), only=["audits"])


def test_bad_entries_are_named(tmp_path):
    path = tmp_path / "prefect.yaml"
    path.write_text("deployments:\n  - entrypoint: flows/audit.py:audit_model\n")
    with pytest.raises(DeploymentSpecError, match="entries with a name"):
        load_specs(path)
    path.write_text(
        "deployments:\n  - name: x\n    entrypoint: flows/registry_watch.py:watch_registry\n"
        "    schedules:\n      - every: 5\n"
    )
    with pytest.raises(DeploymentSpecError, match="none of cron, interval, rrule"):
        build_deployments(load_specs(path))


def test_serve_refuses_to_start_without_a_server():
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with (
        temporary_settings(updates={PREFECT_API_URL: None}),
        pytest.raises(SystemExit, match="PREFECT_API_URL is not set"),
    ):
        main(["--only", "registry-watch"])


@pytest.mark.services
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_process_work_pool_runs_the_deployments_with_a_real_worker(services, tmp_path):
    """Create the pool from deployments/work-pools/process.json, register the deployments on it
    (``leap serve --deploy-to``) and let ``prefect worker start --run-once`` run the watcher."""
    from prefect.client.orchestration import get_client

    pool = f"leap-process-{tmp_path.name[-8:]}".replace("_", "-")
    cli = [str(BIN / "prefect"), "--no-prompt"]
    template = REPO / "deployments" / "work-pools" / "process.json"
    subprocess.run(
        [
            *cli,
            "work-pool",
            "create",
            pool,
            "--type",
            "process",
            "--base-job-template",
            str(template),
        ],
        env=services,
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=120,
    )
    with get_client(sync_client=True) as client:
        created = client.read_work_pool(pool)
        assert created.type == "process"
        assert created.base_job_template == json.loads(template.read_text())

        assert main(["--deploy-to", pool, "--only", "audit", "registry-watch"]) == 0
        audit = client.read_deployment_by_name("audit-model/audit")
        watch = client.read_deployment_by_name("leap-registry-watch/registry-watch")
        try:
            assert audit.work_pool_name == pool and watch.work_pool_name == pool
            assert watch.job_variables["working_dir"] == str(REPO)
            automations = client.read_resource_related_automations(f"prefect.deployment.{audit.id}")
            assert [a.trigger.expect for a in automations] == [{AUDIT_REQUESTED_EVENT}]

            run = client.create_flow_run_from_deployment(
                watch.id, parameters={"models": ["no-such-model"], "max_requests": 1}
            )
            worker = subprocess.run(
                [*cli, "worker", "start", "--pool", pool, "--run-once", "--type", "process"],
                env=services,
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=240,
            )
            state = wait_for(
                lambda: (s := client.read_flow_run(run.id).state) and s.is_final() and s,
                60,
                what="the worker's flow run to finish",
            )
            assert state.is_completed(), worker.stdout[-3000:] + worker.stderr[-3000:]
        finally:
            for deployment in (audit, watch):
                client.delete_deployment(deployment.id)
            client.delete_work_pool(pool)
