"""``engine.generate``: leap-ie's entry point, chaining the stages on one model.

Prototype mode (``samples=None``): learning-rate finding -> baseline -> prototype optimisation ->
entanglement -> isolation on the prototypes. Sample mode: isolation on the user's images only.
Each stage is a public function of its own module; this module validates input once, at the
boundary, runs the stages and writes the results (PNG files, a DataFrame, numpy arrays).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from leapcore.adapter import LogitsModel, Preprocessing, eval_mode, model_device
from leapcore.baseline import BaselineResult, make_baseline
from leapcore.config import (
    BASELINE,
    ENTANGLEMENT,
    ISOLATION,
    LR,
    PROTOTYPES,
    ConfigLike,
    EngineConfig,
    load_config,
)
from leapcore.device import (
    chunk_size_for,
    deterministic_algorithms,
    peak_memory_mb,
    pick_device,
)
from leapcore.entanglement import entanglement, relaxed_entanglement
from leapcore.errors import InputError
from leapcore.isolation import IsolationResult, choose_classes, isolate_features
from leapcore.lr_finder import LearningRateResult, find_learning_rate
from leapcore.outputs import probabilities, resolve_region
from leapcore.preprocess import find_eval_transform
from leapcore.problem import row_keys
from leapcore.prototypes import PrototypeResult, optimise_prototypes
from leapcore.publishers import publish_all
from leapcore.rng import Stream
from leapcore.stage_names import StageTimes

log = logging.getLogger(__name__)


@contextlib.contextmanager
def stage_mode(model: Any, config: EngineConfig, device: torch.device) -> Iterator[None]:
    """What every stage runs under, here and in the pipeline's tasks: the model in eval mode with
    frozen parameters, and PyTorch's deterministic kernels when ``config.deterministic`` asks for
    them on CUDA. Both are restored afterwards, also when the stage raises."""
    with eval_mode(model), deterministic_algorithms(config.deterministic, device):
        yield


@dataclass
class Audit:
    """Everything one ``generate`` call computed, before it is written anywhere.

    Every tensor in it is on the CPU, whichever device ran the stages.
    """

    class_list: list[str]
    config: EngineConfig
    lr: LearningRateResult | None = None
    baseline: BaselineResult | None = None
    prototypes: PrototypeResult | None = None
    entanglement: torch.Tensor | None = None  # [B, K]
    entanglement_probed: torch.Tensor | None = None  # [B] bool: rows the probe entered; None: off
    isolation: IsolationResult | None = None
    samples: torch.Tensor | None = None
    sample_logits: torch.Tensor | None = None
    timings: dict[str, float] = field(default_factory=StageTimes)
    peak_memory_mb: float = 0.0
    output: str = "logits"  # config option ``output``: how probabilities are computed
    model_kind: str = "classifier"  # or "segmentation" (logits pooled over ``region``)
    region: str | None = None  # the region's label for segmentation models, else None
    logit_size: tuple[int, int] | None = None  # a segmentation model's logit map (h, w)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Probabilities of ``[B, K]`` logits as this audit's model defines them."""
        return probabilities(logits, self.output)


# ---------------------------------------------------------------------------------------------- #
# Validation at the boundary
# ---------------------------------------------------------------------------------------------- #
def normalise_targets(target_classes: Any, num_classes: int) -> list[list[int]]:
    """``None`` -> ``[[0]]``; ints and nested lists (hybrids) -> lists of class indices, checked."""
    if target_classes is None:
        target_classes = [0]
    if isinstance(target_classes, (int, np.integer)):
        target_classes = [target_classes]
    if not isinstance(target_classes, Sequence) or len(target_classes) == 0:
        raise InputError(
            "target_classes must be a non-empty list of class indices, e.g. [0, 1] or [[1, 292]] for a hybrid."
        )
    targets = []
    for item in target_classes:
        classes = list(item) if isinstance(item, (list, tuple)) else [item]
        if not classes:
            raise InputError(
                "a nested target in target_classes is empty; give at least one class index."
            )
        for c in classes:
            if isinstance(c, bool) or not isinstance(c, (int, np.integer)):
                raise InputError(f"target_classes holds {c!r}; class indices must be integers.")
            if not 0 <= int(c) < num_classes:
                raise InputError(
                    f"target class index {int(c)} is out of range: the model has {num_classes} classes "
                    f"(valid indices 0..{num_classes - 1})."
                )
        targets.append([int(c) for c in classes])
    return targets


