"""Overhead of the spurious-feature scan: an audit with default options with and without the scan.

    python benchmarks/scan_overhead.py               # the digits CNN, 10 classes, default options
    python benchmarks/scan_overhead.py --quick       # max_steps 200, to try the script
    python benchmarks/scan_overhead.py --photos      # the 3-channel photo-patch CNN (8 classes)

In one process, side by side: the audit (``engine.run``: baseline, learning-rate search,
prototypes, entanglement, isolation; every default option) runs twice, before and after the scan,
and the mean is the audit's time; the scan (:func:`leapcore.spurious.scan_audit` with its default
:class:`~leapcore.spurious.ScanSettings`: extra prototypes, occlusion evidence, pastes) runs on the
first audit's prototypes as the pipeline's ``scan_spurious`` stage does. The pipeline's own
overhead (Arrow tables, report, MLflow, W&B) is left out of the audit's time, so the ratio printed
is an upper bound of what the scan adds to ``audit_model``. Issue 15's limit: 25 %.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from leapcore import engine  # noqa: E402
from leapcore.config import load_config  # noqa: E402
from leapcore.spurious import ScanSettings, scan_audit  # noqa: E402
from tests.spurious.testbed import MarkerSpec, train_pair  # noqa: E402

LIMIT = 0.25


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--photos", action="store_true")
    args = parser.parse_args()
    spec = MarkerSpec("photos", colour=(1.0, 0.0, 0.0)) if args.photos else MarkerSpec()
    trained, _ = train_pair(spec)
    options = {"input_dim": list(trained.shape), "seed": 0}
    if args.quick:
        options["max_steps"] = 200
    cfg = load_config(options)
    classes = list(range(len(trained.class_list)))
    net = engine.build_model(
        trained.model, trained.class_list, trained.preprocessing, trained.shape, "pt"
    )
    device = torch.device("cpu")

    def audit() -> tuple[float, object]:
        began = time.perf_counter()
        result = engine.run(
            trained.model, trained.class_list, options, classes, trained.preprocessing, device="cpu"
        )
        return time.perf_counter() - began, result

    first, result = audit()
    settings = ScanSettings()
    began = time.perf_counter()
    rows = len(classes) * max(settings.extra_prototypes, 1)
    chunk = engine.prototype_chunk_size(net, rows, cfg, device)
    scans = scan_audit(
        net,
        result.prototypes,
        result.baseline.image,
        result.lr.lr,
        None,
        cfg,
        chunk,
        settings,
        names=trained.class_list,
    )
    scan_seconds = time.perf_counter() - began
    second, _ = audit()
    audit_seconds = (first + second) / 2
    ratio = scan_seconds / audit_seconds
    print(f"model: {spec.dataset} CNN, {len(classes)} classes, max_steps {cfg.max_steps}")
    print(f"audit (mean of 2): {audit_seconds:.1f} s  ({first:.1f} s, {second:.1f} s)")
    print(
        f"scan: {scan_seconds:.1f} s ({settings.extra_prototypes} extra prototypes x "
        f"{settings.steps(cfg)} steps per class)"
    )
    print(f"overhead: {ratio:.1%} (limit {LIMIT:.0%})")
    print("verdicts:", ", ".join(f"{s.class_name}={s.verdict}" for s in scans))
    return 0 if ratio <= LIMIT else 1


if __name__ == "__main__":
    sys.exit(main())
