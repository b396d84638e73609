"""captum's attribution methods in the registry (captum imported only when a method runs).

Every method sees the adapter (pixels in [0, 1] -> logits, preprocessing inside), so baselines and
noise are in pixel space. Maps are summed over channels by ``attribute``.
"""

from __future__ import annotations

from typing import Any

import torch

from leapcore.attribution.core import MethodContext
from leapcore.attribution.registry import GRADIENT_FRAMEWORKS, register_method
from leapcore.errors import InputError


def _captum(name: str) -> Any:
    try:
        import captum.attr as attr
    except ImportError as error:  # pragma: no cover - the extra is installed in CI
        raise ImportError(
            "attribution methods need captum: pip install 'leapcore[attribution]'"
        ) from error
    return getattr(attr, name)


def _baseline(images: torch.Tensor, value: float) -> torch.Tensor:
    return torch.full_like(images, float(value))


def patch_mask(images: torch.Tensor, patch: int) -> torch.Tensor:
    """A ``[B, 1, H, W]`` feature mask of ``patch x patch`` squares (the features of Lime/KernelShap)."""
    _, _, h, w = images.shape
    rows = torch.arange(h, device=images.device) // patch
    cols = torch.arange(w, device=images.device) // patch
    grid = rows[:, None] * ((w + patch - 1) // patch) + cols[None, :]
    return grid.expand(images.shape[0], 1, h, w)


@register_method(
    "saliency",
    library="captum",
    passes="1",
    frameworks=GRADIENT_FRAMEWORKS,
    defaults={"abs": False},
    aliases=("gradient", "grad"),
)
def saliency(ctx: MethodContext, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Input gradient (signed unless ``abs``)."""
    return _captum("Saliency")(ctx.model).attribute(images, target=targets, abs=ctx.options["abs"])


@register_method(
    "input_x_gradient",
    library="captum",
    passes="1",
    frameworks=GRADIENT_FRAMEWORKS,
    aliases=("ixg", "gradient_x_input"),
)
def input_x_gradient(
    ctx: MethodContext, images: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Input times gradient."""
    return _captum("InputXGradient")(ctx.model).attribute(images, target=targets)


@register_method(
    "integrated_gradients",
    library="captum",
    passes="n_steps (default 32)",
    frameworks=GRADIENT_FRAMEWORKS,
    defaults={"n_steps": 32, "baseline": 0.0, "method": "gausslegendre"},
    aliases=("ig",),
)
def integrated_gradients(
    ctx: MethodContext, images: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Integrated gradients from a constant pixel baseline (black by default)."""
    o = ctx.options
    return _captum("IntegratedGradients")(ctx.model).attribute(
        images,
        baselines=_baseline(images, o["baseline"]),
        target=targets,
        n_steps=o["n_steps"],
        method=o["method"],
        internal_batch_size=max(ctx.rows, images.shape[0]),
    )


@register_method(
    "smoothgrad",
    library="captum",
    passes="nt_samples (default 16)",
    frameworks=GRADIENT_FRAMEWORKS,
    defaults={"nt_samples": 16, "stdevs": 0.15, "abs": False},
    aliases=("smooth_grad", "noise_tunnel"),
)
def smoothgrad(ctx: MethodContext, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """SmoothGrad: captum's NoiseTunnel over Saliency, noise in pixel units."""
    o = ctx.options
    tunnel = _captum("NoiseTunnel")(_captum("Saliency")(ctx.model))
    return tunnel.attribute(
        images,
        nt_type="smoothgrad",
        nt_samples=o["nt_samples"],
        stdevs=o["stdevs"],
        nt_samples_batch_size=max(1, ctx.rows // max(1, images.shape[0])),
        target=targets,
        abs=o["abs"],
    )


@register_method(
    "gradient_shap",
    library="captum",
    passes="n_samples (default 16)",
    frameworks=GRADIENT_FRAMEWORKS,
    defaults={"n_samples": 16, "stdevs": 0.0, "baselines": (0.0, 1.0)},
    aliases=("gradshap",),
)
def gradient_shap(ctx: MethodContext, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """GradientShap over constant pixel baselines (black and white by default)."""
    o = ctx.options
    baselines = torch.cat([_baseline(images[:1], v) for v in o["baselines"]])
    return _captum("GradientShap")(ctx.model).attribute(
        images, baselines=baselines, n_samples=o["n_samples"], stdevs=o["stdevs"], target=targets
    )


def check_activations(network: torch.nn.Module, method: str, supported: tuple[type, ...]) -> None:
    """Refuse a modified-backward method when captum would leave some activations unmodified.

    captum's DeepLift and GuidedBackprop only change the backward pass of the activation modules
    they know; other activations (ReLU6, SiLU, GELU, ...) keep their gradient, so the result would
    quietly be input x gradient or the plain gradient.
    """
    from torch.nn.modules import activation

    kinds = {type(m) for m in network.modules() if type(m).__module__ == activation.__name__}
    unknown = sorted(k.__name__ for k in kinds if not issubclass(k, supported))
    if unknown or not kinds:
        found = ", ".join(unknown) if unknown else "no activation modules (functional ones?)"
        raise InputError(
            f"{method} changes the backward pass of {', '.join(k.__name__ for k in supported)} "
            f"modules only; this model has {found}, so its map would be a plain gradient method's. "
            "Use integrated_gradients, input_x_gradient or an LRP composite instead."
        )


def _deeplift_supported() -> tuple[type, ...]:
    from captum.attr._core.deep_lift import SUPPORTED_NON_LINEAR

    return tuple(k for k in SUPPORTED_NON_LINEAR if k.__module__ == "torch.nn.modules.activation")


@register_method(
    "deeplift",
    library="captum",
    passes="1 (modified backward)",
    defaults={"baseline": 0.0},
)
def deeplift(ctx: MethodContext, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """DeepLift (Rescale rule) from a constant pixel baseline."""
    check_activations(ctx.network, "deeplift", _deeplift_supported())
    return _captum("DeepLift")(ctx.model).attribute(
        images, baselines=_baseline(images, ctx.options["baseline"]), target=targets
    )


@register_method(
    "guided_backprop",
    library="captum",
    passes="1 (modified backward)",
    aliases=("guided_backpropagation",),
)
def guided_backprop(
    ctx: MethodContext, images: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Guided backpropagation (ReLU modules only pass positive gradients)."""
    check_activations(ctx.network, "guided_backprop", (torch.nn.ReLU,))
    return _captum("GuidedBackprop")(ctx.model).attribute(images, target=targets)


@register_method(
    "occlusion",
    library="captum",
    passes="1 + windows ((H - window) / stride + 1)^2, forward only",
    frameworks=GRADIENT_FRAMEWORKS,
    defaults={"window": 32, "stride": 16, "baseline": 0.0},
)
def occlusion(ctx: MethodContext, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Occlusion with square windows of a constant pixel value."""
    o = ctx.options
    channels = images.shape[1]
    return _captum("Occlusion")(ctx.model).attribute(
        images,
        sliding_window_shapes=(channels, o["window"], o["window"]),
        strides=(channels, o["stride"], o["stride"]),
        baselines=float(o["baseline"]),
        target=targets,
        perturbations_per_eval=max(1, ctx.rows // max(1, images.shape[0])),
    )


def _surrogate(name: str, ctx: MethodContext, images: torch.Tensor, targets: torch.Tensor) -> Any:
    o = ctx.options
    if name == "Lime":
        # captum's default surrogate is a Lasso (alpha 0.01) that zeroes every weight when the
        # logit moves by less than that; a ridge keeps the signed weights.
        from captum._utils.models.linear_model import SkLearnRidge

        method = _captum(name)(ctx.model, interpretable_model=SkLearnRidge(alpha=o["alpha"]))
    else:
        method = _captum(name)(ctx.model)
    return method.attribute(
        images,
        baselines=float(o["baseline"]),
        target=targets,
        feature_mask=patch_mask(images, o["patch"]),
        n_samples=o["n_samples"],
        perturbations_per_eval=max(1, ctx.rows),
    )


@register_method(
    "kernel_shap",
    library="captum",
    passes="n_samples (default 128), forward only",
    frameworks=GRADIENT_FRAMEWORKS,
    defaults={"n_samples": 128, "patch": 16, "baseline": 0.0},
    aliases=("kernelshap",),
)
def kernel_shap(ctx: MethodContext, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """KernelShap over square patches (``patch`` pixels), absent patches set to ``baseline``."""
    return _surrogate("KernelShap", ctx, images, targets)


@register_method(
    "lime",
    library="captum",
    passes="n_samples (default 128), forward only",
    frameworks=GRADIENT_FRAMEWORKS,
    defaults={"n_samples": 128, "patch": 16, "baseline": 0.0, "alpha": 1.0},
)
def lime(ctx: MethodContext, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """LIME over square patches (``patch`` pixels), absent patches set to ``baseline``; ridge surrogate."""
    return _surrogate("Lime", ctx, images, targets)


@register_method(
    "grad_cam",
    library="captum",
    passes="1",
    defaults={"layer": None, "relu": False},
    aliases=("gradcam", "layer_grad_cam"),
)
def grad_cam(ctx: MethodContext, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """LayerGradCam at ``layer`` (a module name of the model), upsampled to the input."""
    method = _captum("LayerGradCam")(ctx.model, ctx.layer())
    return method.attribute(images, target=targets, relu_attributions=ctx.options["relu"])
