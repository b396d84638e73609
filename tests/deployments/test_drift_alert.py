"""The optional drift alert of prefect.yaml against a real ``prefect server``: a diff's drift event
fires the automation, whose flow run sends the summary through a notification block (a custom
webhook on loopback, standing in for a team's Slack or e-mail block)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from uuid import UUID, uuid4

import pyarrow as pa
import pytest
from deploy_support import LOOPBACK, wait_for

from deployments.serve import build_deployments, load_specs

pytestmark = [pytest.mark.services, pytest.mark.slow, pytest.mark.timeout(300)]

CLASSES = ["cat", "dog", "fox"]


def _side(label: str, version: str, dog_logit_on_cat: float, verdict: str | None = None):
    """An audit of two targets (cat, dog) whose cat prototype gives ``dog`` the given logit (and,
    with ``verdict``, a scan that judged cat so)."""
    from leapcore.diff import AuditSide

    protos = pa.table({"row": [0, 1], "target_name": ["cat", "dog"], "target_classes": [[0], [1]]})
    logits = [[6.0, dog_logit_on_cat, -2.0], [-3.0, 6.0, -2.0]]
    ent = pa.table(
        {
            "row": [r for r in (0, 1) for _ in CLASSES],
            "target_name": [t for t in ("cat", "dog") for _ in CLASSES],
            "class_index": [0, 1, 2] * 2,
            "logit": [z for row in logits for z in row],
        }
    )
    facts = {"name": "pets", "version": version, "run_id": f"run-{version}"}
    tables = {"prototypes": protos, "entanglement": ent}
    if verdict is not None:
        tables["spurious"] = pa.table({"class_name": ["cat"], "verdict": [verdict]})
    return AuditSide(label, CLASSES, tables, facts=facts)


def _drift_event():
    """The event an audit's diff stage emits when cat and dog became entangled (v1 -> v2)."""
    from leapcore.diff import diff_audits
    from tasks.diff import DRIFT_EVENT, diff_findings

    diff = diff_audits(_side("pets v1", "1", -4.0), _side("pets v2", "2", 5.5))
    ((name, payload),) = diff_findings(diff.table).events
    assert name == DRIFT_EVENT and payload["entangled"][0].startswith("cat <-> dog")
    # no models, so the pairs are on prototypes: the alert itself says they may be seed noise
    assert payload["pair_basis"] == "prototypes" and "seed-only retrain" in payload["summary"]
    # ... and what the threshold was judged against (each model's own prototypes, unchecked)
    assert payload["judged_on"].startswith("each model on its own prototypes (not cross-checked")
    assert f"judged against {payload['judged_on']}" in payload["summary"]
    return name, payload


def _verdict_event():
    """The event of a diff where only the scan's verdict of cat got worse (no pair moved)."""
    from leapcore.diff import diff_audits
    from tasks.diff import DRIFT_EVENT, diff_findings

    diff = diff_audits(
        _side("pets v2", "2", -4.0, "clean"), _side("pets v3", "3", -4.0, "likely spurious")
    )
    ((name, payload),) = diff_findings(diff.table).events
    assert name == DRIFT_EVENT and not payload["entangled"] and not payload["disentangled"]
    assert payload["worse_verdicts"] == ["cat: clean -> likely spurious"]
    return name, payload


def test_a_worse_verdict_alone_emits_the_event_and_an_unchanged_diff_none():
    from leapcore.diff import diff_audits
    from tasks.diff import diff_findings

    _verdict_event()
    same = diff_audits(_side("pets v2", "2", -4.0, "clean"), _side("pets v3", "3", -4.0, "clean"))
    assert diff_findings(same.table).events == []


