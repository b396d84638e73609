"""One adapter for every model: pixel-space NCHW images in [0, 1] go in, checked logits come out.

The engine talks only to :class:`LogitsModel`. It applies the user's preprocessing inside the graph,
unwraps dict outputs that carry ``logits``, and on its first call checks that the output is a batch of
logits whose width matches the class list. TensorFlow models join through the gradient bridge in
``leapcore.frameworks.tensorflow``, which returns a torch module of the same kind.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from leapcore.errors import InputError, ModelOutputError
from leapcore.fold import fold_batchnorm
from leapcore.outputs import WHOLE_IMAGE, Region, probabilities, segmentation_layout

Preprocessing = (
    Callable[[torch.Tensor], torch.Tensor] | Sequence[Callable[[torch.Tensor], torch.Tensor]] | None
)


def compose_preprocessing(
    preprocessing: Preprocessing,
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Accept None, one callable, or leap-ie's list of callables (applied in order)."""
    if preprocessing is None:
        return None
    if callable(preprocessing) and not isinstance(preprocessing, (list, tuple)):
        return preprocessing
    steps = list(preprocessing)
    for step in steps:
        if not callable(step):
            raise InputError(
                f"preprocessing must be a callable or a list of callables; got an item of type "
                f"{type(step).__name__}."
            )
    if not steps:
        return None

    def apply(x: torch.Tensor) -> torch.Tensor:
        for step in steps:
            x = step(x)
        return x

    return apply


