"""request_audit against a real MLflow server and a real Prefect server: claim once, emit once."""

from __future__ import annotations

import json

import pytest
from deploy_support import free_port, prefect_events, wait_for

from flows.hooks import (
    AUDIT_REQUESTED_EVENT,
    REQUESTED_TAG,
    AuditRequestError,
    UnknownModelError,
    event_id_for,
    request_audit,
)

pytestmark = [pytest.mark.services, pytest.mark.slow, pytest.mark.timeout(300)]


def _tags(name: str, version: str) -> dict[str, str]:
    from mlflow import MlflowClient

    return MlflowClient().get_model_version(name, version).tags


def test_request_claims_the_version_and_emits_one_event(register_version, model_name):
    version = register_version(model_name)
    uri = f"models:/{model_name}/{version}"

    first = request_audit(uri, requested_by="training-run")

    assert first.emitted and first.model_uri == uri
    assert first.event_id == str(event_id_for(uri))
    claim = json.loads(_tags(model_name, version)[REQUESTED_TAG])
    assert claim["by"] == "training-run" and claim["event"] == first.event_id
    events = wait_for(lambda: prefect_events(f"leap.model.{uri}"), 30, what="the event in Prefect")
    assert len(events) == 1
    assert events[0]["event"] == AUDIT_REQUESTED_EVENT
    assert events[0]["id"] == first.event_id
    assert events[0]["payload"]["model_uri"] == uri
    assert events[0]["resource"]["mlflow.model.version"] == version

    again = request_audit(uri, requested_by="registry-watch")
    assert not again.emitted and again.detail == "already requested"
    assert again.event_id == first.event_id
    assert json.loads(_tags(model_name, version)[REQUESTED_TAG])["by"] == "training-run"


def test_alias_is_pinned_to_its_version_and_not_audited_twice(register_version, model_name):
    from mlflow import MlflowClient

    v1 = register_version(model_name)
    v2 = register_version(model_name)
    client = MlflowClient()
    client.set_registered_model_alias(model_name, "champion", v2)

    by_alias = request_audit(f"models:/{model_name}@champion", requested_by="webhook")
    assert by_alias.emitted and by_alias.model_uri == f"models:/{model_name}/{v2}"
    assert REQUESTED_TAG in _tags(model_name, v2) and REQUESTED_TAG not in _tags(model_name, v1)

    # The alias moves on to a version that was already requested: nothing new.
    client.set_registered_model_alias(model_name, "candidate", v2)
    assert not request_audit(f"models:/{model_name}@candidate").emitted
    assert not request_audit(f"models:/{model_name}/{v2}").emitted


def test_force_requests_again_with_a_new_event_id(register_version, model_name):
    version = register_version(model_name)
    uri = f"models:/{model_name}/{version}"
    first = request_audit(uri)
    forced = request_audit(uri, force=True, requested_by="operator")
    assert forced.emitted and forced.event_id != first.event_id
    assert json.loads(_tags(model_name, version)[REQUESTED_TAG])["event"] == forced.event_id


def test_runs_uri_is_claimed_with_a_run_tag(services):
    import mlflow
    from mlflow import MlflowClient

    with mlflow.start_run() as run:
        mlflow.log_param("p", 1)
    uri = f"runs:/{run.info.run_id}/model"
    assert request_audit(uri).emitted
    assert REQUESTED_TAG in MlflowClient().get_run(run.info.run_id).data.tags
    assert not request_audit(uri).emitted


def test_unknown_versions_and_aliases_are_named(register_version, model_name):
    register_version(model_name)
    with pytest.raises(UnknownModelError, match=rf"models:/{model_name}/99 does not exist"):
        request_audit(f"models:/{model_name}/99")
    with pytest.raises(UnknownModelError, match="has alias 'nope'"):
        request_audit(f"models:/{model_name}@nope")


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("", "must be a non-empty string"),
        ("models:/only-a-name", "is not models:/<name>/<version> or models:/<name>@<alias>"),
    ],
)
def test_bad_uris_are_rejected_with_a_message(services, uri, message):
    with pytest.raises(AuditRequestError, match=message):
        request_audit(uri)


def test_claim_is_undone_when_prefect_is_unreachable(register_version, model_name):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    version = register_version(model_name)
    closed = f"http://127.0.0.1:{free_port()}/api"  # nothing listens there
    with (
        temporary_settings(updates={PREFECT_API_URL: closed}),
        pytest.raises(AuditRequestError, match="did not accept the audit request event"),
    ):
        request_audit(f"models:/{model_name}/{version}")
    assert REQUESTED_TAG not in _tags(model_name, version)
    # With the server back, the next request goes through.
    assert request_audit(f"models:/{model_name}/{version}").emitted


def test_without_prefect_api_url_the_error_says_what_to_set(services):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with (
        temporary_settings(updates={PREFECT_API_URL: None}),
        pytest.raises(AuditRequestError, match="PREFECT_API_URL is not set"),
    ):
        request_audit("efficientnet_lite0")