def check_class_list(class_list: Any) -> list[str]:
    if isinstance(class_list, str) or not isinstance(class_list, Sequence):
        raise InputError("class_list must be a list of class names, one per model output.")
    if len(class_list) == 0:
        raise InputError(
            "class_list is empty; pass one class name per model output, e.g. ['cat', 'dog']."
        )
    return [str(c) for c in class_list]


def input_shape(
    config: EngineConfig, mode: str, preprocessing: Preprocessing = None
) -> tuple[int, int, int]:
    """``(C, H, W)`` from ``input_dim`` (with or without batch; channels last for tf), else the
    output size of the :class:`~leapcore.preprocess.EvalTransform` leading ``preprocessing``
    (what ``get_model`` returns), else 3x224x224."""
    if config.input_dim is None:
        transform = find_eval_transform(preprocessing)
        return (3, *transform.size) if transform is not None else (3, 224, 224)
    dims = list(config.input_dim[-3:])
    channel_ix = config.channel_ix
    if channel_ix is not None:
        channel_ix = channel_ix - (len(config.input_dim) - 3)
    elif mode == "tf":
        channel_ix = 2
    else:
        channel_ix = 0 if dims[0] <= 4 or dims[2] > 4 else 2
    c = dims.pop(channel_ix)
    return (int(c), int(dims[0]), int(dims[1]))


