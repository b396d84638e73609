"""One Prefect task per engine stage: load the inputs' artifacts, call the stage, store its artifacts.

Every task reads Arrow artifacts named by :class:`~tasks.artifacts.ArtifactRef`, calls exactly one
engine stage function (``make_baseline``, ``find_learning_rate``, ``optimise_prototypes``,
``entanglement``, ``isolate_features``, ``run_samples``) and writes its results as Arrow IPC
artifacts, returning a :class:`StageOutput` (references, compute time, a summary for the Prefect UI).
Tasks retry transient failures (not leapcore's own errors, which a retry cannot fix), cache by
content (:mod:`tasks.caching`) and clean secrets out of any exception they raise.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from typing import Any

import pyarrow as pa
import torch
from prefect import task

from leapcore import engine
from leapcore import entanglement as entanglement_stage
from leapcore import isolation as isolation_stage
from leapcore import lr_finder as lr_stage
from leapcore import prototypes as prototype_stage
from leapcore.baseline import make_baseline
from leapcore.config import BASELINE, ISOLATION, LR, PROTOTYPES, EngineConfig
from leapcore.device import pick_device
from leapcore.errors import LeapError
from leapcore.images import load_image
from leapcore.problem import row_keys
from leapcore.results import (
    baseline_from_arrow,
    baseline_to_arrow,
    entanglement_to_arrow,
    isolations_to_arrow,
    learning_rate_from_arrow,
    learning_rate_to_arrow,
    prototypes_from_arrow,
    prototypes_to_arrow,
    sample_transform_spec,
    samples_from_arrow,
    samples_to_arrow,
    trajectories_to_arrow,
)
from tasks.artifacts import ArtifactError, ArtifactStore
from tasks.audit_io import merge_prototypes
from tasks.caching import ENTANGLEMENT, FETCH, SAMPLE_ISOLATION, SAMPLES, stage_cache_policy
from tasks.model import (
    ModelLocator,
    ModelRef,
    engine_model,
    load_and_keep,
    model_ref,
    sample_transform,
)
from tasks.progress import task_progress
from tasks.redaction import redacting
from tasks.stage_outputs import ClassChunk, StageOutput, class_chunks

__all__ = [
    "ClassChunk",
    "SampleFile",
    "StageOutput",
    "class_chunks",
    "fetch_model",
    "find_learning_rate",
    "generate_baseline",
    "isolate_features",
    "isolate_samples",
    "load_samples",
    "optimise_prototypes",
    "score_entanglement",
    "stage_task",
]

RETRIES_ENV = "LEAP_TASK_RETRIES"
RETRY_DELAY_ENV = "LEAP_TASK_RETRY_DELAY"


def _env_number(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


def transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only what a retry can fix: not leapcore's own errors (bad input, NaN, bad artifacts)."""
    try:
        state.result()
    except (ConnectionError, TimeoutError):  # network and remote stores: worth another try
        return True
    # Deterministic: bad input, NaN, bad artifacts, unreadable or corrupt files (OSError, PIL's
    # UnidentifiedImageError), decode errors (ValueError), a stop request (a LeapError).
    except (LeapError, ArtifactError, OSError, TypeError, ValueError, KeyError):
        return False
    except Exception:
        return True
    return True


def stage_task(name: str, stage: str, description: str) -> Any:
    """Decorate a stage body as a Prefect task: content-keyed cache, retries, secret-safe errors."""

    def wrap(fn: Any) -> Any:
        return task(
            name=name,
            description=description,
            cache_policy=stage_cache_policy(stage),
            persist_result=True,
            retries=int(_env_number(RETRIES_ENV, 2)),
            retry_delay_seconds=_env_number(RETRY_DELAY_ENV, 2.0),
            retry_condition_fn=transient,
        )(redacting(fn))

    return wrap


def _seed(config: EngineConfig) -> None:
    # engine.run seeds the global generator once; a stage run on its own does the same.
    torch.manual_seed(config.seed)


