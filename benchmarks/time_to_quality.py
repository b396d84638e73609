"""Time to a good prototype: leapcore with its defaults vs lucent, same model and classes, one run.

"Good" means: every prototype has target probability >= 0.99 on the clean image AND >= 0.9 mean
target probability under random resized crops (scale 0.6-1, aspect 3/4-4/3) and horizontal flips
(:func:`leapcore.quality.robust_target_probs`, 16 seeded views). Both contenders' images are scored by
the same evaluator: the model as the user has it (NCHW, batch norms as they are), in pixel space.

- leapcore: ``leapcore.engine.run`` with the default options (isolation off, ``--leap-config`` JSON
  overrides on top), all classes in one batch. Its time to quality is the wall time until the call
  returns when the returned prototypes are good, else "not reached": a user gets nothing earlier.
- lucent (torch-lucent 0.1.8): ``render_vis`` one class per run, as its README does: the logit
  objective ``"logits:<class>"``, its standard transforms, ``param.image`` (decorrelated Fourier),
  Adam at 0.05. Images are kept at ``--lucent-checkpoints`` steps and every step's clock is read, so
  lucent's time to quality is the time of the first checkpoint at which its image is good (an oracle
  stop that lucent itself does not have: this favours lucent). Scoring runs off the clock.

The model is EfficientNet-Lite0 (bundled ImageNet weights) fed ``--size`` px images, normalised with
the ImageNet mean/std (no resize, so 128 px runs really cost 128 px).

Usage: python benchmarks/time_to_quality.py [--classes 1,2,3] [--size 224] [--lucent-steps 512]
       [--device cpu] [--threads 2] [--leap-config '{"max_steps": 256}'] [--skip-lucent]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from leapcore.adapter import LogitsModel
from leapcore.device import pick_device
from leapcore.models import get_model
from leapcore.quality import robust_target_probs

PROB, ROBUST = 0.99, 0.9
VIEWS = 16


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PixelModel(torch.nn.Module):
    """[0, 1] images -> logits, ending in an ``Identity`` named ``logits`` for lucent's hooks."""

    def __init__(self, net: torch.nn.Module, normalise: torch.nn.Module):
        super().__init__()
        self.normalise = normalise
        self.net = net
        self.logits = torch.nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(self.net(self.normalise(x)))


