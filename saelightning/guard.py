"""NonFiniteGuard: a training step whose activations, loss or gradients hold NaN/inf changes nothing.

Everything about such a step lives here, and none of it waits on the GPU:
- the step's flag: NaN/inf in the activations (one sum per hook: a sum is non-finite when an entry is,
  and one pass is ~5x cheaper than isfinite().all()) or in the SAEs' summed loss, agreed by all ranks;
- per SAE, the update's flag: the step's, or a non-finite gradient norm of that SAE alone (one SAE of a
  sweep is skipped without its siblings); it reaches SkipAdam's fused kernel as `found_inf`;
- the SAEs' step buffers (BatchTopK's threshold EMA) put back on a skipped step;
- the count (details/nonfinite_skipped) and the stop after `max_steps` skipped steps in a row, whose
  run length is read back to the host through pinned memory (on CUDA two steps late, on every rank at
  the same step).
"""

from __future__ import annotations

from collections import deque

import torch
from torch import nn

from saelightning.errors import SAELightningError


class Readback:
    """A small device tensor read on the host without stalling the GPU.

    On CUDA each call copies the value into a ring of pinned buffers behind an event and returns the value
    of `lag` calls earlier (so every DDP rank reads the same step's value at the same step); elsewhere it
    returns the value at once. Returns (values as a list, tag) or None while the first `lag` calls are in flight.
    """

    def __init__(self, lag: int = 2):
        self.lag, self.calls = lag, 0
        self.pending: deque = deque()
        self.ring: list[torch.Tensor] = []

    def __call__(self, value: torch.Tensor, tag=None):
        if value.device.type != "cuda":
            return value.tolist(), tag
        if not self.ring:
            self.ring = [torch.empty(value.shape, dtype=value.dtype, pin_memory=True) for _ in range(self.lag + 1)]
        host = self.ring[self.calls % len(self.ring)]  # the `lag` pending copies hold the other buffers
        self.calls += 1
        host.copy_(value, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.pending.append((host, event, tag))
        if len(self.pending) <= self.lag:
            return None
        host, event, tag = self.pending.popleft()
        event.synchronize()  # recorded `lag` steps ago: long complete, so this does not wait
        return host.tolist(), tag


class NonFiniteGuard(nn.Module):
    """The skip flags of one training step and the count of skipped steps (see the module docstring).

    Per step, in Lightning's order: start() before the SAEs' forwards, agree() on their summed loss,
    finish() at the end of training_step, gradient_flag() per SAE after backward, update_flag() per SAE
    after the optimizer step.
    """

    def __init__(self, max_steps: int):
        super().__init__()
        self.max_steps = max_steps
        self.register_buffer("skipped", torch.zeros((), dtype=torch.long))  # steps (or SAE updates) skipped so far
        # [skipped steps in a row now, the longest such run, what the last one had: 1 activations, 2 loss]
        self.register_buffer("runs", torch.zeros(3, dtype=torch.long), persistent=False)
        self.readback = Readback()
        self.step_bad: torch.Tensor | None = None  # this step's flag (0/1 on the device, agreed by all ranks)
        self._acts_bad: torch.Tensor | None = None
        self._saved: dict[str, list[torch.Tensor]] = {}
        self._flags: dict[str, torch.Tensor] = {}
        self._dropped: torch.Tensor | None = None

    def start(self, acts: dict[str, torch.Tensor], saes) -> None:
        """Look at the step's activations; keep the SAEs' step buffers to put back on a skip."""
        sums = torch.stack([a.sum(dtype=torch.float32) for a in acts.values()])
        self._acts_bad = ~torch.isfinite(sums).all()
        self._saved = {name: [sae.get_buffer(b).clone() for b in sae.step_buffers] for name, sae in saes.items()}

    def agree(self, loss: torch.Tensor, sum_over_ranks, saes) -> torch.Tensor:
        """The step's skip flag (1.0: skip) from its activations and loss on every rank; a skipped step's SAE
        step buffers are put back. Returns 1 - flag (multiply what the step adds to counters by it)."""
        bad = sum_over_ranks((self._acts_bad | ~torch.isfinite(loss)).float()).clamp(max=1)
        self.step_bad = bad
        for name, sae in saes.items():
            for b, before in zip(sae.step_buffers, self._saved.pop(name, [])):
                sae.get_buffer(b).copy_(torch.where(bad > 0, before, sae.get_buffer(b)))
        return 1 - bad

    def finish(self, step: int) -> None:
        """Count a skipped step; stop the run once max_steps in a row were skipped (read back without a sync)."""
        bad = self.step_bad
        self.skipped += bad.long()
        run = (self.runs[0] + 1) * bad.long()
        what = torch.where(bad > 0, 2 - self._acts_bad.long(), self.runs[2])
        self.runs.copy_(torch.stack([run, torch.maximum(self.runs[1], run), what]))
        seen = self.readback(self.runs, step)
        if seen is None or seen[0][1] < self.max_steps:
            return
        (_, longest, what), at = seen
        raise SAELightningError(
            f"{longest} steps in a row had non-finite {'activations' if what == 1 else 'loss'} (last at step {at}); "
            "the run stopped and its last checkpoint is the last good state: check the model/data for NaN/inf or "
            "lower the lr"
        )

    def gradient_flag(self, name: str, grad_norm: torch.Tensor) -> torch.Tensor:
        """SAE `name`'s update flag: the step's, or its own non-finite gradient norm (counted once)."""
        step_bad = self.step_bad if self.step_bad is not None else self.skipped.new_zeros((), dtype=torch.float32)
        bad_grads = (~torch.isfinite(grad_norm)).to(step_bad.dtype)
        flag = torch.maximum(step_bad, bad_grads)
        self._flags[name] = flag
        dropped = bad_grads * (1 - step_bad)  # a skipped step is counted in finish() already
        self._dropped = dropped if self._dropped is None else torch.maximum(self._dropped, dropped)
        return flag

    def count_gradient_skips(self) -> None:
        if self._dropped is not None:
            self.skipped += self._dropped.long()
            self._dropped = None

    def update_flag(self, name: str) -> torch.Tensor | None:
        """The flag of SAE `name`'s update this step (for its after-step projection), once."""
        return self._flags.pop(name, None)
