"""``leap diff AUDIT_A AUDIT_B``: what changed between two audits of a model.

Each audit is an MLflow run id, a ``models:/name/version`` or ``models:/name@alias`` (the version's
audit) or another model URI (its latest finished audit). The audits' tables are read back from
their MLflow runs, both models are loaded again for the prototype similarity (``--no-models``
skips that), and the diff is printed, written as ``diff.parquet`` and ``diff.html``, and with
``--mlflow`` logged to a run of its own (tag ``leapcore.kind=diff``) next to the later audit.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from leapcli.progress import say


def add_diff_parser(sub: Any, formatter: Any = argparse.HelpFormatter) -> None:
    """Register ``leap diff`` on the ``leap`` subparsers."""
    diff = sub.add_parser(
        "diff",
        formatter_class=formatter,
        help="compare two audits: entanglement, prototypes, quality, scan verdicts",
        description="Compare AUDIT_A (earlier) with AUDIT_B (later). Each is an MLflow run id, "
        "models:/name/version, models:/name@alias or another model URI that has an audit.",
    )
    diff.add_argument("audit_a", metavar="AUDIT_A")
    diff.add_argument("audit_b", metavar="AUDIT_B")
    diff.add_argument(
        "--output-dir",
        help="where diff.parquet and diff.html go (default leap_results/diff/A_vs_B)",
    )
    diff.add_argument(
        "--config",
        metavar="FILE",
        help="JSON file of engine options; its diff_* options set the thresholds and pair measure",
    )
    diff.add_argument(
        "--entanglement-threshold",
        type=float,
        metavar="X",
        help="default: the config's diff_entanglement_threshold (0.2)",
    )
    diff.add_argument(
        "--quality-threshold",
        type=float,
        metavar="X",
        help="default: the config's diff_quality_threshold (0.1)",
    )
    diff.add_argument(
        "--similarity-threshold",
        type=float,
        metavar="X",
        help="default: the config's diff_similarity_threshold (0.5)",
    )
    diff.add_argument(
        "--pair-measure",
        choices=("samples", "fixed", "own"),
        help="what the pair probabilities are measured on (default: the config's "
        "diff_pair_measure); 'samples' needs --samples",
    )
    diff.add_argument(
        "--samples",
        nargs="+",
        metavar="PATH",
        help="the user's images (files or folders) for the 'samples' pair measure",
    )
    diff.add_argument(
        "--layer", help="module whose input is the feature vector (default: last Linear)"
    )
    diff.add_argument("--no-models", action="store_true", help="no prototype similarity")
    diff.add_argument("--mlflow", action="store_true", help="log the diff to an MLflow run")
    diff.add_argument("--top", type=int, default=10, metavar="N", help="pairs to print")
    diff.add_argument("-v", "--verbose", action="store_true")
    diff.set_defaults(handler=cmd_diff)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in text).strip("_")[:60]


def cmd_diff(args: argparse.Namespace) -> int:
    """Compare the two audits; exit 1 with the reason on bad input (before anything is written)."""
    from leapcore.diff import diff_audits
    from leapcore.errors import LeapError
    from tasks.audit_source import audit_side, client_for, find_audit
    from tasks.mlflow_registry import tracking_uri
    from tasks.sample_files import image_files

    try:
        thresholds, measure = diff_options(args)
        files = image_files(args.samples) if args.samples else []
        uri = tracking_uri()
        client = client_for(uri)
        audits = [find_audit(client, ref) for ref in (args.audit_a, args.audit_b)]
        sides = [audit_side(client, a, uri, not args.no_models) for a in audits]
        samples = read_samples(files, sides[1]) if files else None
        diff = diff_audits(
            sides[0], sides[1], thresholds, args.layer, pair_measure=measure, samples=samples
        )
    except LeapError as err:
        if args.verbose:
            raise
        sys.stderr.write(f"leap: {type(err).__name__}: {err}\n")
        return 1
    out = Path(
        args.output_dir
        or Path("leap_results") / "diff" / f"{_slug(audits[0].label)}_vs_{_slug(audits[1].label)}"
    )
    files = write_diff(diff, out)
    print_diff(diff, args.top)
    say("")
    for path in files:
        say(f"written: {path}")
    if args.mlflow:
        run_id = log_diff(client, diff, audits, files)
        say(f"MLflow run: {run_id}")
    return 0


def diff_options(args: argparse.Namespace) -> tuple[Any, str]:
    """The thresholds and pair measure: the config file's ``diff_*`` options (checked with the
    whole config), the flags over them."""
    from leapcore.config import load_config
    from leapcore.diff import DiffThresholds

    config = load_config(args.config) if args.config else load_config(None)
    given = (args.entanglement_threshold, args.quality_threshold, args.similarity_threshold)
    defaults = (
        config.diff_entanglement_threshold,
        config.diff_quality_threshold,
        config.diff_similarity_threshold,
    )
    values = [d if g is None else g for g, d in zip(given, defaults)]
    thresholds = DiffThresholds(*values, prototype_noise=config.diff_prototype_noise)
    return thresholds, args.pair_measure or config.diff_pair_measure


def read_samples(files: list[Any], side: Any) -> Any:
    """The user's images at the size of ``side``'s prototypes (pixels in [0, 1])."""
    import torch

    from leapcore.images import load_image
    from leapcore.results import column_tensor

    protos = side.tables.get("prototypes")
    if protos is None or not protos.num_rows:
        return None
    c, h, w = column_tensor(protos.column("image")).shape[1:]
    return torch.stack([load_image(f.path, (h, w), c) for f in files])


def write_diff(diff: Any, out: Path) -> list[Path]:
    """``diff.parquet`` and ``diff.html`` in ``out``."""
    import pyarrow.parquet as pq

    from leapcore.diff_report import diff_page

    out.mkdir(parents=True, exist_ok=True)
    table_path, page_path = out / "diff.parquet", out / "diff.html"
    pq.write_table(diff.table, table_path, compression="zstd")
    page_path.write_text(diff_page(diff.table), encoding="utf-8")
    return [table_path, page_path]


def print_diff(diff: Any, top: int = 10) -> None:
    """The diff on the terminal: pairs, prototype similarity, flagged quality and verdicts."""
    from leapcore.diff import judged_text

    say(f"leap diff: {diff.current} vs {diff.previous}")
    for note in diff.notes:
        say(f"  note: {note}")
    pairs = diff.rows("entanglement")
    if pairs:
        meta = diff.table.schema.metadata or {}
        basis = meta.get(b"leapcore.pair_basis", b"prototypes").decode()
        judged = judged_text(diff.table)
        against = f"; the threshold judged against {judged}" if judged else ""
        say(f"\npairs (pair probability on {basis}{against}), largest judged change first:")
        for r in pairs[:top]:
            pair = f"{r['target']} <-> {r['other']}"
            say(
                f"  {pair:<28} {r['before']:.3f} -> {r['after']:.3f}  {r['change']:+.3f}  "
                f"{r['flag']}"
            )
    protos = diff.rows("prototype")
    if protos:
        say("\nprototype similarity (penultimate-layer cosine, previous model / current model):")
        for r in protos:
            say(
                f"  {r['target']:<28} {r['cosine_previous_model']:.3f} / "
                f"{r['cosine_current_model']:.3f}  {r['flag']}  ({r['detail']})"
            )
    flagged = diff.rows("quality", "worse") + diff.rows("quality", "better")
    if flagged:
        say("\nquality changes beyond the threshold:")
        for r in flagged:
            say(
                f"  {r['target']:<20} {r['measure']:<20} {r['before']:.3f} -> {r['after']:.3f}  "
                f"{r['flag']}"
            )
    for r in diff.rows("verdict"):
        if r["flag"]:
            say(
                f"scan verdict of {r['target']}: {r['before_text']} -> {r['after_text']} ({r['flag']})"
            )


def log_diff(client: Any, diff: Any, audits: list[Any], files: list[Path]) -> str:
    """A run of its own (tag ``leapcore.kind=diff``) in the later audit's experiment: the metrics,
    links to both audits' runs, and the files."""
    import time

    from mlflow.entities import Metric, RunTag

    later = client.get_run(audits[1].run_id)
    run = client.create_run(
        later.info.experiment_id,
        run_name=f"diff {diff.current} vs {diff.previous}",
        tags={"leapcore.kind": "diff", "mlflow.runName": f"diff {diff.current} vs {diff.previous}"},
    )
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    tags = {
        "leapcore.diff.previous_run_id": audits[0].run_id,
        "leapcore.diff.current_run_id": audits[1].run_id,
        "leapcore.diff.previous": diff.previous,
        "leapcore.diff.current": diff.current,
    }
    client.log_batch(
        run_id,
        metrics=[Metric(k, float(v), now, 0) for k, v in sorted(diff.metrics().items())],
        tags=[RunTag(k, v) for k, v in tags.items()],
    )
    for path in files:
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, "FINISHED")
    return run_id
