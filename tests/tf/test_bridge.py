"""The gradient bridge: one torch op around a Keras model; values and gradients equal TensorFlow's own."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tf_support import build_digit_cnn

from leapcore.adapter import LogitsModel
from leapcore.errors import InputError, ModelOutputError
from leapcore.frameworks.tensorflow import keras_logits_model
from leapcore.models import Normalize

pytestmark = pytest.mark.tf


def nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def test_forward_and_input_gradient_match_tensorflow(tf, digit_cnn, digits):
    images = digits[0][:6]
    model = keras_logits_model(digit_cnn, 10)
    assert isinstance(model, LogitsModel)
    assert model.input_shape == (1, 16, 16) and model.num_classes == 10
    pixels = nchw(images).requires_grad_(True)
    logits = model(pixels)
    upstream = torch.randn(logits.shape, generator=torch.Generator().manual_seed(0))
    logits.backward(upstream)

    x = tf.constant(images)
    with tf.GradientTape() as tape:
        tape.watch(x)
        expected = digit_cnn(x, training=False)
    grad = tape.gradient(expected, x, output_gradients=tf.constant(upstream.numpy()))
    np.testing.assert_allclose(logits.detach().numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        pixels.grad.permute(0, 2, 3, 1).numpy(), grad.numpy(), rtol=1e-5, atol=1e-6
    )
    assert float(pixels.grad.abs().sum()) > 0


def test_inference_mode_is_used(digit_cnn, digits):
    """Dropout is off: two calls give the same logits, with and without gradients."""
    model = keras_logits_model(digit_cnn, 10)
    pixels = nchw(digits[0][:4])
    with torch.no_grad():
        first = model(pixels)
    second = model(pixels.clone().requires_grad_(True)).detach()
    torch.testing.assert_close(first, second)


def test_unaligned_and_sliced_buffers(digit_cnn, digits):
    """Views of numpy arrays and row slices need not be 64-byte aligned; TensorFlow aborts on those."""
    model = keras_logits_model(digit_cnn, 10)
    base = torch.from_numpy(np.ascontiguousarray(digits[0][:7])).permute(0, 3, 1, 2)
    rows = [model(base[i : i + 2].contiguous()) for i in range(0, 6, 2)]
    whole = model(base[:6].clone())
    torch.testing.assert_close(torch.cat(rows), whole.detach(), rtol=1e-5, atol=1e-5)


def test_preprocessing_torch_modules_and_tensorflow_callables(tf, digit_cnn, digits):
    images = digits[0][:3]
    expected = digit_cnn(tf.constant((images - 0.5) / 0.25), training=False).numpy()
    via_torch = keras_logits_model(digit_cnn, 10, [Normalize((0.5,), (0.25,))])
    via_tf = keras_logits_model(digit_cnn, 10, lambda x: (x - 0.5) / 0.25)
    with torch.no_grad():
        for model in (via_torch, via_tf):
            np.testing.assert_allclose(model(nchw(images)).numpy(), expected, rtol=1e-4, atol=1e-4)


def test_preprocessing_that_cannot_be_traced_runs_eagerly(digit_cnn, digits, caplog):
    """A step that needs eager tensors (.numpy()) falls back from tf.function with a warning."""

    def numpy_step(x):
        return x * float(np.asarray(x.numpy()).max() > -1)

    model = keras_logits_model(digit_cnn, 10, numpy_step)
    pixels = nchw(digits[0][:2]).requires_grad_(True)
    model(pixels).sum().backward()
    assert float(pixels.grad.abs().sum()) > 0
    assert "running it eagerly" in caplog.text


def test_probabilities_are_refused(digits):

    model = keras_logits_model(build_digit_cnn(softmax=True), 10)
    with pytest.raises(ModelOutputError, match="returns probabilities"):
        model(nchw(digits[0][:2]))


def test_input_dim_that_disagrees_with_the_model(digit_cnn):
    with pytest.raises(
        InputError, match=r"the Keras model takes \(1, 16, 16\); pass input_dim=\[1, 16, 16, 1\]"
    ):
        keras_logits_model(digit_cnn, 10, None, (3, 32, 32))


def test_output_width_that_disagrees_with_the_class_list(digit_cnn, digits):
    model = keras_logits_model(digit_cnn, 3)
    with pytest.raises(ModelOutputError, match="returns 10 outputs but class_list has 3 names"):
        model(nchw(digits[0][:1]))


def test_backward_twice_with_retain_graph(digit_cnn, digits):
    model = keras_logits_model(digit_cnn, 10)
    pixels = nchw(digits[0][:2]).requires_grad_(True)
    out = model(pixels).sum()
    out.backward(retain_graph=True)
    once = pixels.grad.clone()
    out.backward()
    torch.testing.assert_close(pixels.grad, 2 * once)


def test_pixels_changed_in_place_before_backward_are_caught(digit_cnn, digits):
    """TensorFlow may alias the pixels' buffer; torch's version counter guards it."""
    model = keras_logits_model(digit_cnn, 10)
    leaf = nchw(digits[0][:2]).requires_grad_(True)
    pixels = leaf * 1.0
    out = model(pixels).sum()
    with torch.no_grad():
        pixels.add_(0.1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()