# ---------------------------------------------------------------------------------------------- #
# The stages
# ---------------------------------------------------------------------------------------------- #
@stage_task("fetch_model", FETCH, "Load the model from its URI and record its digest and classes.")
def fetch_model(locator: ModelLocator, store: ArtifactStore) -> ModelRef:
    began = time.perf_counter()
    loaded = load_and_keep(locator)
    ref = model_ref(loaded, locator)
    card = pa.table(
        {
            "class_index": pa.array(range(ref.num_classes), pa.int32()),
            "class_name": pa.array(list(ref.class_list)),
        }
    ).replace_schema_metadata(
        {
            b"leapcore.schema": b"model",
            b"leapcore.uri": ref.uri.encode(),
            b"leapcore.digest": ref.digest.encode(),
            b"leapcore.framework": ref.framework.encode(),
            b"leapcore.input_shape": ",".join(map(str, ref.input_shape)).encode(),
            b"leapcore.seconds": repr(time.perf_counter() - began).encode(),
        }
    )
    return replace(ref, card=store.put_table(card, "model"))


@stage_task("generate_baseline", BASELINE, "The start image of every prototype (make_baseline).")
def generate_baseline(
    model: ModelRef,
    locator: ModelLocator,
    config: EngineConfig,
    rows: int,
    store: ArtifactStore,
    device: str | None = None,
) -> StageOutput:
    dev = pick_device(device)
    net, loaded = engine_model(model, locator, config, dev)
    _seed(config)
    began = time.perf_counter()
    with engine.stage_mode(loaded.model, config, dev):
        result = make_baseline(net, net.input_shape, config, rows, dev)
    seconds = time.perf_counter() - began
    summary = [
        {
            "start": str(config.baseline_init),
            "equidistant": config.use_baseline,
            "steps": result.steps,
            "probability spread": round(result.spread, 4),
        }
    ]
    ref = store.put_table(baseline_to_arrow(result), "baseline")
    return StageOutput("generate_baseline", {"baseline": ref}, seconds, summary)


@stage_task("find_learning_rate", LR, "Learning-rate range test on the prototype objective.")
def find_learning_rate(
    model: ModelRef,
    locator: ModelLocator,
    config: EngineConfig,
    targets: list[list[int]],
    baseline: StageOutput,
    store: ArtifactStore,
    device: str | None = None,
) -> StageOutput:
    dev = pick_device(device)
    net, loaded = engine_model(model, locator, config, dev)
    start = baseline_from_arrow(store.get_table(baseline.refs["baseline"])).image.to(dev)
    rows = len(targets) * config.prototypes_per_class
    _seed(config)
    began = time.perf_counter()
    with engine.stage_mode(loaded.model, config, dev):
        chunk = engine.prototype_chunk_size(net, rows, config, dev)
        result = lr_stage.find_learning_rate(net, targets, start, config, chunk)
    seconds = time.perf_counter() - began
    summary = [
        {
            "learning rate": result.lr,
            "windows": len(result.losses),
            "fell back": result.fell_back,
            "reason": result.reason,
        }
    ]
    ref = store.put_table(learning_rate_to_arrow(result), "learning_rate")
    return StageOutput("find_learning_rate", {"learning_rate": ref}, seconds, summary)


@stage_task("optimise_prototypes", PROTOTYPES, "Optimise prototypes for a chunk of targets.")
def optimise_prototypes(
    model: ModelRef,
    locator: ModelLocator,
    config: EngineConfig,
    chunk: ClassChunk,
    baseline: StageOutput,
    learning_rate: StageOutput | None,
    store: ArtifactStore,
    device: str | None = None,
) -> StageOutput:
    dev = pick_device(device)
    net, loaded = engine_model(model, locator, config, dev)
    per = config.prototypes_per_class
    first_row = chunk.first_target * per
    rows = len(chunk.targets) * per
    start = baseline_from_arrow(store.get_table(baseline.refs["baseline"])).image
    if start.shape[0] > 1:  # one start image per row (noise): this chunk's rows
        start = start[first_row : first_row + rows]
    rate = (
        learning_rate_from_arrow(store.get_table(learning_rate.refs["learning_rate"])).lr
        if learning_rate is not None
        else config.lr
    )
    _seed(config)
    with engine.stage_mode(loaded.model, config, dev):
        batch = engine.prototype_chunk_size(net, rows, config, dev)
        result = prototype_stage.optimise_prototypes(
            net,
            chunk.targets,
            start.to(dev),
            config,
            rate,
            batch,
            progress=task_progress(PROTOTYPES, chunk.index),
        )
    names = list(model.class_list)
    probs = result.probs
    summary = []
    for r in range(len(result.images)):
        t = result.targets[result.row_target(r)]
        top = int(probs[r].argmax())
        summary.append(
            {
                "target": "+".join(names[c] for c in t),
                "prototype": result.row_index(r),
                "target probability": round(float(probs[r, t].mean()), 4),
                "top class": names[top],
                "top probability": round(float(probs[r, top]), 4),
            }
        )
    refs = {
        "prototypes": store.put_table(prototypes_to_arrow(result, names), "prototypes"),
        "trajectories": store.put_table(trajectories_to_arrow(result), "trajectories"),
    }
    return StageOutput("optimise_prototypes", refs, result.seconds, summary, first_row)


