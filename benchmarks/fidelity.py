"""Fidelity of isolation: leapcore's masks and HiPE against captum's attributions, on the same images.

Printed side by side: RISE deletion / insertion AUC (blurred substrate, 16 budgets), the share of the
map's mass inside a planted marker (digits CNNs trained here in seconds, markers of several sizes,
colours and positions), and seconds per image. ``--photos`` adds the pretrained EfficientNet-Lite0 on
scikit-learn's sample photos (slow on a CPU).

    PYTHONPATH=. python benchmarks/fidelity.py [--images 6] [--photos]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from leapcore import engine  # noqa: E402
from leapcore.faithfulness import deletion_insertion_auc  # noqa: E402
from leapcore.hipe import blurred_substrate  # noqa: E402
from tests.engine.marker_support import marker_mass, train_marker_model  # noqa: E402

MARKERS = [
    {"size": 5, "position": (2, 25), "value": 1.0, "seed": 0},
    {"size": 4, "position": (24, 3), "value": 0.5, "seed": 1},
    {"size": 6, "position": (13, 13), "value": 0.0, "seed": 2},
]


def captum_maps(name, forward, images, targets):
    """``[N, H, W]`` absolute attributions, summed over channels."""
    import captum.attr as ca

    base = blurred_substrate(images)
    method = {
        "Saliency": lambda: ca.Saliency(forward).attribute(images, target=targets),
        "IntegratedGradients": lambda: ca.IntegratedGradients(forward).attribute(
            images, baselines=base, target=targets, n_steps=32, internal_batch_size=32
        ),
        "GradientShap": lambda: ca.GradientShap(forward).attribute(
            images,
            baselines=torch.cat([base, torch.zeros_like(images)]),
            target=targets,
            n_samples=16,
        ),
        "Occlusion": lambda: ca.Occlusion(forward).attribute(
            images,
            target=targets,
            sliding_window_shapes=(
                images.shape[1],
                max(2, images.shape[-1] // 8),
            )
            * 1
            + (max(2, images.shape[-1] // 8),),
            strides=(
                images.shape[1],
                max(1, images.shape[-1] // 16),
                max(1, images.shape[-1] // 16),
            ),
            baselines=base,
        ),
    }[name]
    return method().abs().sum(1).detach()


def leapcore_maps(model, class_list, pre, images, targets, extra):
    audit = engine.run(
        model,
        class_list,
        {
            "input_dim": list(images.shape[1:]),
            "isolation_keep": 0,
            "max_isolate_classes": 1,
            **extra,
        },
        [[t] for t in sorted(set(targets))],
        pre,
        samples=images,
        device="cpu",
    )
    iso = audit.isolation
    wanted = {(i, t) for i, t in enumerate(targets)}
    rows = [k for k, pair in enumerate(iso.pairs) if pair in wanted]
    return iso.masks[rows, 0]


def apply(pre, x):
    """leap-ie's preprocessing: a callable or a list of callables."""
    for step in pre if isinstance(pre, (list, tuple)) else [pre]:
        x = step(x)
    return x


def compare(model, class_list, pre, images, targets, box=None):
    def forward(x):
        return model(apply(pre, x))

    methods = {
        "leapcore mask": lambda: leapcore_maps(model, class_list, pre, images, targets, {}),
        "leapcore HiPE": lambda: leapcore_maps(
            model, class_list, pre, images, targets, {"use_hipe": True, "hipe_min_cell": 1}
        ),
        **{
            n: (lambda n=n: captum_maps(n, forward, images.clone().requires_grad_(True), targets))
            for n in ("Saliency", "IntegratedGradients", "GradientShap", "Occlusion")
        },
        "random": lambda: torch.rand(
            images.shape[0], *images.shape[2:], generator=torch.Generator().manual_seed(0)
        ),
    }
    rows = []
    for name, fn in methods.items():
        began = time.perf_counter()
        maps = fn()
        seconds = (time.perf_counter() - began) / len(images)
        with torch.no_grad():
            deletion, insertion = deletion_insertion_auc(forward, images, maps, targets)
        mass = float(marker_mass(maps, box).mean()) if box is not None else float("nan")
        rows.append((name, float(deletion.mean()), float(insertion.mean()), mass, seconds))
    return rows


def show(title, rows):
    print(f"\n{title}")
    print(f"{'method':22s} {'deletion':>9s} {'insertion':>9s} {'marker':>7s} {'s/image':>8s}")
    for name, d, i, m, s in rows:
        print(f"{name:22s} {d:9.3f} {i:9.3f} {m:7.2f} {s:8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--photos", action="store_true")
    parser.add_argument("--only-photos", action="store_true", help="skip the marker models")
    args = parser.parse_args()
    torch.manual_seed(0)
    for spec in [] if args.only_photos else MARKERS:
        m = train_marker_model(**spec)
        images = m.images[: args.images]
        rows = compare(
            m.model, m.class_list, m.preprocessing, images, [m.marker_class] * len(images), m.box
        )
        show(f"digits CNN with marker {spec} (clean accuracy {m.clean_accuracy:.2f})", rows)
    if args.photos or args.only_photos:
        from leapcore.models import get_model
        from tests.engine.engine_support import photo_samples

        pre, model, class_list = get_model("efficientnet_lite0")
        model.eval()
        photos = photo_samples()
        with torch.no_grad():
            targets = model(apply(pre, photos)).argmax(1).tolist()
        show(
            "EfficientNet-Lite0, sklearn sample photos",
            compare(model, class_list, pre, photos, targets),
        )


if __name__ == "__main__":
    main()
