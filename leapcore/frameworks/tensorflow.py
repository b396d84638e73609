"""TensorFlow / Keras models in the PyTorch engine, through a gradient bridge.

The engine optimises torch tensors; a Keras model joins the same optimisation as one differentiable
torch op (:class:`KerasBridge`): its forward hands the NCHW pixels to TensorFlow (zero-copy through
DLPack where TensorFlow accepts the buffer), transposes to NHWC, applies TensorFlow-side
preprocessing and runs the model with ``training=False``; its backward runs the model again under a
``tf.GradientTape`` with the upstream gradient and hands the input gradient back to torch. Both are
``tf.function`` graphs traced once for any batch size.

Preprocessing in ``mode="tf"``: ``torch.nn.Module`` steps (e.g. leapcore's ``Normalize``) run in torch
on NCHW pixels before the bridge; any other callable runs in TensorFlow on NHWC tensors, as leap-ie
passes them.

Loading: ``.keras`` / ``.h5`` files with ``safe_mode=True`` unless trusted; SavedModel folders through
their ``serving_default`` signature, refused unless trusted when that graph reads or writes files or
calls Python.

TensorFlow is imported by this module only, and this module only when a TensorFlow model is used.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from leapcore.adapter import LogitsModel, Preprocessing
from leapcore.errors import InputError, ModelOutputError, ModelSourceError, UntrustedSourceError

log = logging.getLogger(__name__)

DEFAULT_SHAPE = (3, 224, 224)
_TF_ALIGNMENT = 64
# Ops a SavedModel's serving graph has no business running: file access, Python calls, summaries.
_UNSAFE_OPS = (
    "ReadFile",
    "WriteFile",
    "MatchingFiles",
    "DeleteFile",
    "PyFunc",
    "PyFuncStateless",
    "EagerPyFunc",
    "Save",
    "SaveV2",
    "SaveSlices",
    "Restore",
    "RestoreV2",
    "RestoreSlice",
    "MergeV2Checkpoints",
    "PrintV2",
    "CreateSummaryFileWriter",
    "WriteSummary",
    "ImmutableConst",
)
# Whole op families that can reach files, Python, the network or the console: any op whose name
# contains one of these is refused unless trusted (tf.data writers such as DatasetToTFRecord and
# SaveDatasetV2, readers, summaries, prints, checkpoints, py_function, ...). A serving graph of an
# image classifier needs none of them.
_UNSAFE_OP_PARTS = (
    "File",
    "Dataset",
    "Iterator",
    "Reader",
    "Writer",
    "Summary",
    "Print",
    "PyFunc",
    "Save",
    "Restore",
    "Checkpoint",
    "Record",
    "Sql",
    "Socket",
    "Rpc",
    "Enqueue",
    "Dequeue",
    "Queue",
    "Lookup",
    "ImportTable",
    "InitializeTableFromTextFile",
)


def unsafe_ops(ops: set[str]) -> list[str]:
    """The ops of ``ops`` that can touch files, Python, the network or the console."""
    return sorted(
        op for op in ops if op in _UNSAFE_OPS or any(part in op for part in _UNSAFE_OP_PARTS)
    )


def import_tensorflow() -> Any:
    """``tensorflow``, or an error that says how to install it."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf
    except ImportError:
        raise InputError(
            "mode='tf' needs TensorFlow: pip install 'leapcore[tf]' (tensorflow-cpu on machines "
            "without a GPU)."
        ) from None
    return tf


def _keras() -> Any:
    import_tensorflow()
    import keras

    return keras


def is_keras_model(model: Any) -> bool:
    keras = sys.modules.get("keras")
    if keras is None:
        keras = _keras()
    return isinstance(model, keras.Model)


# ---------------------------------------------------------------------------------------------- #
# Calling a model the same way everywhere
# ---------------------------------------------------------------------------------------------- #
def _logits_tensor(output: Any) -> Any:
    """The logits of a Keras / SavedModel output: a tensor, a dict with one output or ``logits``."""
    if isinstance(output, dict):
        if "logits" in output:
            return output["logits"]
        if len(output) == 1:
            return next(iter(output.values()))
        raise ModelOutputError(
            f"the TensorFlow model returned outputs {sorted(output)}; expected one output or a "
            "'logits' key. Wrap the model so that it returns the logits."
        )
    if isinstance(output, (list, tuple)):
        return output[0]
    return output


def call_model(model: Any, x: Any) -> Any:
    """``model(x)`` in inference mode; Keras models get ``training=False``."""
    if is_keras_model(model):
        return _logits_tensor(model(x, training=False))
    return _logits_tensor(model(x))