@stage_task("score_entanglement", ENTANGLEMENT, "Entanglement of every class with each target.")
def score_entanglement(
    model: ModelRef,
    config: EngineConfig,
    baseline: StageOutput,
    prototypes: list[StageOutput],
    store: ArtifactStore,
    locator: ModelLocator | None = None,
    device: str | None = None,
) -> StageOutput:
    merged = merge_prototypes(
        [
            prototypes_from_arrow(
                store.get_table(p.refs["prototypes"]), store.get_table(p.refs["trajectories"])
            )
            for p in sorted(prototypes, key=lambda p: p.first_row)
        ]
    )
    base = baseline_from_arrow(store.get_table(baseline.refs["baseline"]))
    base_logits = base.logits.cpu()
    began = time.perf_counter()
    if config.entanglement_measure == "relaxed" and merged.output != "multilabel_logits":
        if locator is None:
            raise ValueError("the 'relaxed' entanglement measure needs the model's locator")
        dev = pick_device(device)
        net, loaded = engine_model(model, locator, config, dev)
        _seed(config)
        with engine.stage_mode(loaded.model, config, dev):
            batch = engine.prototype_chunk_size(net, len(merged.images), config, dev)
            scores, probed = engine.score_entanglement(
                net, merged, base_logits, config, dev, batch, base.image
            )
    else:
        probed = None
        scores = entanglement_stage.entanglement(
            base_logits,
            merged.logits,
            output=merged.output,
            targets=merged.target_mask(),
            measure=config.entanglement_measure,
        )
    seconds = time.perf_counter() - began
    names = list(model.class_list)
    summary = []
    for r in range(len(scores)):
        own = set(merged.targets[merged.row_target(r)])
        order = scores[r].argsort(descending=True).tolist()
        others = [c for c in order if c not in own][:3]
        summary.append(
            {
                "target": "+".join(names[c] for c in sorted(own)),
                "prototype": merged.row_index(r),
                "most entangled": ", ".join(
                    f"{names[c]} ({float(scores[r, c]):.2f})" for c in others
                ),
                **({} if probed is None else {"probe": "used" if probed[r] else "fell short"}),
            }
        )
    table = entanglement_to_arrow(merged, base_logits, scores, names, probed)
    ref = store.put_table(table, "entanglement")
    return StageOutput("score_entanglement", {"entanglement": ref}, seconds, summary)


@stage_task("isolate_features", ISOLATION, "Isolate the features of a chunk of prototypes.")
def isolate_features(
    model: ModelRef,
    locator: ModelLocator,
    config: EngineConfig,
    chunk: ClassChunk,
    prototypes: StageOutput,
    store: ArtifactStore,
    device: str | None = None,
) -> StageOutput:
    dev = pick_device(device)
    net, loaded = engine_model(model, locator, config, dev)
    result = prototypes_from_arrow(
        store.get_table(prototypes.refs["prototypes"]),
        store.get_table(prototypes.refs["trajectories"]),
    )
    isolate = _chunk_isolate_classes(config, chunk)
    _seed(config)
    with engine.stage_mode(loaded.model, config, dev):
        shown, classes = engine.isolation_inputs(result, isolate, config, net.num_classes, dev)
        batch = engine.prototype_chunk_size(net, len(result.images), config, dev)
        keys = row_keys(result.targets, result.per_target)
        isolated = isolation_stage.isolate_features(
            net, shown, classes, config, batch, keys, progress=task_progress(ISOLATION, chunk.index)
        )
    # Image indices are rows of the whole audit, not of this chunk.
    isolated = replace(isolated, pairs=[(i + prototypes.first_row, c) for i, c in isolated.pairs])
    names = list(model.class_list)
    summary = [
        {
            "prototype row": i,
            "class": names[c],
            "mask coverage": round(float(isolated.coverage[k]), 3),
            "logit (whole)": round(float(isolated.logits_full[k]), 3),
            "logit (isolated)": round(float(isolated.logits_isolated[k]), 3),
        }
        for k, (i, c) in enumerate(isolated.pairs)
    ]
    ref = store.put_table(
        isolations_to_arrow(isolated, names, "prototype", result.region), "isolations"
    )
    return StageOutput(
        "isolate_features", {"isolations": ref}, isolated.seconds, summary, prototypes.first_row
    )


