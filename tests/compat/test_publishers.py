"""``generate`` finds W&B through the ``leapcore.publishers`` entry point, and only when asked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import sys, torch
from leapcore import engine
net = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
net(torch.rand(1, 3, 16, 16))
config = {"max_steps": 2, "find_lr_steps": 0, "isolation": False, "input_dim": [3, 16, 16]}
pipeline = {"wandb", "tasks", "prefect"}
for extra in ({}, {"wandb_entity": "someone"}):
    df, results = engine.generate("pubtest", net, ["a", "b"], {**config, **extra})
    loaded = {m.split(".")[0] for m in sys.modules} & pipeline
    print(sorted(loaded), sorted(results.get("publications", {})))
"""


def test_generate_finds_the_wandb_publisher_only_when_asked(tmp_path) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(ROOT),
        "HOME": str(tmp_path),
        "WANDB_DIR": str(tmp_path),
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "OMP_NUM_THREADS": "1",
    }
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert out.returncode == 0, out.stderr[-2000:]
    without, with_entity = out.stdout.strip().splitlines()[-2:]
    # Without W&B keys nothing of the pipeline is imported (the engine's import rule at run time).
    assert without == "[] []"
    # With an entity, the entry point leapcore.publishers:wandb is loaded and publishes.
    assert with_entity == "['prefect', 'tasks', 'wandb'] ['wandb']", with_entity
    assert list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))


def test_a_key_that_cannot_reach_wandb_falls_back_to_offline(tmp_path, monkeypatch) -> None:
    import socket

    import torch

    from leapcore import engine
    from tests.pipeline.support import wandb_contents

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    key = "0123456789abcdef" * 3  # shaped like a W&B key, so the online path is tried
    for name, value in {
        "WANDB_BASE_URL": f"http://127.0.0.1:{port}",
        "WANDB_INIT_TIMEOUT": "3",
        "WANDB_DIR": str(tmp_path),
        "WANDB_DATA_DIR": str(tmp_path / "data"),
        "WANDB_CONFIG_DIR": str(tmp_path / "config"),
        "WANDB_SILENT": "true",
    }.items():
        monkeypatch.setenv(name, value)
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_ENTITY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.Flatten(), torch.nn.Linear(392, 2))
    config = {"max_steps": 2, "find_lr_steps": 0, "isolation": False, "input_dim": [3, 16, 16]}
    config["wandb_api_key"] = key
    _, results = engine.generate("fallback", net, ["a", "b"], config)
    published = results["publications"]["wandb"]
    assert published["mode"] == "offline", published
    assert wandb_contents(published["run_dir"])["history"]["prototypes.nrows"] == 1
    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and key.encode() in p.read_bytes()]
    assert not leaked, leaked
