"""Faithfulness of attribution maps: deletion / insertion AUC, sparseness and the pointing game.

The deletion / insertion protocol is RISE's (Petsiuk et al., 2018): pixels are ranked by the map,
then the class probability (softmax of the logits at the target) is read while the most important
pixels are replaced by a substrate (deletion) or revealed from it, most important first (insertion),
over ``steps`` equal pixel budgets. The curve has ``steps + 1`` points (0 pixels .. all pixels) and the
AUC is its trapezoid mean, so it lies in [0, 1]. A faithful map gives a low deletion AUC and a high
insertion AUC.

Relation to Quantus (the cross-check in ``tests/engine/test_faithfulness.py``): Quantus'
``PixelFlipping`` ranks ``C x H x W`` features by the map broadcast over channels and records the
probability *after* each step only, with an un-normalised ``np.trapz``. Ours ranks pixels (all
channels of a pixel move together, which is what the broadcast does too), includes the unperturbed
point and divides by ``steps``. ``sparseness`` is Quantus' ``Sparseness`` (Gini index of the absolute
map, Chalasani et al.), normalised by each map's own maximum where Quantus divides the whole batch by
one maximum (the Gini index is scale-invariant, so only Quantus' ``1e-7`` offset tells them apart).
``pointing_game`` is Quantus' ``PointingGame`` (a hit when any maximal pixel lies in the box).

Everything is batched over images x steps and stays on the images' device: no host
synchronisation happens inside the loops.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = [
    "deletion_insertion_auc",
    "deletion_insertion_curves",
    "perturbation_curves",
    "pointing_game",
    "sparseness",
    "substrate_images",
]

SUBSTRATES = ("blur", "mean", "zero")

# RISE's blur substrate: an 11 x 11 Gaussian kernel with sigma 5, a heavily blurred image.
_BLUR_KERNEL = 11
_BLUR_SIGMA = 5.0
_DEFAULT_ROWS = 64


def substrate_images(images: torch.Tensor, substrate: str | torch.Tensor = "blur") -> torch.Tensor:
    """The image every pixel is replaced by (deletion) or revealed from (insertion).

    Args:
        images: ``[N, C, H, W]`` in [0, 1].
        substrate: ``"blur"`` (11 x 11 Gaussian, sigma 5, as RISE), ``"mean"`` (each image's mean
            colour per channel), ``"zero"`` (black) or a tensor broadcastable to ``images``.

    Returns:
        A tensor of the shape of ``images``.
    """
    if isinstance(substrate, torch.Tensor):
        try:
            return torch.broadcast_to(substrate.to(images), images.shape)
        except RuntimeError as error:
            raise ValueError(
                f"substrate of shape {tuple(substrate.shape)} does not broadcast to the images' shape "
                f"{tuple(images.shape)}"
            ) from error
    if substrate == "zero":
        return torch.zeros_like(images)
    if substrate == "mean":
        return images.mean(dim=(2, 3), keepdim=True).expand_as(images)
    if substrate == "blur":
        from torchvision.transforms.functional import gaussian_blur

        return gaussian_blur(images, kernel_size=[_BLUR_KERNEL] * 2, sigma=[_BLUR_SIGMA] * 2)
    raise ValueError(f"unknown substrate {substrate!r}; use one of {list(SUBSTRATES)} or a tensor")


def _check(images: torch.Tensor, maps: torch.Tensor, targets: Sequence[int], steps: int) -> None:
    if images.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W]; got shape {tuple(images.shape)}")
    n, _, h, w = images.shape
    if tuple(maps.shape) != (n, h, w):
        raise ValueError(f"maps must be [N, H, W] = {[n, h, w]}; got shape {tuple(maps.shape)}")
    if len(targets) != n:
        raise ValueError(f"targets has {len(targets)} entries for {n} images; pass one per image")
    if steps < 1 or steps > h * w:
        raise ValueError(f"steps must be between 1 and the number of pixels ({h * w}); got {steps}")


def _ranks_and_budgets(
    maps: torch.Tensor, steps: int, h: int, w: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``([N, H * W] rank of each pixel in its map, highest first; ties by pixel index,
    [steps + 1] pixel budgets)``: a pixel is changed at point ``k`` when its rank is below
    ``budgets[k]``."""
    n = maps.shape[0]
    maps = maps.to(device=device, dtype=torch.float32).reshape(n, h * w)
    order = torch.argsort(maps, dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(h * w, device=device).expand(n, -1))
    budgets = torch.tensor([round(k * h * w / steps) for k in range(steps + 1)], device=device)
    return rank, budgets