class SavedModelFunction:
    """A SavedModel's ``serving_default`` signature as a callable on one NHWC batch."""

    def __init__(self, loaded: Any, signature: Any, input_name: str):
        self.loaded = loaded
        self.signature = signature
        self.input_name = input_name

    @property
    def variables(self) -> list[Any]:
        return list(self.loaded.variables)

    def __call__(self, x: Any) -> Any:
        return self.signature(**{self.input_name: x})

    def __repr__(self) -> str:
        return f"SavedModelFunction(input={self.input_name!r})"


def keras_input_shape(model: Any) -> tuple[int, int, int] | None:
    """``(C, H, W)`` of a Keras model (or SavedModel function) when its input shape is fixed."""
    try:
        if isinstance(model, SavedModelFunction):
            shape = model.signature.structured_input_signature[1][model.input_name].shape
        else:
            shape = model.inputs[0].shape
        dims = list(shape)
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        return None
    if len(dims) != 4 or any(d is None for d in dims[1:]):
        return None
    h, w, c = (int(d) for d in dims[1:])
    return (c, h, w)


def keras_output(model: Any, nhwc_shape: Sequence[int]) -> torch.Tensor:
    """The model's logits on a mid-grey NHWC batch (the sources' trial forward pass)."""
    tf = import_tensorflow()
    x = tf.constant(np.full(tuple(nhwc_shape), 0.5, dtype=np.float32))
    return torch.from_numpy(np.array(call_model(model, x)))


# ---------------------------------------------------------------------------------------------- #
# The gradient bridge
# ---------------------------------------------------------------------------------------------- #
def _to_tf(t: torch.Tensor, tf: Any) -> Any:
    """A torch tensor as a ``tf.Tensor``: DLPack (no copy) where TensorFlow takes the buffer."""
    t = t.detach()
    if t.device.type != "cpu" and not tf.config.list_physical_devices("GPU"):
        t = t.cpu()
    t = t.contiguous()
    if t.data_ptr() % _TF_ALIGNMENT:
        # TensorFlow's CPU kernels assume 64-byte aligned buffers (and abort otherwise); views
        # of numpy arrays or row slices need not be. A torch copy is aligned.
        t = t.clone()
    try:
        return tf.experimental.dlpack.from_dlpack(torch.utils.dlpack.to_dlpack(t))
    except Exception:  # a buffer TensorFlow will not alias; copy through numpy
        return tf.convert_to_tensor(t.cpu().numpy())


def _to_torch(value: Any, device: torch.device) -> torch.Tensor:
    try:
        out = torch.from_dlpack(value)
    except Exception:
        out = torch.from_numpy(np.array(value))
    return out.to(device)


class _BridgeFunction(torch.autograd.Function):
    """One differentiable op: torch NCHW pixels -> TensorFlow model -> torch logits.

    The forward runs TensorFlow's forward graph only; the backward runs one graph that recomputes
    the forward and returns the vector-Jacobian product. Holding a ``GradientTape`` across the two
    instead makes TensorFlow keep every intermediate of the forward graph as an output, which
    measured slower than recomputing (see ``benchmarks/tf_bridge.py``) and holds more memory.
    """

    @staticmethod
    def forward(ctx: Any, pixels: torch.Tensor, bridge: KerasBridge, record: bool) -> torch.Tensor:
        x = _to_tf(pixels, bridge.tf)
        y = bridge.forward_tf(x)
        if record:
            ctx.bridge, ctx.x = bridge, x
            ctx.save_for_backward(pixels)  # torch's version check guards the aliased buffer
        return _to_torch(y, pixels.device)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (pixels,) = ctx.saved_tensors
        g = ctx.bridge.vjp_tf(ctx.x, _to_tf(grad.float(), ctx.bridge.tf))
        return _to_torch(g, pixels.device).to(pixels.dtype), None, None


