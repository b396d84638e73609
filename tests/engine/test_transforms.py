"""The batched transforms: correct values, and the same bits for a row whatever batch it is in."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from leapcore.rng import RowStreams
from leapcore.transforms import (
    DRAW_COLUMNS,
    DeterministicGridSample,
    NoiseBank,
    affine_grid,
    create_augmenter,
    gaussian_blur,
)


def reference_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Row by row, in float64, with an explicit 2-D kernel: the textbook definition."""
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    out = []
    for row, s in zip(x.double(), sigma.double()):
        k1 = torch.exp(-0.5 * (offsets / s) ** 2)
        k1 = k1 / k1.sum()
        k2 = (k1[:, None] * k1[None, :]).expand(row.shape[0], 1, -1, -1)
        padded = F.pad(row[None], (radius,) * 4, mode="reflect")
        out.append(F.conv2d(padded, k2, groups=row.shape[0]))
    return torch.cat(out).to(x.dtype)


@pytest.mark.parametrize("channels", [1, 3])
def test_blur_matches_the_reference(channels):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, channels, 20, 17, generator=gen)
    sigma = torch.tensor([0.3, 0.8, 1.5, 2.0])
    torch.testing.assert_close(gaussian_blur(x, sigma, 3), reference_blur(x, sigma, 3))
    # A wider sigma smooths more: neighbouring pixels move closer together.
    rough = lambda y: float((y[..., 1:] - y[..., :-1]).abs().mean())  # noqa: E731
    blurred = gaussian_blur(x, sigma, 3)
    assert rough(blurred[3]) < rough(blurred[0]) < rough(x[0])


@pytest.mark.parametrize(("channels", "size"), [(1, 32), (1, 57), (3, 32), (3, 224)])
def test_blur_gives_a_row_the_same_bits_in_any_batch(channels, size):
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(7, channels, size, size, generator=gen)
    sigma = torch.rand(7, generator=gen) + 0.1
    upstream = torch.randn(x.shape, generator=gen)

    def run(rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        part = x[rows].clone().requires_grad_(True)
        out = gaussian_blur(part, sigma[rows], 2)
        (out * upstream[rows]).sum().backward()
        return out.detach(), part.grad

    whole, whole_grad = run(slice(None))
    for sizes in ([1] * 7, [2, 5], [6, 1]):
        starts = torch.tensor([0, *sizes]).cumsum(0).tolist()
        parts = [run(slice(a, b)) for a, b in zip(starts, starts[1:])]
        assert torch.equal(torch.cat([p[0] for p in parts]), whole)
        assert torch.equal(torch.cat([p[1] for p in parts]), whole_grad)


def test_augmenter_rows_do_not_depend_on_the_chunk():
    augmenter = create_augmenter("xl", (0.01, 1.0))
    x = torch.rand(6, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    bank = NoiseBank(0, (3, 48, 48), x.device, x.dtype)
    draw = augmenter.draw(RowStreams(0, range(6), "cpu").rand((DRAW_COLUMNS,)), bank)
    whole = augmenter.apply(x, draw)
    chunks = [augmenter.apply(x[i : i + 2], draw.rows(slice(i, i + 2))) for i in range(0, 6, 2)]
    assert torch.equal(torch.cat(chunks), whole)
    # Something happened: rows moved and the corners hold fill noise, not the image.
    assert not torch.allclose(whole, x, atol=0.05)


def test_row_streams_follow_the_key_not_the_position():
    alone = RowStreams(3, [("cat", 0)], "cpu").rand((5,))
    among = RowStreams(3, [("dog", 0), ("cat", 0), ("eel", 1)], "cpu").rand((5,))
    assert torch.equal(among[1], alone[0])
    assert not torch.equal(among[0], among[1])
    # Another seed, other numbers; a repeated key gets its own stream.
    assert not torch.equal(RowStreams(4, [("cat", 0)], "cpu").rand((5,)), alone)
    twice = RowStreams(3, [("cat", 0), ("cat", 0)], "cpu").rand((5,))
    assert torch.equal(twice[0], alone[0]) and not torch.equal(twice[1], twice[0])


@pytest.mark.parametrize("size", [(24, 24), (17, 31)])
def test_deterministic_grid_sample_matches_grid_sample(size):
    """The CUDA warp's own backward (checked here on the CPU): same values and input gradient as
    ``F.grid_sample``, with rotations, zooms out of the frame and flips."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, *size, generator=gen, requires_grad=True)
    angle = torch.tensor([0.0, 0.4, -1.0, 2.5])
    scale = torch.tensor([1.0, 0.7, 1.6, 1.1])  # < 1 zooms in, > 1 samples outside the frame
    flip = torch.tensor([1.0, -1.0, 1.0, -1.0])
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [
            torch.stack([cos * flip, -sin * flip, torch.tensor([0.0, 0.1, -0.3, 0.2])], 1),
            torch.stack([sin, cos, torch.tensor([0.0, -0.2, 0.1, 0.3])], 1),
        ],
        1,
    )
    grid, inside = affine_grid(theta, size)
    assert not inside.all()  # some samples fall outside the image
    upstream = torch.randn(4, 3, *size, generator=gen)

    expected = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    (expected_grad,) = torch.autograd.grad((expected * upstream).sum(), x)
    out = DeterministicGridSample.apply(x, grid)
    (grad,) = torch.autograd.grad((out * upstream).sum(), x)

    assert torch.equal(out, expected)
    assert expected_grad.abs().max() > 0.5
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-5)


@pytest.mark.gpu
def test_deterministic_grid_sample_on_cuda_repeats_its_bits():
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.rand(8, 3, 64, 64, device="cuda", generator=gen, requires_grad=True)
    theta = torch.tensor([[0.6, -0.3, 0.1], [0.3, 0.6, -0.1]], device="cuda").expand(8, 2, 3)
    grid, _ = affine_grid(theta, (64, 64))  # zoomed in: many outputs share each source pixel
    upstream = torch.randn(8, 3, 64, 64, device="cuda", generator=gen)
    grads = [
        torch.autograd.grad((DeterministicGridSample.apply(x, grid) * upstream).sum(), x)[0]
        for _ in range(5)
    ]
    assert all(torch.equal(g, grads[0]) for g in grads)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    (expected,) = torch.autograd.grad((out * upstream).sum(), x)
    torch.testing.assert_close(grads[0], expected, rtol=0, atol=1e-5)