def perturbation_curves(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    maps: torch.Tensor,
    targets: Sequence[int],
    *,
    steps: int = 16,
    substrate: str | torch.Tensor = "blur",
    batch_size: int | None = None,
    mode: str = "deletion",
) -> torch.Tensor:
    """Target-class probability while pixels are deleted or inserted in the order of ``maps``.

    Args:
        logits_fn: images ``[B, C, H, W]`` in [0, 1] -> logits ``[B, classes]``.
        images: ``[N, C, H, W]`` in [0, 1].
        maps: ``[N, H, W]``; higher = more important. Ties are broken by pixel index.
        targets: one class index per image.
        steps: number of equal pixel budgets; the curve has ``steps + 1`` points.
        substrate: see :func:`substrate_images`.
        batch_size: perturbed images per forward pass (default 64).
        mode: ``"deletion"`` or ``"insertion"``.

    Returns:
        ``[N, steps + 1]`` probabilities, point ``k`` after ``round(k * H * W / steps)`` pixels.
    """
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be 'deletion' or 'insertion'; got {mode!r}")
    _check(images, maps, targets, steps)
    n, c, h, w = images.shape
    device = images.device
    base = substrate_images(images, substrate)
    rank, budgets = _ranks_and_budgets(maps, steps, h, w, device)
    target_index = torch.as_tensor(list(targets), dtype=torch.long, device=device)
    rows = max(1, batch_size or _DEFAULT_ROWS)
    total = n * (steps + 1)
    curves = torch.empty(total, device=device, dtype=torch.float32)
    flat_image = torch.arange(total, device=device) // (steps + 1)
    flat_step = torch.arange(total, device=device) % (steps + 1)
    with torch.no_grad():
        for start in range(0, total, rows):
            image_of = flat_image[start : start + rows]
            changed = rank[image_of] < budgets[flat_step[start : start + rows]].unsqueeze(1)
            changed = changed.reshape(-1, 1, h, w)
            if mode == "deletion":
                batch = torch.where(changed, base[image_of], images[image_of])
            else:
                batch = torch.where(changed, images[image_of], base[image_of])
            logits = logits_fn(batch).float()
            probs = torch.softmax(logits, dim=1)
            curves[start : start + rows] = probs.gather(1, target_index[image_of].unsqueeze(1))[
                :, 0
            ]
    return curves.reshape(n, steps + 1)


def curve_auc(curves: torch.Tensor) -> torch.Tensor:
    """Trapezoid mean of ``[N, K + 1]`` curves over equal spacings, in the curves' range."""
    steps = curves.shape[1] - 1
    return (curves[:, :-1] + curves[:, 1:]).sum(dim=1) / (2 * steps)


