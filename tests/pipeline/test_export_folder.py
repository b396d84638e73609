"""The output folder is replaced as a whole by each audit: no foreign or stale files beside a report."""

from __future__ import annotations

import pytest

from leapcore.errors import InputError
from tasks.artifacts import ArtifactStore
from tasks.export import MARKER, check_output_dir, export_results
from tasks.report import ReportOutput


def _bundle(store: ArtifactStore, files: dict[str, bytes]) -> ReportOutput:
    refs = {
        rel: store.put_bytes(data, "report", rel.rsplit(".", 1)[-1], "raw")
        for rel, data in files.items()
    }
    return ReportOutput(files=refs, metrics={}, title="t")


def _tree(root) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_a_second_audit_leaves_no_file_of_the_first(tmp_path) -> None:
    store = ArtifactStore(str(tmp_path / "store"))
    out = tmp_path / "results" / "digits"
    first = _bundle(store, {"report.html": b"model A", "images/model-a-mask.png": b"A"})
    second = _bundle(store, {"report.html": b"model B", "images/model-b-mask.png": b"B"})
    export_results.fn(first, store, str(out))
    report = export_results.fn(second, store, str(out))
    assert report == str(out / "report.html")
    assert _tree(out) == {"report.html", "images/model-b-mask.png", MARKER}
    assert (out / "report.html").read_bytes() == b"model B"
    assert sorted(p.name for p in out.parent.iterdir()) == ["digits"]  # no staging leftovers


def test_a_folder_with_foreign_files_is_refused_and_left_alone(tmp_path) -> None:
    store = ArtifactStore(str(tmp_path / "store"))
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("not leapcore's")
    with pytest.raises(InputError, match="holds files leapcore did not write"):
        check_output_dir(out)
    with pytest.raises(InputError, match="holds files leapcore did not write"):
        export_results.fn(_bundle(store, {"report.html": b"x"}), store, str(out))
    assert _tree(out) == {"thesis.tex"}
    (tmp_path / "afile").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        check_output_dir(tmp_path / "afile")
    check_output_dir(tmp_path / "new")  # a new or empty folder is fine
