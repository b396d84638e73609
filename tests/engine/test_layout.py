"""Channels-last batches on the CPU: used when they help, never at the cost of a model that breaks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from leapcore import engine
from leapcore.adapter import LogitsModel
from leapcore.errors import InputError

from .engine_support import fast_config


class SmallNet(nn.Module):
    """A 3-channel conv net; ``view=True`` flattens with ``.view``, which channels-last rejects."""

    def __init__(self, view: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4 * 16 * 16, 5)
        self.view = view
        self.layouts: list[bool] = []  # per call: did the conv get a channels-last batch?

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.layouts.append(x.is_contiguous(memory_format=torch.channels_last))
        features = torch.relu(self.conv(x))
        flat = features.view(len(x), -1) if self.view else features.flatten(1)
        return self.head(flat)


BATCH = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def test_auto_feeds_a_conv_net_channels_last_on_the_cpu_with_the_same_logits():
    net = SmallNet(view=False)
    auto = LogitsModel(net, 5, input_shape=(3, 16, 16))
    plain = LogitsModel(net, 5, input_shape=(3, 16, 16), channels_last=False)
    fast, usual = auto(BATCH), plain(BATCH)
    assert net.layouts == [True, False]
    torch.testing.assert_close(fast, usual, rtol=1e-5, atol=1e-6)
    # Gradients reach the pixels through the layout change.
    pixels = BATCH.clone().requires_grad_(True)
    auto(pixels)[:, 2].sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0


def test_a_model_without_convolutions_keeps_the_usual_layout():
    seen: list[bool] = []

    class Linear(nn.Module):
        def forward(self, x):
            seen.append(x.is_contiguous())
            return x.flatten(1)[:, :5]

    LogitsModel(Linear(), 5, input_shape=(3, 16, 16))(BATCH)
    assert seen == [True]


def test_auto_falls_back_when_the_model_rejects_channels_last():
    net = SmallNet(view=True)
    audit = engine.run(
        net,
        [f"c{i}" for i in range(5)],
        fast_config(input_dim=[3, 16, 16], max_steps=3, isolation=False),
        target_classes=[1],
        device="cpu",  # channels-last is automatic on the CPU only
    )
    assert audit.prototypes.images.shape == (1, 3, 16, 16)
    # The first call tried channels-last and failed; every later call used the usual layout.
    assert net.layouts[0] is True and not any(net.layouts[1:])


def test_forcing_channels_last_on_a_model_that_rejects_it_names_the_option():
    net = SmallNet(view=True)
    with pytest.raises(InputError, match="channels_last to None"):
        engine.run(
            net,
            [f"c{i}" for i in range(5)],
            fast_config(input_dim=[3, 16, 16], max_steps=3, isolation=False, channels_last=True),
            target_classes=[1],
        )
