"""Same seed on the CPU (on CUDA with `deterministic`) gives identical results; another seed gives
other results."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from leapcore.device import deterministic_algorithms
from leapcore.errors import InputError

from .engine_support import EXACT, run_digits


def _run(digits, seed: int, device=EXACT, **extra):
    return run_digits(
        digits,
        [1, 7],
        transform="m",
        prototypes_per_class=2,
        seed=seed,
        isolation=True,
        isolation_steps=10,
        device=device,
        **extra,
    )


def test_same_seed_gives_identical_prototypes_and_masks(digits):
    first, second = _run(digits, 3), _run(digits, 3)
    assert torch.equal(first.prototypes.images, second.prototypes.images)
    assert torch.equal(first.prototypes.logits, second.prototypes.logits)
    assert torch.equal(first.prototypes.trajectory, second.prototypes.trajectory)
    assert torch.equal(first.isolation.masks, second.isolation.masks)


def test_same_seed_is_identical_with_noise_start_alpha_and_lr_search(digits):
    extra = {"baseline_init": "r", "use_alpha": True, "find_lr_steps": 20, "num_lr_windows": 5}
    first, second = _run(digits, 5, **extra), _run(digits, 5, **extra)
    assert first.lr.lr == second.lr.lr
    assert torch.equal(first.prototypes.images, second.prototypes.images)
    assert torch.equal(first.prototypes.alphas, second.prototypes.alphas)


def test_global_rng_state_does_not_matter(digits):
    torch.manual_seed(123)
    first = _run(digits, 3)
    torch.manual_seed(456)
    torch.rand(10)
    second = _run(digits, 3)
    assert torch.equal(first.prototypes.images, second.prototypes.images)


def test_another_seed_gives_other_prototypes(digits):
    first, other = _run(digits, 3), _run(digits, 4)
    assert not torch.equal(first.prototypes.images, other.prototypes.images)


@pytest.mark.gpu
def test_deterministic_gives_identical_runs_on_cuda(digits):
    """``deterministic: true``: PyTorch's deterministic kernels, and the warp's input gradient summed
    in a fixed order (``DeterministicGridSample``); without it these runs drift apart."""
    extra = {"use_alpha": True, "max_steps": 30, "log_freq": 10, "deterministic": True}
    first, second = _run(digits, 3, "cuda", **extra), _run(digits, 3, "cuda", **extra)
    assert torch.equal(first.prototypes.images, second.prototypes.images)
    assert torch.equal(first.prototypes.trajectory, second.prototypes.trajectory)
    assert torch.equal(first.isolation.masks, second.isolation.masks)


def test_deterministic_switches_torch_to_deterministic_kernels_and_restores_them():
    """Checked on the flags themselves, so it runs without a GPU: set for a CUDA device only,
    shared by overlapping blocks, restored by the last one, also when the block raises."""
    cuda = torch.device("cuda")
    assert not torch.are_deterministic_algorithms_enabled()
    with deterministic_algorithms(True, torch.device("cpu")):
        assert not torch.are_deterministic_algorithms_enabled()
    with deterministic_algorithms(False, cuda):
        assert not torch.are_deterministic_algorithms_enabled()
    with deterministic_algorithms(True, cuda):
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        with deterministic_algorithms(True, cuda):
            pass
        assert torch.are_deterministic_algorithms_enabled()  # the outer block still needs it
    assert not torch.are_deterministic_algorithms_enabled()
    assert not torch.backends.cudnn.deterministic
    with pytest.raises(KeyError), deterministic_algorithms(True, cuda):
        raise KeyError("boom")
    assert not torch.are_deterministic_algorithms_enabled()


def test_an_operation_without_a_deterministic_kernel_names_the_option():
    message = (
        "upsample_bicubic2d_backward_out_cuda does not have a deterministic implementation, but you "
        "set 'torch.use_deterministic_algorithms(True)'."
    )
    with pytest.raises(InputError) as err, deterministic_algorithms(True, torch.device("cuda")):
        raise RuntimeError(message)
    text = str(err.value)
    assert "upsample_bicubic2d_backward_out_cuda" in text and "deterministic: false" in text
    assert not torch.are_deterministic_algorithms_enabled()


@pytest.mark.gpu
def test_a_model_op_without_a_deterministic_cuda_kernel_is_named(digits):
    class Warps(nn.Module):
        """A model that resamples its input: grid_sample's CUDA backward has no deterministic kernel."""

        def __init__(self):
            super().__init__()
            self.net = digits.model

        def forward(self, x):
            theta = torch.eye(2, 3, device=x.device).expand(len(x), 2, 3) * 0.9
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            return self.net(F.grid_sample(x, grid, align_corners=False))

    with pytest.raises(InputError, match="grid_sampler_2d_backward_cuda.*deterministic: false"):
        run_digits(digits, model=Warps(), device="cuda", deterministic=True)
    assert not torch.are_deterministic_algorithms_enabled()
