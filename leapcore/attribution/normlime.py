"""NormLIME (Ahern et al., 2019; InterpretDL's ``NormLIMECVInterpreter``) on top of captum's Lime.

NormLIME turns many local LIME explanations into one global importance per feature and class:
each image's LIME weights ``w`` for the class it is explained for are normalised as
``w_k^2 / sum_j |w_j|`` (InterpretDL's normalisation), and a feature's NormLIME weight for a class
is the mean of its normalised weights over the images explained for that class.

InterpretDL's global features are k-means clusters of superpixel descriptors from a pretrained
network. Here the features are the square patches of ``lime`` (``patch`` pixels) at fixed
positions, so the global feature is "this region of the image": the result is, per class, a map
of where the evidence for that class sits across the user's images (meaningful for aligned images
such as scans, documents, digits or prototypes; for photos the regions move with the object).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from leapcore.attribution.core import (
    _device,
    as_logits_model,
    attribute,
    check_images,
    inference_mode_switch,
)
from leapcore.errors import InputError


@dataclass
class NormLimeResult:
    """Global NormLIME weights per class over patch positions, and the local LIME weights.

    Attributes:
        classes: the classes with at least one explained image, ascending.
        weights: ``[len(classes), gh, gw]`` NormLIME weight of each patch position per class
            (non-negative; each image contributes ``w^2 / ||w||_1``).
        counts: ``[len(classes)]`` images behind each class's weights.
        local: ``[N, gh, gw]`` each image's signed LIME weight per patch.
        targets: ``[N]`` the class each image was explained for.
        patch: the patch size in pixels.
    """

    classes: list[int]
    weights: torch.Tensor
    counts: torch.Tensor
    local: torch.Tensor
    targets: torch.Tensor
    patch: int

    def map(self, cls: int, size: tuple[int, int]) -> torch.Tensor:
        """The class's NormLIME weights as an ``[H, W]`` map (each patch's weight on its pixels)."""
        if cls not in self.classes:
            raise KeyError(f"no image was explained for class {cls}; classes: {self.classes}")
        grid = self.weights[self.classes.index(cls)]
        full = grid.repeat_interleave(self.patch, 0).repeat_interleave(self.patch, 1)
        return full[: size[0], : size[1]]


def patch_weights(maps: torch.Tensor, patch: int, channels: int) -> torch.Tensor:
    """``[N, H, W]`` channel-summed LIME maps -> ``[N, gh, gw]`` one weight per patch.

    captum's Lime gives every pixel and channel of a patch the patch's weight; ``attribute`` sums
    the channels, so the mean over a patch divided by the channels is the weight itself.
    """
    return F.avg_pool2d(maps[:, None], patch, ceil_mode=True)[:, 0] / channels


def normalised_importance(local: torch.Tensor) -> torch.Tensor:
    """``w^2 / sum |w|`` of each image's weights (zero for an all-zero explanation)."""
    flat = local.flatten(1)
    norm = flat.abs().sum(1, keepdim=True)
    return (flat.square() / norm.clamp_min(torch.finfo(flat.dtype).tiny)).view_as(local)


def normlime(
    model: Any,
    images: torch.Tensor,
    targets: int | Sequence[int] | None = None,
    *,
    patch: int = 16,
    n_samples: int = 128,
    baseline: float = 0.0,
    alpha: float = 1.0,
    **options: Any,
) -> NormLimeResult:
    """NormLIME weights of ``images`` (each explained for one class), see the module docstring.

    Args:
        model: a torch module, :class:`~leapcore.adapter.LogitsModel` or Keras model (as for
            :func:`~leapcore.attribution.attribute`).
        images: ``[N, C, H, W]`` in [0, 1]; the more images per class, the steadier the weights.
        targets: the class to explain in each image (one for all, or one per image); default each
            image's top class, as InterpretDL explains the predicted labels.
        patch, n_samples, baseline, alpha: ``lime``'s options (patch size in pixels, samples per
            image, value of an absent patch, ridge penalty of the surrogate).
        **options: common options of ``attribute`` (``preprocessing``, ``class_list``,
            ``batch_size``, ``memory_budget_mb``).

    Raises:
        InputError: a patch larger than the image, or what ``attribute`` refuses.
    """
    images = check_images(images)
    if not 1 <= patch <= min(images.shape[-2:]):
        raise InputError(
            f"patch must be between 1 and {min(images.shape[-2:])} pixels; got {patch}."
        )
    if targets is None:
        adapter = as_logits_model(
            model, images, options.get("preprocessing"), options.get("class_list")
        )
        with torch.no_grad(), inference_mode_switch(adapter):
            logits = adapter(images.to(_device(adapter) or images.device))
        targets = logits.argmax(1).tolist()
    lime = {"patch": patch, "n_samples": n_samples, "baseline": baseline, "alpha": alpha}
    result = attribute(model, images, targets, ["lime"], lime=lime, **options)
    if not torch.equal(result.image_index, torch.arange(len(images))):
        raise InputError("normlime explains one class per image: pass one target per image.")
    local = patch_weights(result.maps["lime"], patch, images.shape[1])
    importance = normalised_importance(local)
    classes = sorted(set(result.targets.tolist()))
    weights, counts = [], []
    for cls in classes:
        rows = result.targets == cls
        weights.append(importance[rows].mean(0))
        counts.append(int(rows.sum()))
    return NormLimeResult(
        classes, torch.stack(weights), torch.tensor(counts), local, result.targets, patch
    )


