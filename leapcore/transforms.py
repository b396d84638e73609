"""Batched robustness transforms: random affine presets with noise fill, flips, and per-row blur.

Every transform takes one set of random parameters per batch row (uniforms from the row's own
stream, ``leapcore.rng``), then acts on the whole batch with one element-wise affine grid, one
``grid_sample`` and one depthwise convolution, so the cost is a small fraction of a model's forward
pass and a row gets the same bits whatever else is in its batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_PRESETS: dict[str, AffinePreset] = {}
# Uniform noise images a row's out-of-frame fill is picked from, each step.
NOISE_BANK = 16


def register_transform(name: str, preset: AffinePreset) -> None:
    """Register an affine preset under ``name`` (the config's ``transform`` takes these names)."""
    _PRESETS[name] = preset


def list_transforms() -> list[str]:
    return sorted(_PRESETS)


@dataclass(frozen=True)
class AffinePreset:
    degrees: float
    translate: float
    scale: tuple[float, float]
    flip: bool = True


register_transform("s", AffinePreset(5, 0.05, (0.95, 1.05)))
register_transform("m", AffinePreset(10, 0.05, (0.9, 1.1)))
register_transform("l", AffinePreset(20, 0.10, (0.8, 1.2)))
register_transform("xl", AffinePreset(30, 0.20, (0.7, 1.3)))


def _uniform(
    n: int, low: float, high: float, like: torch.Tensor, gen: torch.Generator | None
) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=like.device, dtype=like.dtype) * (high - low) + low


@dataclass
class AugmentationDraw:
    """The random draws of one step for every row: affine matrices, blur sigmas and fill noise."""

    theta: torch.Tensor | None  # [N, 2, 3]
    sigma: torch.Tensor | None  # [N]
    noise: torch.Tensor | None  # [N, C, H, W]

    def rows(self, index: slice | torch.Tensor) -> AugmentationDraw:
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return AugmentationDraw(pick(self.theta), pick(self.sigma), pick(self.noise))


class NoiseBank:
    """``NOISE_BANK`` uniform noise images drawn once from ``seed``; rows pick one per step.

    Drawing fresh noise for every row of every step cost more than the affine warp itself; picking
    from a bank still changes a row's fill from step to step.
    """

    def __init__(self, seed: int, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype):
        gen = torch.Generator(device=device).manual_seed(seed)
        self.images = torch.rand((NOISE_BANK, *shape), generator=gen, device=device, dtype=dtype)

    def pick(self, u: torch.Tensor) -> torch.Tensor:
        """One image per row from uniforms ``u`` in [0, 1) of shape ``[N]``."""
        index = (u * NOISE_BANK).long().clamp_(0, NOISE_BANK - 1)
        return self.images.index_select(0, index)


# Uniforms one row uses per step: angle, scale, shift x, shift y, flip, fill pick, blur sigma.
DRAW_COLUMNS = 7


