"""The engine's configuration: one typed model that both validates user input and writes the docs.

Every option of leap-ie's two reference pages is accepted with a default; where those pages disagree
(``lr``, ``hf_weight``, ``max_steps``, ``isolation``, ``alpha_weight``) or where their default fails on
real ImageNet weights (``baseline_init``), the choice made here is stated in the option's ``note``.
``docs/config.md`` is generated from this module (``python -m leapcore.config_docs``) and a test checks that
the committed file matches, so the docs cannot drift from the validation.
"""

from __future__ import annotations

import difflib
import os
from typing import Any, Literal

from pydantic import (
    ConfigDict,
    ValidationError,
)

from leapcore.config_checks import PUBLISHER_KEYS, describe_errors, read_raw_config
from leapcore.config_general import GeneralOptions, _opt
from leapcore.errors import ConfigError
from leapcore.secrets import sanitise
from leapcore.stage_names import (  # noqa: F401 (the stage names, named here as before)
    ALL,
    BASELINE,
    ENTANGLEMENT,
    ISOLATION,
    LR,
    PROTOTYPES,
    STAGE_ALIASES,
    stage_name,
)

TRANSFORM_PRESETS = ("s", "m", "l", "xl")
#: The analysis stage that reads the ``diff_*`` options (``tasks/diff.py``).
DIFF_STAGE = "diff_audits"
_DIFF_NOTE = (
    "Between two seeds of one digits CNN pairs moved by up to 0.13 on 100 held-out samples, 0.43 "
    "cross-checked on prototypes (so flagged from 0.45 there) and 0.83 averaged ('fixed')."
)
_MEASURE_NOTE = (
    "Chosen by measurement (issue 15, benchmarks/diff_testbed.py, docs/diff.md): samples and, "
    "without them, 'crossed' kept seed-only retrains under the threshold; 'fixed' and 'own' did not."
)
PARAMETERISATIONS = ("pixel", "fourier")


