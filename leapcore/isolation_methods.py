"""What every feature-isolation method shares, and the registry that names them.

A method maps ``(model, images, classes, config, chunk_size, image_keys)`` to an
:class:`IsolationResult` and registers itself with :func:`isolation_method` under the name the
``isolation_method`` config option takes (``mask``: :mod:`leapcore.isolation`; ``hipe``:
:mod:`leapcore.hipe`). The pieces both use live here, so neither method module imports the other:
the result type, the backgrounds that masked-out pixels show, the calibration of a saliency map
into the reported mask, and chunked class logits and probabilities.
"""

from __future__ import annotations

import difflib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F

from leapcore.errors import InputError
from leapcore.faithfulness import deletion_insertion_auc
from leapcore.outputs import model_probabilities
from leapcore.rng import RowKey, RowStreams

if TYPE_CHECKING:
    from leapcore.config import EngineConfig

LEVELS = (
    0.01,
    0.02,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.25,
    0.3,
    0.4,
    0.5,
    0.6,
    0.7,
    0.8,
    0.9,
    1.0,
)
AUC_STEPS = 16

# Forwards without autograd (calibration, kept, the AUCs) send this many times ``chunk_size`` rows per
# model call unless ``max_batch_size`` caps every call: ``chunk_size`` budgets a forward and its
# backward per row (:func:`leapcore.device.estimate_row_bytes` counts three forwards' activations),
# and a forward without autograd holds at most one forward's. On the 32 px marker CNNs of
# benchmarks/fidelity.py a forward took 0.096 ms of CPU per image in batches of 18, 0.089 in batches
# of 54 (issue 19; a small gain, the rest of the time is the images themselves).
NO_GRAD_ROWS = 3


# Optional per-pair measures of an IsolationResult (None when not measured), in table order.
PAIR_MEASURES = ("kept_prob", "prob_full", "prob_isolated", "deletion_auc", "insertion_auc")


