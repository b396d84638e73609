"""Reading an offline W&B run file while W&B is still writing it: only whole records are read."""

from __future__ import annotations

import struct

from tasks.wandb_records import wait_written, wandb_records


def _run_file(path, records) -> bytes:
    """A ``run-*.wandb`` log of ``records`` (each one "full" chunk in the first block)."""
    data = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
    for record in records:
        payload = record.SerializeToString()
        data += struct.pack("<IHB", 0, len(payload), 1) + payload
    path.write_bytes(data)
    return data


def test_a_half_written_last_record_is_not_read_and_waiting_does_not_raise(tmp_path):
    """W&B's service flushes after ``run.finish()`` returns; a poll that lands mid-record used to
    raise protobuf's DecodeError out of ``publish`` (seen once in the suite under load)."""
    from wandb.proto import wandb_internal_pb2 as pb

    first = pb.Record()
    first.run.run_id = "abc"
    done = pb.Record()
    done.exit.exit_code = 0
    done.exit.runtime = 12
    path = tmp_path / "run-abc.wandb"
    data = _run_file(path, [first, done])
    assert [r.WhichOneof("record_type") for r in wandb_records(tmp_path)] == ["run", "exit"]
    assert wait_written(tmp_path, timeout=1)
    path.write_bytes(data[:-3])  # the exit record's last bytes not written yet
    assert [r.WhichOneof("record_type") for r in wandb_records(tmp_path)] == ["run"]
    assert not wait_written(tmp_path, timeout=0.3)
