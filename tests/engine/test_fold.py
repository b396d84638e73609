"""Batch norms folded into their convolutions: the same function, on a copy, never a wrong model."""

from __future__ import annotations

import pytest
import torch
from timm.layers import BatchNormAct2d
from torch import nn

from leapcore import engine
from leapcore.adapter import LogitsModel, eval_mode
from leapcore.errors import InputError

from .engine_support import fast_config

BATCH = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def randomise_statistics(model: nn.Module) -> nn.Module:
    """Running statistics and affine parameters far from the identity, so a wrong fold shows."""
    generator = torch.Generator().manual_seed(2)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator))
            module.running_var.copy_(torch.rand(n, generator=generator) * 3 + 0.1)
            module.weight.data.copy_(torch.randn(n, generator=generator))
            module.bias.data.copy_(torch.randn(n, generator=generator))
    return model.eval()


class ConvBnNet(nn.Module):
    """conv -> BN -> ReLU twice, then a head; ``reuse=True`` also adds the first conv's raw output
    to the block's result, so folding that BN into the conv would change the function."""

    def __init__(self, reuse: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.bn1 = nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 5)
        self.reuse = reuse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raw = self.conv1(x)
        y = torch.relu(self.bn1(raw))
        y = torch.relu(self.bn2(self.conv2(y)))
        if self.reuse:
            y = y + raw
        return self.head(y.mean((2, 3)))


def timm_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        BatchNormAct2d(8, act_layer=nn.ReLU6),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),
        BatchNormAct2d(8, act_layer=nn.ReLU6),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )


def input_gradient(model: nn.Module, target: int = 2) -> torch.Tensor:
    pixels = BATCH.clone().requires_grad_(True)
    model(pixels)[:, target].sum().backward()
    return pixels.grad


@pytest.mark.parametrize("make", [ConvBnNet, timm_net], ids=["torch-bn", "timm-bn-act"])
def test_folded_copy_computes_the_same_logits_and_gradients_and_leaves_the_model_alone(make):
    net = randomise_statistics(make())
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with eval_mode(net):
        folded = LogitsModel(net, 5, input_shape=(3, 16, 16))
        plain = LogitsModel(net, 5, input_shape=(3, 16, 16), fold_batchnorm=False)
        torch.testing.assert_close(folded(BATCH), plain(BATCH), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(
            input_gradient(folded), input_gradient(plain), rtol=1e-4, atol=1e-6
        )
    assert folded.folded is not None and plain.folded is None
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.folded.modules())
    # The user's model still has its batch norms, the same weights, and its training mode back.
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == 2
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not any(p.requires_grad for p in folded.folded.parameters())


def test_a_fold_that_would_change_the_function_is_not_used():
    net = randomise_statistics(ConvBnNet(reuse=True))
    with eval_mode(net):
        auto = LogitsModel(net, 5, input_shape=(3, 16, 16))
        expected = net(BATCH)
        torch.testing.assert_close(auto(BATCH), expected)
    assert auto.folded is None


def test_forcing_a_fold_that_cannot_be_made_names_the_option():
    net = randomise_statistics(ConvBnNet(reuse=True))
    with eval_mode(net), pytest.raises(InputError, match="fold_batchnorm to None") as caught:
        LogitsModel(net, 5, input_shape=(3, 16, 16), fold_batchnorm=True)(BATCH)
    assert "differ" in str(caught.value)


def test_batch_norms_in_train_mode_are_not_folded():
    net = randomise_statistics(ConvBnNet()).train()
    model = LogitsModel(net, 5, input_shape=(3, 16, 16))
    model(BATCH)
    assert model.folded is None


def test_the_engine_runs_the_folded_copy_and_agrees_with_the_unfolded_run():
    classes = [f"c{i}" for i in range(5)]
    runs, calls = {}, {}
    for fold in (None, False):
        net = randomise_statistics(ConvBnNet())
        seen: list[int] = []
        # A deep copy keeps the hook, so it also counts the folded copy's calls.
        net.bn2.register_forward_hook(lambda *_, seen=seen: seen.append(1))
        config = fast_config(
            input_dim=[3, 16, 16], max_steps=5, isolation=False, fold_batchnorm=fold, lr=0.05
        )
        runs[fold] = engine.run(net, classes, config, target_classes=[1, 3])
        calls[fold] = len(seen)
    # Folded: the batch norm ran only in the two probe calls that made the copy.
    assert calls[None] == 2 and calls[False] > 5  # one a step, at least
    folded, plain = runs[None].prototypes, runs[False].prototypes
    torch.testing.assert_close(folded.images, plain.images, rtol=0, atol=1e-3)
    torch.testing.assert_close(folded.probs, plain.probs, rtol=0, atol=1e-3)


@pytest.mark.gpu
def test_the_fold_is_checked_in_full_precision_on_cuda(lite0):
    """Under TF32 (PyTorch's default for cuDNN convolutions) the original and folded logits of
    EfficientNet-Lite0 differ by ~4e-3 of their scale on an H100; the check runs in float32."""
    preprocessing, net, classes = lite0
    device = torch.device("cuda")
    assert torch.backends.cudnn.allow_tf32
    try:
        net.to(device)
        model = LogitsModel(net, len(classes), preprocessing)
        if isinstance(model.preprocess, nn.Module):
            model.preprocess.to(device)
        with eval_mode(net):
            model(torch.rand(2, 3, 224, 224, device=device))
        assert model.folded is not None
        assert torch.backends.cudnn.allow_tf32  # the user's setting is back
    finally:
        net.to("cpu")