@dataclass
class IsolationResult:
    """Masks and isolated images for ``pairs``: one row per (image index, class index).

    Attributes:
        pairs: ``[(image, class), ...]``.
        masks: ``[P, 1, H, W]`` in [0, 1].
        isolated: ``[P, C, H, W]`` = image * mask + background * (1 - mask).
        logits_full: ``[P]`` the class's logit on the whole image.
        logits_isolated: ``[P]`` the class's logit on the isolated image.
        method: the registered name of the method (``"mask"``, ``"hipe"``, ...).
        kept_prob: ``[P]`` the class probability on the isolated image ÷ on the whole image.
        prob_full, prob_isolated: ``[P]`` the class probability on the whole / isolated image (the
            two sides of ``kept_prob``: a tiny ``prob_full`` makes any ratio look large).
        deletion_auc, insertion_auc: ``[P]`` RISE AUCs of the pair's saliency map (blurred
            substrate, :data:`AUC_STEPS` budgets); None when not measured.
    """

    pairs: list[tuple[int, int]]
    masks: torch.Tensor
    isolated: torch.Tensor
    logits_full: torch.Tensor
    logits_isolated: torch.Tensor
    method: str
    seconds: float = 0.0
    kept_prob: torch.Tensor | None = None
    prob_full: torch.Tensor | None = None
    prob_isolated: torch.Tensor | None = None
    deletion_auc: torch.Tensor | None = None
    insertion_auc: torch.Tensor | None = None
    steps_run: list[int] | None = None  # mask steps each pair ran (isolation_stop_early)
    saliency: torch.Tensor | None = (
        None  # [P, 1, H, W] in [0, 1]: the map the mask is a top share of
    )
    map_seconds: float | None = None  # until the saliency was ready (before calibration, measures)
    calibration_seconds: float | None = None  # the calibration into the reported mask

    @classmethod
    @torch.no_grad()
    def from_masks(
        cls,
        model: torch.nn.Module,
        pairs: list[tuple[int, int]],
        source: torch.Tensor,
        classes: torch.Tensor,
        masks: torch.Tensor,
        background: torch.Tensor,
        logits_full: torch.Tensor,
        method: str,
        began: float,
        chunk_size: int,
    ) -> IsolationResult:
        """Composite ``source`` on ``background`` through ``masks``, score it, move it to the CPU."""
        isolated = source * masks + background * (1 - masks)
        kept = class_logits(model, isolated, classes, chunk_size)
        return cls(
            pairs,
            masks.cpu(),
            isolated.cpu(),
            logits_full.cpu(),
            kept.cpu(),
            method,
            time.perf_counter() - began,
        )

    @classmethod
    @torch.no_grad()
    def from_saliency(
        cls,
        model: torch.nn.Module,
        pairs: list[tuple[int, int]],
        source: torch.Tensor,
        classes: torch.Tensor,
        saliency: torch.Tensor,
        background: torch.Tensor,
        logits_full: torch.Tensor,
        method: str,
        began: float,
        chunk_size: int,
        keep: float,
        ranking: torch.Tensor | None = None,
        *,
        full_rows: torch.Tensor | None = None,
        rows: int | None = None,
    ) -> IsolationResult:
        """The reported result of a saliency map: calibrated mask, kept ratios and RISE AUCs.

        ``ranking`` (default: ``saliency``) is the map whose top share the calibration reports, e.g.
        the saliency smoothed so that the reported mask is made of regions; the AUCs always rank
        ``saliency``, and ``keep <= 0`` reports ``saliency`` itself. ``full_rows`` (``[P, K]``, the
        logits of ``source``) saves a forward when the method has them; ``rows`` is the images per
        forward pass (default ``chunk_size``; see :func:`no_grad_rows`). The logits that the
        calibration read for the chosen mask are its kept logit and probability: no pass repeats.
        """
        map_seconds = time.perf_counter() - began
        rows = rows or chunk_size
        if full_rows is None:
            full_rows = logits_rows(model, source, rows)
        if keep > 0:
            masks, isolated_rows = calibrated(
                model,
                source,
                classes,
                saliency if ranking is None else ranking,
                background,
                logits_full,
                keep,
                rows,
                full_rows,
            )
        else:
            masks, isolated_rows = saliency, None
        isolated = source * masks + background * (1 - masks)
        if isolated_rows is None:
            isolated_rows = logits_rows(model, isolated, rows)
        calibration_seconds = time.perf_counter() - began - map_seconds
        pick = classes[:, None]
        result = cls(
            pairs,
            masks.cpu(),
            isolated.cpu(),
            logits_full.cpu(),
            isolated_rows.gather(1, pick).squeeze(1).cpu(),
            method,
        )
        p_full = model_probabilities(model, full_rows).gather(1, pick).squeeze(1)
        p_iso = model_probabilities(model, isolated_rows).gather(1, pick).squeeze(1)
        result.kept_prob = (p_iso / p_full.clamp_min(1e-12)).cpu()
        result.prob_full, result.prob_isolated = p_full.cpu(), p_iso.cpu()
        deletion, insertion = deletion_insertion_auc(
            model,
            source,
            saliency[:, 0],
            classes.tolist(),
            steps=AUC_STEPS,
            substrate="blur",
            batch_size=rows,
            image_logits=full_rows,
        )
        result.deletion_auc, result.insertion_auc = deletion.float(), insertion.float()
        shown = (saliency if ranking is None else ranking).clamp_min(0).flatten(1)
        shown = shown / shown.amax(1, keepdim=True).clamp_min(1e-12)
        result.saliency = shown.view_as(saliency).cpu()
        result.seconds = time.perf_counter() - began
        result.map_seconds = map_seconds
        result.calibration_seconds = calibration_seconds
        return result

    @property
    def coverage(self) -> torch.Tensor:
        return self.masks.flatten(1).mean(1)

    @property
    def kept(self) -> torch.Tensor:
        """Share of the full logit that the isolated image keeps."""
        return self.logits_isolated / self.logits_full.abs().clamp_min(1e-6)


class IsolationMethod(Protocol):
    """``(model, images, classes, config, chunk_size, image_keys) -> IsolationResult``."""

    def __call__(
        self,
        model: torch.nn.Module,
        images: torch.Tensor,
        classes: list[list[int]],
        config: EngineConfig,
        chunk_size: int,
        image_keys: list[RowKey] | None = None,
    ) -> IsolationResult: ...


#: name -> method; filled by :func:`isolation_method` when a method's module is imported
#: (``import leapcore.isolation`` registers every built-in one).
ISOLATION_METHODS: dict[str, IsolationMethod] = {}
#: name -> how the report names the method.
ISOLATION_TITLES: dict[str, str] = {}


