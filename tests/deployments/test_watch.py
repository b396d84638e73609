"""The registry watcher flow against real servers: every unaudited version once, then nothing."""

from __future__ import annotations

import json

import pytest
from deploy_support import prefect_events, wait_for

from flows.hooks import REQUESTED_TAG, iter_unaudited_versions, mlflow_client
from flows.registry_watch import watch_registry

pytestmark = [pytest.mark.services, pytest.mark.slow, pytest.mark.timeout(300)]


def test_watcher_requests_each_unaudited_version_once(register_version, model_name):
    client = mlflow_client()
    other = f"{model_name}-other"
    v1, v2 = register_version(model_name), register_version(model_name)
    v3 = register_version(other)
    client.set_model_version_tag(model_name, v1, REQUESTED_TAG, '{"by": "earlier"}')

    unaudited = list(iter_unaudited_versions(client, [model_name, other]))
    assert [(mv.name, mv.version) for mv in unaudited] == [(model_name, v2), (other, v3)]

    first = watch_registry(models=[model_name, other], max_requests=1)
    assert first == [f"models:/{model_name}/{v2}"]  # oldest first, bounded by max_requests
    second = watch_registry(models=[model_name, other])
    assert second == [f"models:/{other}/{v3}"]
    assert watch_registry(models=[model_name, other]) == []  # polling again requests nothing

    for name, version in ((model_name, v2), (other, v3)):
        claim = json.loads(client.get_model_version(name, version).tags[REQUESTED_TAG])
        assert claim["by"] == "registry-watch"
        events = wait_for(
            lambda n=name, v=version: prefect_events(f"leap.model.models:/{n}/{v}"), 30
        )
        assert len(events) == 1 and events[0]["payload"]["requested_by"] == "registry-watch"
        # The event names the watcher's flow run as the one that asked.
        assert any(r["prefect.resource.role"] == "requested-by" for r in events[0]["related"])
    assert client.get_model_version(model_name, v1).tags[REQUESTED_TAG] == '{"by": "earlier"}'
    assert prefect_events(f"leap.model.models:/{model_name}/{v1}") == []
