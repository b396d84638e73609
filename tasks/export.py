"""``export_results``: copy an audit's download bundle into a local folder users open directly."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from prefect import task

from tasks.artifacts import ArtifactStore
from tasks.redaction import redacting
from tasks.report import ReportOutput

_UMASK = os.umask(0)
os.umask(_UMASK)


@task(name="export_results", retries=1, retry_delay_seconds=1, persist_result=False)
@redacting
def export_results(report: ReportOutput, store: ArtifactStore, out_dir: str) -> str:
    """Write every bundle file under ``out_dir`` (atomically, file by file); returns the report path
    (or the folder when there is no HTML report)."""
    root = Path(out_dir)
    for rel, ref in report.files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(store.get_bytes(ref))
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; users share these files
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return str((root / "report.html").resolve() if report.report else root.resolve())