class KerasBridge(nn.Module):
    """A Keras model (or TensorFlow callable) as a torch module on NCHW pixels -> logits.

    Args:
        model: a Keras model, or a callable on NHWC ``tf.Tensor`` batches.
        tf_steps: TensorFlow-side preprocessing, applied on NHWC tensors before the model.
        input_shape: ``(C, H, W)``; fixes the traced signature (any batch size).
        graph: trace forward and backward as ``tf.function`` graphs (falls back to eager when
            tracing fails, e.g. for preprocessing that calls ``.numpy()``).
    """

    def __init__(
        self,
        model: Any,
        tf_steps: Sequence[Callable] = (),
        input_shape: tuple[int, int, int] = DEFAULT_SHAPE,
        graph: bool = True,
    ):
        super().__init__()
        self.tf = import_tensorflow()
        object.__setattr__(self, "keras_model", model)  # not a torch submodule
        self.tf_steps = list(tf_steps)
        self.input_shape = tuple(input_shape)
        self.graph = graph
        if graph:
            c, h, w = self.input_shape
            pixels = self.tf.TensorSpec([None, c, h, w], self.tf.float32)
            grads = self.tf.TensorSpec([None, None], self.tf.float32)
            options = {"autograph": False, "reduce_retracing": True}
            self._forward_graph = self.tf.function(self.logits, input_signature=[pixels], **options)
            self._vjp_graph = self.tf.function(self.vjp, input_signature=[pixels, grads], **options)

    def logits(self, x: Any) -> Any:
        """NCHW ``tf.Tensor`` -> logits, in TensorFlow (eagerly, or while tracing)."""
        x = self.tf.transpose(x, [0, 2, 3, 1])
        for step in self.tf_steps:
            x = step(x)
        return self.tf.cast(call_model(self.keras_model, x), self.tf.float32)

    def vjp(self, x: Any, grad: Any) -> Any:
        """The input gradient of ``sum(logits * grad)``."""
        with self.tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(x)
            y = self.logits(x)
        g = tape.gradient(y, x, output_gradients=grad)
        return self.tf.zeros_like(x) if g is None else g

    def forward_tf(self, x: Any) -> Any:
        return self._call("_forward_graph", self.logits, x)

    def vjp_tf(self, x: Any, grad: Any) -> Any:
        return self._call("_vjp_graph", self.vjp, x, grad)

    def _call(self, graph_name: str, eager: Callable, *args: Any) -> Any:
        if self.graph:
            try:
                return getattr(self, graph_name)(*args)
            except (TypeError, NotImplementedError, AttributeError, ValueError) as err:
                try:
                    result = eager(*args)
                except Exception:
                    raise err from None
                log.warning(
                    "the TensorFlow model or preprocessing cannot be traced as a tf.function "
                    "(%s: %s); running it eagerly (slower).",
                    type(err).__name__,
                    str(err)[:200],
                )
                self.graph = False
                return result
        return eager(*args)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        record = torch.is_grad_enabled() and pixels.requires_grad
        return _BridgeFunction.apply(pixels.float(), self, record)

    def extra_repr(self) -> str:
        return f"model={type(self.keras_model).__name__}, input_shape={self.input_shape}"


def split_preprocessing(preprocessing: Preprocessing) -> tuple[list[Callable], list[Callable]]:
    """``(torch steps, TensorFlow steps)``: torch modules run before the bridge, the rest inside."""
    if preprocessing is None:
        return [], []
    steps = (
        [preprocessing]
        if callable(preprocessing) and not isinstance(preprocessing, (list, tuple))
        else list(preprocessing)
    )
    for step in steps:
        if not callable(step):
            raise InputError(
                f"preprocessing must be a callable or a list of callables; got an item of type "
                f"{type(step).__name__}."
            )
    torch_steps = [s for s in steps if isinstance(s, nn.Module)]
    tf_steps = [s for s in steps if not isinstance(s, nn.Module)]
    if torch_steps and tf_steps and steps.index(tf_steps[0]) < steps.index(torch_steps[-1]):
        raise InputError(
            "in mode='tf', torch module preprocessing steps run before TensorFlow ones; put the "
            "torch steps (e.g. Normalize) first in the list."
        )
    return torch_steps, tf_steps


def keras_logits_model(
    model: Any,
    num_classes: int,
    preprocessing: Preprocessing = None,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
) -> LogitsModel:
    """Wrap a Keras model (channels last) as the engine's :class:`LogitsModel` (NCHW pixels in).

    ``shape`` is ``(C, H, W)``. A model that declares a fixed input shape wins over the default
    ``(3, 224, 224)``; an explicit ``input_dim`` that disagrees with it is an error.
    """
    tf = import_tensorflow()
    known = is_keras_model(model) or isinstance(model, (tf.Module, SavedModelFunction))
    if not known and not callable(model):
        raise InputError(
            f"mode='tf' takes a Keras model or a TensorFlow callable, not {type(model).__name__}."
        )
    if is_keras_model(model):
        import keras

        if keras.backend.backend() != "tensorflow":
            raise InputError(
                f"mode='tf' needs Keras on its TensorFlow backend; this Keras runs on "
                f"{keras.backend.backend()!r} (set KERAS_BACKEND=tensorflow)."
            )
    declared = keras_input_shape(model)
    shape = tuple(int(s) for s in shape)  # type: ignore[assignment]
    if declared is not None and declared != shape:
        if shape != DEFAULT_SHAPE:
            c, h, w = declared
            raise InputError(
                f"input_dim says (C, H, W) = {shape} but the Keras model takes {declared}; pass "
                f"input_dim=[1, {h}, {w}, {c}] or leave it out."
            )
        shape = declared
    torch_steps, tf_steps = split_preprocessing(preprocessing)
    bridge = KerasBridge(model, tf_steps, shape)
    return LogitsModel(bridge, num_classes, torch_steps or None, shape)