def unwrap_logits(output: Any) -> torch.Tensor:
    """Take the logits out of a model output: a tensor, a dict with ``logits`` (or torchvision's
    ``out``), or an HF-style object."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        if "logits" in output:
            return output["logits"]
        if "out" in output:  # torchvision's segmentation models (deeplabv3, fcn, lraspp)
            return output["out"]
        raise ModelOutputError(
            f"the model returned a dict with keys {sorted(map(str, output))} and no 'logits' key "
            "(nor torchvision's 'out'). "
            "Wrap the model so that it returns the logits tensor (see README: 'Models that return "
            "something else')."
        )
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ModelOutputError(
        f"the model returned {type(output).__name__}; expected a tensor of logits [batch, classes]."
    )


def check_logits(logits: torch.Tensor, num_classes: int, output: str = "logits") -> None:
    """Raise a clear error unless ``logits`` is ``[batch, num_classes]`` of unnormalised scores.

    ``output="multilabel_logits"`` refuses sigmoid outputs (every value in [0, 1]); ``"logits"``
    refuses softmax outputs (rows in [0, 1] summing to 1).
    """
    if logits.ndim != 2:
        raise ModelOutputError(
            f"the model returned shape {list(logits.shape)}; expected logits of shape "
            f"[batch, {num_classes}] (or [batch, {num_classes}, H, W] from a segmentation model). "
            "Feature models need a wrapper that returns class logits."
        )
    if logits.shape[1] != num_classes:
        raise ModelOutputError(
            f"the model returns {logits.shape[1]} outputs but class_list has {num_classes} names; "
            "pass one class name per model output."
        )
    with torch.no_grad():
        values = logits.detach().float()
        in_unit = bool(((values >= 0) & (values <= 1)).all())
        sums_to_one = bool(
            torch.allclose(values.sum(dim=1), torch.ones(1, device=values.device), atol=1e-3)
        )
    if output == "multilabel_logits" and in_unit and num_classes > 1:
        raise ModelOutputError(
            "output is 'multilabel_logits' but every output is in [0, 1]: the model returns "
            "probabilities (a final sigmoid), not logits. Remove the final sigmoid, or wrap the model "
            "to return the scores before it: optimising probabilities saturates and gives no useful "
            "gradient."
        )
    if in_unit and sums_to_one and num_classes > 1:
        raise ModelOutputError(
            "the model returns probabilities (rows in [0, 1] summing to 1), not logits. Remove the "
            "final softmax, or wrap the model to return the scores before it: optimising "
            "probabilities saturates and gives no useful gradient. (A multi-label model: remove "
            "its sigmoid and set the config option output to 'multilabel_logits'.)"
        )


class LogitsModel(nn.Module):
    """Pixel-space images ``[B, C, H, W]`` in [0, 1] -> logits ``[B, K]``; the engine's only model view.

    A segmentation model's ``[B, K, H, W]`` (or channels-last ``[B, H, W, K]``) logits are pooled
    over ``region`` (``leapcore.outputs``), so every stage sees one logit per class.

    Args:
        model: a torch module (or any callable on tensors) returning logits.
        num_classes: length of the class list; checked against the output width.
        preprocessing: applied inside the graph before the model.
        input_shape: ``(C, H, W)`` the model expects.
        channels_last: feed the model channels-last batches (same values, NHWC strides). None
            (auto): on the CPU, for torch modules with 2-D convolutions, where oneDNN runs them
            about 25 % faster; a model that rejects the layout on the first call (a ``.view`` of a
            feature map, say) gets the usual layout from then on. True forces it, False never.
        fold_batchnorm: run a copy of the model with each eval-mode batch norm folded into the
            convolution before it (``leapcore.fold``), made on the first call. None (auto): when
            the copy's logits match the original's; True: raise if it cannot be made; False: never.
        output: ``"logits"`` (softmax classes) or ``"multilabel_logits"`` (independent sigmoids).
        region: where a segmentation model's logits are pooled (default: the whole image).
        output_channels_last: a 4-D output is looked at channels-last first (Keras models).
    """

    def __init__(
        self,
        model: Callable[[torch.Tensor], Any],
        num_classes: int,
        preprocessing: Preprocessing = None,
        input_shape: tuple[int, int, int] = (3, 224, 224),
        channels_last: bool | None = None,
        fold_batchnorm: bool | None = None,
        output: str = "logits",
        region: Region | None = None,
        output_channels_last: bool = False,
    ):
        super().__init__()
        self.output = output
        self.region = region if region is not None else WHOLE_IMAGE
        self.output_channels_last = output_channels_last
        self.kind: str = "classifier"  # "segmentation" once a 4-D output was seen
        self.logit_size: tuple[int, int] | None = None  # a segmentation model's logit map (h, w)
        self._seg_layout: str | None = None
        self.model = model
        self.folded: nn.Module | None = None
        self.fold_batchnorm = fold_batchnorm
        self.num_classes = num_classes
        self.preprocess = compose_preprocessing(preprocessing)
        self.input_shape = tuple(input_shape)
        self.channels_last = channels_last
        self._has_conv = isinstance(model, nn.Module) and any(
            isinstance(m, nn.Conv2d) for m in model.modules()
        )
        self._checked = False

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        wanted = self.channels_last
        if wanted is None:
            wanted = self._has_conv and x.device.type == "cpu"
        if wanted and x.ndim == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Class probabilities of this model's ``[B, K]`` logits (softmax, or sigmoid for
        multi-label); use this instead of calling softmax."""
        return probabilities(logits, self.output)

    @property
    def region_label(self) -> str | None:
        """The region's label for a segmentation model, None for a classifier."""
        return self.region.label if self.kind == "segmentation" else None

    def reduce(self, output: Any) -> torch.Tensor:
        """The model's raw output -> ``[B, K]`` logits (segmentation maps pooled over the region)."""
        logits = unwrap_logits(output)
        if logits.ndim != 4:
            return logits
        if self._seg_layout is None:
            self._seg_layout = segmentation_layout(
                logits.shape, self.num_classes, self.output_channels_last
            )
            self.kind = "segmentation"
        if self._seg_layout == "NHWC":
            logits = logits.permute(0, 3, 1, 2)
        self.logit_size = (int(logits.shape[2]), int(logits.shape[3]))
        return self.region.pool(logits)

    @property
    def runtime(self) -> Callable[[torch.Tensor], Any]:
        """The module the engine calls: the folded copy if one was made, else the user's model."""
        return self.folded if self.folded is not None else self.model

    @staticmethod
    def _fold_view(output: Any) -> torch.Tensor:
        """What the fold check compares: the logits (a segmentation map flattened per image)."""
        logits = unwrap_logits(output)
        return logits.flatten(1) if logits.ndim > 2 else logits

    def _fold(self, x: torch.Tensor) -> None:
        if self.fold_batchnorm is False or not isinstance(self.model, nn.Module):
            return
        try:
            self.folded, why = fold_batchnorm(self.model, x.detach()[:1], self._fold_view)
        except Exception as error:  # noqa: BLE001 - the real call below reports a failing model
            why = f"the probe call failed ({error})"
        if self.folded is None and self.fold_batchnorm:
            raise InputError(
                f"fold_batchnorm is True but the batch norms cannot be folded: {why}. Set the config "
                "option fold_batchnorm to None (auto) or False."
            )

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(pixels) if self.preprocess is not None else pixels
        if self._checked:
            return self.reduce(self.runtime(self._layout(x)))
        self._fold(x)
        laid_out = self._layout(x)
        try:
            output = self.runtime(laid_out)
        except RuntimeError as error:
            if laid_out is x:
                raise
            if self.channels_last:
                raise InputError(
                    f"the model failed on a channels-last batch ({error}); set the config option "
                    "channels_last to None (auto) or False."
                ) from error
            self.channels_last = False  # auto: this model wants the usual layout
            output = self.runtime(x)
        logits = self.reduce(output)
        if self.kind != "segmentation" and self.region.kind != "image":
            raise InputError(
                f"the option region ({self.region.label}) applies to segmentation models, but this "
                f"model returns {list(logits.shape)} (one logit per class for the whole image); "
                "leave region out."
            )
        check_logits(logits, self.num_classes, self.output)
        self._checked = True
        return logits


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """Put every submodule in eval mode for the run and restore each one's mode afterwards, on error too.

    Frozen parameters too: prototypes need gradients for the input only.
    """
    if not isinstance(model, nn.Module):
        yield
        return
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in grads:
            p.requires_grad_(False)
        yield
    finally:
        for m, was_training in modes:
            m.train(was_training)
        for p, needed in grads:
            p.requires_grad_(needed)


@dataclass
class ModelInfo:
    """What leapcore knows about a model beyond its weights (the adapter's metadata)."""

    framework: str = "pt"
    input_shape: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    class_list: list[str] = field(default_factory=list)
    weights_digest: str | None = None
    source: str | None = None


def model_device(model: Any) -> torch.device | None:
    """The device of a torch module's first parameter or buffer, if any."""
    if isinstance(model, nn.Module):
        for t in list(model.parameters()) + list(model.buffers()):
            return t.device
    return None
