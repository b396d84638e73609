"""Quality of every prototype, measured in every audit: is it of its own class, and robustly so?

- :func:`prototype_flags`: the top class of each prototype, whether it is off target (its top class is
  not one of its targets; for an antitype, ``objective_weight`` < 0, whether it *is* one), and the
  target probability (mean over a hybrid's classes).
- :func:`robust_target_probs`: the mean target probability under seeded random resized crops (scale
  0.6-1 of the area, aspect 3/4-4/3) and horizontal flips, as torchvision's ``RandomResizedCrop``
  draws them. A prototype that holds its class only pixel-perfectly scores low here.
- :func:`transfer_target_probs`: the target probability of each prototype on other models with the
  same class list (``reference_models``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from leapcore.errors import InputError
from leapcore.naming import target_key
from leapcore.outputs import model_probabilities, probabilities
from leapcore.rng import Stream

ROBUST_VIEWS = 8  # crops per prototype; the mean over 8 moves by < 0.05 between seeds on the digits


def target_mask(targets: list[list[int]], per_target: int, num_classes: int) -> torch.Tensor:
    """``[B, K]`` with 1 on each prototype row's target classes (rows target-major)."""
    mask = torch.zeros(len(targets) * per_target, num_classes)
    for t, classes in enumerate(targets):
        mask[t * per_target : (t + 1) * per_target, classes] = 1.0
    return mask


