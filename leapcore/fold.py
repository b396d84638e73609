"""Batch norm folded into the convolution before it, on a copy of an eval-mode model.

In eval mode a batch norm is a fixed per-channel affine map, so ``bn(conv(x))`` is one convolution
with scaled weights and a bias. The engine never trains the model, so it can run that convolution
instead: on the CPU, EfficientNet-Lite0's forward+backward at batch 5 takes 185 ms instead of 293 ms
(the batch-norm backward and the copies around its in-place activation were a third of the step).

The user's model is never edited: the fold works on a deep copy. Pairs are found by running the copy
once with forward hooks (a batch norm whose input is exactly the output of a convolution called once),
and the folded copy is kept only if its logits match the original's on the probe batch.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

log = logging.getLogger(__name__)

# Relative agreement the folded model must reach with the original on the probe batch (folding
# changes rounding only: about 1e-6 of the logits' scale on EfficientNet-Lite0).
FOLD_TOLERANCE = 1e-3


def _replacement(bn: nn.BatchNorm2d) -> nn.Module | None:
    """What a folded batch norm becomes: nothing, or the activation it carries (timm's norm-act)."""
    if type(bn) is nn.BatchNorm2d:
        return nn.Identity()
    if type(bn).__name__ == "BatchNormAct2d" and hasattr(bn, "act") and hasattr(bn, "drop"):
        return nn.Sequential(bn.drop, bn.act)
    return None  # an unknown subclass may do more than normalise: leave it alone


def _conv_bn_pairs(model: nn.Module, probe: torch.Tensor) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """(convolution, batch norm) pairs where the norm's input is the convolution's output."""
    produced: dict[int, tuple[nn.Conv2d, torch.Tensor]] = {}  # keeps outputs alive: ids stay unique
    calls: dict[nn.Module, int] = {}
    pairs = []

    def on_conv(module, _inputs, output):
        calls[module] = calls.get(module, 0) + 1
        produced[id(output)] = (module, output)

    def on_norm(module, inputs, _output):
        calls[module] = calls.get(module, 0) + 1
        source = produced.get(id(inputs[0]))
        if source is not None:
            pairs.append((source[0], module))

    handles = []
    for module in model.modules():
        if type(module) is nn.Conv2d:
            handles.append(module.register_forward_hook(on_conv))
        elif isinstance(module, nn.BatchNorm2d):
            handles.append(module.register_forward_hook(on_norm))
    try:
        model(probe)
    finally:
        for handle in handles:
            handle.remove()
    return [(conv, bn) for conv, bn in pairs if calls[conv] == 1 and calls[bn] == 1]


def _foldable(bn: nn.BatchNorm2d) -> bool:
    return (
        not bn.training
        and bn.running_mean is not None
        and bn.running_var is not None
        and _replacement(bn) is not None
    )


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """Float32 convolutions and matrix products on CUDA for the block (no TF32).

    The check is about the fold's algebra, not the hardware's precision: with TF32 (PyTorch's
    default for cuDNN convolutions on Ampere and later) each convolution keeps about 10 bits, and the
    original and folded logits of EfficientNet-Lite0 differed by more than the tolerance on an H100.
    The runs themselves use the user's settings.
    """
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@torch.no_grad()
def fold_batchnorm(
    model: nn.Module, probe: torch.Tensor, unwrap: Callable[[Any], torch.Tensor]
) -> tuple[nn.Module | None, str]:
    """A copy of ``model`` with every eval-mode batch norm folded into its convolution.

    Args:
        model: a torch module in eval mode.
        probe: an input row the model accepts.
        unwrap: takes the logits out of the model's output.

    Returns:
        ``(folded, why)``: the folded copy with frozen parameters, or None and the reason it was not
        made (nothing to fold, a batch norm in train mode, the model cannot be copied, or the copy's
        logits disagree with the original's).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if not norms or not any(type(m) is nn.Conv2d for m in model.modules()):
        return None, "the model has no convolution followed by a batch norm"
    if any(bn.training for bn in norms):
        return None, "a batch norm is in train mode"
    try:
        folded = copy.deepcopy(model)
    except Exception as error:  # noqa: BLE001 - any model that cannot be copied keeps running as is
        return None, f"the model cannot be copied ({error})"
    with full_precision():
        reference = folded(probe)
    pairs = [(conv, bn) for conv, bn in _conv_bn_pairs(folded, probe) if _foldable(bn)]
    if not pairs:
        return None, "no batch norm reads a convolution's output directly"
    swap: dict[nn.Module, nn.Module] = {}
    for conv, bn in pairs:
        weight, bias = fuse_conv_bn_weights(
            conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
        )
        conv.weight = nn.Parameter(weight.detach(), requires_grad=False)
        conv.bias = nn.Parameter(bias.detach(), requires_grad=False)
        swap[bn] = _replacement(bn)
    for parent in list(folded.modules()):
        for name, child in list(parent.named_children()):
            if child in swap:
                setattr(parent, name, swap[child])
    for parameter in folded.parameters():
        parameter.requires_grad_(False)
    with full_precision():
        got = folded(probe)
    try:
        reference, got = unwrap(reference).float(), unwrap(got).float()
    except Exception:  # noqa: BLE001 - an output the adapter rejects is reported on the real call
        return None, "the model's output could not be compared"
    if reference.shape != got.shape:
        return None, "the model's output could not be compared"
    scale = max(1.0, float(reference.abs().max()))
    error = float((got - reference).abs().max()) / scale
    if not error <= FOLD_TOLERANCE:
        return None, f"the folded model's logits differ by {error:.2e} of their scale"
    log.debug("folded %d batch norms into their convolutions (error %.1e)", len(pairs), error)
    return folded, f"folded {len(pairs)} batch norms"
