"""The start image: a constant, per-channel values or noise, optionally optimised to be equidistant."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from leapcore import penalties, stopping
from leapcore.config import EngineConfig
from leapcore.errors import InputError
from leapcore.optim import BatchedAdam
from leapcore.outputs import probabilities
from leapcore.parameterisation import create_parameterisation
from leapcore.rng import Stream
from leapcore.transforms import DRAW_COLUMNS, NoiseBank, create_augmenter

log = logging.getLogger(__name__)


@dataclass
class BaselineResult:
    """The start image(s) ``[1 or B, C, H, W]`` in [0, 1], their logits, and how flat they are."""

    image: torch.Tensor
    logits: torch.Tensor
    spread: float
    steps: int


def initial_image(
    init: float | list[float] | str,
    shape: tuple[int, int, int],
    rows: int,
    seed: int,
    device: torch.device,
) -> torch.Tensor:
    """``[1, C, H, W]`` constant (or per-channel) image, or ``[rows, C, H, W]`` uniform noise for ``'r'``."""
    c, h, w = shape
    if init == "r":
        gen = torch.Generator(device=device).manual_seed(seed)
        return torch.rand((rows, c, h, w), generator=gen, device=device)
    if isinstance(init, list):
        if len(init) != c:
            raise InputError(
                f"baseline_init has {len(init)} values but the model takes {c} channels; give one value per channel."
            )
        values = torch.tensor(init, dtype=torch.float32, device=device)
        return values.view(1, c, 1, 1).expand(1, c, h, w).contiguous()
    return torch.full((1, c, h, w), float(init), device=device)


def spread(logits: torch.Tensor, output: str = "logits") -> torch.Tensor:
    """Max minus min class probability per row: 0 when every class is equally likely."""
    probs = probabilities(logits, output)
    return probs.max(dim=1).values - probs.min(dim=1).values


def make_baseline(
    model: torch.nn.Module,
    shape: tuple[int, int, int],
    config: EngineConfig,
    rows: int,
    device: torch.device,
) -> BaselineResult:
    """The start image; with ``use_baseline``, optimised until all classes are about equally likely.

    The equidistant optimisation minimises the variance of the softmax under the same transforms and
    smoothness penalty as prototypes, and stops once the probability spread is below ``0.5 / K`` or
    after ``baseline_steps`` steps.
    """
    image = initial_image(config.baseline_init, shape, rows, config.seed, device)
    steps = 0
    if config.use_baseline and config.baseline_steps > 0:
        image, steps = _equidistant(model, image, config)
    with torch.no_grad():
        logits = model(image)
    return BaselineResult(
        image.detach(),
        logits.detach(),
        float(spread(logits, getattr(model, "output", "logits")).max()),
        steps,
    )


def _equidistant(
    model: torch.nn.Module, start: torch.Tensor, config: EngineConfig
) -> tuple[torch.Tensor, int]:
    param = create_parameterisation(config.parameterisation, start, start.shape[0])
    optimiser = BatchedAdam(param.params)
    augmenter = create_augmenter(config.transform, (config.blur_min, config.blur_max))
    gen = torch.Generator(device=start.device).manual_seed(config.seed + Stream.BASELINE)
    bank = NoiseBank(
        config.seed + Stream.BASELINE, tuple(start.shape[1:]), start.device, start.dtype
    )
    tolerance = 0.5 / model.num_classes
    output = getattr(model, "output", "logits")
    samples = max(2, config.transform_samples)
    step = 0
    for step in range(1, config.baseline_steps + 1):
        stopping.check()
        image = param.render()
        view = image.repeat(samples, 1, 1, 1)
        if not augmenter.is_identity:
            u = torch.rand(
                (len(view), DRAW_COLUMNS), generator=gen, device=view.device, dtype=view.dtype
            )
            view = augmenter.apply(view, augmenter.draw(u, bank))
        probs = probabilities(model(view), output)
        loss = probs.var(dim=1).sum() * model.num_classes
        if config.hf_weight > 0:
            loss = loss + config.hf_weight * penalties.high_frequency(image).sum()
        grads = torch.autograd.grad(loss, param.params)
        optimiser.step(list(grads), config.lr)
        if step % 10 == 0:
            with torch.no_grad():
                flat = float(spread(model(param.render()), output).max())
            if flat < tolerance:
                break
    log.info("equidistant baseline after %d steps", step)
    return param.render().detach(), step