def mean_target_prob(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (probs * mask).sum(-1) / mask.sum(-1).clamp_min(1)


def prototype_flags(
    logits: torch.Tensor,
    targets: list[list[int]],
    per_target: int,
    objective_weight: float = 1.0,
    output: str = "logits",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per prototype row: ``(top_class [B] int, off_target [B] bool, target_prob [B] float)``."""
    logits = logits.detach().cpu().float()
    mask = target_mask(targets, per_target, logits.shape[1])
    top = logits.argmax(1)
    top_is_target = mask.gather(1, top[:, None]).squeeze(1) > 0
    off = top_is_target if objective_weight < 0 else ~top_is_target
    return top, off, mean_target_prob(probabilities(logits, output), mask)


def random_resized_crops(
    images: torch.Tensor, views: int, generator: torch.Generator
) -> torch.Tensor:
    """``views`` crops of every image (view-major: row ``v * N + i``), resized back, half flipped."""
    n, _, h, w = images.shape
    out = []
    for _ in range(views):
        for i in range(n):
            for _attempt in range(10):  # torchvision's rejection sampling of a crop that fits
                area = h * w * (0.6 + 0.4 * float(torch.rand((), generator=generator)))
                log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * float(
                    torch.rand((), generator=generator)
                )
                ratio = math.exp(log_ratio)
                cw = int(round(math.sqrt(area * ratio)))
                ch = int(round(math.sqrt(area / ratio)))
                if 0 < cw <= w and 0 < ch <= h:
                    break
            else:
                ch, cw = h, w
            top = int(torch.randint(0, h - ch + 1, (), generator=generator))
            left = int(torch.randint(0, w - cw + 1, (), generator=generator))
            crop = images[i : i + 1, :, top : top + ch, left : left + cw]
            crop = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)
            if float(torch.rand((), generator=generator)) < 0.5:
                crop = crop.flip(-1)
            out.append(crop)
    return torch.cat(out)


@torch.no_grad()
def robust_target_probs(
    model: torch.nn.Module,
    images: torch.Tensor,
    targets: list[list[int]],
    per_target: int,
    seed: int,
    chunk_size: int,
    views: int = ROBUST_VIEWS,
) -> torch.Tensor:
    """Mean target probability of each image over ``views`` seeded random resized crops and flips."""
    gen = torch.Generator().manual_seed(seed + Stream.ROBUST_VIEWS)
    crops = random_resized_crops(images.detach().cpu().float(), views, gen).to(images.device)
    logits = torch.cat([model(crops[i : i + chunk_size]) for i in range(0, len(crops), chunk_size)])
    mask = target_mask(targets, per_target, logits.shape[1])
    probs = model_probabilities(model, logits).cpu().view(views, len(images), -1)
    return mean_target_prob(probs, mask[None]).mean(0)


def check_reference_width(name: str, width: int, expected: int) -> None:
    """A reference model must score the same classes: refuse a different output width."""
    if width != expected:
        raise InputError(
            f"reference model {name!r} has {width} outputs but the audited model has {expected} "
            "classes; reference_models must share the audited model's class list."
        )


@torch.no_grad()
def transfer_target_probs(
    models: list[tuple[str, torch.nn.Module]],
    images: torch.Tensor,
    targets: list[list[int]],
    per_target: int,
    num_classes: int,
    chunk_size: int,
) -> torch.Tensor:
    """``[B, R]``: the target probability of each prototype on each reference model (pixel input)."""
    mask = target_mask(targets, per_target, num_classes)
    columns = []
    for name, net in models:
        logits = torch.cat(
            [net(images[i : i + chunk_size]) for i in range(0, len(images), chunk_size)]
        ).cpu()
        check_reference_width(name, logits.shape[1], num_classes)
        columns.append(mean_target_prob(model_probabilities(net, logits.float()), mask))
    return torch.stack(columns, 1) if columns else torch.zeros(len(images), 0)


OFF_TARGET_TAG = "leapcore.off_target_prototypes"


def quality_metrics(audit) -> dict[str, float]:
    """Per-class quality metrics of an audit, for MLflow and W&B (keys as ``audit_metrics``'s).

    ``off_target/<target>`` (1.0 when any prototype of the class is off target),
    ``target_prob_robust/<target>``, ``transfer_prob/<target>/<k>``, ``prototypes/off_target``
    (count), and the isolation means of ``kept_prob``, ``deletion_auc`` and ``insertion_auc``.
    """
    metrics: dict[str, float] = {}
    p = getattr(audit, "prototypes", None)
    if p is not None:
        _, off, _ = p.flags()
        names = audit.class_list
        for row in range(len(off)):
            name = target_key(p.targets[p.row_target(row)], names)
            key = f"off_target/{name}"
            metrics[key] = max(metrics.get(key, 0.0), float(off[row]))
            if p.robust_probs is not None:
                key = f"target_prob_robust/{name}"
                metrics[key] = metrics.get(key, 0.0) + float(p.robust_probs[row]) / p.per_target
            if p.transfer_probs is not None:
                for k in range(p.transfer_probs.shape[1]):
                    key = f"transfer_prob/{name}/{k}"
                    metrics[key] = metrics.get(key, 0.0) + float(p.transfer_probs[row, k]) / (
                        p.per_target
                    )
        metrics["prototypes/off_target"] = float(off.sum())
    iso = getattr(audit, "isolation", None)
    if iso is not None:
        for field in ("kept_prob", "deletion_auc", "insertion_auc"):
            value = getattr(iso, field)
            if value is not None:
                metrics[f"isolation/mean_{field}"] = float(value.mean())
    return metrics


def quality_tags(metrics: dict[str, float]) -> dict[str, str]:
    """The run tag naming the targets whose prototypes are off target ('none' when all are fine)."""
    if "prototypes/off_target" not in metrics:
        return {}
    off = sorted(
        k.split("/", 1)[1] for k, v in metrics.items() if k.startswith("off_target/") and v
    )
    return {OFF_TARGET_TAG: ",".join(off) if off else "none"}


def _probs_cell(iso, k: int) -> str:
    """``0.912 → 0.871 (0.96)``: both probabilities and their ratio (the ratio alone when only it
    was stored)."""
    ratio = f"{float(iso.kept_prob[k]):.2f}"
    if iso.prob_full is None or iso.prob_isolated is None:
        return ratio
    return f"{float(iso.prob_full[k]):.3f} &rarr; {float(iso.prob_isolated[k]):.3f} ({ratio})"


def quality_section(audit, context=None) -> str | None:
    """An HTML fragment for the report (h13's ``report_sections`` registry, name ``quality``):
    off-target prototypes first, then every prototype's target probability clean / robust /
    transferred and every isolation's kept ratio, coverage and RISE AUCs. None when there is nothing."""
    import html

    parts: list[str] = []
    p = getattr(audit, "prototypes", None)
    names = audit.class_list
    if p is not None:
        top, off, prob = p.flags()
        refs = [html.escape(r) for r in p.reference_models]
        head = "<tr><th>target</th><th>#</th><th>top class</th><th>target prob</th>"
        head += "<th>under crops+flips</th>" if p.robust_probs is not None else ""
        head += "".join(f"<th>on {r}</th>" for r in refs) + "</tr>"
        rows = []
        for r in range(len(top)):
            target = "+".join(names[c] for c in p.targets[p.row_target(r)])
            cells = [
                html.escape(target),
                str(p.row_index(r)),
                html.escape(names[int(top[r])]) + (" &#9888; off target" if off[r] else ""),
                f"{float(prob[r]):.3f}",
            ]
            if p.robust_probs is not None:
                cells.append(f"{float(p.robust_probs[r]):.3f}")
            if p.transfer_probs is not None:
                cells += [f"{float(v):.3f}" for v in p.transfer_probs[r]]
            style = ' style="background:#fde2e1"' if off[r] else ""
            rows.append(f"<tr{style}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        count = int(off.sum())
        warning = (
            f"<p><strong>{count} prototype(s) are classified as another class</strong>: they are "
            "not evidence for their target.</p>"
            if count
            else "<p>Every prototype is classified as its own target.</p>"
        )
        parts.append(f"<h3>Prototype quality</h3>{warning}<table>{head}{''.join(rows)}</table>")
    iso = getattr(audit, "isolation", None)
    if iso is not None and iso.deletion_auc is not None:
        rows = [
            f"<tr><td>{i}</td><td>{html.escape(names[c])}</td><td>{float(iso.kept[k]):.2f}</td>"
            f"<td>{_probs_cell(iso, k)}</td><td>{float(iso.coverage[k]):.0%}</td>"
            f"<td>{float(iso.deletion_auc[k]):.3f}</td><td>{float(iso.insertion_auc[k]):.3f}</td></tr>"
            for k, (i, c) in enumerate(iso.pairs)
        ]
        parts.append(
            "<h3>Isolation faithfulness</h3><table><tr><th>image</th><th>class</th>"
            "<th>kept logit</th><th>probability: whole &rarr; isolated (kept)</th><th>coverage</th><th>deletion AUC (lower is "
            "better)</th><th>insertion AUC (higher is better)</th></tr>"
            + "".join(rows)
            + "</table>"
        )
    return "".join(parts) or None
