"""A test helper callback: a `saelightning fit` subprocess announces that it reached a point and waits there.

Fault tests must not race the run: a fast machine finishes an 8-step fit before a poll for its step
checkpoint sees it. With this callback in the config, the run writes `marker` when it reaches `event`
(at or after `step`) and then holds still until a stop signal reached it (or `hold` seconds pass), so the
test's signal or kill lands at exactly that point. Only global rank 0 announces and holds; the other
ranks of a DDP run wait for it at their next collective.
"""

import time
from pathlib import Path

import lightning.pytorch as pl

from saelightning.faults import stop_requested

EVENTS = ("fit_start", "train_start", "train_batch_start", "train_batch_end", "validation_start", "save_checkpoint")


class Announce(pl.Callback):
    def __init__(self, marker: str, event: str = "train_batch_end", step: int = 0, hold: float = 120.0):
        assert event in EVENTS, event
        self.marker, self.event, self.step, self.hold = Path(marker), event, step, hold
        self.done = False

    def _reached(self, trainer, event: str) -> None:
        if self.done or event != self.event or trainer.global_step < self.step or not trainer.is_global_zero:
            return
        self.done = True
        tmp = self.marker.with_name(self.marker.name + ".tmp")
        tmp.write_text(str(trainer.global_step))
        tmp.replace(self.marker)  # whole when the test sees it
        deadline = time.monotonic() + self.hold
        while stop_requested() is None and time.monotonic() < deadline:
            time.sleep(0.01)

    def on_fit_start(self, trainer, pl_module):
        self._reached(trainer, "fit_start")

    def on_train_start(self, trainer, pl_module):
        self._reached(trainer, "train_start")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._reached(trainer, "train_batch_start")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._reached(trainer, "train_batch_end")

    def on_validation_start(self, trainer, pl_module):
        self._reached(trainer, "validation_start")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self._reached(trainer, "save_checkpoint")


def wait_for(proc, marker: Path, timeout: float = 240) -> int:
    """The step the run announced; fails (with the run's stderr) if it exits or times out first."""
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run exited ({proc.returncode}) before {marker.name}:\n"
                                 f"{proc.communicate()[1][-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"the run did not reach {marker.name} within {timeout} s")
        time.sleep(0.01)
    return int(marker.read_text())
