"""Acceptance: ``leap serve`` against real servers runs one audit per model version.

One ``python -m deployments.serve`` process (the audit deployment with its event trigger, the
registry watcher on a 15 s interval, the MLflow webhook endpoint) serves the whole module; it is
stopped in the fixture's teardown with its flow-run subprocesses. Each test registers a tiny model
under its own name and waits, bounded, for the ``audit_model`` flow run of that version.
"""

from __future__ import annotations

import json
import sys
import time

import pytest
from deploy_support import (
    LOOPBACK,
    REPO,
    WEBHOOK_SECRET,
    free_port,
    http_ok,
    log_tiny_model,
    server_process,
    tiny_config,
    wait_for,
)

from flows.hooks import REQUESTED_TAG, request_audit

pytestmark = [pytest.mark.services, pytest.mark.slow, pytest.mark.timeout(420)]

WATCHED = "leap-e2e-watched"
WATCH_INTERVAL = 15
AUDIT_STATUS_TAG = "leapcore.audit_status"  # set by audit_model when it publishes to MLflow


@pytest.fixture(scope="module")
def served(services, tmp_path_factory):
    """``leap serve`` for the audit and registry-watch deployments, plus the webhook endpoint."""
    from prefect.client.orchestration import get_client

    root = tmp_path_factory.mktemp("served")
    config = root / "audit-config.json"
    config.write_text(json.dumps(tiny_config(isolation=False)))
    port = free_port()
    env = {**services, "LEAP_WEBHOOK_SECRET": WEBHOOK_SECRET}
    cmd = [sys.executable, "-m", "deployments.serve"]
    cmd += ["--only", "audit", "registry-watch", "--limit", "2"]
    cmd += ["--watch-interval", str(WATCH_INTERVAL), "--watch-models", WATCHED]
    cmd += ["--audit-config", str(config), "--audit-param", 'skip=["wandb"]']
    cmd += ["--audit-param", f"artifact_store={root / 'artifacts'}"]
    cmd += ["--audit-param", f"output_dir={root / 'results'}"]
    cmd += ["--webhook-port", str(port)]
    log_path = root / "serve.log"
    with server_process("leap serve", cmd, env, log_path, cwd=REPO) as server:
        with get_client(sync_client=True) as client:

            def ready():
                if not server.running:
                    raise AssertionError(f"leap serve exited:\n{server.log_tail()}")
                try:
                    audit = client.read_deployment_by_name("audit-model/audit")
                except Exception:
                    return None
                owned = client.read_resource_related_automations(f"prefect.deployment.{audit.id}")
                webhook_up = http_ok(f"http://{LOOPBACK}:{port}/health")
                return audit if owned and webhook_up else None

            audit = wait_for(ready, 120, 1.0, "the served deployments and the webhook endpoint")
        time.sleep(2)  # the trigger service loads new automations on its next pass
        yield {
            "deployment_id": audit.id,
            "webhook_url": f"http://{LOOPBACK}:{port}/mlflow",
            "log": log_path,
            "server": server,
        }


