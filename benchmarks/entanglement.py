"""Entanglement against held-out confusion, and how well confusion itself is defined.

Trains twelve digit CNNs (sklearn digits at 32x32; seeds, epochs and training sizes vary: 55-97 %
held-out accuracy; models 0-5 chose the defaults, 6-11 only check them), audits one prototype per
digit and prints:

1. **The target's reliability**, per model: split-half Spearman (two random halves of the held-out
   digits, 20 draws) of the symmetrised hard confusion (argmax counts) and soft confusion (mean
   predicted probability), the Spearman-Brown ceiling ``sqrt(2r / (1 + r))`` (the best correlation
   any score can reach against the full held-out confusion), the share of pairs with zero hard
   confusion (ties), and the agreement of the confusion with the confusion of the same model on 8
   augmented views of the held-out digits (shifts, rotations, scaling).
2. **Measures**: Spearman over the 45 unordered pairs between each measure and the held-out
   confusion, mean (worst) over the models, hard and soft, plus the measure's own time per audit
   and its ratio to the prototype stage, then each model's soft Spearman. Every measure reads the
   same prototypes, per objective; the default is computed by ``engine.score_entanglement`` itself
   (the relaxed share times the probe's, geometric mean, on the rows whose probe reached its
   target logit; the relaxed share elsewhere), beside the probe unguarded and its two halves alone.
3. With ``--lite0``: the pretrained EfficientNet-Lite0 with ``leap demo``'s classes and settings:
   each class's strongest neighbours by the relaxed share alone (probe off), the probe unguarded
   and the default (guarded), whether each probe reached its target, and the time per class pair
   of the relaxed share and of the default, side by side.

    PYTHONPATH=. python benchmarks/entanglement.py [--objectives margin logit] [--models 12]
        [--defaults] [--all] [--lite0]

``--defaults`` runs the engine's default schedule (slow on a CPU); otherwise the digits tests'
fast one (100 steps, transform ``s``, lr 0.05). ``--all`` adds the measures that lost: the
extrapolated relaxation, a column prior from blurred prototypes, the logit correlation across the
relaxed prototypes, and the data-free boundary measures (targeted ease, escape, barrier, linearised
boundary distance).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from leapcore import engine  # noqa: E402
from leapcore.entanglement import (  # noqa: E402
    entanglement,
    pair_entanglement,
    probe_reached,
    probed,
    relaxed_logits,
    share,
)
from tests.engine.engine_support import train_digits  # noqa: E402

MODELS = [
    (2, 600, 0),
    (1, 200, 1),
    (1, 400, 2),
    (3, 600, 3),
    (2, 400, 4),
    (2, 300, 5),
    (2, 500, 6),
    (1, 300, 7),
    (3, 400, 8),
    (2, 800, 9),
    (1, 600, 10),
    (4, 600, 11),
]
FAST = {"max_steps": 100, "find_lr_steps": 0, "lr": 0.05, "transform": "s"}
UPPER = np.triu_indices(10, 1)
TARGETS = torch.arange(10)


def symmetrised(m: np.ndarray) -> np.ndarray:
    """The 45 off-diagonal pairs of ``(m + m.T) / 2``."""
    m = np.asarray(m, dtype=float)
    return ((m + m.T) / 2)[UPPER]


def rho(a: np.ndarray, b: np.ndarray) -> float:
    return float(spearmanr(a, b).statistic)


def confusions(logits: torch.Tensor, labels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Row-normalised hard and soft confusion ``[true, predicted]``."""
    y = labels.numpy()
    hard = np.zeros((10, 10))
    np.add.at(hard, (y, logits.argmax(1).numpy()), 1)
    probs = logits.softmax(1).numpy()
    soft = np.stack([probs[y == c].mean(0) for c in range(10)])
    return hard / hard.sum(1, keepdims=True), soft