def isolation_method(name: str, title: str = "") -> Callable[[IsolationMethod], IsolationMethod]:
    """Decorator: register ``fn`` as the isolation method that ``isolation_method: name`` selects.

    Args:
        name: the config value.
        title: how the report names it (default: the name).
    """

    def wrap(fn: IsolationMethod) -> IsolationMethod:
        if name in ISOLATION_METHODS and ISOLATION_METHODS[name] is not fn:
            raise ValueError(f"isolation method {name!r} is registered twice")
        ISOLATION_METHODS[name] = fn
        ISOLATION_TITLES[name] = title or name
        return fn

    return wrap


def unknown_method_message(name: object) -> str:
    """What to say about an isolation method nobody registered: the closest valid name."""
    valid = sorted(ISOLATION_METHODS)
    close = difflib.get_close_matches(str(name), valid, n=1, cutoff=0.0)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown isolation method {name!r}{hint}; valid methods: {', '.join(valid)}."


def get_isolation_method(name: str) -> IsolationMethod:
    """The registered method called ``name``.

    Raises:
        InputError: no such method; the message names the closest valid one.
    """
    if name not in ISOLATION_METHODS:
        raise InputError(unknown_method_message(name))
    return ISOLATION_METHODS[name]


def pair_keys(pairs: list[tuple[int, int]], image_keys: list[RowKey] | None) -> list[RowKey]:
    """The random-stream key of each (image, class) pair: the image's key and the class."""
    return [(i if image_keys is None else image_keys[i], c) for i, c in pairs]


