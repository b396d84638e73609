"""Entanglement against held-out confusion: leapcore's ``share`` measure and leap-ie's ``leap``.

Trains six digit CNNs (sklearn digits at 32x32; seeds, epochs and training sizes vary: 55-97 %
held-out accuracy), audits one prototype per digit, and prints per model the Spearman correlation
over the 45 unordered digit pairs between the pair entanglement and the symmetrised held-out
confusion (hard: argmax counts; soft: mean predicted probability), plus the split-half reliability
of the hard confusion (how well any score could track it). Both measures are computed from the same
prototypes.

    PYTHONPATH=. python benchmarks/entanglement.py [--objective margin] [--defaults]

``--defaults`` runs the engine's default schedule (slow on a CPU); otherwise the digits tests'
fast one (100 steps, transform ``s``, lr 0.05).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from leapcore import engine  # noqa: E402
from leapcore.entanglement import entanglement, pair_entanglement  # noqa: E402
from tests.engine.engine_support import train_digits  # noqa: E402

MODELS = [(2, 600, 0), (1, 200, 1), (1, 400, 2), (3, 600, 3), (2, 400, 4), (2, 300, 5)]
FAST = {"max_steps": 100, "find_lr_steps": 0, "lr": 0.05, "transform": "s"}


def upper(m: np.ndarray) -> np.ndarray:
    return m[np.triu_indices(len(m), 1)]


def symmetrised(m: np.ndarray) -> np.ndarray:
    return upper((m + m.T) / 2)


def confusions(logits: torch.Tensor, labels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Row-normalised hard and soft confusion ``[true, predicted]``."""
    y = labels.numpy()
    hard = np.zeros((10, 10))
    np.add.at(hard, (y, logits.argmax(1).numpy()), 1)
    probs = logits.softmax(1).numpy()
    soft = np.stack([probs[y == c].mean(0) for c in range(10)])
    return hard / hard.sum(1, keepdims=True), soft


def split_half(logits: torch.Tensor, labels: torch.Tensor, draws: int = 20) -> float:
    """Mean Spearman between the hard confusions of two random halves of the held-out digits."""
    rhos = []
    for seed in range(draws):
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
        a, b = order[: len(order) // 2], order[len(order) // 2 :]
        ha, _ = confusions(logits[a], labels[a])
        hb, _ = confusions(logits[b], labels[b])
        rhos.append(spearmanr(symmetrised(ha), symmetrised(hb)).statistic)
    return float(np.mean(rhos))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objective", default="margin")
    parser.add_argument("--defaults", action="store_true")
    args = parser.parse_args()
    config = {"input_dim": [1, 32, 32], "isolation": False, "log_freq": 50}
    config.update({} if args.defaults else FAST)
    config["objective"] = args.objective
    print(f"objective {args.objective}, {'default' if args.defaults else 'fast'} schedule")
    print("model        acc   split-half | share hard/soft | leap hard/soft")
    results = []
    for epochs, size, seed in MODELS:
        digits = train_digits(epochs, size, seed)
        with torch.no_grad():
            logits = digits.model(digits.preprocessing(digits.test_x))
        hard, soft = confusions(logits, digits.test_y)
        audit = engine.run(
            digits.model, digits.class_list, config, list(range(10)), digits.preprocessing
        )
        share = pair_entanglement(audit.entanglement).numpy()
        leap = entanglement(audit.baseline.logits.cpu(), audit.prototypes.logits, measure="leap")
        leap = leap.numpy()
        row = [
            spearmanr(upper(share), symmetrised(hard)).statistic,
            spearmanr(upper(share), symmetrised(soft)).statistic,
            spearmanr(symmetrised(leap), symmetrised(hard)).statistic,
            spearmanr(symmetrised(leap), symmetrised(soft)).statistic,
        ]
        results.append(row)
        acc = float(np.diag(hard).mean())
        print(
            f"{epochs}ep/{size}/s{seed:<3} {acc:.2f}  {split_half(logits, digits.test_y):6.2f}     |"
            f"  {row[0]:5.2f} / {row[1]:5.2f}  |  {row[2]:5.2f} / {row[3]:5.2f}",
            flush=True,
        )
    mean, worst = np.mean(results, 0), np.min(results, 0)
    print(
        f"mean                          |  {mean[0]:5.2f} / {mean[1]:5.2f}  |  {mean[2]:5.2f} / {mean[3]:5.2f}"
    )
    print(
        f"worst                         |  {worst[0]:5.2f} / {worst[1]:5.2f}  |  {worst[2]:5.2f} / {worst[3]:5.2f}"
    )


if __name__ == "__main__":
    main()