def split_half(logits: torch.Tensor, labels: torch.Tensor, draws: int = 20) -> tuple[float, float]:
    """Mean Spearman between the (hard, soft) confusions of two random halves of the digits."""
    hard, soft = [], []
    for seed in range(draws):
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
        a, b = order[: len(order) // 2], order[len(order) // 2 :]
        ha, sa = confusions(logits[a], labels[a])
        hb, sb = confusions(logits[b], labels[b])
        hard.append(rho(symmetrised(ha), symmetrised(hb)))
        soft.append(rho(symmetrised(sa), symmetrised(sb)))
    return float(np.mean(hard)), float(np.mean(soft))


def ceiling(r: float) -> float:
    """Spearman-Brown: the best correlation a score can reach against the full-data target."""
    return float(np.sqrt(max(2 * r / (1 + r), 0.0)))


def augmented(x: torch.Tensor, seed: int, views: int = 8) -> list[torch.Tensor]:
    """Random shifts (+-2 px of 32), rotations (+-10 degrees) and scaling (0.9-1.1)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(views):
        b = len(x)
        angle = (torch.rand(b, generator=gen) - 0.5) * np.pi / 9
        scale = 0.9 + 0.2 * torch.rand(b, generator=gen)
        shift = (torch.rand(b, 2, generator=gen) - 0.5) / 4
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack(
            [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
        )
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        out.append(F.grid_sample(x, grid, align_corners=False))
    return out


# ---------------------------------------------------------------------------------------------- #
# Measures: each maps (net, prototype images, audit) to a [10, 10] score (a higher score: closer)
# ---------------------------------------------------------------------------------------------- #
def _signed_steps(net, x, objective: Callable, k: int, eps: float) -> torch.Tensor:
    for _ in range(k):
        x = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(objective(net(x)).sum(), x)
        x = (x.detach() + eps * grad.sign()).clamp(0, 1)
    return x.detach()


def m_share(net, images, audit) -> np.ndarray:
    return pair_entanglement(entanglement(audit.baseline.logits, audit.prototypes.logits)).numpy()


def m_leap(net, images, audit) -> np.ndarray:
    return entanglement(audit.baseline.logits, audit.prototypes.logits, measure="leap").numpy()


def m_default(net, images, audit) -> np.ndarray:
    """The engine's default measure, through ``engine.score_entanglement`` itself."""
    config = audit.config.model_copy(update={"entanglement_measure": "relaxed"})
    scores, _ = engine.score_entanglement(
        net,
        audit.prototypes,
        audit.baseline.logits,
        config,
        torch.device("cpu"),
        64,
        audit.baseline.image,
    )
    return pair_entanglement(scores).numpy()


def m_unguarded(net, images, audit) -> np.ndarray:
    """The relaxed share times the probe's (20 x 0.05) on every row, reached or not."""
    mask = F.one_hot(TARGETS, 10).bool()
    z = relaxed_logits(net, images, mask, 10, 0.02)
    probe = probed(net, audit.baseline.image, mask, 20, 0.05)
    reached = probe_reached(probe, [z, audit.prototypes.logits], mask)
    REACHED.append((int(reached.sum()), len(reached)))
    return pair_entanglement((share(z, mask) * share(probe, mask)).sqrt()).numpy()


REACHED: list[tuple[int, int]] = []


def m_relaxed(net, images, audit, steps: int = 10, step: float = 0.02) -> np.ndarray:
    mask = F.one_hot(TARGETS, 10).bool()
    z = relaxed_logits(net, images, mask, steps, step)
    return pair_entanglement(entanglement(audit.baseline.logits, z)).numpy()


def m_probe(net, images, audit, steps: int = 20, step: float = 0.05) -> np.ndarray:
    """``share`` on the probe alone: the start image after 20 signed steps of 0.05 up the target."""
    z = probed(net, audit.baseline.image, F.one_hot(TARGETS, 10).bool(), steps, step)
    return pair_entanglement(share(z)).numpy()


def m_extrapolated(net, images, audit, lam: float = 2.0) -> np.ndarray:
    """``share`` of ``z_r + lam (z_r - z_p)``: the relaxation (10 x 0.01) extrapolated in logits."""
    mask = F.one_hot(TARGETS, 10).bool()
    z = relaxed_logits(net, images, mask, 10, 0.01)
    return pair_entanglement(share(z + lam * (z - audit.prototypes.logits), mask)).numpy()


def m_relaxed_blur_prior(net, images, audit) -> np.ndarray:
    """log relaxed pair score + 0.5 log of a column prior: each class's mean non-target share on
    the prototypes blurred (Gaussian, sigma 2 px); a data-free estimate of 'attractor' classes."""
    import torchvision.transforms.functional as TF

    mask = F.one_hot(TARGETS, 10).bool()
    with torch.no_grad():
        blurred = share(net(TF.gaussian_blur(images, 9, 2.0)), mask).masked_fill(mask, torch.nan)
    prior = blurred.nanmean(0)
    pairs = np.log(m_relaxed(net, images, audit) + 1e-30)
    return pairs + 0.5 * np.log((prior[:, None] * prior[None, :]).numpy() + 1e-30)


def m_logit_correlation(net, images, audit) -> np.ndarray:
    """Correlation of the class logits across the ten relaxed prototypes."""
    z = relaxed_logits(net, images, F.one_hot(TARGETS, 10).bool(), 10, 0.02)
    z = F.normalize(z - z.mean(0), dim=0)
    return (z.T @ z).numpy()


def m_targeted_ease(net, images, audit, k: int = 1, eps: float = 0.02) -> np.ndarray:
    """log p_b after k signed steps from a's prototype raising log p_b (all 90 pairs batched)."""
    a = TARGETS.repeat_interleave(10)
    b = TARGETS.repeat(10)
    rows = torch.arange(100)
    x = _signed_steps(net, images[a], lambda z: z.log_softmax(1)[rows, b], k, eps)
    with torch.no_grad():
        return net(x).log_softmax(1)[rows, b].reshape(10, 10).numpy()


def m_flip_steps(net, images, audit, max_k: int = 30, eps: float = 0.01) -> np.ndarray:
    """Minus the signed steps from a's prototype until b is the top class."""
    a, b = TARGETS.repeat_interleave(10), TARGETS.repeat(10)
    rows = torch.arange(100)
    x = images[a]
    steps = torch.full((100,), float(max_k + 1))
    for k in range(1, max_k + 1):
        x = _signed_steps(net, x, lambda z: z.log_softmax(1)[rows, b], 1, eps)
        with torch.no_grad():
            flipped = (net(x).argmax(1) == b) & (steps > max_k)
        steps[flipped] = k
    return -steps.reshape(10, 10).numpy()


def m_escape(net, images, audit, k: int = 1, eps: float = 0.01) -> np.ndarray:
    """Non-target share after k signed steps lowering the target's log-probability."""
    x = _signed_steps(net, images, lambda z: -z.log_softmax(1)[TARGETS, TARGETS], k, eps)
    with torch.no_grad():
        return pair_entanglement(entanglement(audit.baseline.logits, net(x))).numpy()


def m_barrier(net, images, audit, points: int = 11) -> np.ndarray:
    """min over the straight path between a's and b's prototypes of p_a + p_b (no leak: close)."""
    t = torch.linspace(0, 1, points)[:, None, None, None]
    out = np.zeros((10, 10))
    with torch.no_grad():
        for a in range(10):
            for b in range(a + 1, 10):
                p = net((1 - t) * images[a] + t * images[b]).softmax(1)
                out[a, b] = out[b, a] = float((p[:, a] + p[:, b]).min())
    return out


def m_boundary_distance(net, images, audit) -> np.ndarray:
    """Minus the linearised L2 distance (z_a - z_b) / |grad (z_a - z_b)| (DeepFool's step)."""
    out = np.zeros((10, 10))
    for b in range(10):
        x = images.clone().requires_grad_(True)
        z = net(x)
        gap = z[TARGETS, TARGETS] - z[:, b]
        (grad,) = torch.autograd.grad(gap.sum(), x)
        out[:, b] = -(gap.detach() / grad.flatten(1).norm(dim=1).clamp_min(1e-8)).numpy()
    return out


MEASURES: dict[str, Callable] = {
    "relaxed (default: relaxed x guarded probe)": m_default,
    "relaxed x probe, unguarded": m_unguarded,
    "relaxed without the probe (10 x 0.02)": m_relaxed,
    "probe alone (20 x 0.05 from the start image)": m_probe,
    "share": m_share,
    "leap (leap-ie's formula)": m_leap,
}
MORE: dict[str, Callable] = {
    "relaxed, extrapolated (10 x 0.01, lam 2)": m_extrapolated,
    "relaxed + blurred-prototype column prior": m_relaxed_blur_prior,
    "logit correlation across relaxed prototypes": m_logit_correlation,
    "relaxed, 20 steps of 0.01": lambda n, i, a: m_relaxed(n, i, a, 20, 0.01),
    "relaxed, 40 steps of 0.01": lambda n, i, a: m_relaxed(n, i, a, 40, 0.01),
    "targeted ease a->b (log p_b, 1 step)": m_targeted_ease,
    "targeted ease a->b (log p_b, 10 steps)": lambda n, i, a: m_targeted_ease(n, i, a, 10, 0.01),
    "steps until b is top (a->b)": m_flip_steps,
    "escape share (1 step down p_a)": m_escape,
    "escape share (10 steps down p_a)": lambda n, i, a: m_escape(n, i, a, 10, 0.02),
    "barrier on the a-b prototype path": m_barrier,
    "linearised boundary distance": m_boundary_distance,
}


def lite0_neighbours() -> None:
    """``leap demo``'s audit on the pretrained EfficientNet-Lite0: neighbours and time per pair."""
    from leapcli.demo import DEMO_CLASSES, DEMO_CONFIG
    from leapcore.entanglement import target_logit
    from leapcore.sources import load_model

    loaded = load_model("efficientnet_lite0")
    classes = list(loaded.class_list)
    config = {**DEMO_CONFIG, "isolation": False, "entanglement_measure": "share"}
    targets = [classes.index(c) for c in DEMO_CLASSES]
    audit = engine.run(loaded.model, classes, config, targets, loaded.preprocessing)
    cfg = audit.config
    shape = engine.input_shape(cfg, "pt", loaded.preprocessing)
    net = engine.build_model(
        loaded.model, classes, loaded.preprocessing, shape, "pt", cfg.channels_last,
        cfg.fold_batchnorm, cfg.output, cfg.region,
    )  # fmt: skip
    cpu, rows = torch.device("cpu"), len(targets)
    mask = audit.prototypes.target_mask()
    timed = {}
    for name, steps in (("relaxed share alone (main: probe off)", 0), ("default (guarded)", 20)):
        update = {"entanglement_measure": "relaxed", "entanglement_probe_steps": steps}
        began = time.perf_counter()
        scores, _ = engine.score_entanglement(
            net, audit.prototypes, audit.baseline.logits, cfg.model_copy(update=update), cpu, 64,
            audit.baseline.image,
        )  # fmt: skip
        timed[name] = (scores, time.perf_counter() - began)
    shown, _ = engine.isolation_inputs(audit.prototypes, [], cfg, len(classes), cpu)
    relaxed = relaxed_logits(net, shown, mask)
    probe = probed(net, audit.baseline.image, mask)
    reached = probe_reached(probe, [relaxed, audit.prototypes.logits], mask)
    unguarded = (share(relaxed, mask) * share(probe, mask)).sqrt()
    print(
        f"\n3. EfficientNet-Lite0, leap demo's classes and settings ({DEMO_CONFIG['max_steps']} steps)"
    )
    print(
        "  target logit: prototype "
        + " ".join(f"{v:.1f}" for v in target_logit(audit.prototypes.logits, mask).tolist())
        + "; relaxed "
        + " ".join(f"{v:.1f}" for v in target_logit(relaxed, mask).tolist())
        + "; probe (20 x 0.05 from the start image) "
        + " ".join(f"{v:.1f}" for v in target_logit(probe, mask).tolist())
        + f"; probe reached: {reached.tolist()}"
    )
    versions = {**{k: v[0] for k, v in timed.items()}, "relaxed x probe, unguarded": unguarded}
    for name, scores in versions.items():
        print(f"  {name}:")
        for r, t in enumerate(targets):
            row = scores[r].clone()
            row[t] = -1
            top = row.topk(3)
            names = ", ".join(
                f"{classes[c]} {v:.2f}" for c, v in zip(top.indices.tolist(), top.values.tolist())
            )
            print(f"    {classes[t]:18s} -> {names}")
    pairs = rows * (len(classes) - 1)
    proto = audit.prototypes.seconds
    print(f"  time (prototype stage {proto:.1f} s, {rows} rows x {len(classes) - 1} classes):")
    for name, (_, seconds) in timed.items():
        print(
            f"    {name:40s} {seconds:6.2f} s, {1e3 * seconds / pairs:.2f} ms per class pair, "
            f"{100 * seconds / proto:.1f} % of the prototype stage"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objectives", nargs="+", default=["margin", "logit"])
    parser.add_argument("--models", type=int, default=len(MODELS))
    parser.add_argument("--defaults", action="store_true")
    parser.add_argument("--all", action="store_true", help="also the boundary measures that lost")
    parser.add_argument("--lite0", action="store_true", help="also the demo's Lite0 neighbours")
    parser.add_argument("--only-lite0", action="store_true", help="only the Lite0 section")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.only_lite0:
        lite0_neighbours()
        return
    measures = {**MEASURES, **(MORE if args.all else {})}
    config = {"input_dim": [1, 32, 32], "isolation": False, "log_freq": 50}
    config.update({} if args.defaults else FAST)
    print(f"{'default' if args.defaults else 'fast'} schedule; models 0-5 chose, 6-11 check\n")
    print("1. The target: reliability of held-out confusion (45 symmetrised pairs)")
    print(
        "model        acc  n     zero | split-half hard / soft | ceiling hard / soft | "
        "plain~augmented hard / soft | hard~soft"
    )
    scores: dict[tuple[str, str], list[tuple[float, float]]] = {}
    seconds: dict[tuple[str, str], list[float]] = {}
    proto_seconds: dict[str, list[float]] = {}
    reliability = []
    for epochs, size, seed in MODELS[: args.models]:
        digits = train_digits(epochs, size, seed)
        net = torch.nn.Sequential(digits.preprocessing, digits.model).eval()
        net.num_classes = 10  # what engine.score_entanglement reads of a LogitsModel
        with torch.no_grad():
            logits = net(digits.test_x)
            views = augmented(digits.test_x, seed)
            aug_logits = torch.cat([net(v) for v in views])
        hard, soft = confusions(logits, digits.test_y)
        aug_hard, aug_soft = confusions(aug_logits, digits.test_y.repeat(len(views)))
        sh_hard, sh_soft = split_half(logits, digits.test_y)
        h, s = symmetrised(hard), symmetrised(soft)
        reliability.append((sh_hard, sh_soft, ceiling(sh_hard), ceiling(sh_soft)))
        print(
            f"{epochs}ep/{size}/s{seed:<4} {np.diag(hard).mean():.2f} {len(digits.test_y):5d} "
            f"{(h == 0).mean():.2f} |       {sh_hard:.2f} / {sh_soft:.2f}    |"
            f"     {ceiling(sh_hard):.2f} / {ceiling(sh_soft):.2f}     |"
            f"          {rho(h, symmetrised(aug_hard)):.2f} / {rho(s, symmetrised(aug_soft)):.2f}"
            f"        |   {rho(h, s):.2f}",
            flush=True,
        )
        for objective in args.objectives:
            audit = engine.run(
                digits.model,
                digits.class_list,
                {**config, "objective": objective, "entanglement_measure": "share"},
                list(range(10)),
                digits.preprocessing,
            )
            proto_seconds.setdefault(objective, []).append(audit.prototypes.seconds)
            images = audit.prototypes.images
            for name, fn in measures.items():
                began = time.perf_counter()
                m = fn(net, images, audit)
                seconds.setdefault((objective, name), []).append(time.perf_counter() - began)
                scores.setdefault((objective, name), []).append(
                    (rho(symmetrised(m), h), rho(symmetrised(m), s))
                )
    r = np.array(reliability)
    print(
        f"mean split-half hard {r[:, 0].mean():.2f} (min {r[:, 0].min():.2f}), soft "
        f"{r[:, 1].mean():.2f} (min {r[:, 1].min():.2f}); ceiling hard {r[:, 2].mean():.2f} "
        f"(min {r[:, 2].min():.2f}), soft {r[:, 3].mean():.2f} (min {r[:, 3].min():.2f})\n"
    )
    print("2. Spearman against held-out confusion, mean (worst); the measure's time per audit")
    head = "hard: all | fit | check      soft: all | fit | check       s/audit  x proto"
    for objective in args.objectives:
        print(f"\nobjective {objective}{' ' * 34}{head}")
        proto = float(np.mean(proto_seconds[objective]))
        for name in measures:
            v = np.array(scores[(objective, name)])
            t = float(np.mean(seconds[(objective, name)]))
            cells = []
            for col in (0, 1):
                parts = [f"{v[:, col].mean():.2f} ({v[:, col].min():5.2f})"]
                parts += [f"{v[sl, col].mean():.2f}" for sl in (slice(0, 6), slice(6, None))]
                cells.append(" | ".join(parts))
            print(f"  {name:46s} {cells[0]}     {cells[1]}     {t:6.3f}   {t / proto:.3f}")
        print(f"  (prototype stage: {proto:.2f} s per audit)")
        print(
            f"\n  per model, soft (objective {objective}): "
            + " ".join(f"{m[2]:>5d}" for m in MODELS)
        )
        for name in measures:
            v = np.array(scores[(objective, name)])[:, 1]
            print(f"  {name:46s} " + " ".join(f"{x:5.2f}" for x in v))
    reached = np.array(REACHED)
    print(
        f"\n  probes that reached their target: {reached[:, 0].sum()} of {reached[:, 1].sum()} rows"
    )
    if args.lite0:
        lite0_neighbours()


if __name__ == "__main__":
    main()
