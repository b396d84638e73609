"""Engine speed on the pretrained EfficientNet-Lite0 at 224 px, measured side by side in one run.

1. Overhead: seconds per engine optimisation step (render, transforms, model, backward, Adam) divided
   by seconds of a bare model forward+backward at the same batch. Target: <= 1.2. Two bare
   references: the model as a user runs it (NCHW batches, batch norms as they are), and the same
   calls the engine makes (on the CPU: channels-last batches into a copy with the batch norms folded
   into the convolutions), which isolates the engine's own work.
2. Batching: 8 classes in one run vs 8 one-class runs, same steps. Target: >= 3x faster.
3. Memory: peak memory of one run, and a batch split into chunks by a memory budget (not failed),
   with identical results.

Timings alternate between the contenders and keep the median, because machines here are noisy.

On a GPU every timing waits for the device (``torch.cuda.synchronize``) before the clock stops.

Usage: python benchmarks/engine_overhead.py [--steps N] [--batch B] [--repeats R] [--device D]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from leapcore.adapter import LogitsModel, eval_mode
from leapcore.config import load_config
from leapcore.device import peak_memory_mb, pick_device
from leapcore.models import get_model
from leapcore.problem import PrototypeProblem, target_weights
from leapcore.prototypes import optimise_prototypes


def bare_step(model: LogitsModel, x: torch.Tensor, targets: torch.Tensor) -> None:
    x = x.detach().requires_grad_(True)
    logits = model(x)
    logits.gather(1, targets[:, None]).sum().backward()


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a clock read afterwards covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    """Seconds of one call of ``fn``, queued GPU work included."""
    synchronize(device)
    began = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - began


def time_it(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    return statistics.median(timed(fn, device) for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--steps", type=int, default=6, help="steps per run in the batching comparison"
    )
    parser.add_argument(
        "--device", default=None, help="cpu, cuda or mps (default: chosen like the engine)"
    )
    args = parser.parse_args()
    device = pick_device(args.device)
    torch.set_num_threads(2)

    preprocessing, net, classes = get_model("efficientnet_lite0")
    net.to(device)
    print(
        f"[device] {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    )
    # The engine's view: channels-last on the CPU and batch norms folded (both auto).
    model = LogitsModel(net, len(classes), preprocessing)
    as_is = LogitsModel(net, len(classes), preprocessing, channels_last=False, fold_batchnorm=False)
    config = load_config({"find_lr_steps": 0})  # defaults: fourier, transform 'xl', blur 0.01-1.0
    targets = list(range(1, 1 + args.batch))
    start = torch.full((1, 3, 224, 224), 0.5, device=device)
    with eval_mode(net):
        weights, group = target_weights([[t] for t in targets], 1000, 1.0, 1, start.device)
        problem = PrototypeProblem(
            model, start, weights, group, config, chunk_size=args.batch, seed=0
        )
        x = torch.rand(args.batch, 3, 224, 224, device=device)
        target_tensor = torch.tensor(targets, device=device)

        # Side by side: alternate engine and bare steps, median of each.
        contenders = {
            "engine": lambda: problem.step(0.05),
            "bare": lambda: bare_step(model, x, target_tensor),
            "bare_as_is": lambda: bare_step(as_is, x, target_tensor),
        }
        times: dict[str, list[float]] = {name: [] for name in contenders}
        for fn in contenders.values():
            fn()
        for _ in range(args.repeats):
            for name, fn in contenders.items():
                times[name].append(timed(fn, device))
        engine_s, bare_s, as_is_s = (statistics.median(times[n]) for n in contenders)
        calls = [
            "batch norms folded" if model.folded is not None else "batch norms as they are",
            "NCHW" if model.channels_last is False else "channels-last",
        ]
        print(
            f"[overhead] batch {args.batch} @224px: engine step {engine_s * 1000:.0f} ms; bare "
            f"forward+backward {as_is_s * 1000:.0f} ms for the model as a user runs it, "
            f"{bare_s * 1000:.0f} ms for the engine's own model calls ({', '.join(calls)}); "
            f"ratio {engine_s / as_is_s:.3f} vs the model as is (target <= 1.2), "
            f"{engine_s / bare_s:.3f} vs the same calls (the engine's own work)"
        )

        # Batching: 8 classes together vs one at a time.
        eight = list(range(10, 18))
        cfg = load_config(
            {
                "find_lr_steps": 0,
                "max_steps": args.steps,
                "log_freq": args.steps,
                "isolation": False,
            }
        )

        def batched() -> None:
            optimise_prototypes(model, [[c] for c in eight], start, cfg, 0.05, chunk_size=8)

        def one_by_one() -> None:
            for c in eight:
                optimise_prototypes(model, [[c]], start, cfg, 0.05, chunk_size=1)

        batched_s = time_it(batched, max(1, args.repeats // 3), device)
        single_s = time_it(one_by_one, max(1, args.repeats // 3), device)
        print(
            f"[batching] 8 classes x {args.steps} steps: one batch {batched_s:.2f} s, "
            f"8 one-class runs {single_s:.2f} s, speed-up {single_s / batched_s:.2f}x (target >= 3)"
        )
        # The ceiling: how much the bare model itself gains from a batch of 8 on this machine.
        x1 = torch.rand(1, 3, 224, 224, device=device)
        x8 = torch.rand(8, 3, 224, 224, device=device)
        t1 = time_it(lambda: bare_step(model, x1, target_tensor[:1]), args.repeats, device)
        t8 = time_it(
            lambda: bare_step(model, x8, torch.arange(8, device=device)), args.repeats, device
        )
        print(
            f"[batching] ceiling: bare forward+backward 8 x t(batch 1) / t(batch 8) = {8 * t1 / t8:.2f}x "
            f"({t1 * 1000:.0f} ms vs {t8 * 1000:.0f} ms)"
        )

        # Memory: a budget that forces chunks gives identical prototypes.
        whole = optimise_prototypes(model, [[c] for c in eight[:4]], start, cfg, 0.05, chunk_size=4)
        chunked = optimise_prototypes(
            model, [[c] for c in eight[:4]], start, cfg, 0.05, chunk_size=1
        )
        diff = float((whole.images - chunked.images).abs().max())
        rows = torch.arange(4)  # results come back on the CPU
        prob_diff = float(
            (
                whole.probs[rows, torch.tensor(eight[:4])]
                - chunked.probs[rows, torch.tensor(eight[:4])]
            )
            .abs()
            .max()
        )
        print(
            f"[memory] 4 classes in chunks of 1 vs one batch of 4: max |pixel difference| {diff:.2e}, "
            f"max |target probability difference| {prob_diff:.2e} (batched kernels round differently; "
            "Adam amplifies rounding in near-zero gradients)"
        )
    what = "peak GPU memory allocated" if device.type == "cuda" else "peak RSS"
    print(f"[memory] {what} of this benchmark: {peak_memory_mb(device):.0f} MiB")


if __name__ == "__main__":
    main()