def deletion_insertion_curves(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    maps: torch.Tensor,
    targets: Sequence[int],
    *,
    steps: int = 16,
    substrate: str | torch.Tensor = "blur",
    batch_size: int | None = None,
    image_logits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both curves of :func:`perturbation_curves` from one batched pass that scores each distinct
    image once.

    The two curves share their end points: deletion starts at the image and ends at the substrate,
    insertion starts at the substrate and ends at the image. So an image needs ``2 * steps``
    forwards, not ``2 * (steps + 1)``, and ``2 * steps - 1`` when ``image_logits`` (``[N, classes]``,
    the logits of the unperturbed images, which the caller often has already) are given.

    Returns:
        ``(deletion, insertion)``, each ``[N, steps + 1]`` probabilities as :func:`perturbation_curves`
        gives them.
    """
    _check(images, maps, targets, steps)
    n, _, h, w = images.shape
    device = images.device
    base = substrate_images(images, substrate)
    rank, budgets = _ranks_and_budgets(maps, steps, h, w, device)
    target_index = torch.as_tensor(list(targets), dtype=torch.long, device=device)
    # Per image, in this order: deletion points 0 (the image, unless given) .. steps (the
    # substrate), then insertion points 1 .. steps - 1.
    first = 0 if image_logits is None else 1
    jobs = [(k, True) for k in range(first, steps + 1)] + [(k, False) for k in range(1, steps)]
    step_of = torch.tensor([k for k, _ in jobs], device=device)
    deleting = torch.tensor([d for _, d in jobs], device=device)
    per_image = len(jobs)
    total = n * per_image
    rows = max(1, batch_size or _DEFAULT_ROWS)
    scores = torch.empty(total, device=device, dtype=torch.float32)
    with torch.no_grad():
        for start in range(0, total, rows):
            flat = torch.arange(start, min(start + rows, total), device=device)
            image_of, job = flat // per_image, flat % per_image
            changed = rank[image_of] < budgets[step_of[job]].unsqueeze(1)
            # Deletion shows the substrate where changed, insertion the image where changed.
            show_base = (changed == deleting[job].unsqueeze(1)).reshape(-1, 1, h, w)
            batch = torch.where(show_base, base[image_of], images[image_of])
            probs = torch.softmax(logits_fn(batch).float(), dim=1)
            scores[start : start + len(flat)] = probs.gather(1, target_index[image_of, None])[:, 0]
    scores = scores.reshape(n, per_image)
    if image_logits is None:
        whole, scores = scores[:, :1], scores[:, 1:]
    else:
        probs = torch.softmax(image_logits.to(device).float(), dim=1)
        whole = probs.gather(1, target_index[:, None])
    deletion = torch.cat([whole, scores[:, :steps]], 1)
    insertion = torch.cat([scores[:, steps - 1 : steps], scores[:, steps:], whole], 1)
    return deletion, insertion


def deletion_insertion_auc(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    maps: torch.Tensor,
    targets: Sequence[int],
    *,
    steps: int = 16,
    substrate: str | torch.Tensor = "blur",
    batch_size: int | None = None,
    image_logits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deletion and insertion AUC of each map (RISE protocol; see the module docstring).

    Args:
        logits_fn: images ``[B, C, H, W]`` in [0, 1] -> logits ``[B, classes]``.
        images: ``[N, C, H, W]`` in [0, 1].
        maps: ``[N, H, W]``; higher = more important.
        targets: one class index per image.
        steps: equal pixel budgets; each curve has ``steps + 1`` points.
        substrate: ``"blur"``, ``"mean"``, ``"zero"`` or a tensor (see :func:`substrate_images`).
        batch_size: perturbed images per forward pass (default 64).
        image_logits: ``[N, classes]`` logits of the unperturbed images, if the caller has them.

    Returns:
        ``(deletion, insertion)``, each ``[N]`` in [0, 1] on the images' device. Lower deletion and
        higher insertion mean a more faithful map. Both come from one pass of ``2 * steps``
        perturbed images per image (:func:`deletion_insertion_curves`).
    """
    deletion, insertion = deletion_insertion_curves(
        logits_fn,
        images,
        maps,
        targets,
        steps=steps,
        substrate=substrate,
        batch_size=batch_size,
        image_logits=image_logits,
    )
    return curve_auc(deletion), curve_auc(insertion)


def sparseness(maps: torch.Tensor) -> torch.Tensor:
    """Gini index of each absolute map (Quantus ``Sparseness``): 0 = uniform, towards 1 = one pixel.

    Args:
        maps: ``[N, ...]`` attribution maps (signed; the absolute value is used).

    Returns:
        ``[N]`` in [0, 1).
    """
    flat = maps.detach().float().reshape(maps.shape[0], -1).abs()
    peak = flat.amax(dim=1, keepdim=True)
    flat = flat / torch.where(peak > 0, peak, torch.ones_like(peak)) + 1e-7
    flat, _ = torch.sort(flat, dim=1)
    count = flat.shape[1]
    index = torch.arange(1, count + 1, device=flat.device, dtype=flat.dtype)
    return ((2 * index - count - 1) * flat).sum(dim=1) / (count * flat.sum(dim=1))


def boxes_to_masks(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``[N, 4]`` boxes ``(x0, y0, x1, y1)`` in pixels (end exclusive) -> ``[N, H, W]`` bool masks."""
    boxes = torch.as_tensor(boxes)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(
            f"boxes must be [N, 4] as (x0, y0, x1, y1); got shape {tuple(boxes.shape)}"
        )
    ys = torch.arange(height, device=boxes.device).view(1, -1, 1)
    xs = torch.arange(width, device=boxes.device).view(1, 1, -1)
    x0, y0, x1, y1 = (boxes[:, i].view(-1, 1, 1) for i in range(4))
    return (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)


def pointing_game(maps: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """1.0 where a maximal pixel of the map lies inside the object (Quantus ``PointingGame``).

    Args:
        maps: ``[N, H, W]``.
        boxes: ``[N, 4]`` boxes ``(x0, y0, x1, y1)`` in pixels, end exclusive, or ``[N, H, W]`` masks.

    Returns:
        ``[N]`` of 1.0 (hit) / 0.0 (miss); NaN where the box is empty.
    """
    n, h, w = maps.shape
    boxes = torch.as_tensor(boxes, device=maps.device)
    masks = boxes.bool() if boxes.ndim == 3 else boxes_to_masks(boxes, h, w)
    if tuple(masks.shape) != (n, h, w):
        raise ValueError(f"boxes give masks of shape {tuple(masks.shape)}; expected {(n, h, w)}")
    flat = maps.detach().reshape(n, -1)
    masks = masks.reshape(n, -1)
    peak = flat == flat.amax(dim=1, keepdim=True)
    hit = (peak & masks).any(dim=1).float()
    return torch.where(masks.any(dim=1), hit, torch.full_like(hit, float("nan")))
