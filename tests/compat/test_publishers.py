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
config.update(EXTRA)
df, results = engine.generate("pubtest", net, ["a", "b"], config)
loaded = {m.split(".")[0] for m in sys.modules} & {"wandb", "tasks", "prefect"}
print(sorted(loaded), sorted(results.get("publications", {})))
"""


def _run(extra: str, tmp_path: Path) -> str:
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(ROOT),
        "HOME": str(tmp_path),
        "WANDB_DIR": str(tmp_path),
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "OMP_NUM_THREADS": "1",
    }
    code = SCRIPT.replace("EXTRA", extra)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


def test_without_wandb_keys_nothing_of_the_pipeline_is_imported(tmp_path) -> None:
    assert _run("{}", tmp_path) == "[] []"


def test_with_an_entity_the_entry_point_publishes(tmp_path) -> None:
    line = _run('{"wandb_entity": "someone"}', tmp_path)
    assert line.startswith("['prefect', 'tasks', 'wandb']") and line.endswith("['wandb']"), line
    assert list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
