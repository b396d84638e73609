"""How an image batch is parameterised for optimisation.

Every parameterisation renders ``sigmoid(offset + delta(params))``: ``offset`` is the start image in
logit space (so any start image, constant, noise or an optimised baseline, is reproduced exactly at
step 0) and ``delta`` starts at zero. The sigmoid keeps every pixel inside [0, 1].

- ``pixel``: ``delta`` is a free tensor per pixel.
- ``fourier``: ``delta`` is the inverse real FFT of a spectrum scaled by 1/frequency, mixed through a
  decorrelated colour basis for 3-channel images (Olah et al., Lucid; Fel et al., MACO). Steps then
  move low frequencies first, which gives natural-looking prototypes that survive crops and flips.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from leapcore import rowwise

_EPS = 1e-4

# Square root of the ImageNet colour covariance (Lucid), normalised so that its largest column has norm 1.
_COLOUR_SQRT = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
_COLOUR_SQRT = _COLOUR_SQRT / _COLOUR_SQRT.norm(dim=0).max()


def to_logit(image: torch.Tensor) -> torch.Tensor:
    return torch.logit(image.clamp(_EPS, 1 - _EPS))


@dataclass
class Parameterisation:
    """Parameters (leaf tensors with gradients) and the function that renders them into images."""

    params: list[torch.Tensor]
    render_delta: Callable[[slice], torch.Tensor]
    offset: torch.Tensor

    def render(self, rows: slice = slice(None)) -> torch.Tensor:
        """Images ``[B, C, H, W]`` in [0, 1] for the rows ``rows`` (all rows by default)."""
        return rowwise.sigmoid(self.offset[rows] + self.render_delta(rows))

    def snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params]

    def restore(self, values: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, v in zip(self.params, values):
                p.copy_(v)


_PARAMETERISATIONS: dict[str, Callable[..., Parameterisation]] = {}


def register_parameterisation(name: str):
    def wrap(factory: Callable[..., Parameterisation]) -> Callable[..., Parameterisation]:
        _PARAMETERISATIONS[name] = factory
        return factory

    return wrap


def list_parameterisations() -> list[str]:
    return sorted(_PARAMETERISATIONS)


def create_parameterisation(name: str, start: torch.Tensor, batch: int) -> Parameterisation:
    """A parameterisation whose first render equals ``start`` (``[1 or batch, C, H, W]`` in [0, 1])."""
    if name not in _PARAMETERISATIONS:
        raise KeyError(f"unknown parameterisation {name!r}; known: {list_parameterisations()}")
    offset = to_logit(start).expand(batch, *start.shape[1:]).contiguous()
    return _PARAMETERISATIONS[name](offset)


@register_parameterisation("pixel")
def pixel(offset: torch.Tensor) -> Parameterisation:
    delta = torch.zeros_like(offset, requires_grad=True)
    return Parameterisation([delta], lambda rows: delta[rows], offset)


def _frequency_scale(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    fy = torch.fft.fftfreq(h, device=device, dtype=dtype)[:, None]
    fx = torch.fft.rfftfreq(w, device=device, dtype=dtype)[None, :]
    freq = torch.sqrt(fx**2 + fy**2)
    scale = 1.0 / torch.clamp(freq, min=1.0 / max(h, w))
    # Normalise so that a unit step in the spectrum moves pixels by about one unit, whatever the size.
    return scale / scale.pow(2).mean().sqrt()


@register_parameterisation("fourier")
def fourier(offset: torch.Tensor) -> Parameterisation:
    b, c, h, w = offset.shape
    scale = _frequency_scale(h, w, offset.device, offset.dtype)
    spectrum = torch.zeros(
        b, c, h, w // 2 + 1, 2, device=offset.device, dtype=offset.dtype, requires_grad=True
    )
    colour = _COLOUR_SQRT.to(offset.device, offset.dtype) if c == 3 else None

    def render_delta(rows: slice) -> torch.Tensor:
        complex_spec = torch.view_as_complex(spectrum[rows]) * scale
        # One inverse FFT (and one colour matmul of the same shape) per row: a batched FFT rounds
        # differently from a single one, and chunked batches (``max_batch_size``) must give the same
        # bits. ``split`` rather than indexing keeps the backward one concatenation, not one
        # full-size zero gradient per row.
        deltas = []
        for row in complex_spec.split(1):
            delta = torch.fft.irfft2(row, s=(h, w), norm="ortho")
            if colour is not None:
                delta = (colour @ delta.view(c, h * w)).view(1, c, h, w)
            deltas.append(delta)
        return torch.cat(deltas)

    return Parameterisation([spectrum], render_delta, offset)