# ---------------------------------------------------------------------------------------------- #
# Loading, safely
# ---------------------------------------------------------------------------------------------- #
def load_keras_file(path: str | Path, trusted: bool = False) -> Any:
    """``keras.models.load_model`` with ``safe_mode=True`` unless ``trusted``; clear errors."""
    keras = _keras()
    try:
        return keras.models.load_model(str(path), safe_mode=not trusted, compile=False)
    except ValueError as err:
        text = str(err)
        if "safe_mode" in text or "unsafe_deserialization" in text:
            raise UntrustedSourceError(
                f"{path} holds Python code (a Keras Lambda layer or a pickled function), which "
                "Keras refuses in safe_mode because it can run arbitrary code. If you trust where "
                "it came from, load it with load_model(..., trusted=True) (CLI: --trusted), which "
                "passes safe_mode=False; or rebuild the model without Lambda layers."
            ) from None
        raise ModelSourceError(f"Keras could not read {path}: {text[:300]}") from None
    except Exception as err:
        raise ModelSourceError(
            f"Keras could not read {path} ({type(err).__name__}: {str(err)[:300]}); is it a "
            ".keras or .h5 model file?"
        ) from None


def _graph_ops(fn: Any) -> set[str]:
    graph_def = fn.graph.as_graph_def()
    ops = {node.op for node in graph_def.node}
    for function in graph_def.library.function:
        ops |= {node.op for node in function.node_def}
    return ops


def load_saved_model(path: str | Path, trusted: bool = False) -> tuple[SavedModelFunction, Any]:
    """A SavedModel folder's ``serving_default`` signature and its ``(C, H, W)`` (or None).

    Raises:
        UntrustedSourceError: the serving graph uses file, Python or summary ops and not ``trusted``.
        ModelSourceError: not a readable SavedModel, or no single-input serving signature.
    """
    tf = import_tensorflow()
    try:
        loaded = tf.saved_model.load(str(path))
    except Exception as err:
        raise ModelSourceError(
            f"TensorFlow could not read the SavedModel {path} ({type(err).__name__}: "
            f"{str(err)[:200]})."
        ) from None
    signatures = dict(getattr(loaded, "signatures", {}) or {})
    if "serving_default" not in signatures:
        raise ModelSourceError(
            f"the SavedModel {path} has no serving_default signature (it has "
            f"{sorted(signatures) or 'none'}); export it with model.export(path) or a serving "
            "signature."
        )
    signature = signatures["serving_default"]
    if not trusted:
        unsafe = unsafe_ops(_graph_ops(signature))
        if unsafe:
            raise UntrustedSourceError(
                f"the SavedModel {path} runs ops that touch files or call Python ({', '.join(unsafe)}); "
                "leapcore refused it. If you trust where it came from, pass trusted=True "
                "(CLI: --trusted)."
            )
    inputs = signature.structured_input_signature[1]
    if len(inputs) != 1:
        raise ModelSourceError(
            f"the SavedModel {path} takes inputs {sorted(inputs)}; leapcore needs one image input."
        )
    fn = SavedModelFunction(loaded, signature, next(iter(inputs)))
    return fn, keras_input_shape(fn)


def tf_weights_digest(model: Any) -> str:
    """A content digest of a Keras model's (or SavedModel's) weights: order, shapes and values.

    Names are left out: Keras renames layers (``dense_1``...) when a model is built twice.
    """
    h = hashlib.sha256()
    variables = model.weights if hasattr(model, "weights") else model.variables
    for v in variables:
        value = np.ascontiguousarray(np.asarray(v.numpy() if hasattr(v, "numpy") else v))
        h.update(str(value.shape).encode() + str(value.dtype).encode())
        h.update(value.tobytes())
    return h.hexdigest()
