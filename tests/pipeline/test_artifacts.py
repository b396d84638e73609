"""The artifact store: content-addressed, hash-checked reads, atomic writes (a killed writer leaves
nothing a reader trusts)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pytest

from tasks.artifacts import ArtifactError, ArtifactStore


def _table(n: int = 4, name: str = "prototypes") -> pa.Table:
    table = pa.table({"row": list(range(n)), "value": [float(i) / 3 for i in range(n)]})
    return table.replace_schema_metadata({b"leapcore.schema": name.encode()})


def test_tables_round_trip_with_their_hash_and_schema(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    ref = store.put_table(_table(), "prototypes")
    assert ref.schema == "prototypes" and ref.format == "arrow"
    assert ref.key == f"prototypes/{ref.sha256}.arrow"
    assert ref.uri.startswith("file://") and ref.uri.endswith(ref.key)
    assert store.get_table(ref).equals(_table())
    # Content-addressed: the same content gives the same reference, other content another.
    assert store.put_table(_table(), "prototypes") == ref
    assert store.put_table(_table(5), "prototypes").sha256 != ref.sha256

    parquet = store.put_parquet(_table(), "tables")
    assert parquet.format == "parquet"
    assert store.get_table(parquet).equals(_table())
    assert (tmp_path / "store" / parquet.key).read_bytes()[:4] == b"PAR1"


def test_a_damaged_artifact_is_detected_not_trusted_and_rewritten(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    ref = store.put_table(_table(200), "prototypes")
    path = tmp_path / "store" / ref.key
    path.write_bytes(path.read_bytes()[:-10] + b"0123456789")  # same size, other content
    assert store.exists(ref)  # the size matches ...
    assert not store.is_intact(ref)  # ... but the hash does not
    with pytest.raises(ArtifactError, match="does not match its content hash"):
        store.get_table(ref)
    assert store.put_table(_table(200), "prototypes") == ref  # writing again repairs it
    assert store.get_table(ref).num_rows == 200

    path.unlink()
    with pytest.raises(ArtifactError, match="missing"):
        store.get_bytes(ref)


def test_the_schema_name_is_checked(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    ref = store.put_table(_table(name="isolations"), "isolations")
    wrong = type(ref)(ref.store, ref.key, ref.sha256, "prototypes", ref.format, ref.size)
    with pytest.raises(ArtifactError, match="holds schema 'isolations'"):
        store.get_table(wrong)


def test_a_writer_killed_mid_write_leaves_no_artifact(tmp_path: Path) -> None:
    """A real SIGKILL in the middle of writing: the final key never appears."""
    root = tmp_path / "store"
    script = textwrap.dedent(
        f"""
        import os, signal
        import pyarrow as pa
        from tasks.artifacts import ArtifactStore

        store = ArtifactStore({str(root)!r})
        real_open = store._fs.open_output_stream

        class Dying:
            def __init__(self, stream):
                self.stream = stream
            def __enter__(self):
                return self
            def __exit__(self, *exc):
                return False
            def write(self, data):
                self.stream.write(data[: len(data) // 2])
                self.stream.flush()
                os.kill(os.getpid(), signal.SIGKILL)

        class DyingFileSystem:
            def __init__(self, fs):
                self.fs = fs
            def __getattr__(self, name):
                return getattr(self.fs, name)
            def open_output_stream(self, path):
                return Dying(real_open(path))

        store._fs = DyingFileSystem(store._fs)
        table = pa.table({{"x": list(range(100_000))}})
        store.put_table(table.replace_schema_metadata({{b"leapcore.schema": b"prototypes"}}), "prototypes")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[2])
    assert done.returncode == -9  # killed, as planned
    written = [p.name for p in (root / "prototypes").iterdir()]
    assert written and all(".tmp-" in name for name in written), written
    assert not [name for name in written if name.endswith(".arrow")]

    # The same content written by a healthy process is complete and passes its hash check.
    store = ArtifactStore(root)
    table = pa.table({"x": list(range(100_000))})
    ref = store.put_table(
        table.replace_schema_metadata({b"leapcore.schema": b"prototypes"}), "prototypes"
    )
    assert store.get_table(ref).num_rows == 100_000


def test_store_uri_credentials_never_reach_messages() -> None:
    with pytest.raises(ArtifactError) as caught:
        ArtifactStore("file://user:s3cr3t-pw@localhost/tmp/nowhere")
    assert "s3cr3t-pw" not in str(caught.value)
    assert "***" in str(caught.value)