def audit_runs(deployment_id, model_uri: str) -> list:
    """Flow runs of the served ``audit`` deployment for ``model_uri``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
            sort=FlowRunSort.ID_DESC,  # prefect 3.8.8's client sends null, which its server refuses
            limit=200,
        )
    return [r for r in runs if r.parameters.get("model_uri") == model_uri]


def wait_for_audit(served, model_uri: str, timeout: float = 240):
    """The one completed audit flow run of ``model_uri`` (fails fast if it crashed or failed)."""

    def finished():
        if not served["server"].running:
            raise AssertionError(f"leap serve exited:\n{served['server'].log_tail()}")
        runs = audit_runs(served["deployment_id"], model_uri)
        done = [r for r in runs if r.state and r.state.is_final()]
        for run in done:
            assert run.state.is_completed(), (
                f"audit of {model_uri} ended {run.state.name}:\n{served['server'].log_tail()}"
            )
        return done

    try:
        return wait_for(finished, timeout, 2.0, f"the audit flow run of {model_uri}")
    except AssertionError as err:
        runs = [(r.name, r.state_name) for r in audit_runs(served["deployment_id"], model_uri)]
        tail = served["server"].log_tail(6000)
        raise AssertionError(f"{err}; runs: {runs}\nleap serve log:\n{tail}") from None


def version_tags(name: str, version: str) -> dict[str, str]:
    from mlflow import MlflowClient

    return MlflowClient().get_model_version(name, version).tags


def test_registered_version_is_audited_once_by_the_watcher(served):
    from mlflow import MlflowClient

    ref = log_tiny_model(WATCHED)
    uri = f"models:/{WATCHED}/{ref.version}"

    (run,) = wait_for_audit(served, uri)
    tags = version_tags(WATCHED, ref.version)
    assert json.loads(tags[REQUESTED_TAG])["by"] == "registry-watch"
    assert tags[AUDIT_STATUS_TAG] == "FINISHED"
    assert run.state.is_completed()

    # The alias moves to the audited version, and the watcher polls twice more: no second audit.
    client = MlflowClient()
    client.set_registered_model_alias(WATCHED, "champion", ref.version)
    assert not request_audit(f"models:/{WATCHED}@champion").emitted
    # Two requesters that both passed the tag check (simulated by removing the claim) send the
    # same event id, which the Prefect server evaluates only once.
    claim = json.loads(tags[REQUESTED_TAG])
    client.delete_model_version_tag(WATCHED, ref.version, REQUESTED_TAG)
    raced = request_audit(uri, requested_by="racing-requester")
    assert raced.emitted and raced.event_id == claim["event"]
    time.sleep(2 * WATCH_INTERVAL + 5)
    assert len(audit_runs(served["deployment_id"], uri)) == 1


def test_webhook_delivery_triggers_the_audit_and_a_bad_signature_does_not(served, model_name):
    from mlflow import MlflowClient

    client = MlflowClient()
    events = ["model_version.created", "model_version_alias.created"]
    bad = client.create_webhook(
        f"{model_name}-bad", served["webhook_url"], events, secret="a-wrong-secret"
    )
    try:
        time.sleep(1.5)  # MLFLOW_WEBHOOK_CACHE_TTL=1 on the test server
        refused = log_tiny_model(f"{model_name}-refused")
        wait_for(
            lambda: "signature does not match" in served["log"].read_text(errors="replace"),
            60,
            what="the endpoint to reject the wrongly signed delivery",
        )
    finally:
        client.delete_webhook(bad.webhook_id)
    good = client.create_webhook(
        f"{model_name}-good", served["webhook_url"], events, secret=WEBHOOK_SECRET
    )
    try:
        time.sleep(1.5)
        ref = log_tiny_model(model_name)
        uri = f"models:/{model_name}/{ref.version}"
        (run,) = wait_for_audit(served, uri)
        assert json.loads(version_tags(model_name, ref.version)[REQUESTED_TAG])["by"] == "webhook"
        assert version_tags(model_name, ref.version)[AUDIT_STATUS_TAG] == "FINISHED"
    finally:
        client.delete_webhook(good.webhook_id)

    # Nothing was requested for the version whose only delivery was wrongly signed.
    refused_uri = f"models:/{model_name}-refused/{refused.version}"
    assert REQUESTED_TAG not in version_tags(f"{model_name}-refused", refused.version)
    assert audit_runs(served["deployment_id"], refused_uri) == []
    log_text = served["log"].read_text(errors="replace")
    assert WEBHOOK_SECRET not in log_text and "a-wrong-secret" not in log_text


def test_training_run_hook_triggers_the_audit(served, model_name):
    """A training flow registers its model and calls request_audit at its end."""
    import torch
    from deploy_support import TINY_CLASSES, TINY_SHAPE, tiny_classifier
    from prefect import flow

    from tasks.mlflow_models import log_model_with_metadata

    @flow(name="train-tiny-classifier")
    def train() -> str:
        model = tiny_classifier(seed=3).train()
        optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
        x = torch.rand(32, *TINY_SHAPE)
        y = torch.randint(0, len(TINY_CLASSES), (32,))
        first = None
        for _ in range(20):
            optimiser.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimiser.step()
            first = first if first is not None else loss.item()
        assert loss.item() < first  # it did learn something
        ref = log_model_with_metadata(
            model.eval(), TINY_CLASSES, input_shape=TINY_SHAPE, registered_model_name=model_name
        )
        request_audit(ref.uri)  # the one call at the end of training
        return ref.uri

    uri = train()
    (run,) = wait_for_audit(served, uri)
    name, version = uri.removeprefix("models:/").rsplit("/", 1)
    assert json.loads(version_tags(name, version)[REQUESTED_TAG])["by"] == "training-run"
    assert version_tags(name, version)[AUDIT_STATUS_TAG] == "FINISHED"