class EngineConfig(GeneralOptions):
    """All options of ``engine.generate``; unknown keys are rejected with the closest valid name."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    # --- prototype optimisation ---
    lr: float = _opt(
        0.05,
        "Adam step size for prototypes; found automatically when `find_lr_steps` > 0.",
        PROTOTYPES,
        note="leap-ie's pages say 0.01 and 0.05; 0.05 suits both parameterisations here.",
        gt=0,
    )
    max_steps: int = _opt(
        1000,
        "Optimisation steps for prototypes (and for isolation unless `isolation_steps` is set).",
        PROTOTYPES,
        note="leap-ie's pages say 1000 and 1500.",
        ge=0,
    )
    stop_early: bool = _opt(
        True,
        "Stop a target's prototypes once they have converged: for `stop_patience` checks in a row "
        "(one every `stop_check_every` steps) neither their clean target probability nor its mean "
        "over the step's transformed views beat its best by more than `stop_tolerance` (relative), "
        "and the clean target probability is at least 0.5 (lower rows run to `max_steps`). "
        "Stopped targets leave the batch; `max_steps` is the cap. False runs exactly `max_steps` "
        "steps (leap-ie's behaviour).",
        PROTOTYPES,
        note="Measured (issue 14, benchmarks/time_to_quality.py: EfficientNet-Lite0, 224 px, 5 "
        "classes, 2 CPU cores): every prototype at target probability >= 0.99 and >= 0.9 under "
        "random crops and flips in 5.9 s per class (rows stopped after 80-176 steps), against "
        "11.2 s for 256 fixed steps; lucent 0.1.8 got 2 of 5 there in 512 steps (93 s/class).",
    )
    stop_check_every: int = _opt(
        16, "Steps between convergence checks (the loop's only other host sync).", PROTOTYPES, ge=1
    )
    stop_tolerance: float = _opt(
        0.02, "Smallest gain of log target probability over its best that counts.", PROTOTYPES, gt=0
    )
    stop_patience: int = _opt(
        2, "Checks in a row without progress before a target's prototypes stop.", PROTOTYPES, ge=1
    )
    transform: Literal["s", "m", "l", "xl"] | None = _opt(
        "xl",
        "Robustness preset applied every step: random rotation (5/10/20/30 degrees), translation "
        "(5/5/10/20 %), scale (0.95-1.05 / 0.9-1.1 / 0.8-1.2 / 0.7-1.3) and horizontal flips; "
        "out-of-frame pixels are noise. None disables transforms.",
        PROTOTYPES,
    )
    transform_samples: int = _opt(
        1,
        "Independently transformed copies of each prototype per step whose objectives are "
        "averaged (more robust prototypes; costs a proportionally larger batch).",
        PROTOTYPES,
        ge=1,
    )
    blur_min: float = _opt(
        0.01, "Smallest Gaussian blur sigma (pixels) applied per step.", PROTOTYPES, ge=0
    )
    blur_max: float = _opt(
        1.0, "Largest Gaussian blur sigma (pixels) applied per step.", PROTOTYPES, ge=0
    )
    hf_weight: float = _opt(
        0.0,
        "Penalty on high-frequency patterns (mean absolute difference of neighbouring pixels).",
        PROTOTYPES,
        note="leap-ie's pages say 0 and 1.",
        ge=0,
    )
    parameterisation: Literal["pixel", "fourier"] = _opt(
        "fourier",
        "How the prototype is parameterised: 'pixel' optimises pixels directly; 'fourier' "
        "optimises a decorrelated-colour Fourier spectrum scaled by 1/frequency (Lucid/MACO "
        "style), which gives natural-looking prototypes that survive crops and flips.",
        PROTOTYPES,
    )
    use_alpha: bool = _opt(
        False,
        "Add an alpha channel: the model sees x * a + noise * (1 - a), so the prototype can say "
        "which pixels do not matter.",
        PROTOTYPES,
    )
    alpha_only: bool = _opt(
        False,
        "Optimise the alpha channel alone over the start image (shape, no colour).",
        PROTOTYPES,
    )
    alpha_mask: bool = _opt(
        False,
        "Favour centred, compact prototypes (alpha penalised more far from the centre).",
        PROTOTYPES,
    )
    alpha_weight: float = _opt(
        0.0,
        "Penalty on mean alpha (pushes prototypes to be minimal) when `use_alpha` is on.",
        PROTOTYPES,
        note="leap-ie's pages say 0.0 and 1.",
        ge=0,
    )
    prototypes_per_class: int = _opt(
        1, "Prototypes generated for each target, all in the same batch.", PROTOTYPES, ge=1
    )
    diversity_weight: float = _opt(
        0.0,
        "Push several prototypes of one target apart (penalises their cosine similarity).",
        PROTOTYPES,
        ge=0,
    )
    objective: str = _opt(
        "margin",
        "What prototype optimisation maximises for the target classes: 'logit' (the raw target "
        "logit, leap-ie's objective), 'log_softmax' (the target's log-probability: its logit "
        "relative to every other class) or 'margin' (the target logit minus the largest other).",
        PROTOTYPES,
        note="Default by measurement (issue 19): on 7 digit CNNs of 55-97 % accuracy with the "
        "default options, 63 of 70 prototypes are of their own class with 'margin', 62 with "
        "'logit', 56 with 'log_softmax' (whose learning-rate search can collapse to min_lr). "
        "The xl transform on 32 px inputs, not the objective, causes most misses; every miss "
        "is flagged (`off_target`). With `output: multilabel_logits` the default is 'logit' "
        "(independent classes) and 'log_softmax' is refused.",
    )
    entanglement_measure: str = _opt(
        "relaxed",
        "How entanglement is scored: 'relaxed' ('share' read after `entanglement_relax_steps` "
        "signed-gradient steps raising the target logit from the prototype; with "
        "`entanglement_probe_steps` > 0, the geometric mean with 'share' on a probe, the start "
        "image after that many such steps, wherever the probe's target logit reaches the "
        "prototype's), 'share' "
        "(the share of the probability a prototype leaves to the non-target classes that goes to "
        "each class; targets 1) or 'leap' (leap-ie's: each class's logit gain over the baseline "
        "against the top logit's).",
        ENTANGLEMENT,
        note="Default by measurement (issue 19): Spearman against held-out soft confusion (mean "
        "predicted probability) over the 45 pairs of twelve digit CNNs of 55-97 % accuracy, full "
        "defaults: mean 0.71 (worst 0.58) for 'relaxed' with the guarded 20-step probe, 0.67 "
        "(0.53) without the probe, 0.52 (0.37) for 'share', 0.27 (0.02) for 'leap'. No measure "
        "tried reached 0.7 on every model. "
        "Multi-label outputs always use the per-class gain formula.",
    )
    entanglement_relax_steps: int = _opt(
        10,
        "Steps of the 'relaxed' measure on each prototype (0: read it as it is); each costs one "
        "forward and backward pass per prototype, like one optimisation step.",
        ENTANGLEMENT,
        ge=0,
    )
    entanglement_relax_step: float = _opt(
        0.02,
        "Step size of the 'relaxed' steps, in pixel units (images in [0, 1]).",
        ENTANGLEMENT,
        gt=0,
    )
    entanglement_probe_steps: int = _opt(
        20,
        "Steps of the 'relaxed' measure's probe from the start image (0: no probe, the relaxed "
        "share alone); each costs one forward and backward pass per prototype. The probe is used "
        "only for prototypes whose probe reaches a target logit at least the prototype's (before "
        "and after the relaxation); the others keep the relaxed share alone.",
        ENTANGLEMENT,
        note="On the digit CNNs every probe reaches its target and the probe raises the Spearman "
        "against held-out confusion from 0.67 (worst 0.53) to 0.71 (0.58). On the pretrained "
        "EfficientNet-Lite0 (`leap demo`), 20 steps from grey fall short of tabby and golden "
        "retriever, where an unguarded probe shrank the ImageNet neighbours to noise (tabby: "
        "tiger cat 0.62 -> 0.01); the guard keeps the relaxed share there, and where the probe "
        "does reach (goldfish, Granny Smith) the neighbours stayed sensible (goldfish: tench).",
        ge=0,
    )
    entanglement_probe_step: float = _opt(
        0.05, "Step size of the probe's steps, in pixel units.", ENTANGLEMENT, gt=0
    )
    objective_weight: float = _opt(
        1.0,
        "Weight of the target logits; -1 minimises them (an 'antitype').",
        PROTOTYPES,
    )
    reference_models: list[str] = _opt(
        [],
        "Other models with the same class list (any URI the model sources accept: a zoo name, an "
        "MLflow URI, a file path) on which every prototype's target probability is also measured "
        "(`transfer_probs`): a prototype that only its own model believes is a weak explanation.",
        PROTOTYPES,
    )
    equalise: float = _opt(
        0.0,
        "Post-processing contrast equalisation of prototypes, 0 (none) to 1 (full).",
        PROTOTYPES,
        ge=0,
        le=1,
    )
    seed: int = _opt(
        0,
        "Random seed; the same seed on the CPU gives identical results (on CUDA with "
        "`deterministic`).",
        ALL,
    )
    deterministic: bool = _opt(
        False,
        "On CUDA, run with PyTorch's deterministic kernels so that one seed gives the same bits run "
        "after run (1.3-1.5x the time per step on an H100). Without it, atomic additions in "
        "backward passes make GPU runs drift apart. A model operation with no deterministic CUDA "
        "kernel is reported by name. The CPU is always deterministic.",
        ALL,
    )
    log_freq: int = _opt(
        100,
        "Record every class's probability (the trajectory) and check for NaN/Inf every "
        "`log_freq` steps; the only host syncs of the step loop.",
        PROTOTYPES,
        ge=1,
    )
    always_update: bool = _opt(
        False,
        "Keep the last image even if the target probability fell below its best logged value "
        "(default: keep the best logged image).",
        PROTOTYPES,
    )
    max_batch_size: int | None = _opt(
        None,
        "Largest batch sent through the model at once; bigger batches are split into chunks "
        "(results are identical). None: derived from `memory_budget_mb`.",
        ALL,
        ge=1,
    )
    channels_last: bool | None = _opt(
        None,
        "Feed the model channels-last (NHWC-strided) batches: same values, faster convolutions. "
        "None: on the CPU for PyTorch models with 2-D convolutions (oneDNN runs them about 25 % "
        "faster), falling back to the usual layout if the model rejects it on its first call "
        "(a `.view` of a feature map, say). True forces it; False never.",
        ALL,
    )
    fold_batchnorm: bool | None = _opt(
        None,
        "Run a copy of a PyTorch model with each eval-mode batch norm folded into the convolution "
        "before it: the same function up to rounding, about a third faster per step on the CPU "
        "(EfficientNet-Lite0). The user's model is not changed. None: when the copy's logits match "
        "the original's on the first batch (relative error <= 1e-3); True: raise if it cannot be "
        "made; False: never.",
        ALL,
    )
    memory_budget_mb: float | None = _opt(
        None,
        "Memory budget for one chunk (activations + gradients), measured on a probe batch. "
        "None: no limit on the CPU, 80 % of free memory on a GPU.",
        ALL,
        gt=0,
    )

    # --- isolation ---
    isolation: bool = _opt(
        True,
        "Isolate the features of the most entangled classes in each prototype.",
        ISOLATION,
        note="leap-ie's pages say True and False.",
    )
    isolate_classes: list[list[int]] | list[int] | None = _opt(
        None,
        "Classes to isolate for EACH target, e.g. [[2, 7, 8], [2, 3]] (or one flat list for all); "
        "else the top `max_isolate_classes` by logit.",
        ISOLATION,
    )
    max_isolate_classes: int = _opt(
        3, "How many classes to isolate when `isolate_classes` is not given.", ISOLATION, ge=1
    )
    isolation_lr: float = _opt(
        0.3,
        "Adam step size for isolation masks (mask logits on a grid of `isolation_cell` pixels).",
        ISOLATION,
        note="leap-ie's page says 0.05. With `isolation_map: evidence` the mask only has to find "
        "the region in 10 steps; at 15 steps 0.3 put more of the map on planted markers than 0.1 "
        "(0.45-0.57 vs 0.35-0.41) and deleted better (issue 19, `benchmarks/fidelity.py`).",
        gt=0,
    )
    isolation_steps: int | None = _opt(
        None,
        "Steps of mask optimisation; None uses min(`max_steps`, 10).",
        ISOLATION,
        ge=0,
        note="Was min(`max_steps`, 100) before `isolation_map: evidence`: with it fewer steps "
        "inserted more on two photos (0.32 at 10 vs 0.31 at 15 steps, lr 0.3; 0.30 at 15 vs 0.28 "
        "at 30, lr 0.1) and the map costs 11 backward passes per image, a third of captum's "
        "IntegratedGradients (issue 19).",
    )
    isolation_stop_early: bool = _opt(
        True,
        "Stop a pair's mask steps once its kept logit share and coverage (10-step means) moved "
        "<= 0.01 for two checks in a row; `isolation_steps` is the cap. False runs every step.",
        ISOLATION,
        note="At 224 px the soft mask still shrinks at the 100-step cap, so it seldom fires there; "
        "a looser tolerance (0.03) doubled the calibrated coverage of some pairs (issue 14).",
    )
    isolation_hf_weight: float = _opt(
        1.0, "Penalty on high-frequency patterns in the isolation mask.", ISOLATION, ge=0
    )
    isolation_alpha_weight: float = _opt(
        1.0,
        "Penalty on mask coverage: higher values keep fewer pixels.",
        ISOLATION,
        ge=0,
    )
    isolation_cell: int | None = _opt(
        None,
        "Size (pixels) of one cell of the isolation mask grid. None: a sixteenth of the image's "
        "shorter side, between 1 and 4 (2 px on 32 px digits, 4 px on 224 px photos).",
        ISOLATION,
        note="Before issue 19 cells were always 8 px: they cannot outline a 5 px marker on 32 px "
        "digits (mask mass on the marker 0.40 at 4 px vs 0.46-0.73 at 2 px), and on EfficientNet-"
        "Lite0 photos 4 px cells keep 90 % of the logit with 0.5 / 0.25 of the image where 8 px "
        "cells needed 0.9 / 0.4, at the same time per step.",
        ge=1,
    )
    isolation_background: Literal["blur", "mean", "noise"] = _opt(
        "blur",
        "What masked-out pixels show, in mask optimisation, HiPE occlusion and the isolated "
        "image: 'blur' (a heavily blurred copy of the image), 'mean' (its mean colour) or "
        "'noise' (uniform noise).",
        ISOLATION,
        note="Chosen by measurement (issue 19): with calibrated masks keeping 90 % of the logit, "
        "blur needs the least coverage on digit CNNs (mean 0.12 vs 0.23 mean, 0.52 noise), puts "
        "0.46-0.73 of the mask on a planted marker (noise 0.00-0.12) and gives the lowest "
        "deletion AUC on real photos; noise adds evidence of its own (it kept 0.93 of the logit "
        "but 0.65 of the probability).",
    )
    isolation_map: Literal["evidence", "mask"] = _opt(
        "evidence",
        "The saliency map of `isolation_method: mask` (what `isolation_keep` calibrates and the "
        "deletion / insertion AUCs rank): 'evidence' = (the optimised soft mask squared + 1 - its "
        "peak) times each pixel's gradient . (image - background) of the class log-probability "
        "(pixels against the class last; a mask that stayed soft admits the evidence outside it; "
        "a confident mask's gaps are filled from their neighbours, `leapcore.evidence_fill`), "
        "and the reported mask is a top share of that map averaged over windows of 2 cells + 1 "
        "pixel, so it is made of regions; 'mask' = the soft mask alone.",
        ISOLATION,
        note="Chosen by measurement (issue 19, `benchmarks/fidelity.py`, 4 Lite0 photo views, 3 "
        "marker CNNs): the soft mask alone inserted 0.17 on photos; the evidence map deletes / "
        "inserts 0.036 / 0.37 (captum's IntegratedGradients read signed 0.055 / 0.35) and puts "
        "0.45-0.57 of its mass on planted markers (soft mask 0.18-0.39), with 11 backward passes "
        "per image (IG: 32). On four other photos (scikit-image's, `--more-photos`) it deletes "
        "worse than IG read signed (0.22 vs 0.11) and inserts less than Occlusion (0.51 vs 0.55). "
        "Filling the gaps took marker deletion (30 images, 6 markers) from 0.039-0.559 to "
        "0.039-0.381: below captum's Occlusion on five markers, level on the sixth (0.039 vs 0.040).",
    )
    isolation_keep: float = _opt(
        0.9,
        "The reported mask is the smallest top share of the optimised saliency whose isolated "
        "image keeps at least this fraction of the class logit (its coverage is the share). "
        "0 reports the saliency map itself (see `isolation_map`).",
        ISOLATION,
        ge=0,
        le=1,
    )
    isolation_method: str = _opt(
        "mask",
        "How features are isolated: 'mask' (optimise a smooth mask per pair) or 'hipe' "
        "(Hierarchical Perturbation: occlusion on refining grids, much faster, model-agnostic). "
        "More methods register with `leapcore.isolation_methods.isolation_method`.",
        ISOLATION,
        note="HiPE occludes cells with a heavily blurred copy of the image, not noise: with one noise "
        "sample the masks changed with the seed, on a real photo from better than random cells to "
        "worse; the blur gives one answer. The occluding substrate is `isolation_background`.",
    )
    use_hipe: bool = _opt(
        False,
        "leap-ie's switch, kept as an alias: true selects `isolation_method: 'hipe'`. Giving both "
        "with different answers is an error.",
        ISOLATION,
    )
    hipe_min_cell: int = _opt(
        8, "Smallest grid cell (pixels) that hierarchical perturbation refines to.", ISOLATION, ge=1
    )

    # --- the audit diff (analysis stage diff_audits, and `leap diff`) ---
    diff_entanglement_threshold: float = _opt(
        0.2,
        "A change of a pair's probability (see `diff_pair_measure`) that flags the pair "
        "`entangled` / `disentangled` in the audit diff and fires the `leapcore.audit.drift` event.",
        DIFF_STAGE,
        note=_DIFF_NOTE,
        ge=0,
        le=1,
    )
    diff_quality_threshold: float = _opt(
        0.1,
        "A change of a prototype / isolation quality measure (target probability, off-target "
        "share, kept logit, coverage) that the audit diff flags `worse` / `better`.",
        DIFF_STAGE,
        ge=0,
    )
    diff_similarity_threshold: float = _opt(
        0.5,
        "Penultimate-layer cosine between a class's prototypes of the two versions below which "
        "the audit diff flags them `dissimilar`.",
        DIFF_STAGE,
        ge=0,
        le=1,
    )
    diff_prototype_noise: float = _opt(
        0.45,
        "The noise bound on prototypes: a pair the audit diff measured on prototypes "
        "(cross-checked, `diff_pair_measure` 'crossed' or 'samples' without samples) is flagged "
        "from the larger of this and `diff_entanglement_threshold`.",
        DIFF_STAGE,
        note="Measured (docs/diff.md): seed-only retrains of the digits CNN moved a cross-checked "
        "pair by up to 0.43, planted merges by 0.35-0.98.",
        ge=0,
        le=1,
    )
    diff_pair_measure: Literal["samples", "crossed", "fixed", "own"] = _opt(
        "samples",
        "Which images the audit diff's pair probabilities are measured on, with both models: "
        "'samples' (the user's `samples`, each target's those either version assigns to it; "
        "targets without one, or no samples at all, use 'crossed'), 'crossed' (both versions' "
        "prototypes fed to both models, a pair judged on the smaller of its two sides' changes), "
        "'fixed' (the same reads, the mean of the two sides) or 'own' (each model on its own "
        "prototypes, leap-ie's view; the only one without the models).",
        DIFF_STAGE,
        note=_MEASURE_NOTE,
    )

    # --- output ---
    output_dir: str | None = _opt(
        None,
        "Folder for PNG files; default `leap_results/<project_name>` in the working folder.",
        ALL,
    )

    def secret_free(self) -> dict[str, Any]:
        """The options as plain JSON-able values, with every secret left out."""
        return sanitise(self.model_dump(mode="json", exclude={"samples"}))

    @property
    def steps_for_isolation(self) -> int:
        return min(self.max_steps, 10) if self.isolation_steps is None else self.isolation_steps


def option_stage(name: str) -> str:
    extra = EngineConfig.model_fields[name].json_schema_extra or {}
    return extra["stage"]  # type: ignore[index]


def options_for_stage(stage: str) -> list[str]:
    """Names of the options a stage reads (the stage's own plus the ones every stage reads)."""
    stage = stage_name(stage)
    return [n for n in EngineConfig.model_fields if option_stage(n) in (stage, ALL)]


ConfigLike = dict | str | os.PathLike | EngineConfig | None


def load_config(config: ConfigLike) -> EngineConfig:
    """Validate a config given as a dict, a JSON file path or an ``EngineConfig``.

    Raises:
        ConfigError: naming every wrong key (with the closest valid name) or value.
    """
    if isinstance(config, EngineConfig):
        return config
    raw = read_raw_config(config)
    names = [*EngineConfig.model_fields, *PUBLISHER_KEYS]
    unknown = [k for k in raw if k not in names]
    if unknown:
        parts = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            parts.append(f"{key!r}{hint}")
        raise ConfigError(
            f"unknown config option {', '.join(parts)}. Valid options are listed in docs/config.md."
        )
    try:
        return EngineConfig(**raw)
    except ValidationError as err:
        raise ConfigError(describe_errors(err)) from None