class Augmenter:
    """Random affine preset (noise-filled) then per-row Gaussian blur, drawn for the whole batch at once.

    Drawing first and applying per chunk keeps results identical however a batch is split.
    """

    def __init__(self, preset: AffinePreset | None, blur: tuple[float, float] = (0.0, 0.0)):
        self.preset = preset
        self.blur = blur

    @property
    def is_identity(self) -> bool:
        return self.preset is None and self.blur[1] <= 0

    def draw(self, u: torch.Tensor, bank: NoiseBank) -> AugmentationDraw:
        """The draw for ``len(u)`` rows from their uniforms ``u`` (``[N, DRAW_COLUMNS]`` in [0, 1))."""
        theta = noise = sigma = None
        between = lambda col, low, high: u[:, col] * (high - low) + low  # noqa: E731
        if self.preset is not None:
            p = self.preset
            angle = between(0, -p.degrees, p.degrees) * (math.pi / 180)
            scale = between(1, *p.scale)
            shift_x = between(2, -p.translate, p.translate) * 2
            shift_y = between(3, -p.translate, p.translate) * 2
            flip = torch.ones_like(angle)
            if p.flip:
                flip = torch.where(u[:, 4] < 0.5, -flip, flip)
            cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
            # theta maps output to input coordinates; the flip mirrors the input x axis.
            theta = torch.stack(
                [
                    torch.stack([cos * flip, -sin * flip, shift_x], dim=1),
                    torch.stack([sin, cos, shift_y], dim=1),
                ],
                dim=1,
            )
            noise = bank.pick(u[:, 5])
        if self.blur[1] > 0:
            sigma = between(6, *self.blur)
        return AugmentationDraw(theta, sigma, noise)

    def apply(self, x: torch.Tensor, draw: AugmentationDraw) -> torch.Tensor:
        if draw.theta is not None:
            grid, inside = affine_grid(draw.theta, x.shape[-2:])
            out = grid_sample(x, grid)
            x = torch.where(inside, out, draw.noise)
        if draw.sigma is not None:
            radius = min(int(math.ceil(2 * self.blur[1])), (min(x.shape[-2:]) - 1) // 2)
            x = gaussian_blur(x, draw.sigma, radius)
        return x


def grid_sample(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """``F.grid_sample(x, grid)``, bilinear, zero padding, ``align_corners=False``.

    ``F.grid_sample``'s CUDA backward adds into the input gradient with atomics and has no
    deterministic kernel: under ``torch.use_deterministic_algorithms`` (the config's
    ``deterministic``) it raises. There the input gradient is summed by
    :class:`DeterministicGridSample` instead (the grid never needs a gradient here).
    """
    if (
        x.device.type == "cuda"
        and x.requires_grad
        and not grid.requires_grad
        and torch.are_deterministic_algorithms_enabled()
    ):
        return DeterministicGridSample.apply(x, grid)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class DeterministicGridSample(torch.autograd.Function):
    """Bilinear ``grid_sample`` (zero padding, ``align_corners=False``) whose input gradient is
    summed with one ``index_put_(accumulate=True)``, which under deterministic algorithms sorts the
    indices and adds each target's contributions in a fixed order. The grid gets no gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(grid)
        ctx.input_shape = x.shape
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:
        (grid,) = ctx.saved_tensors
        n, c, h, w = ctx.input_shape
        # Source coordinates in pixels (grid_sample's unnormalisation for align_corners=False).
        ix = ((grid[..., 0] + 1) * w - 1) / 2  # [N, Ho, Wo]
        iy = ((grid[..., 1] + 1) * h - 1) / 2
        x0, y0 = ix.floor(), iy.floor()
        fx, fy = ix - x0, iy - y0
        base = torch.arange(n, device=grid.device)[:, None, None] * (h * w)
        g = grad_out.permute(0, 2, 3, 1)  # [N, Ho, Wo, C]
        indices, values = [], []
        for dx, dy, weight in (
            (0, 0, (1 - fx) * (1 - fy)),
            (1, 0, fx * (1 - fy)),
            (0, 1, (1 - fx) * fy),
            (1, 1, fx * fy),
        ):
            xs, ys = x0 + dx, y0 + dy
            inside = (xs >= 0) & (xs <= w - 1) & (ys >= 0) & (ys <= h - 1)
            flat = base + ys.clamp(0, h - 1).long() * w + xs.clamp(0, w - 1).long()
            indices.append(flat.reshape(-1))
            values.append((g * (weight * inside).unsqueeze(-1)).reshape(-1, c))
        grad = torch.zeros(n * h * w, c, device=grad_out.device, dtype=grad_out.dtype)
        grad.index_put_((torch.cat(indices),), torch.cat(values), accumulate=True)
        return grad.view(n, h, w, c).permute(0, 3, 1, 2), None


def affine_grid(theta: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``F.affine_grid(theta, ..., align_corners=False)`` written element-wise (a quarter of its
    cost, and a row's grid never depends on the batch), with the mask of output pixels whose source
    lies inside the image.

    Returns:
        ``(grid [N, H, W, 2], inside [N, 1, H, W] bool)``.
    """
    h, w = size
    xs = (torch.arange(w, device=theta.device, dtype=theta.dtype) * 2 + 1) / w - 1
    ys = (torch.arange(h, device=theta.device, dtype=theta.dtype) * 2 + 1) / h - 1
    t = theta[:, :, :, None, None]  # [N, 2, 3, 1, 1]
    coords = t[:, :, 0] * xs + t[:, :, 1] * ys[:, None] + t[:, :, 2]  # [N, 2, H, W]
    inside = (coords.abs() <= 1).all(dim=1, keepdim=True)
    return coords.permute(0, 2, 3, 1), inside


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per row (``sigma`` of shape ``[B]``), reflect-padded.

    Every channel of every row is one group of a depthwise convolution over ``[1, B*C, H, W]``:
    each group is computed on its own, so a row gets the same bits whatever else is in the batch
    (``max_batch_size`` chunks stay identical on CPU), at about a third of the cost of shifted sums.
    A single group would take the dense convolution path, which rounds differently, so a lone
    one-channel row is blurred as two.
    """
    if radius < 1:
        return x
    b, c, h, w = x.shape
    if b * c == 1:
        return gaussian_blur(torch.cat([x, x]), torch.cat([sigma, sigma]), radius)[:1]
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (offsets[None] / sigma.clamp_min(1e-3)[:, None]) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # [B*C, k]
    y = F.pad(x.reshape(1, b * c, h, w), (radius,) * 4, mode="reflect")
    y = F.conv2d(y, kernel[:, None, None, :], groups=b * c)  # along width
    y = F.conv2d(y, kernel[:, None, :, None], groups=b * c)  # along height
    return y.view(b, c, h, w)


def create_augmenter(name: str | None, blur: tuple[float, float] = (0.0, 0.0)) -> Augmenter:
    """The augmenter for a registered preset name (None: blur only)."""
    if name is not None and name not in _PRESETS:
        raise KeyError(f"unknown transform {name!r}; known: {list_transforms()}")
    return Augmenter(None if name is None else _PRESETS[name], blur)


def random_resized_crop_flip(
    x: torch.Tensor,
    gen: torch.Generator | None = None,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """Random resized crops and horizontal flips, one per row: the robustness check of prototypes."""
    n = x.shape[0]
    area = _uniform(n, *scale, x, gen)
    log_ratio = _uniform(n, math.log(ratio[0]), math.log(ratio[1]), x, gen)
    aspect = torch.exp(log_ratio)
    width = torch.sqrt(area * aspect).clamp(max=1.0)
    height = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = _uniform(n, 0, 1, x, gen) * (1 - width) * 2 - (1 - width)
    cy = _uniform(n, 0, 1, x, gen) * (1 - height) * 2 - (1 - height)
    flip = torch.where(_uniform(n, 0, 1, x, gen) < 0.5, -1.0, 1.0).to(x.dtype)
    zero = torch.zeros_like(width)
    theta = torch.stack(
        [torch.stack([width * flip, zero, cx], 1), torch.stack([zero, height, cy], 1)], dim=1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
