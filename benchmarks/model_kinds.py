"""Seconds per prototype step by model kind, each against a classifier of similar size (issue 17).

Pairs (random weights: speed does not depend on them; no downloads):
- segmentation: torchvision LR-ASPP MobileNetV3-Large (21 classes, logits pooled over a box) vs the
  MobileNetV3-Large classifier;
- vision transformer: a DeiT-tiny-sized ViT from a transformers config (patch 16, 12 layers, 192
  wide) vs the MobileNetV3-Large classifier (both about 5.5 M parameters);
- SegFormer-b0-sized from a transformers config (logits at 1/4 resolution) vs the same classifier;
- multi-label: the classifier with ``output: multilabel_logits`` vs ``logits`` (same network).

One ``engine.run`` per model (no learning-rate search, no isolation, transform 's', one target, a
batch of ``--rows`` prototypes); the time per step is the prototype loop's wall time over its
steps. Runs alternate between the contenders and keep the median of ``--repeats``.

Usage: python benchmarks/model_kinds.py [--size 224] [--steps 10] [--rows 2] [--repeats 3] [--device D]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from leapcore import engine
from leapcore.device import pick_device
from leapcore.models import IMAGENET_MEAN, IMAGENET_STD, Normalize


def classifier() -> torch.nn.Module:
    from torchvision.models import mobilenet_v3_large

    return mobilenet_v3_large(weights=None)


def lraspp() -> torch.nn.Module:
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large

    return lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=21)


def vit(size: int) -> torch.nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=size,
        patch_size=16,
        hidden_size=192,
        num_hidden_layers=12,
        num_attention_heads=3,
        intermediate_size=768,
        num_labels=1000,
    )
    return ViTForImageClassification(config)


def segformer() -> torch.nn.Module:
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    return SegformerForSemanticSegmentation(SegformerConfig(num_labels=150))  # b0 sizes


def params(model: torch.nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def seconds_per_step(model, classes, args, device, **options) -> float:
    config = {
        "input_dim": [3, args.size, args.size],
        "max_steps": args.steps,
        "find_lr_steps": 0,
        "transform": "s",
        "isolation": False,
        "log_freq": args.steps,
        "prototypes_per_class": args.rows,
        **options,
    }
    pre = [Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    audit = engine.run(model, classes, config, [1], pre, device=device)
    return audit.prototypes.seconds / args.steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    device = pick_device(args.device)
    torch.manual_seed(0)
    reference = classifier().eval()
    names = [str(i) for i in range(1000)]
    cases = {
        "classifier (MobileNetV3-L)": (reference, names, {}),
        "multi-label (same net)": (reference, names, {"output": "multilabel_logits"}),
        "segmentation (LR-ASPP MobileNetV3-L)": (
            lraspp().eval(),
            [str(i) for i in range(21)],
            {"region": [0, 0, args.size // 2, args.size // 2]},
        ),
        "ViT (DeiT-tiny size)": (vit(args.size).eval(), names, {}),
        "SegFormer (b0 size)": (segformer().eval(), [str(i) for i in range(150)], {}),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, (model, classes, options) in cases.items():
            times[name].append(seconds_per_step(model, classes, args, device, **options))
    base = statistics.median(times["classifier (MobileNetV3-L)"])
    print(
        f"device {device}, {args.size} px, batch {args.rows}, {args.steps} steps, "
        f"median of {args.repeats}"
    )
    print(f"{'model':40s} {'params (M)':>10s} {'s/step':>8s} {'vs classifier':>14s}")
    for name, (model, _, _) in cases.items():
        median = statistics.median(times[name])
        print(f"{name:40s} {params(model):10.2f} {median:8.3f} {median / base:13.2f}x")


if __name__ == "__main__":
    main()
