"""``leap demo``'s model and settings: the bundled EfficientNet-Lite0 in the local MLflow registry."""

from __future__ import annotations

from typing import Any

from leapcli.progress import say

DEMO_MODEL = "efficientnet-lite0"
DEMO_ALIAS = "demo"
DEMO_CLASSES = ["goldfish", "tabby", "golden retriever", "Granny Smith"]
DEMO_CONFIG: dict[str, Any] = {
    "max_steps": 80,
    "find_lr_steps": 0,
    "lr": 0.05,
    "transform": "m",
    "isolation_steps": 30,
    "max_isolate_classes": 2,
    "log_freq": 10,
    "project_name": "leapcore-demo",
}


def register_demo_model(name: str = DEMO_MODEL, alias: str = DEMO_ALIAS) -> str:
    """Register the bundled pretrained EfficientNet-Lite0 in the MLflow registry (once per weights
    digest) under ``alias``; returns ``models:/<name>@<alias>``."""
    import mlflow
    from mlflow import MlflowClient

    from leapcore.sources import load_model
    from tasks.mlflow_models import log_model_with_metadata
    from tasks.mlflow_registry import tracking_uri

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    loaded = load_model("efficientnet_lite0")
    try:
        current = client.get_model_version_by_alias(name, alias)
        if (current.tags or {}).get("leapcore.digest") == loaded.digest:
            return f"models:/{name}@{alias}"
    except Exception:
        pass  # not registered yet
    say(f"Registering the bundled EfficientNet-Lite0 as models:/{name}@{alias} in {uri} ...")
    mlflow.set_experiment("leapcore-models")
    with mlflow.start_run(run_name="efficientnet-lite0 (bundled ImageNet weights)"):
        ref = log_model_with_metadata(
            loaded, registered_model_name=name, alias=alias, input_example=None
        )
    client.set_model_version_tag(name, ref.version, "leapcore.digest", loaded.digest)
    return ref.uri
