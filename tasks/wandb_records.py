"""Reading an offline W&B run back from its ``run-*.wandb`` file (a LevelDB-style record log of
protobuf records), and waiting until W&B has written it: ``run.finish()`` returns before W&B's
service has flushed an offline run's file, so a folder copied right away could miss records."""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_BLOCK = 32 * 1024
_HEADER = 7  # crc32 (4) + length (2) + record type (1)


def wandb_records(run_dir: str | Path) -> Iterator[Any]:
    """The protobuf records of an offline W&B run (its ``run-*.wandb`` log), in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = Path(run_dir).glob("run-*.wandb")
    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    if ident != b":W&B" or magic != 0xBEE1 or version != 0:
        raise ValueError(f"{path} is not a W&B run file")
    pos, pending = 7, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        pos += _HEADER
        if pos + length > len(data):
            break  # a record W&B is still writing: only whole records are read
        chunk, pos = data[pos : pos + length], pos + length
        if kind == 1:  # full
            payload = chunk
        elif kind == 2:  # first
            pending = chunk
            continue
        elif kind == 3:  # middle
            pending += chunk
            continue
        elif kind == 4:  # last
            payload, pending = pending + chunk, b""
        else:
            continue
        record = pb.Record()
        record.ParseFromString(payload)
        yield record


def wait_written(run_dir: str | Path, timeout: float = 60.0) -> bool:
    """Wait until the run file holds its ``exit`` record; False if it did not within ``timeout``."""
    from google.protobuf.message import DecodeError

    deadline = time.monotonic() + timeout
    while True:
        try:
            if any(r.WhichOneof("record_type") == "exit" for r in wandb_records(run_dir)):
                return True
        except (ValueError, struct.error, DecodeError):
            pass  # not written far enough yet
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
