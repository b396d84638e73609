"""Cache keys, stage plans, targets and secret handling, without any service."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from leapcore.config import load_config
from leapcore.errors import InputError
from tasks.artifacts import ArtifactRef
from tasks.caching import stage_key, stage_options
from tasks.model import ModelRef, resolve_targets
from tasks.redaction import clean_jsonable, scrub_exception, scrubbed_errors, secret_values
from tasks.stages import ClassChunk, _chunk_isolate_classes, class_chunks

CANARY = "CANARY-unit-9f3a77d1"


def _model() -> ModelRef:
    return ModelRef("m", "digest-1", "identity-1", "pt", (1, 8, 8), ("a", "b", "c"), "file")


def _ref(sha: str) -> ArtifactRef:
    return ArtifactRef("file:///s", f"x/{sha}.arrow", sha, "baseline", "arrow", 10)


def _key(stage: str, fn, config: dict, **more) -> str:
    return stage_key(stage, fn, {"model": _model(), "config": load_config(config), **more})


def _prototypes_body() -> None:
    """Stands in for a stage function (its source is part of the key)."""


def _other_body() -> None:
    """Another stage function."""


def test_max_steps_is_read_by_prototypes_and_isolation_only() -> None:
    assert "max_steps" in stage_options("prototypes", load_config({}))
    assert "max_steps" in stage_options("isolation", load_config({}))
    assert "max_steps" not in stage_options("isolation", load_config({"isolation_steps": 5}))
    assert "max_steps" not in stage_options("lr_finding", load_config({}))
    assert "max_steps" not in stage_options("baseline", load_config({"use_baseline": True}))
    # What shapes the objective is read by the range test (and by an equidistant baseline).
    assert "transform" in stage_options("lr_finding", load_config({}))
    assert "transform" not in stage_options("baseline", load_config({}))
    assert "transform" in stage_options("baseline", load_config({"use_baseline": True}))


def test_secrets_and_labels_are_never_part_of_a_key() -> None:
    for stage in ("fetch_model", "baseline", "lr_finding", "prototypes", "isolation", "report"):
        names = stage_options(stage, load_config({}))
        assert "wandb_api_key" not in names and "leap_api_key" not in names
    assert "project_name" not in stage_options("prototypes", load_config({}))
    base = _key("prototypes", _prototypes_body, {"max_steps": 5})
    assert _key("prototypes", _prototypes_body, {"max_steps": 5, "wandb_api_key": CANARY}) == base
    assert _key("prototypes", _prototypes_body, {"max_steps": 5, "project_name": "x"}) == base


def test_keys_follow_options_inputs_model_and_source() -> None:
    base = _key("prototypes", _prototypes_body, {"max_steps": 5}, baseline=_ref("a" * 64))
    assert _key("prototypes", _prototypes_body, {"max_steps": 6}, baseline=_ref("a" * 64)) != base
    assert _key("prototypes", _prototypes_body, {"max_steps": 5}, baseline=_ref("b" * 64)) != base
    assert _key("prototypes", _other_body, {"max_steps": 5}, baseline=_ref("a" * 64)) != base
    # The learning-rate finder does not read max_steps.
    lr = _key("lr_finding", _prototypes_body, {"max_steps": 5})
    assert _key("lr_finding", _prototypes_body, {"max_steps": 500}) == lr
    assert _key("lr_finding", _prototypes_body, {"max_steps": 5, "transform": "m"}) != lr


def test_a_changed_engine_changes_every_key(tmp_path, monkeypatch) -> None:
    import shutil

    import leapcore
    import tasks.caching as caching

    copy = tmp_path / "leapcore"
    shutil.copytree(
        Path(leapcore.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__")
    )
    assert caching.package_digest(copy) == caching.engine_digest()
    (copy / "isolation.py").write_text((copy / "isolation.py").read_text() + "\n# changed\n")
    changed = caching.package_digest(copy)
    assert changed != caching.engine_digest()
    (copy / "templates" / "report.html").write_text("<p>another page</p>")
    assert caching.package_digest(copy) not in (changed, caching.engine_digest())
    base = _key("prototypes", _prototypes_body, {"max_steps": 5})
    monkeypatch.setattr(caching, "engine_digest", lambda: changed)
    assert _key("prototypes", _prototypes_body, {"max_steps": 5}) != base


def test_tensors_cannot_be_part_of_a_key() -> None:
    with pytest.raises(TypeError, match="pass an ArtifactRef"):
        stage_key("prototypes", _prototypes_body, {"images": torch.zeros(2)})


def test_targets_by_index_name_and_hybrid() -> None:
    names = ("cat", "dog", "tabby cat")
    assert resolve_targets([0, "dog", "Tabby Cat"], names) == [[0], [1], [2]]
    assert resolve_targets(["cat+dog", [0, 2]], names) == [[0, 1], [0, 2]]
    assert resolve_targets(None, names) == [[0]]
    with pytest.raises(InputError, match="no class named 'dgo'.*'dog'"):
        resolve_targets(["dgo"], names)
    with pytest.raises(InputError, match="out of range"):
        resolve_targets([7], names)


def test_class_chunks_and_their_isolate_classes() -> None:
    chunks = class_chunks([[0], [1], [2], [3], [4]], 2)
    assert [(c.first_target, c.targets) for c in chunks] == [
        (0, [[0], [1]]),
        (2, [[2], [3]]),
        (4, [[4]]),
    ]
    assert len(class_chunks([[0], [1]], None)) == 1
    config = load_config({"isolate_classes": [[1], [2], [3], [4], [5]]})
    assert _chunk_isolate_classes(config, chunks[1]) == [[3], [4]]
    flat = load_config({"isolate_classes": [1, 2]})
    assert _chunk_isolate_classes(flat, chunks[2]) == [1, 2]
    assert _chunk_isolate_classes(load_config({}), ClassChunk(0, 0, [[0]], 1)) is None


def test_plan_switches_off_what_needs_a_skipped_stage() -> None:
    from flows.audit import plan_stages

    plan = plan_stages(["baseline", "wandb"], load_config({}))
    for stage in (
        "generate_baseline",
        "find_learning_rate",
        "optimise_prototypes",
        "score_entanglement",
        "isolate_features",
        "publish_wandb",
    ):
        assert not plan.on(stage)
    assert plan.on("publish_mlflow") and plan.on("render_report")
    assert not plan_stages(None, load_config({"isolation": False})).on("isolate_features")
    assert plan_stages(["lr"], load_config({})).on("optimise_prototypes")
    with pytest.raises(InputError, match="unknown stage 'prototype'"):
        plan_stages(["prototype"], load_config({}))
    with pytest.raises(InputError, match="cannot be skipped"):
        plan_stages(["fetch_model"], load_config({}))


def test_secret_values_are_found_and_scrubbed() -> None:
    config = load_config({"wandb_api_key": CANARY, "leap_api_key": CANARY + "-leap"})
    uri = f"s3://AKIA:{CANARY}-uri@bucket/models"
    secrets = secret_values(config, uri, {"hf_token": CANARY + "-tok"})
    assert {CANARY, CANARY + "-leap", CANARY + "-tok"} <= set(secrets)

    cause = OSError(2, f"no file {uri}", f"/x/{CANARY}")
    error = ValueError(f"failed with {CANARY} at {uri}")
    error.__cause__ = cause
    cleaned = scrub_exception(error, secrets)
    assert cleaned is error
    assert CANARY not in str(error) and CANARY not in str(cause) and CANARY not in cause.filename

    with pytest.raises(RuntimeError) as caught, scrubbed_errors(secrets):
        raise RuntimeError(f"token={CANARY}")
    assert CANARY not in str(caught.value)


def test_stored_flow_parameters_hold_no_secret() -> None:
    from flows.audit import audit_model

    parameters = {
        "model_uri": f"https://user:{CANARY}@models.example.com/m.pt2",
        "config": {"wandb_api_key": CANARY, "max_steps": 3, "nested": {"db_password": CANARY}},
        "model_options": {"access_token": CANARY, "class_list": ["a"]},
        "typed": load_config({"wandb_api_key": CANARY}),
    }
    stored = audit_model.serialize_parameters(parameters)
    assert CANARY not in repr(stored)
    assert stored["config"]["max_steps"] == 3
    assert stored["model_uri"] == "https://***@models.example.com/m.pt2"
    assert audit_model.with_options(name="x").serialize_parameters(parameters) == stored
    assert clean_jsonable({"a_key": 1, "b": [f"{CANARY}"]}, [CANARY]) == {"b": ["***"]}