def check_samples(
    samples: Any, shape: tuple[int, int, int], mode: str, preprocessing: Preprocessing = None
) -> torch.Tensor:
    """Samples as ``[N, C, H, W]`` float in [0, 1] on the CPU; clear errors for layout and range.

    Samples of another size than ``shape`` are brought to it by the
    :class:`~leapcore.preprocess.EvalTransform` leading ``preprocessing`` when there is one (raw
    ``ToTensor`` images with ``get_model``'s list); samples already prepared with
    ``preprocessing[0]`` pass unchanged.
    """
    if isinstance(samples, np.ndarray):
        samples = torch.from_numpy(samples)
    if not isinstance(samples, torch.Tensor):
        # TF tensors (and other array-likes) convert through numpy; importing TensorFlow here
        # would cost seconds for any wrong input (a path, a list of images) and is not needed.
        try:
            if not (hasattr(samples, "__array__") or isinstance(samples, (list, tuple))):
                raise TypeError
            samples = torch.from_numpy(np.array(samples))
        except Exception:
            raise InputError(
                f"samples must be a tensor or array, not {type(samples).__name__}."
            ) from None
    if samples.ndim == 3:
        samples = samples[None]
    if samples.ndim != 4:
        raise InputError(
            f"samples must have shape [N, C, H, W] (pt) or [N, H, W, C] (tf); got {list(samples.shape)}."
        )
    c, h, w = shape
    if mode == "tf":
        if samples.shape[-1] != c and samples.shape[1] == c:
            raise InputError(
                f"samples look channels-first {list(samples.shape)}; mode='tf' takes channels-last [N, H, W, {c}]."
            )
        samples = samples.permute(0, 3, 1, 2)
    elif samples.shape[1] != c:
        hint = (
            " They look channels-last: use samples.permute(0, 3, 1, 2)."
            if samples.shape[-1] == c
            else ""
        )
        raise InputError(
            f"samples have shape {list(samples.shape)} but the model takes {c} channels first ([N, {c}, H, W]).{hint}"
        )
    samples = samples.float()
    lo, hi = float(samples.min()), float(samples.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        if hi > 1.5 and lo >= 0 and hi <= 255:
            raise InputError(
                f"samples range over [{lo:.3g}, {hi:.3g}]: pass pixel values in [0, 1] (divide by 255)."
            )
        raise InputError(
            f"samples range over [{lo:.3g}, {hi:.3g}]: pass pixel values in [0, 1], before normalisation; "
            "the preprocessing argument is applied inside the engine."
        )
    transform = find_eval_transform(preprocessing)
    if transform is not None and tuple(samples.shape[-2:]) != tuple(shape[1:]):
        with torch.no_grad():
            samples = transform(samples)
    return samples.contiguous()


def build_model(
    model: Any,
    class_list: list[str],
    preprocessing: Preprocessing,
    shape: tuple[int, int, int],
    mode: str,
    channels_last: bool | None = None,
    fold_batchnorm: bool | None = None,
    output: str = "logits",
    region: Any = None,
) -> LogitsModel:
    """Wrap the user's model as a :class:`LogitsModel`, checking that its framework matches ``mode``.

    ``region`` (the config option) is checked against the input size here, before anything runs.
    """
    is_torch = isinstance(model, torch.nn.Module)
    if mode == "tf":
        if is_torch:
            raise InputError("a PyTorch model was given with mode='tf'; use mode='pt'.")
        from leapcore.frameworks.tensorflow import keras_logits_model

        wrapped = keras_logits_model(model, len(class_list), preprocessing, shape)
        wrapped.output, wrapped.output_channels_last = output, True
        wrapped.region = resolve_region(region, *wrapped.input_shape[1:])
        return wrapped
    if mode != "pt":
        raise InputError(f"mode must be 'pt' or 'tf', not {mode!r}.")
    if not is_torch:
        kind = type(model).__module__.split(".")[0]
        if kind in ("keras", "tensorflow", "tf_keras"):
            raise InputError("a TensorFlow/Keras model was given with mode='pt'; use mode='tf'.")
        if not callable(model):
            raise InputError(
                f"model must be a torch.nn.Module (mode='pt'), not {type(model).__name__}."
            )
    return LogitsModel(
        model,
        len(class_list),
        preprocessing,
        shape,
        channels_last,
        fold_batchnorm,
        output,
        resolve_region(region, *shape[1:]),
    )


# ---------------------------------------------------------------------------------------------- #
# The chain of stages
# ---------------------------------------------------------------------------------------------- #
def prototype_chunk_size(
    model: LogitsModel, rows: int, config: EngineConfig, device: torch.device
) -> int:
    """Prototype rows per model call for a batch of ``rows`` (each ``transform_samples`` copies)."""
    chunk = chunk_size_for(
        model,
        model.input_shape,
        rows * config.transform_samples,
        device,
        config.max_batch_size,
        config.memory_budget_mb,
    )
    return max(1, chunk // config.transform_samples)


def isolation_inputs(
    prototypes: PrototypeResult,
    isolate_classes: list[list[int]] | list[int] | None,
    config: EngineConfig,
    num_classes: int,
    device: torch.device,
) -> tuple[torch.Tensor, list[list[int]]]:
    """What isolation sees for each prototype row, and the classes to isolate in it.

    Alpha prototypes are shown on a fixed background (seeded by ``config.seed``); ``isolate_classes``
    is one flat list for all rows, one list per target of ``prototypes`` (shared by that target's
    prototypes) or one list per row; None picks the top ``max_isolate_classes`` by logit.
    """
    rows = len(prototypes.images)
    isolate = isolate_classes
    if isolate is not None and not all(isinstance(c, int) for c in isolate):
        # One list per target; every prototype of a target shares it.
        isolate = (
            [isolate[prototypes.row_target(r)] for r in range(rows)]
            if len(isolate) == len(prototypes.targets)
            else isolate
        )
    classes = choose_classes(prototypes.logits, isolate, config.max_isolate_classes, num_classes)
    shown = prototypes.images.to(device)
    if prototypes.alphas is not None:
        alpha = prototypes.alphas.to(device)
        background = torch.rand(
            shown.shape[1:],
            generator=torch.Generator().manual_seed(config.seed + Stream.TRANSFORMS),
        ).to(device)
        shown = shown * alpha + background * (1 - alpha)
    return shown, classes


def load_references(
    config: EngineConfig, num_classes: int, shape: tuple[int, int, int], device: torch.device
) -> dict[str, LogitsModel]:
    """Load ``config.reference_models`` (before any stage runs), checking their output width."""
    from leapcore.quality import check_reference_width
    from leapcore.sources import load_model

    references = {}
    for uri in config.reference_models:
        loaded = load_model(uri)
        check_reference_width(uri, len(loaded.class_list), num_classes)
        if isinstance(loaded.model, torch.nn.Module):
            loaded.model.eval().to(device)
        references[uri] = build_model(
            loaded.model, loaded.class_list, loaded.preprocessing, shape, loaded.framework
        )
    return references


def run_prototypes(
    model: LogitsModel,
    targets: list[list[int]],
    config: EngineConfig,
    device: torch.device,
    audit: Audit,
    references: dict[str, LogitsModel] | None = None,
) -> Audit:
    shape = model.input_shape
    rows = len(targets) * config.prototypes_per_class
    chunk = prototype_chunk_size(model, rows, config, device)

    began = time.perf_counter()
    audit.baseline = make_baseline(model, shape, config, rows, device)
    audit.timings[BASELINE] = time.perf_counter() - began

    began = time.perf_counter()
    audit.lr = find_learning_rate(model, targets, audit.baseline.image, config, chunk)
    audit.timings[LR] = time.perf_counter() - began

    audit.prototypes = optimise_prototypes(
        model, targets, audit.baseline.image, config, audit.lr.lr, chunk
    )
    audit.timings[PROTOTYPES] = audit.prototypes.seconds
    if references:
        from leapcore.quality import transfer_target_probs

        began = time.perf_counter()
        p = audit.prototypes
        shown, _ = isolation_inputs(p, [], config, model.num_classes, device)
        p.transfer_probs = transfer_target_probs(
            list(references.items()), shown, p.targets, p.per_target, model.num_classes, chunk
        )
        p.reference_models = list(references)
        audit.timings["transfer"] = time.perf_counter() - began

    began = time.perf_counter()
    audit.entanglement, audit.entanglement_probed = score_entanglement(
        model,
        audit.prototypes,
        audit.baseline.logits.cpu(),
        config,
        device,
        chunk,
        audit.baseline.image,
    )
    audit.timings[ENTANGLEMENT] = time.perf_counter() - began

    if config.isolation:
        began = time.perf_counter()
        shown, classes = isolation_inputs(
            audit.prototypes, config.isolate_classes, config, model.num_classes, device
        )
        keys = row_keys(audit.prototypes.targets, audit.prototypes.per_target)
        audit.isolation = isolate_features(model, shown, classes, config, chunk, keys)
        audit.timings[ISOLATION] = time.perf_counter() - began
    return audit


def score_entanglement(
    model: LogitsModel,
    prototypes: PrototypeResult,
    baseline_logits: torch.Tensor,
    config: EngineConfig,
    device: torch.device,
    chunk_size: int,
    baseline_image: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``([B, K] scores, [B] probed rows or None)``: entanglement by ``config.entanglement_measure``.

    ``relaxed``: :func:`leapcore.entanglement.relaxed_entanglement` on the prototypes as the
    model sees them (alpha on its background), the probe from ``baseline_image``; multi-label
    models keep the per-class gain formula. The second item says which rows the probe entered
    (None where no probe ran).
    """
    measure = config.entanglement_measure
    if measure == "relaxed" and config.output != "multilabel_logits":
        shown, _ = isolation_inputs(prototypes, [], config, model.num_classes, device)
        return relaxed_entanglement(
            model,
            shown,
            prototypes.logits,
            prototypes.target_mask(),
            config,
            baseline_image,
            chunk_size,
        )
    scores = entanglement(
        baseline_logits,
        prototypes.logits,
        output=config.output,
        targets=prototypes.target_mask(),
        measure=measure,
    )
    return scores, None


def run_samples(
    model: LogitsModel,
    samples: torch.Tensor,
    targets: list[list[int]] | None,
    config: EngineConfig,
    device: torch.device,
    audit: Audit,
) -> Audit:
    shape = model.input_shape
    samples = samples.to(device)
    chunk = chunk_size_for(
        model,
        shape,
        len(samples) * config.max_isolate_classes,
        device,
        config.max_batch_size,
        config.memory_budget_mb,
    )
    with torch.no_grad():
        logits = torch.cat([model(samples[i : i + chunk]) for i in range(0, len(samples), chunk)])
    audit.samples, audit.sample_logits = samples.cpu(), logits.cpu()
    if targets is not None:
        classes = [sorted({c for t in targets for c in t})] * len(samples)
    else:
        classes = choose_classes(
            logits, config.isolate_classes, config.max_isolate_classes, model.num_classes
        )
    began = time.perf_counter()
    audit.isolation = isolate_features(model, samples, classes, config, chunk)
    audit.timings[ISOLATION] = time.perf_counter() - began
    return audit


def run(
    model: Any,
    class_list: list[str],
    config: ConfigLike,
    target_classes: Any = None,
    preprocessing: Preprocessing = None,
    samples: Any = None,
    device: str | torch.device | None = None,
    mode: str | None = "pt",
) -> Audit:
    """Validate everything, run the stages and return the :class:`Audit` (nothing written)."""
    cfg = load_config(config)
    mode = mode or cfg.mode or "pt"
    classes = check_class_list(class_list)
    shape = input_shape(cfg, mode, preprocessing)
    dev = pick_device(device)
    wrapped = build_model(
        model,
        classes,
        preprocessing,
        shape,
        mode,
        cfg.channels_last,
        cfg.fold_batchnorm,
        cfg.output,
        cfg.region,
    )
    audit = Audit(class_list=classes, config=cfg, output=cfg.output)
    references = (
        load_references(cfg, len(classes), wrapped.input_shape, dev)
        if samples is None and cfg.reference_models
        else {}
    )
    torch.manual_seed(cfg.seed)
    original_device = model_device(model)
    with stage_mode(model, cfg, dev):
        try:
            if isinstance(model, torch.nn.Module):
                model.to(dev)
            if isinstance(wrapped.preprocess, torch.nn.Module):
                wrapped.preprocess.to(dev)
            if samples is not None:
                tensor = check_samples(samples, wrapped.input_shape, mode, preprocessing)
                targets = (
                    None
                    if target_classes is None
                    else normalise_targets(target_classes, len(classes))
                )
                run_samples(wrapped, tensor, targets, cfg, dev, audit)
            else:
                targets = normalise_targets(target_classes, len(classes))
                run_prototypes(wrapped, targets, cfg, dev, audit, references)
        finally:
            if isinstance(model, torch.nn.Module) and original_device is not None:
                model.to(original_device)
    audit.model_kind, audit.logit_size = wrapped.kind, wrapped.logit_size
    audit.region = wrapped.region_label
    if audit.baseline is not None:  # the start image lived on the device; results are on the host
        audit.baseline = replace(
            audit.baseline, image=audit.baseline.image.cpu(), logits=audit.baseline.logits.cpu()
        )
    audit.peak_memory_mb = peak_memory_mb(dev)
    return audit


def generate(
    project_name: str,
    model: Any,
    class_list: list[str],
    config: ConfigLike,
    target_classes: Any = None,
    preprocessing: Preprocessing = None,
    samples: Any = None,
    device: str | torch.device | None = None,
    mode: str = "pt",
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Generate prototypes, entanglements and isolations (or isolate features in ``samples``).

    A drop-in for ``leap_ie.vision.engine.generate``; see the README and docs/config.md. Images are
    written as PNG files under ``config['output_dir']`` (default ``leap_results/<project_name>``).

    Returns:
        ``(df, results)``: the DataFrame described in ALGORITHMS.md ('Results') and a dict of numpy
        arrays (prototypes, masks, probability trajectories, ...) plus the Arrow tables under
        ``results['tables']``. With ``wandb_api_key`` or ``wandb_entity`` in the config, the results
        are also logged to the W&B project ``project_name`` (through the ``leapcore.publishers``
        entry point; offline when no key works) and ``results['publications']['wandb']`` says
        where (``run_dir``, ``sync_command``, ``url``).
    """
    from leapcore.results import audit_arrays, audit_frame, audit_tables, write_images

    if not isinstance(project_name, str) or not project_name:
        raise InputError("project_name must be a non-empty string.")
    audit = run(model, class_list, config, target_classes, preprocessing, samples, device, mode)
    out_dir = Path(audit.config.output_dir or Path("leap_results") / project_name)
    paths = write_images(audit, out_dir)
    df = audit_frame(audit, paths)
    arrays = audit_arrays(audit)
    arrays["tables"] = audit_tables(audit)
    arrays["output_dir"] = str(out_dir)
    publications = publish_all(project_name, audit, arrays, audit.config)
    if publications:
        arrays["publications"] = publications
    return df, arrays


def display_df(df: pd.DataFrame, rows: int = 20) -> Any:
    """Show results inline in a notebook (images rendered), else return them as text."""
    from leapcore.results import frame_html

    try:
        from IPython import get_ipython
        from IPython.display import HTML, display

        if get_ipython() is not None:
            display(HTML(frame_html(df, rows)))
            return None
    except ImportError:
        pass
    return df.head(rows).to_string()