@torch.no_grad()
def score(
    evaluator: LogitsModel, images: torch.Tensor, classes: list[int], seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(clean target prob [B], robust target prob [B])`` of one image per class."""
    images = images.to(next(evaluator.parameters()).device).float()
    probs = evaluator(images).softmax(1).cpu()
    clean = probs[torch.arange(len(classes)), torch.tensor(classes)]
    robust = robust_target_probs(
        evaluator, images, [[c] for c in classes], 1, seed, chunk_size=16, views=VIEWS
    )
    return clean, robust


def good(clean: torch.Tensor, robust: torch.Tensor) -> bool:
    return bool((clean >= PROB).all() and (robust >= ROBUST).all())


def run_leapcore(net, normalise, names, classes, size, device, overrides: dict) -> dict:
    from leapcore import engine

    config = {"isolation": False, "input_dim": [3, size, size], **overrides}
    synchronize(device)
    began = time.perf_counter()
    audit = engine.run(net, names, config, [[c] for c in classes], [normalise], device=device)
    synchronize(device)
    wall = time.perf_counter() - began
    p = audit.prototypes
    return {
        "wall": wall,
        "images": p.images,
        "steps": p.steps,
        "stopped_at": p.extras.get("stopped_at", "-"),
        "lr": p.lr,
        "timings": {k: round(v, 1) for k, v in audit.timings.items()},
    }


def run_lucent(model, classes, size, steps, checkpoints, device) -> list[dict]:
    import kornia
    import kornia.geometry.transform as kgt

    # torch-lucent 0.1.8 calls kornia names that moved to kornia.geometry.transform.
    kornia.get_rotation_matrix2d = kgt.get_rotation_matrix2d
    kornia.warp_affine = kgt.warp_affine
    from lucent.optvis import param, render, transform

    thresholds = tuple(sorted({c for c in checkpoints if c < steps} | {steps}))
    runs = []
    for c in classes:
        clock: list[float] = []

        class TimedAdam(torch.optim.Adam):
            def step(self, closure=None, clock=clock):
                out = super().step(closure)
                synchronize(device)
                clock.append(time.perf_counter())
                return out

        torch.manual_seed(0)
        synchronize(device)
        began = time.perf_counter()
        images = render.render_vis(
            model,
            f"logits:{c}",
            param_f=lambda: param.image(size),
            optimizer=lambda params: TimedAdam(params, lr=5e-2),
            transforms=transform.standard_transforms,
            thresholds=thresholds,
            preprocess=False,
            progress=False,
            show_image=False,
            fixed_image_size=size,
        )
        print(f"[lucent class {c}] {clock[-1] - began:.1f} s, {len(clock)} steps", flush=True)
        runs.append(
            {
                "class": c,
                "at": {t: clock[t - 1] - began for t in thresholds},
                "images": {
                    t: torch.from_numpy(img.copy()).permute(0, 3, 1, 2)
                    for t, img in zip(thresholds, images)
                },
            }
        )
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--classes", default="1,94,309,417,980", help="ImageNet class indices")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--lucent-steps", type=int, default=512)
    parser.add_argument("--lucent-checkpoints", default="32,64,96,128,192,256,384,512")
    parser.add_argument(
        "--leap-config",
        action="append",
        help="JSON overrides of leapcore's defaults; repeat for several leapcore rows (default: {})",
    )
    parser.add_argument("--skip-lucent", action="store_true")
    parser.add_argument("--skip-leapcore", action="store_true")
    parser.add_argument("--device", default=None, help="cpu, cuda or mps (default: as the engine)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    device = pick_device(args.device)
    torch.set_num_threads(args.threads)
    classes = [int(c) for c in args.classes.split(",")]
    preprocessing, net, names = get_model("efficientnet_lite0")
    normalise = preprocessing[1]  # Normalize only: the model sees --size px as given
    net.eval().to(device)
    normalise.to(device)
    evaluator = LogitsModel(
        net, len(names), [normalise], (3, args.size, args.size), False, False
    ).to(device)
    pixel_model = PixelModel(net, normalise).to(device).eval()
    n = len(classes)
    print(f"[setup] {device}, {args.threads} threads, {args.size} px, classes {classes}")
    rows = []
    for text in [] if args.skip_leapcore else args.leap_config or ["{}"]:
        overrides = json.loads(text)
        res = run_leapcore(net, normalise, names, classes, args.size, device, overrides)
        clean, robust = score(evaluator, res["images"], classes)
        reached = res["wall"] if good(clean, robust) else None
        print(f"[leapcore {text}] {res['wall']:.1f} s, {res['steps']} steps", flush=True)
        rows.append(
            (
                "leapcore " + (json.dumps(overrides) if overrides else "defaults"),
                reached,
                res["wall"],
                clean,
                robust,
                f"{res['steps']} steps (rows stopped at {res['stopped_at']}), lr {res['lr']:.3g}, "
                f"stages {res['timings']}",
            )
        )
    if not args.skip_lucent:
        checkpoints = [int(c) for c in args.lucent_checkpoints.split(",")]
        runs = run_lucent(pixel_model, classes, args.size, args.lucent_steps, checkpoints, device)
        total_reached, finals = 0.0, []
        per_class = []
        for run in runs:
            first = None
            for t, at in run["at"].items():
                c, r = score(evaluator, run["images"][t], [run["class"]])
                if first is None and good(c, r):
                    first = (t, at)
                last = (t, at, c, r)
            finals.append(last)
            per_class.append(
                f"{run['class']}: " + (f"step {first[0]} {first[1]:.1f}s" if first else "never")
            )
            total_reached = (
                None if first is None or total_reached is None else total_reached + first[1]
            )
        clean = torch.cat([f[2] for f in finals])
        robust = torch.cat([f[3] for f in finals])
        wall = sum(f[1] for f in finals)
        rows.append(
            (
                f"lucent {args.lucent_steps} steps",
                total_reached,
                wall,
                clean,
                robust,
                "first good checkpoint per class " + ", ".join(per_class),
            )
        )
    print(
        "\n| contender | time to quality (s/class) | wall (s/class) | clean prob min/mean "
        "| robust prob min/mean | notes |\n|---|---|---|---|---|---|"
    )
    for name, reached, wall, clean, robust, notes in rows:
        ttq = "not reached" if reached is None else f"{reached / n:.1f}"
        print(
            f"| {name} | {ttq} | {wall / n:.1f} | {clean.min():.3f} / {clean.mean():.3f} | "
            f"{robust.min():.3f} / {robust.mean():.3f} | {notes} |"
        )
    if not args.skip_lucent and rows[-1][1] is not None:
        for name, reached, *_ in rows[:-1]:
            if reached is not None:
                print(f"lucent / {name} time to quality: {rows[-1][1] / reached:.2f}x")


if __name__ == "__main__":
    main()