class _Hook(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Hook.received.append(json.loads(body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def webhook():
    server = HTTPServer((LOOPBACK, 0), _Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Hook.received = []
    try:
        yield f"http://{LOOPBACK}:{server.server_address[1]}/hook"
    finally:
        server.shutdown()
        server.server_close()


def test_prefect_yaml_declares_the_drift_alert():
    specs = {s["name"]: s for s in load_specs()}
    spec = specs["drift-alert"]
    assert spec["entrypoint"] == "flows/alerts.py:drift_alert"
    assert spec["parameters"] == {"notify_block": None}
    ((deployment,),) = [build_deployments(load_specs(), only=["drift-alert"])]
    (trigger,) = deployment.triggers
    assert trigger.expect == {"leapcore.audit.drift"}
    assert trigger.match.model_dump()["prefect.resource.id"] == "leapcore.model.*"


def test_the_drift_event_fires_the_automation_and_reaches_the_block(prefect_server, webhook):
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.events import Event
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.alerts import drift_alert
    from flows.hooks import send_event

    name, payload = _drift_event()
    with temporary_settings(updates={PREFECT_API_URL: prefect_server}):
        (deployment,) = build_deployments(load_specs(), only=["drift-alert"])
        deployment_id = deployment.apply()
        with get_client(sync_client=True) as client:
            body = {"limit": 100, "offset": 0, "sort": "NAME_ASC"}
            found = client.request("POST", "/automations/filter", json=body).json()
        (automation,) = [a for a in found if a["name"] == "audit-drift"]
        assert automation["enabled"] and automation["trigger"]["expect"] == [name]
        (action,) = automation["actions"]
        assert action["type"] == "run-deployment" and action["deployment_id"] == str(deployment_id)
        # What flows/audit_run.py's _emit sends: resource leapcore.model.<name>, the payload.
        model = f"pets-{uuid4().hex[:8]}"
        payload = {**payload, "model": model}
        event = Event(
            event=name,
            resource={"prefect.resource.id": f"leapcore.model.{model}"},
            payload=payload,
            id=uuid4(),
        )
        send_event(event)
        # A scan verdict that got worse, no pair moved: the same automation fires.
        _, verdict_payload = _verdict_event()
        worse_model = f"pets-{uuid4().hex[:8]}"
        verdict_payload = {**verdict_payload, "model": worse_model}
        send_event(
            Event(
                event=name,
                resource={"prefect.resource.id": f"leapcore.model.{worse_model}"},
                payload=verdict_payload,
                id=uuid4(),
            )
        )

        def created(which: str = model):
            with get_client(sync_client=True) as client:
                runs = client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
                    sort=FlowRunSort.ID_DESC,
                    limit=50,
                )
            return [r for r in runs if r.parameters.get("model") == which]

        (run,) = wait_for(created, 90, interval=1, what="the automation's flow run")
        (worse_run,) = wait_for(
            lambda: created(worse_model), 90, interval=1, what="the verdict event's flow run"
        )
        assert (
            "worse scan verdicts: cat: clean -> likely spurious" in worse_run.parameters["summary"]
        )
        assert worse_run.parameters["version"] == "3"
        assert run.parameters["summary"] == payload["summary"]
        assert run.parameters["version"] == "2" and run.parameters["previous_version"] == "1"
        assert run.parameters["notify_block"] is None  # the deployment's default: log only

        # The team's block: a webhook on loopback. Run the flow with the run's parameters.
        block = CustomWebhookNotificationBlock(
            name="drift-test",
            url=webhook,
            json_data={"text": "{{body}}", "title": "{{subject}}"},
        )
        block.save("drift-test", overwrite=True)
        params = {**run.parameters, "notify_block": "custom-webhook/drift-test"}
        sent = drift_alert(**params)
    assert sent == payload["summary"]
    (message,) = _Hook.received
    assert message["text"] == payload["summary"] and "cat <-> dog" in message["text"]
    assert message["title"] == f"leapcore: {model} v2 drifted from v1"
    assert UUID(str(deployment_id))


def test_a_block_that_cannot_notify_is_refused(prefect_server):
    from prefect.blocks.system import Secret
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.alerts import load_notifier

    with temporary_settings(updates={PREFECT_API_URL: prefect_server}):
        Secret(value="not-a-notifier").save("drift-secret", overwrite=True)
        with pytest.raises(ValueError, match="not a notification block"):
            load_notifier("secret/drift-secret")
