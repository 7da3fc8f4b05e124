"""Preemption and Ctrl-C: SIGTERM, SIGUSR1 and SIGINT make a fit save last.ckpt at a step boundary and stop.

Lightning's own handlers act inside the signal handler (SIGUSR1 under SLURM saves an hpc checkpoint
wherever the main thread happens to be; SIGTERM broadcasts a tensor from the handler; SIGINT raises
KeyboardInterrupt anywhere, which loses everything since the last checkpoint), which can interleave
with DDP collectives. Here the handler only sets a flag; at the end of the next training step every
rank agrees on it (one boolean all-reduce), all ranks save last.ckpt together (the data module gathers
every rank's stream position), the SAEs are exported and the loop stops, without a validation. Under
SLURM, SIGUSR1 then requeues the job (`scontrol requeue`), and the requeued job resumes with
`--ckpt_path last` (configs/slurm/fit.sbatch).

Before the first training step of a process nothing can be lost, so a single-process run stops at once
(the data module polls `stop_requested()` while it fills its first buffer and raises Interrupted). A
second Ctrl-C stops at once without saving.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from saelightning.errors import Interrupted

_received: list[str] = []  # the signals received by this process's handler, in order


def stop_requested() -> str | None:
    """The name of the first stop signal this process received since the fit started, or None."""
    return _received[0] if _received else None


def raise_if_stop_requested(where: str) -> None:
    """Stop work that no step depends on yet (a first buffer fill, the scale estimate) at once."""
    if _received:
        raise Interrupted(_received[0], where)


def _slurm_job_id() -> str | None:
    """The id `scontrol requeue` takes (array jobs: <array job>_<task>); None outside a SLURM batch job."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return os.environ.get("SLURM_JOB_ID")


class Preemption(pl.Callback):
    """Save last.ckpt and stop on SIGTERM, SIGUSR1 or SIGINT (Ctrl-C); under SLURM, requeue the job after a SIGUSR1.

    Args:
        enabled: install the handlers (False: Lightning's defaults; SIGTERM then ends the run without a save,
            Ctrl-C with Lightning's KeyboardInterrupt).
        requeue: under SLURM (SLURM_JOB_ID set), run `scontrol requeue <job>` after saving on SIGUSR1.
    """

    SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")

    def __init__(self, enabled: bool = True, requeue: bool = True):
        self.enabled, self.requeue = enabled, requeue
        self.stopped_at: int | None = None  # global step at which the run saved and stopped
        self._previous: dict = {}

    @property
    def received(self) -> str | None:
        return stop_requested()

    @staticmethod
    def _handler(signum, frame) -> None:
        name = signal.Signals(signum).name
        if name == "SIGINT" and "SIGINT" in _received:  # a second Ctrl-C: stop now, without saving
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        _received.append(name)  # only a flag: no I/O, no collectives

    def _install(self) -> None:
        if not self.enabled or sys.platform == "win32":
            return
        for name in self.SIGNALS:
            self._previous.setdefault(name, signal.getsignal(getattr(signal, name)))
            signal.signal(getattr(signal, name), self._handler)

    def setup(self, trainer, pl_module, stage: str) -> None:
        # from the start of fit (the scale estimate and the first buffer fill come before on_train_start)
        _received.clear()
        self.stopped_at = None
        if stage == "fit":
            self._install()

    def on_train_start(self, trainer, pl_module) -> None:
        # again after Lightning registered its own SIGTERM handler (trainer._run), which would raise
        # SIGTERMException mid-step; Lightning's signal connector restores the originals at teardown
        self._install()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        for name, handler in self._previous.items():
            signal.signal(getattr(signal, name), handler)
        self._previous.clear()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")  # Lightning calls no teardown hook after an exception

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.enabled or self.stopped_at is not None:
            return
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        path = self._save_last(trainer)
        # end the loop at this step without the validation Lightning runs after `should_stop` (the stop
        # must come within seconds, and the checkpoint holds this step's state either way)
        trainer.fit_loop.epoch_loop.max_steps = trainer.global_step
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
        trainer.save_checkpoint(path, weights_only=False)  # every rank: the data state gathers all ranks' positions
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
            rank_zero_warn(f"saelightning: `scontrol requeue {job_id}` failed ({result.stderr.strip()}); "
                           "resubmit to resume")
