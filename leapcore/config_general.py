"""The options every stage shares (accounts, shapes, what the output means), the learning-rate
range test's and the baseline's: the first part of :class:`~leapcore.config.EngineConfig`, which
adds the prototype, entanglement, isolation, diff and output options (one model, split so that each
module stays small; the fields keep their order in ``docs/config.md``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, SecretStr

from leapcore.config_checks import ConfigChecks
from leapcore.stage_names import ALL, BASELINE, LR


def _opt(default: Any, description: str, stage: str, note: str = "", **kwargs: Any) -> Any:
    extra = {"stage": stage}
    if note:
        extra["note"] = note
    return Field(default, description=description, json_schema_extra=extra, **kwargs)


class GeneralOptions(ConfigChecks):
    """The options :class:`~leapcore.config.EngineConfig` starts with (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    # --- accounts (accepted for compatibility, never sent anywhere) ---
    # W&B's keys are not options of the engine: see PUBLISHER_KEYS (routed to the publishers).
    leap_api_key: SecretStr | None = _opt(
        None, "Accepted for leap-ie compatibility and ignored: leapcore needs no account.", ALL
    )
    project_name: str | None = _opt(
        None,
        "Project name; the `project_name` argument of `generate` wins when both are given.",
        ALL,
    )
    mode: Literal["pt", "tf"] | None = _opt(
        None, "Framework, 'pt' or 'tf'; the `mode` argument of `generate` wins.", ALL
    )
    samples: Any = _opt(
        None, "Accepted for compatibility; pass samples to `generate` instead.", ALL
    )

    # --- shapes ---
    input_dim: list[int] | None = _opt(
        None,
        "Input shape the model expects, with or without the batch dimension: [3, 224, 224] (pt) or "
        "[224, 224, 3] (tf). Default: the model's own metadata, else 224x224 with 3 channels.",
        ALL,
    )
    channel_ix: int | None = _opt(
        None, "Index of the channel dimension in `input_dim`; found automatically when None.", ALL
    )

    # --- what the model's output means ---
    output: Literal["logits", "multilabel_logits"] = _opt(
        "logits",
        "What the model's outputs are: 'logits' of exclusive classes (probabilities: softmax over "
        "classes) or 'multilabel_logits', one independent sigmoid logit per class (probabilities: "
        "sigmoid per class; entanglement compares each class's logit gain with the target's, with "
        "no max or softmax over classes). Models that end in a softmax or sigmoid are refused.",
        ALL,
    )
    region: list[int] | list[list[float]] | str | None = _opt(
        None,
        "Segmentation models ([batch, classes, H, W] logits, or [batch, H, W, classes] from Keras): "
        "where each class's logits are averaged into one score, in input pixels. None: the whole "
        "image; a box [x0, y0, x1, y1] (x1, y1 exclusive); a mask [H, W] (non-zero inside) or the "
        "path of a mask image. Prototypes maximise the class's mean logit in the region, "
        "entanglement uses these pooled logits, isolation keeps the pixels that hold the class's "
        "evidence for the region. A region outside the image is an error.",
        ALL,
        note="leap-ie does not say how it reduces segmentation maps; the mean logit over the "
        "region is used because it rewards the class winning everywhere in the region, not in one "
        "pixel (a max would).",
    )

    # --- learning-rate finding ---
    find_lr_steps: int = _opt(
        0,
        "Steps of the learning-rate range test before prototype optimisation; 0 uses `lr` as given.",
        LR,
        note="leap-ie runs a range test by default; leapcore's default is 0 by measurement (issue "
        "14): on EfficientNet-Lite0 the 500-step test cost a third of the run and its rate (0.005) "
        "reached quality no sooner than the fixed `lr` 0.05 with Adam. A few dozen steps sweep the "
        "whole range (`num_lr_windows` is capped at `find_lr_steps`).",
        ge=0,
    )
    min_lr: float = _opt(0.0001, "Lowest rate of the range test.", LR, gt=0)
    max_lr: float = _opt(1.0, "Highest rate of the range test.", LR, gt=0)
    num_lr_windows: int = _opt(
        50, "Windows the range test is split into; one loss is recorded per window.", LR, ge=2
    )
    stop_lr_early: bool = _opt(
        True,
        "Stop the range test once a window's loss is not finite or exceeds the best window's by more than three times its magnitude.",
        LR,
    )

    # --- baseline ---
    baseline_init: float | list[float] | Literal["r"] = _opt(
        0.5,
        "Start image in pixel space [0, 1]: a number, one number per channel (e.g. the training "
        "mean), or 'r' for uniform noise.",
        BASELINE,
        note="leap-ie documents 0; a black start saturates real ImageNet models so that the "
        "gradient is exactly zero, so leapcore starts from mid-grey.",
    )
    use_baseline: bool = _opt(
        False,
        "First optimise the start image to be equidistant (all classes equally likely), so no "
        "prototype is biased by initialisation.",
        BASELINE,
    )
    baseline_steps: int = _opt(
        200,
        "Most steps of the equidistant-baseline optimisation (stops early when flat).",
        BASELINE,
        ge=0,
    )
