"""Attribution of a Keras model through the gradient bridge; methods that need torch hooks refused."""

from __future__ import annotations

import pytest
import torch

from leapcore.attribution import attribute
from leapcore.errors import InputError
from leapcore.frameworks.tensorflow import keras_logits_model

pytestmark = pytest.mark.tf
pytest.importorskip("captum")


def test_gradient_methods_run_through_the_bridge_and_ig_is_complete(digit_cnn, digits) -> None:
    images = torch.from_numpy(digits[0][:3]).permute(0, 3, 1, 2).contiguous()
    classes = [str(i) for i in range(10)]
    result = attribute(
        digit_cnn, images, [0, 1, 2], ["ig", "saliency", "occlusion"], class_list=classes,
        integrated_gradients={"n_steps": 64}, occlusion={"window": 4, "stride": 4},
    )  # fmt: skip
    assert result.maps["saliency"].shape == (3, 16, 16)
    bridge = keras_logits_model(digit_cnn, 10)
    with torch.no_grad():
        gap = bridge(images) - bridge(torch.zeros_like(images))
    expected = gap[torch.arange(3), [0, 1, 2]]
    torch.testing.assert_close(
        result.maps["integrated_gradients"].sum(dim=(1, 2)), expected, rtol=2e-2, atol=2e-2
    )


def test_methods_that_need_torch_hooks_are_refused_with_the_possible_ones(
    digit_cnn, digits
) -> None:
    images = torch.from_numpy(digits[0][:1]).permute(0, 3, 1, 2).contiguous()
    with pytest.raises(InputError, match=r"lrp_epsilon_plus_flat, deeplift cannot run on a tf model.*"
                       r"methods that can: .*integrated_gradients.*saliency"):  # fmt: skip
        attribute(digit_cnn, images, 0, ["lrp", "deeplift"], class_list=[str(i) for i in range(10)])
