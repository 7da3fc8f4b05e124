"""Preemption: SIGTERM / SIGUSR1 make a fit save last.ckpt at a step boundary and stop cleanly.

Lightning's own handlers act inside the signal handler (SIGUSR1 under SLURM saves an hpc checkpoint
wherever the main thread happens to be; SIGTERM broadcasts a tensor from the handler), which can
interleave with DDP collectives. Here the handler only sets a flag; at the end of the next training
step every rank agrees on it (one boolean all-reduce), all ranks save last.ckpt together (the data
module gathers every rank's stream position), and the loop stops. Under SLURM, SIGUSR1 then requeues
the job (`scontrol requeue`), and the requeued job resumes with `--ckpt_path last`
(configs/slurm/fit.sbatch).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn


def _slurm_job_id() -> str | None:
    """The id `scontrol requeue` takes (array jobs: <array job>_<task>); None outside a SLURM batch job."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return os.environ.get("SLURM_JOB_ID")


class Preemption(pl.Callback):
    """Save last.ckpt and stop on SIGTERM or SIGUSR1; under SLURM, requeue the job after a SIGUSR1.

    Args:
        enabled: install the handlers (False: Lightning's defaults; SIGTERM then ends the run without a save).
        requeue: under SLURM (SLURM_JOB_ID set), run `scontrol requeue <job>` after saving on SIGUSR1.
    """

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self, enabled: bool = True, requeue: bool = True):
        self.enabled, self.requeue = enabled, requeue
        self.received: str | None = None  # name of the first signal received in this fit
        self.stopped_at: int | None = None  # global step at which the run saved and stopped

    def _handler(self, signum, frame) -> None:
        self.received = self.received or signal.Signals(signum).name  # only a flag: no I/O, no collectives

    def on_train_start(self, trainer, pl_module) -> None:
        # after Lightning registered its handlers (trainer._run), so these replace them for the run;
        # Lightning's signal connector restores the originals at teardown
        self.received, self.stopped_at = None, None
        if not self.enabled or sys.platform == "win32":
            return
        for name in self.SIGNALS:
            signal.signal(getattr(signal, name), self._handler)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.enabled or self.stopped_at is not None:
            return
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        path = self._save_last(trainer)
        trainer.should_stop = True
        self.stopped_at = trainer.global_step
        rank_zero_info(f"saelightning: {self.received or 'a signal on another rank'} at step {trainer.global_step}: "
                       f"saved {path}; resume with --ckpt_path last")
        if self.received == "SIGUSR1" and self.requeue and _slurm_job_id() and trainer.is_global_zero:
            self._requeue(_slurm_job_id())

    @staticmethod
    def _save_last(trainer) -> Path:
        callback = trainer.checkpoint_callback
        folder = Path(callback.dirpath) if callback is not None and callback.dirpath else Path(trainer.default_root_dir)
        name = getattr(callback, "CHECKPOINT_NAME_LAST", "last") + getattr(callback, "FILE_EXTENSION", ".ckpt")
        path = folder / name
        trainer.save_checkpoint(path)  # every rank: the data state gathers all ranks' positions
        if callback is not None:  # ModelCheckpoint and FinalCheckpoint then see this step as saved
            callback._last_global_step_saved = trainer.global_step
            callback.last_model_path = str(path)
        return path

    @staticmethod
    def _requeue(job_id: str) -> None:
        try:
            result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            rank_zero_warn(f"saelightning: could not requeue SLURM job {job_id} ({e}); resubmit it to resume")
            return
        if result.returncode == 0:
            rank_zero_info(f"saelightning: requeued SLURM job {job_id}")
        else:
            rank_zero_warn(f"saelightning: `scontrol requeue {job_id}` failed ({result.stderr.strip()}); resubmit to resume")