def _prior_ridge(prior: torch.Tensor, alpha: float) -> Any:
    """captum interpretable model: ridge regression pulled towards ``prior`` instead of zero
    (``min sum_i pi_i (y_i - b - x_i w)^2 + alpha ||w - prior||^2``), fitted as a ridge on the
    residual ``y - x prior`` with ``prior`` added back (InterpretDL's LIME with a global prior)."""
    from captum._utils.models.linear_model.model import LinearModel
    from sklearn.linear_model import Ridge

    def train(model: Any, dataloader: Any, construct_kwargs: dict, **_: Any) -> dict:
        xs, ys, ws = [], [], []
        for batch in dataloader:
            xs.append(batch[0].double().cpu())
            ys.append(batch[1].double().cpu().reshape(-1))
            ws.append(batch[2].double().cpu().reshape(-1) if len(batch) == 3 else None)
        x, y = torch.cat(xs), torch.cat(ys)
        w = torch.cat(ws).numpy() if ws[0] is not None else None
        p = prior.double().reshape(-1)
        ridge = Ridge(alpha=alpha).fit(x.numpy(), (y - x @ p).numpy(), sample_weight=w)
        coef = torch.from_numpy(ridge.coef_).reshape(-1) + p
        model._construct_model_params(
            norm_type=None,
            weight_values=coef.float().view(1, -1),
            bias_value=torch.tensor([float(ridge.intercept_)]),
        )
        return {}

    return LinearModel(train_fn=train)


def glime(
    model: Any,
    images: torch.Tensor,
    targets: Sequence[int],
    prior: NormLimeResult,
    *,
    reg_force: float = 1.0,
    n_samples: int = 128,
    baseline: float = 0.0,
    **options: Any,
) -> torch.Tensor:
    """G-LIME (InterpretDL's ``GLIMECVInterpreter``): LIME whose surrogate is pulled towards the
    NormLIME weights ``prior`` of the explained class instead of towards zero.

    With few samples the global prior steadies the local weights; ``reg_force`` large gives the
    prior itself, near zero plain (unregularised) LIME. Features are ``prior``'s patches.

    Returns:
        ``[N, gh, gw]`` the signed local weight of each patch.

    Raises:
        InputError: a target ``prior`` has no weights for, or targets that do not match the images.
    """
    from captum.attr import Lime

    from leapcore.attribution.captum_methods import patch_mask

    images = check_images(images)
    if len(targets) != len(images):
        raise InputError(f"targets has {len(targets)} entries for {len(images)} images.")
    missing = sorted({int(t) for t in targets} - set(prior.classes))
    if missing:
        raise InputError(
            f"the prior has no weights for class {missing}; its classes: {prior.classes}."
        )
    adapter = as_logits_model(
        model, images, options.get("preprocessing"), options.get("class_list")
    )
    device = _device(adapter) or images.device
    out = []
    with inference_mode_switch(adapter):
        for image, target in zip(images.to(device), targets):
            weights = prior.weights[prior.classes.index(int(target))]
            surrogate = _prior_ridge(weights.reshape(-1), float(reg_force))
            mask = patch_mask(image[None], prior.patch)
            attr = Lime(adapter, interpretable_model=surrogate).attribute(
                image[None],
                target=int(target),
                baselines=float(baseline),
                feature_mask=mask,
                n_samples=n_samples,
                return_input_shape=False,
            )
            out.append(attr.reshape(weights.shape).detach().cpu())
    return torch.stack(out)
