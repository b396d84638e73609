"""Identical results get identical artifact hashes, however long they took to compute."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import torch

from leapcore.isolation import IsolationResult
from leapcore.results import isolations_from_arrow, isolations_to_arrow
from tasks.artifacts import ArtifactStore


def _isolation(seconds: float) -> IsolationResult:
    gen = torch.Generator().manual_seed(0)
    masks = torch.rand(2, 1, 8, 8, generator=gen)
    return IsolationResult(
        [(0, 1), (0, 2)],
        masks,
        masks.expand(2, 3, 8, 8).clone(),
        torch.tensor([2.0, 1.0]),
        torch.tensor([1.5, 0.5]),
        "mask",
        seconds,
    )


def test_timings_do_not_change_an_artifacts_hash(tmp_path) -> None:
    store = ArtifactStore(str(tmp_path / "store"))
    classes = [f"c{i}" for i in range(3)]
    fast = store.put_table(
        isolations_to_arrow(_isolation(0.25), classes, "prototype"), "isolate_features"
    )
    slow = store.put_table(
        isolations_to_arrow(_isolation(7.5), classes, "prototype"), "isolate_features"
    )
    assert fast.sha256 == slow.sha256
    read = isolations_from_arrow(store.get_table(fast))
    assert torch.equal(read.masks, _isolation(0).masks)
    other = store.put_table(
        isolations_to_arrow(_isolation(0.25), classes, "prototype").replace_schema_metadata(
            {b"leapcore.schema": b"isolations", b"leapcore.method": b"hipe"}
        ),
        "isolate_features",
    )
    assert other.sha256 != fast.sha256  # other content, other hash
    assert isinstance(store.get_table(fast), pa.Table)


def test_a_read_only_store_says_artifact_store(tmp_path) -> None:
    import os

    import pytest

    from tasks.artifacts import ArtifactError

    root = tmp_path / "store"
    root.mkdir()
    root.chmod(0o555)
    if os.geteuid() == 0:  # root writes into read-only folders; sysfs refuses even root
        root = Path("/sys/leapcore-read-only-store")
    try:
        with pytest.raises(ArtifactError, match="cannot write to the artifact store"):
            ArtifactStore(str(root)).put_bytes(b"data", "stage", "bin", "raw")
    finally:
        (tmp_path / "store").chmod(0o755)
