"""`saelightning fit` on two CPU processes under DDP (gloo), as the slow DDP tests run it."""

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def ddp_fit(config: Path, run_dir: Path, *extra: str, timeout: int = 300) -> dict:
    """Fit CONFIG on two processes (`--trainer.strategy ddp --trainer.devices 2`, then `extra`); the run's
    last.ckpt in run_dir, loaded. A failed run fails the test with the tail of its stderr."""
    cmd = [sys.executable, "-m", "saelightning", "fit", "--config", str(config), "--trainer.strategy", "ddp",
           "--trainer.devices", "2", *extra]
    done = subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(Path(run_dir) / "last.ckpt", weights_only=True)
