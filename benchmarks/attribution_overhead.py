"""Attribution through leapcore vs the same captum / zennit / zennit-crp calls made directly.

For each method, ``leapcore.attribution.attribute`` (validation, the adapter with the preprocessing
inside, batching over images x targets, maps summed over channels and moved to the host) is timed
against the library called directly on the same images, targets and options, the way a user would
(the model behind an ``nn.Sequential`` with the normalisation first). Calls alternate between the
two and the median of ``--repeats`` is kept (machines here are noisy). Goal: ratio <= 1.1.

``--faithfulness`` adds, per method, deletion / insertion AUC (RISE protocol, blur substrate, 16
steps) and sparseness of its maps (``leapcore.faithfulness``) on the same images.

Images: scikit-learn's two sample photos (china.jpg, flower.jpg) resized to ``--size``, explained for
the pretrained EfficientNet-Lite0's top class.

Usage: python benchmarks/attribution_overhead.py [--size 224] [--repeats 3] [--methods a,b]
       [--device cpu|cuda] [--faithfulness]   (--repeats 0 --faithfulness: scores only)
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from leapcore.adapter import LogitsModel
from leapcore.attribution import attribute, get_method
from leapcore.attribution.captum_methods import patch_mask
from leapcore.attribution.lrp import canonizers_for
from leapcore.device import pick_device
from leapcore.faithfulness import deletion_insertion_auc, sparseness
from leapcore.models import get_model

METHODS = [
    "saliency",
    "input_x_gradient",
    "integrated_gradients",
    "smoothgrad",
    "gradient_shap",
    "deeplift",
    "guided_backprop",
    "occlusion",
    "kernel_shap",
    "lime",
    "grad_cam",
    "lrp_epsilon_plus_flat",
    "lrp_epsilon_gamma_box",
    "lrp_epsilon_alpha2_beta1",
    "crp",
]
LAYER = "conv_head"


def sample_images(size: int) -> torch.Tensor:
    from sklearn.datasets import load_sample_images

    photos = [
        torch.from_numpy(p.copy()).permute(2, 0, 1).float() / 255
        for p in load_sample_images().images
    ]
    batch = torch.stack(
        [
            F.interpolate(p[None], size=(size, size), mode="bilinear", antialias=True)[0]
            for p in photos
        ]
    )
    return batch.clamp(0, 1)


def direct_call(
    name: str, net: nn.Module, norm: nn.Module, x: torch.Tensor, t: torch.Tensor, rows: int
) -> Callable[[], torch.Tensor]:
    """The library called directly with the options leapcore uses by default."""
    import captum.attr as ca

    full = nn.Sequential(norm, net).eval()
    zeros = torch.zeros_like(x)
    calls: dict[str, Callable[[], torch.Tensor]] = {
        "saliency": lambda: ca.Saliency(full).attribute(x, target=t, abs=False),
        "input_x_gradient": lambda: ca.InputXGradient(full).attribute(x, target=t),
        "integrated_gradients": lambda: ca.IntegratedGradients(full).attribute(
            x, baselines=zeros, target=t, n_steps=32, internal_batch_size=max(rows, len(x))
        ),
        "smoothgrad": lambda: ca.NoiseTunnel(ca.Saliency(full)).attribute(
            x,
            nt_type="smoothgrad",
            nt_samples=16,
            stdevs=0.15,
            nt_samples_batch_size=max(1, rows // len(x)),
            target=t,
            abs=False,
        ),
        "gradient_shap": lambda: ca.GradientShap(full).attribute(
            x, baselines=torch.cat([zeros[:1], torch.ones_like(x[:1])]), n_samples=16, target=t
        ),
        "deeplift": lambda: ca.DeepLift(full).attribute(x, baselines=zeros, target=t),
        "guided_backprop": lambda: ca.GuidedBackprop(full).attribute(x, target=t),
        "occlusion": lambda: ca.Occlusion(full).attribute(
            x,
            sliding_window_shapes=(3, 32, 32),
            strides=(3, 16, 16),
            baselines=0.0,
            target=t,
            perturbations_per_eval=max(1, rows // len(x)),
        ),
        "kernel_shap": lambda: ca.KernelShap(full).attribute(
            x,
            baselines=0.0,
            target=t,
            feature_mask=patch_mask(x, 16),
            n_samples=128,
            perturbations_per_eval=rows,
        ),
        "lime": lambda: _lime(ca, full, x, t, rows),
        "grad_cam": lambda: ca.LayerGradCam(full, dict(net.named_modules())[LAYER]).attribute(
            x, target=t
        ),
    }
    if name in calls:
        return calls[name]
    return lambda: _zennit(name, net, norm, x, t)


def _lime(ca, full: nn.Module, x: torch.Tensor, t: torch.Tensor, rows: int) -> torch.Tensor:
    from captum._utils.models.linear_model import SkLearnRidge

    return ca.Lime(full, interpretable_model=SkLearnRidge(alpha=1.0)).attribute(
        x,
        baselines=0.0,
        target=t,
        feature_mask=patch_mask(x, 16),
        n_samples=128,
        perturbations_per_eval=rows,
    )


def _zennit(
    name: str, net: nn.Module, norm: nn.Module, x: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    from zennit.attribution import Gradient
    from zennit.composites import EpsilonAlpha2Beta1, EpsilonGammaBox, EpsilonPlusFlat

    data = norm(x).detach()
    canonizers = canonizers_for(net)
    if name == "lrp_epsilon_gamma_box":
        composite = EpsilonGammaBox(
            low=norm(torch.zeros_like(x)), high=norm(torch.ones_like(x)), canonizers=canonizers
        )
    elif name == "lrp_epsilon_alpha2_beta1":
        composite = EpsilonAlpha2Beta1(canonizers=canonizers)
    else:
        composite = EpsilonPlusFlat(canonizers=canonizers)
    if name == "crp":
        from crp.attribution import CondAttribution
        from crp.concepts import ChannelConcept

        attribution = CondAttribution(net, device=x.device)
        layer = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)][-1]
        data.requires_grad_(True)
        whole = attribution(data, [{"y": [int(c)]} for c in t], composite, record_layer=[layer])
        ids = (
            ChannelConcept()
            .attribute(whole.relevances[layer], abs_norm=False)
            .topk(4, dim=1)
            .indices
        )
        conditions = [{layer: [int(c)], "y": [int(y)]} for y, cs in zip(t, ids) for c in cs]
        repeated = torch.repeat_interleave(data.detach(), 4, dim=0).requires_grad_(True)
        return attribution(repeated, conditions, composite).heatmap
    with Gradient(model=net, composite=composite) as attributor:
        out = net(data)
        seed = torch.zeros_like(out).scatter(1, t[:, None], out.gather(1, t[:, None]).detach())
        _, relevance = attributor(data, seed)
    return relevance


def timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    began = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--device", default=None)
    parser.add_argument("--faithfulness", action="store_true")
    args = parser.parse_args()
    device = pick_device(args.device)
    preprocessing, net, classes = get_model("efficientnet_lite0")
    net = net.to(device).eval()
    norm = preprocessing[0].to(device)
    x = sample_images(args.size).to(device)
    adapter = LogitsModel(net, len(classes), preprocessing, tuple(x.shape[1:]), False, False).to(
        device
    )
    with torch.no_grad():
        logits = adapter(x)
    targets = logits.argmax(1)
    rows = len(x) * 32
    print(
        f"device {device}; {len(x)} images at {args.size} px; top classes {[classes[i] for i in targets]}"
    )
    header = f"{'method':28s} {'leapcore s':>11s} {'direct s':>9s} {'ratio':>6s}"
    if args.faithfulness:
        header += f" {'deletion':>9s} {'insertion':>9s} {'sparseness':>10s}"
    print(header)
    for name in args.methods.split(","):
        spec = get_method(name)
        options = {
            "preprocessing": preprocessing,
            "class_list": classes,
            "batch_size": rows,
            "layer": LAYER,
        }
        if spec.name == "crp":
            options.pop("layer")

        def ours(spec=spec, options=options):
            return attribute(net, x, targets.tolist(), [spec.name], **options)

        direct = direct_call(spec.name, net, norm, x, targets, rows)
        line = f"{spec.name:28s} {'-':>11s} {'-':>9s} {'-':>6s}"
        try:
            if args.repeats > 0:  # --repeats 0: faithfulness only
                ours()
                direct()  # warm-up
                mine, theirs = [], []
                for _ in range(args.repeats):
                    mine.append(timed(ours, device))
                    theirs.append(timed(direct, device))
                a, b = statistics.median(mine), statistics.median(theirs)
                line = f"{spec.name:28s} {a:11.3f} {b:9.3f} {a / b:6.2f}"
        except Exception as error:  # noqa: BLE001 - a benchmark row reports the failure and goes on
            print(f"{spec.name:28s} failed: {type(error).__name__}: {str(error)[:120]}")
            continue
        if args.faithfulness:
            maps = ours().maps[spec.name].to(device)
            deletion, insertion = deletion_insertion_auc(adapter, x, maps, targets.tolist())
            sparse = sparseness(maps)
            line += f" {deletion.mean():9.3f} {insertion.mean():9.3f} {sparse.mean():10.3f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
