"""The artifact store: content-addressed Arrow artifacts on any pyarrow filesystem.

Stages hand each other :class:`ArtifactRef` values (store URI, key, content hash, schema name), never
tensors or models. The store is a local folder by default (``.leap/artifacts``, or
``LEAP_ARTIFACT_STORE``), or any URI pyarrow opens (``s3://bucket/prefix``, ``gs://...``).

Writes are atomic: the bytes go to a temporary name that no reader ever looks at, then are moved onto
the final key (a rename on local disks; object stores publish an object only once it is complete).
Keys are the SHA-256 of the content, and every read checks it, so a killed writer or a truncated file
is detected instead of trusted.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from leapcore.results import SCHEMA_KEY, schema_name
from leapcore.secrets import redact_uri

DEFAULT_STORE = ".leap/artifacts"
STORE_ENV = "LEAP_ARTIFACT_STORE"


# Schema metadata that measures the run, not the result: never part of an artifact's bytes.
TIMING_KEYS = frozenset({b"leapcore.seconds"})


class ArtifactError(RuntimeError):
    """An artifact is missing, or its content does not match its hash (never trusted)."""


@dataclass(frozen=True)
class ArtifactRef:
    """A reference to one artifact: where it is, what it holds and its content hash.

    Attributes:
        store: the store's root URI, with any credentials removed.
        key: the path inside the store.
        sha256: hash of the stored bytes; part of every downstream cache key.
        schema: the Arrow schema name (``prototypes``, ``isolations``, ...) or a file kind (``png``).
        format: ``arrow`` (IPC file), ``parquet`` (zstd), or a file suffix (``html``, ``png``).
        size: bytes stored.
    """

    store: str
    key: str
    sha256: str
    schema: str
    format: str
    size: int

    @property
    def uri(self) -> str:
        return f"{self.store.rstrip('/')}/{self.key}"


class ArtifactStore:
    """Content-addressed artifacts under ``root`` (a folder or a pyarrow filesystem URI).

    Args:
        root: a local folder or URI; default ``LEAP_ARTIFACT_STORE``, else ``.leap/artifacts``.
    """

    def __init__(self, root: str | os.PathLike | None = None):
        raw = str(root or os.environ.get(STORE_ENV) or DEFAULT_STORE)
        if "://" not in raw:
            raw = str(Path(raw).expanduser().resolve())
        self._root = raw
        self.uri = redact_uri(raw) if "://" in raw else Path(raw).as_uri()
        try:
            self._fs, self._base = pafs.FileSystem.from_uri(raw)
        except Exception as err:
            # pyarrow repeats the URI (credentials included) in its messages.
            raise ArtifactError(
                f"cannot open the artifact store {self.uri!r}: {redact_uri(str(err)).replace(raw, self.uri)}"
            ) from None

    def __repr__(self) -> str:
        return f"ArtifactStore({self.uri!r})"

    def secret_values(self) -> list[str]:
        """Credentials inside the store's URI (for cleaning messages)."""
        from tasks.redaction import uri_credentials

        return uri_credentials(self._root)

    def __getstate__(self) -> dict:
        return {"root": self._root}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["root"])

    # -- writing ---------------------------------------------------------------------------------
    def put_table(self, table: pa.Table, stage: str) -> ArtifactRef:
        """Store ``table`` as an Arrow IPC file under ``stage/``; the schema name comes from its metadata.

        Wall-clock timings (``leapcore.seconds``) are dropped from the metadata: the file's hash keys
        every later stage's cache, and identical results must get identical hashes (the timing
        travels in the stage's output instead).
        """
        meta = table.schema.metadata or {}
        if any(k in TIMING_KEYS for k in meta):
            table = table.replace_schema_metadata(
                {k: v for k, v in meta.items() if k not in TIMING_KEYS}
            )
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        return self.put_bytes(
            sink.getvalue().to_pybytes(), stage, "arrow", schema_name(table) or stage
        )

    def put_parquet(self, table: pa.Table, stage: str) -> ArtifactRef:
        """Store ``table`` as a zstd-compressed Parquet file (what users download)."""
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        return self.put_bytes(
            sink.getvalue().to_pybytes(), stage, "parquet", schema_name(table) or stage
        )

    def put_bytes(self, data: bytes, stage: str, fmt: str, schema: str) -> ArtifactRef:
        """Store ``data`` under ``stage/<sha256>.<fmt>`` atomically (skipped when already there)."""
        digest = hashlib.sha256(data).hexdigest()
        key = f"{stage}/{digest}.{fmt}"
        ref = ArtifactRef(self.uri, key, digest, schema, fmt, len(data))
        if not self.is_intact(ref):
            self._write_atomic(key, data)
        return ref

    def _write_atomic(self, key: str, data: bytes) -> None:
        path = self._path(key)
        parent = path.rsplit("/", 1)[0]
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            self._fs.create_dir(parent, recursive=True)
            with self._fs.open_output_stream(tmp) as out:
                out.write(data)
            self._fs.move(tmp, path)
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                with contextlib.suppress(Exception):
                    self._fs.delete_file(tmp)
                raise
            # A read-only folder, file system or bucket: say which store, not only which file.
            raise ArtifactError(
                f"cannot write to the artifact store {self.uri!r} (read-only or no permission: "
                f"{redact_uri(str(err)).replace(self._root, self.uri)}); pass a writable store "
                f"(artifact_store=..., CLI --store, or {STORE_ENV})."
            ) from None
        except BaseException:
            with contextlib.suppress(Exception):
                self._fs.delete_file(tmp)
            raise

    # -- reading ---------------------------------------------------------------------------------
    def exists(self, ref: ArtifactRef) -> bool:
        """Whether the artifact is there with the right size (its hash is checked on read)."""
        info = self._fs.get_file_info(self._path(ref.key))
        return info.type == pafs.FileType.File and info.size == ref.size

    def is_intact(self, ref: ArtifactRef) -> bool:
        """Whether the artifact is there and its content matches its hash."""
        try:
            self.get_bytes(ref)
        except ArtifactError:
            return False
        return True

    def get_bytes(self, ref: ArtifactRef) -> bytes:
        """The artifact's bytes, after checking them against ``ref.sha256``.

        Raises:
            ArtifactError: missing, or the content differs from the hash (a partial or altered file).
        """
        try:
            with self._fs.open_input_stream(self._path(ref.key)) as src:
                data = src.read()
        except (FileNotFoundError, OSError):
            raise ArtifactError(
                f"artifact {ref.uri} is missing from the store; re-run the audit to recompute it."
            ) from None
        if hashlib.sha256(data).hexdigest() != ref.sha256:
            raise ArtifactError(
                f"artifact {ref.uri} does not match its content hash (a partial or altered file); "
                "it is not used. Delete it and re-run the audit to recompute it."
            )
        return data

    def get_table(self, ref: ArtifactRef) -> pa.Table:
        """Read an Arrow IPC or Parquet artifact (hash checked) and check its schema name."""
        data = self.get_bytes(ref)
        if ref.format == "parquet":
            table = pq.read_table(io.BytesIO(data))
        else:
            table = pa.ipc.open_file(pa.BufferReader(data)).read_all()
        found = (table.schema.metadata or {}).get(SCHEMA_KEY, b"").decode()
        if found and found != ref.schema:
            raise ArtifactError(f"artifact {ref.uri} holds schema {found!r}, not {ref.schema!r}.")
        return table

    def _path(self, key: str) -> str:
        return f"{self._base.rstrip('/')}/{key}"