def blurred_substrate(images: torch.Tensor) -> torch.Tensor:
    """What an occluded cell shows: the images averaged over windows a quarter of their size."""
    h, w = images.shape[-2:]
    k = max(2, min(h, w) // 4)
    pooled = F.avg_pool2d(images, k, stride=max(1, k // 2), padding=k // 4, count_include_pad=False)
    return F.interpolate(pooled, size=(h, w), mode="bilinear", align_corners=False)


def background_noise(
    seed: int, keys: list[RowKey], shape: tuple[int, ...], device: torch.device
) -> torch.Tensor:
    """Uniform noise ``[len(keys), *shape]``, one row per key from its own stream."""
    return RowStreams(seed, keys, device).rand(shape)


def make_background(kind: str, source: torch.Tensor, seed: int, keys: list[RowKey]) -> torch.Tensor:
    """What masked-out pixels show: a heavy blur of each image, its mean colour, or seeded noise."""
    if kind == "blur":
        return blurred_substrate(source)
    if kind == "mean":
        return source.mean((2, 3), keepdim=True).expand_as(source).contiguous()
    return background_noise(seed, keys, tuple(source.shape[1:]), source.device)


def no_grad_rows(config: EngineConfig, chunk_size: int) -> int:
    """Images per forward pass without autograd: :data:`NO_GRAD_ROWS` x ``chunk_size``, or
    ``chunk_size`` when the config's ``max_batch_size`` caps every model call."""
    return chunk_size if config.max_batch_size is not None else NO_GRAD_ROWS * chunk_size


@torch.no_grad()
def calibrate(
    model: torch.nn.Module,
    source: torch.Tensor,
    classes: torch.Tensor,
    saliency: torch.Tensor,
    background: torch.Tensor,
    full: torch.Tensor,
    keep: float,
    chunk_size: int,
) -> torch.Tensor:
    """Binary masks ``[P, 1, H, W]``: per pair the top pixels of ``saliency`` at the smallest share of
    :data:`LEVELS` whose isolated image keeps ``keep`` of the full logit (for a negative logit: does
    not fall further than ``1 - keep`` of its size). ``keep == 0`` returns the saliency itself."""
    if keep <= 0:
        return saliency
    return calibrated(model, source, classes, saliency, background, full, keep, chunk_size)[0]


@torch.no_grad()
def calibrated(
    model: torch.nn.Module,
    source: torch.Tensor,
    classes: torch.Tensor,
    saliency: torch.Tensor,
    background: torch.Tensor,
    full: torch.Tensor,
    keep: float,
    rows: int,
    full_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`calibrate` (``keep > 0``), and the ``[P, K]`` logits of each chosen isolated image.

    The candidate levels of the pairs still searching are scored in blocks of
    :func:`levels_per_pass` levels, one batch of views per block; a pair's level is the first of
    :data:`LEVELS` that keeps ``keep`` whatever the block size, and a block costs one host
    synchronisation. ``full_rows`` are the logits of ``source`` (the mask of share 1 isolates the
    whole image); computed here when not given.
    """
    n, _, h, w = saliency.shape
    device = source.device
    flat = saliency.flatten(1)
    ranks = flat.argsort(1, descending=True).argsort(1).view(n, 1, h, w)
    # Pixels kept per pair: all of them unless a searched level keeps ``keep``.
    chosen = torch.full((n,), h * w, device=device)
    if full_rows is None:
        full_rows = logits_rows(model, source, rows)
    isolated_rows = full_rows.clone()
    need = full - (1 - keep) * full.abs()
    searched = list(LEVELS[:-1])
    todo = torch.arange(n, device=device)
    while searched and len(todo):
        block = searched[: levels_per_pass(device, rows, len(todo))]
        searched = searched[len(block) :]
        # Views ordered level-major: block[j] of pair todo[i] is row j * len(todo) + i.
        pair = todo.repeat(len(block))
        counts = torch.tensor(
            [round(level * h * w) for level in block], device=device
        ).repeat_interleave(len(todo))
        top = (ranks[pair] < counts.view(-1, 1, 1, 1)).to(source.dtype)
        view = source[pair] * top + background[pair] * (1 - top)
        scored = logits_rows(model, view, rows)
        ok = (scored.gather(1, classes[pair, None]).squeeze(1) >= need[pair]).view(len(block), -1)
        # The first passing level of each pair in this block (argmax of a bool takes the first).
        passed = ok.any(0)
        first = ok.to(torch.int8).argmax(0)
        winners = counts.view(len(block), -1)[first, 0]
        chosen[todo] = torch.where(passed, winners, chosen[todo])
        picked = scored.view(len(block), len(todo), -1)[first, torch.arange(len(todo))]
        isolated_rows[todo] = torch.where(passed[:, None], picked, isolated_rows[todo])
        todo = todo[~passed]  # the block's one host synchronisation
    masks = (ranks < chosen.view(n, 1, 1, 1)).to(source.dtype)
    return masks, isolated_rows


def levels_per_pass(device: torch.device, rows: int, pairs: int) -> int:
    """How many calibration levels one forward pass scores for ``pairs`` pairs still searching.

    On the CPU one: a forward costs about its images there (32 px CNN: 0.09 ms per image in a batch
    of 18, 54 or 186), so scoring levels past a pair's chosen one is wasted work. Measured on the
    marker CNNs of ``benchmarks/fidelity.py`` (issue 19): with 30 images, blocks of
    ``rows // pairs`` levels took 1.2-1.8x as long as one level per pass; with 6 about as long.
    Elsewhere (a GPU, whose small batches cost their launches rather than their images) as many as
    fill ``rows`` images; not measured in issue 19 (no GPU there).
    """
    return 1 if device.type == "cpu" else max(1, rows // max(1, pairs))


def logits_rows(model: torch.nn.Module, images: torch.Tensor, rows: int) -> torch.Tensor:
    """``[N, K]`` the model's logits of ``images``, ``rows`` images per forward pass."""
    return torch.cat([model(images[i : i + rows]) for i in range(0, len(images), rows)])


def class_probs(
    model: torch.nn.Module, images: torch.Tensor, cls: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    """``[P]`` the probability of ``cls[p]`` on ``images[p]``, ``chunk_size`` images at a time."""
    out = [
        model_probabilities(model, model(images[i : i + chunk_size])).gather(
            1, cls[i : i + chunk_size, None]
        )
        for i in range(0, len(images), chunk_size)
    ]
    return torch.cat(out).squeeze(1)


def class_logits(
    model: torch.nn.Module, images: torch.Tensor, cls: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    """``[P]`` the logit of ``cls[p]`` on ``images[p]``, ``chunk_size`` images at a time."""
    out = [
        model(images[i : i + chunk_size]).gather(1, cls[i : i + chunk_size, None]).squeeze(1)
        for i in range(0, len(images), chunk_size)
    ]
    return torch.cat(out)
