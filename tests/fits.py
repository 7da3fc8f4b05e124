"""The end-to-end fit tests' helpers: one writer of their small CPU configs, and `saelightning fit` on two CPU
processes under DDP (gloo), as the slow DDP tests run it."""

import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent


def fit_config(tmp_path: Path, run: str, saes: list[dict], data: dict, trainer: dict | None = None,
               model: dict | None = None, **sections) -> Path:
    """Write <tmp_path>/<run>.yaml and return its path: seed 0, a quiet CPU trainer rooted at <tmp_path>/<run>
    (10 steps, validation every 5, logs every 3), the SAEs with 3 warm-up steps and a 128-token dead window, the
    data section as given, a checkpoint every 4 steps and resampling every 5 (seed 0). `trainer` and `model`
    entries update their sections; the other sections given (checkpoint, resample, export, ...) replace theirs."""
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "max_steps": 10, "val_check_interval": 5, "log_every_n_steps": 3,
                    "default_root_dir": str(tmp_path / run), "enable_progress_bar": False,
                    "enable_model_summary": False, **(trainer or {})},
        "model": {"saes": saes, "warmup_steps": 3, "dead_window_tokens": 128, **(model or {})},
        "data": data,
        "checkpoint": {"every_n_train_steps": 4},
        "resample": {"every_n_steps": 5, "seed": 0},
        **sections,
    }
    path = tmp_path / f"{run}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def ddp_fit(config: Path, run_dir: Path, *extra: str, timeout: int = 300) -> dict:
    """Fit CONFIG on two processes (`--trainer.strategy ddp --trainer.devices 2`, then `extra`); the run's
    last.ckpt in run_dir, loaded. A failed run fails the test with the tail of its stderr."""
    cmd = [sys.executable, "-m", "saelightning", "fit", "--config", str(config), "--trainer.strategy", "ddp",
           "--trainer.devices", "2", *extra]
    done = subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(Path(run_dir) / "last.ckpt", weights_only=True)