def _chunk_isolate_classes(config: EngineConfig, chunk: ClassChunk) -> Any:
    """``isolate_classes`` for one chunk: per-target (or per-row) lists sliced to its targets."""
    isolate = config.isolate_classes
    if isolate is None or all(isinstance(c, int) for c in isolate):
        return isolate
    per = config.prototypes_per_class
    stop = chunk.first_target + len(chunk.targets)
    if len(isolate) == chunk.total_targets:
        return isolate[chunk.first_target : stop]
    if len(isolate) == chunk.total_targets * per:
        return isolate[chunk.first_target * per : stop * per]
    return isolate  # the engine explains the mismatch


# ---------------------------------------------------------------------------------------------- #
# Sample mode (explain_samples)
# ---------------------------------------------------------------------------------------------- #
@dataclass(frozen=True)
class SampleFile:
    """A user image: its path and the SHA-256 of its bytes (the cache key, not the path's age)."""

    path: str
    sha256: str


@stage_task("load_samples", SAMPLES, "Read the user's images with the model's own eval transform.")
def load_samples(
    files: list[SampleFile], model: ModelRef, config: EngineConfig, store: ArtifactStore
) -> StageOutput:
    c = model.input_shape[0]
    transform = sample_transform(model, config)
    began = time.perf_counter()
    with torch.no_grad():
        images = torch.stack([transform(load_image(f.path, None, c)[None])[0] for f in files])
    seconds = time.perf_counter() - began
    names = [os.path.basename(f.path) for f in files]
    table = samples_to_arrow(images, None, names, transform.spec())
    ref = store.put_table(table, "samples")
    h, w = transform.size
    summary = [
        {"image": n, "size": f"{c}x{h}x{w}", "transform": transform.describe()} for n in names
    ]
    return StageOutput("load_samples", {"samples": ref}, seconds, summary)


@stage_task("isolate_samples", SAMPLE_ISOLATION, "Isolate the features of the user's images.")
def isolate_samples(
    model: ModelRef,
    locator: ModelLocator,
    config: EngineConfig,
    samples: StageOutput,
    targets: list[list[int]] | None,
    store: ArtifactStore,
    device: str | None = None,
) -> StageOutput:
    dev = pick_device(device)
    net, loaded = engine_model(model, locator, config, dev)
    loaded_table = store.get_table(samples.refs["samples"])
    images, _, names = samples_from_arrow(loaded_table)
    images = engine.check_samples(images, net.input_shape, "pt")
    audit = engine.Audit(class_list=list(model.class_list), config=config, output=config.output)
    _seed(config)
    with engine.stage_mode(loaded.model, config, dev):
        engine.run_samples(net, images, targets, config, dev, audit)
    iso = audit.isolation
    audit.region = net.region_label
    probs = audit.probabilities(audit.sample_logits)
    summary = [
        {
            "image": names[i],
            "class": model.class_list[c],
            "probability": round(float(probs[i, c]), 4),
            "mask coverage": round(float(iso.coverage[k]), 3),
        }
        for k, (i, c) in enumerate(iso.pairs)
    ]
    refs = {
        "isolations": store.put_table(
            isolations_to_arrow(iso, list(model.class_list), "sample", audit.region),
            "isolations",
        ),
        "samples": store.put_table(
            samples_to_arrow(
                audit.samples, audit.sample_logits, names, sample_transform_spec(loaded_table)
            ),
            "samples",
        ),
    }
    return StageOutput("isolate_samples", refs, audit.timings.get(ISOLATION, 0.0), summary)
