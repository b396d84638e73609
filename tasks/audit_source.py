"""Where an earlier audit's tables come from: its MLflow run (``tables/*.parquet`` artifacts).

``publish_mlflow`` logs every audit's download bundle, tables included, to the audit's run and tags
the audited registry version with the run (``leapcore.audit_run_id``, ``leapcore.audit_status``).
This module finds audits again: the latest earlier version of a registered model that has a
finished audit (:func:`previous_audit`), the audit of a model URI or a run id (:func:`find_audit`),
and reads a run's tables back (:func:`run_tables`).
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from leapcore.errors import InputError
from tasks.mlflow_registry import TAG_RUN_ID, TAG_STATUS

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
_VERSION = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+)/?$")
_ALIAS = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/]+)/?$")


@dataclass(frozen=True)
class AuditRun:
    """A finished audit in MLflow.

    Attributes:
        run_id: the audit's MLflow run.
        model_uri: the audited model's URI (as the run's tag has it).
        name: the registered model's name, when the model came from the registry.
        version: its version.
        tags: the run's tags.
    """

    run_id: str
    model_uri: str
    name: str = ""
    version: str = ""
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        if self.name and self.version:
            return f"{self.name} v{self.version}"
        return self.model_uri or f"run {self.run_id[:8]}"

    @property
    def registry_uri(self) -> str:
        """``models:/name/version`` when known, else the run's model URI."""
        return (
            f"models:/{self.name}/{self.version}" if self.name and self.version else self.model_uri
        )


def client_for(uri: str) -> Any:
    from tasks.mlflow_registry import _client

    return _client(uri)


def _from_run(client: Any, run_id: str) -> AuditRun:
    try:
        run = client.get_run(run_id)
    except Exception as err:
        raise InputError(f"MLflow has no run {run_id} ({type(err).__name__}).") from None
    tags = dict(run.data.tags)
    if tags.get("leapcore.kind", "audit") != "audit" or "leapcore.model_uri" not in tags:
        raise InputError(
            f"MLflow run {run_id} is not a leapcore audit (no leapcore.model_uri tag)."
        )
    if run.info.status != "FINISHED":
        raise InputError(f"the audit in MLflow run {run_id} did not finish ({run.info.status}).")
    return AuditRun(
        run_id,
        tags["leapcore.model_uri"],
        tags.get("leapcore.model_name", ""),
        tags.get("leapcore.model_version", ""),
        tags,
    )


def previous_audit(client: Any, name: str, version: str | int) -> AuditRun | None:
    """The latest version of ``name`` before ``version`` whose audit finished, or None."""
    quoted = name.replace("'", "\\'")
    found = client.search_model_versions(f"name = '{quoted}'")
    earlier = sorted(
        (mv for mv in found if int(mv.version) < int(version)),
        key=lambda mv: int(mv.version),
        reverse=True,
    )
    for mv in earlier:
        tags = dict(mv.tags or {})
        if tags.get(TAG_STATUS) == "FINISHED" and tags.get(TAG_RUN_ID):
            try:
                audit = _from_run(client, tags[TAG_RUN_ID])
            except Exception:  # the run was deleted, or is not an audit after all
                continue
            return AuditRun(audit.run_id, audit.model_uri, name, str(mv.version), audit.tags)
    return None


def find_audit(client: Any, ref: str) -> AuditRun:
    """The audit named by ``ref``: an MLflow run id, ``models:/name/version``, ``models:/name@alias``
    (the version's audit) or any other model URI (its latest finished audit).

    Raises:
        InputError: no audit is found (the message says what was looked for).
    """
    ref = ref.strip()
    if _RUN_ID.match(ref):
        return _from_run(client, ref)
    name = version = None
    if m := _VERSION.match(ref):
        name, version = m["name"], m["version"]
    elif m := _ALIAS.match(ref):
        try:
            mv = client.get_model_version_by_alias(m["name"], m["alias"])
        except Exception:
            raise InputError(f"the MLflow registry has no alias {ref!r}.") from None
        name, version = m["name"], str(mv.version)
    if name is not None:
        try:
            mv = client.get_model_version(name, version)
        except Exception:
            raise InputError(f"the MLflow registry has no version {version} of {name!r}.") from None
        tags = dict(mv.tags or {})
        if tags.get(TAG_STATUS) != "FINISHED" or not tags.get(TAG_RUN_ID):
            raise InputError(
                f"{name} v{version} has no finished leapcore audit (tag {TAG_STATUS}: "
                f"{tags.get(TAG_STATUS, 'none')}); run `leap audit models:/{name}/{version}` first."
            )
        audit = _from_run(client, tags[TAG_RUN_ID])
        return AuditRun(audit.run_id, audit.model_uri, name, str(version), audit.tags)
    return _latest_audit_of(client, ref)


def _latest_audit_of(client: Any, model_uri: str) -> AuditRun:
    quoted = model_uri.replace("'", "\\'")
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(
        experiments,
        filter_string=f"tags.`leapcore.model_uri` = '{quoted}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=20,
    )
    for run in runs:
        if run.data.tags.get("leapcore.kind", "audit") == "audit":
            return _from_run(client, run.info.run_id)
    raise InputError(
        f"found no finished leapcore audit of {model_uri!r} in MLflow; give an MLflow run id or "
        "a models:/ URI of an audited version."
    )


def run_tables(client: Any, run_id: str) -> dict[str, pa.Table]:
    """The Arrow tables an audit logged to its run (``tables/<name>.parquet``), by name."""
    with tempfile.TemporaryDirectory(prefix="leapcore-diff-") as tmp:
        try:
            folder = Path(client.download_artifacts(run_id, "tables", tmp))
        except Exception as err:
            raise InputError(
                f"MLflow run {run_id} has no tables/ artifacts ({type(err).__name__}); was it "
                "published by leapcore?"
            ) from None
        return {path.stem: pq.read_table(path) for path in sorted(folder.glob("*.parquet"))}


def class_list_of(tables: dict[str, pa.Table]) -> list[str] | None:
    """The model's class names from an audit's ``model`` table (the model card), if it has one."""
    card = tables.get("model")
    if card is None or "class_name" not in card.column_names:
        return None
    order = card.column("class_index").to_pylist()
    names = card.column("class_name").to_pylist()
    return [n for _, n in sorted(zip(order, names))]


def audit_side(client: Any, audit: AuditRun, tracking: str, with_model: bool = True) -> Any:
    """An :class:`leapcore.diff.AuditSide` of ``audit``: its tables from its run and, with
    ``with_model``, its model loaded again (left out, with a note, when the registry no longer
    holds the audited weights)."""
    from leapcore.diff import AuditSide
    from tasks.model import load_and_keep, locate_model

    tables = run_tables(client, audit.run_id)
    classes = class_list_of(tables)
    if classes is None:
        raise InputError(
            f"the audit in run {audit.run_id} has no tables/model.parquet (the model's classes)."
        )
    facts = {"name": audit.name, "version": audit.version, "run_id": audit.run_id}
    model = preprocessing = None
    note = ""
    if with_model:
        try:
            loaded = load_and_keep(locate_model(audit.registry_uri, None, tracking))
        except Exception as err:  # the model is only needed for the prototype similarity
            note = f"could not load {audit.registry_uri} ({type(err).__name__})"
        else:
            digest = audit.tags.get("leapcore.model_digest")
            if digest and loaded.digest != digest:
                note = f"{audit.registry_uri} now holds other weights than the audited ones"
            else:
                model, preprocessing = loaded.model, loaded.preprocessing
    if note:
        facts["note"] = note
    return AuditSide(audit.label, classes, tables, model, preprocessing, facts)
