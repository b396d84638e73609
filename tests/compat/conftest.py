"""leap-ie's documented examples, run as written with only the import lines changed.

The examples come from the reference copies of leap-ie's docs (``/work/shared/reference`` or
``LEAP_IE_REFERENCE``); code blocks are extracted from the Markdown, so a changed doc changes the test.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


def _reference() -> Path:
    """``LEAP_IE_REFERENCE``, else ``../shared/reference`` next to the repository (where the issue
    points), else the workspace's ``/work/shared/reference``."""
    if os.environ.get("LEAP_IE_REFERENCE"):
        return Path(os.environ["LEAP_IE_REFERENCE"])
    beside = Path(__file__).resolve().parents[3] / "shared" / "reference"
    return beside if beside.is_dir() else Path("/work/shared/reference")


REFERENCE = _reference()
README = REFERENCE / "leap-ie-readme.md"
GENERATE = REFERENCE / "leap-ie-engine-generate.txt"

# The examples' defaults (max_steps 1000, find_lr_steps 500, ...) take many minutes per example
# on CI's CPUs with a ResNet-18. The examples' code stays as written: the fixture ``fast_defaults``
# lowers only the step counts that the example's own config leaves unset.
FAST = {
    "max_steps": 3,
    "find_lr_steps": 0,
    "isolation_steps": 2,
    "transform_samples": 1,
}


def need_reference() -> None:
    """Skip (with the reason) where leap-ie's reference pages are not available."""
    if not README.is_file() or not GENERATE.is_file():
        pytest.skip(f"leap-ie's reference pages are not in {REFERENCE} (set LEAP_IE_REFERENCE)")


def code_blocks(path: Path = README) -> list[tuple[str, str]]:
    """``(heading, code)`` of every fenced code block, the heading being the section it sits in."""
    need_reference()
    text = path.read_text()
    blocks, heading = [], ""
    for match in re.finditer(r"^(#+ [^\n]*)$|^```(\w*)\n(.*?)^```", text, re.M | re.S):
        if match.group(1):
            heading = match.group(1).lstrip("# ").strip()
        elif match.group(2) != "bash":
            blocks.append((heading, match.group(3)))
    return blocks


def leapcore_imports(code: str) -> str:
    """The only change: ``leap_ie.vision`` -> ``leapcore`` on import lines."""
    lines = []
    for line in code.splitlines():
        if re.match(r"\s*(from|import)\s+leap_ie", line):
            line = line.replace("leap_ie.vision", "leapcore")
        lines.append(line)
    return "\n".join(lines)


def block(heading: str) -> str:
    """The code of the (first) block under ``heading``, imports changed."""
    for head, code in code_blocks():
        if head == heading:
            return leapcore_imports(code)
    raise LookupError(f"no code block under {heading!r} in {README}")


@pytest.fixture
def compat_home(tmp_path: Path) -> Iterator[Path]:
    """A working folder (leap_results/ lands here), offline W&B folders and a torch hub cache with
    an untrained ResNet-18 state dict under the file name torchvision expects."""
    import torchvision

    hub = tmp_path / "torch"
    weights = torchvision.models.get_model_weights("resnet18").DEFAULT
    (hub / "hub" / "checkpoints").mkdir(parents=True)
    torch.manual_seed(0)
    state = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(state, hub / "hub" / "checkpoints" / os.path.basename(weights.url))
    env = {
        "TORCH_HOME": str(hub),
        "WANDB_MODE": "",
        "WANDB_SILENT": "true",
        "WANDB_DIR": str(tmp_path / "wandb"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
        "WANDB_API_KEY": "",
        "WANDB_ENTITY": "",
    }
    (tmp_path / "wandb").mkdir()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value) if value else mp.delenv(key, raising=False)
        mp.setattr(torch.hub, "_hub_dir", None)
        mp.chdir(tmp_path)
        yield tmp_path


@pytest.fixture
def fast_defaults(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Lower the step defaults the example's config leaves unset (see ``FAST``)."""
    from leapcore import engine

    original = engine.load_config

    def load(config):
        if isinstance(config, dict):
            config = {**FAST, **config}
        return original(config)

    monkeypatch.setattr(engine, "load_config", load)
    return FAST
