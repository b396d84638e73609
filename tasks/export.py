"""``export_results``: copy an audit's download bundle into a local folder users open directly."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

from prefect import task

from leapcore.errors import InputError
from tasks.artifacts import ArtifactStore
from tasks.redaction import redacting
from tasks.report import ReportOutput

_UMASK = os.umask(0)
os.umask(_UMASK)


# Written into every folder export_results fills: a folder with it is leapcore's to replace.
MARKER = ".leapcore-output"


def check_output_dir(out_dir: str | os.PathLike) -> None:
    """Refuse a folder that holds files leapcore did not write (it is replaced as a whole).

    Raises:
        InputError: ``out_dir`` is a file, or a non-empty folder without leapcore's marker.
    """
    root = Path(out_dir).expanduser()
    if root.exists() and not root.is_dir():
        raise InputError(f"the output folder {root} is a file; give a folder.")
    if root.is_dir() and not (root / MARKER).exists() and any(root.iterdir()):
        raise InputError(
            f"the output folder {root} holds files leapcore did not write; an audit replaces its "
            "output folder as a whole, so give a new or empty folder (--output-dir)."
        )


@task(name="export_results", retries=1, retry_delay_seconds=1, persist_result=False)
@redacting
def export_results(report: ReportOutput, store: ArtifactStore, out_dir: str) -> str:
    """Write the bundle into a fresh folder beside ``out_dir``, then swap it in as a whole: readers
    never see half a bundle, and no file of an earlier audit (another model, other classes) is left
    beside the report. Returns the report path (or the folder when there is no HTML report).

    Raises:
        InputError: ``out_dir`` holds files leapcore did not write (see :func:`check_output_dir`).
    """
    root = Path(out_dir).expanduser().resolve()
    check_output_dir(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.tmp-"))
    try:
        for rel, ref in report.files.items():
            path = staging / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(store.get_bytes(ref))
            os.chmod(path, 0o666 & ~_UMASK)
        (staging / MARKER).write_text(
            "written by leapcore's export_results; replaced by each audit\n"
        )
        for folder in [staging, *(p for p in staging.rglob("*") if p.is_dir())]:
            os.chmod(folder, 0o777 & ~_UMASK)  # mkdtemp makes 0700; users share these files
        old = root.parent / f".{root.name}.old-{uuid.uuid4().hex}"
        if root.exists():
            os.replace(root, old)
        os.replace(staging, root)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return str((root / "report.html") if report.report else root)
