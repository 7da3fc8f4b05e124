"""The SAEs' optimizer and schedule: fused Adam that can skip one SAE's update without a host sync, and
a linear warm-up / constant / linear decay learning rate."""

from __future__ import annotations

import math

import torch


def default_lr(d_sae: int) -> float:
    """The learning-rate scaling of Gao et al. / SAELens: 2e-4 at 2**14 latents, ∝ 1/sqrt(d_sae)."""
    return 2e-4 / math.sqrt(d_sae / 2**14)


class WarmupDecay:
    """LambdaLR factor: linear warm-up over `warmup` steps, constant, then linear decay to `end` over the last
    `decay` steps."""

    def __init__(self, warmup: int, decay: int, total: int, end: float):
        self.warmup, self.decay, self.total, self.end = warmup, decay, total, end

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.decay > 0 and self.total > 0 and step >= self.total - self.decay:
            return self.end + (1 - self.end) * max(self.total - step, 0) / self.decay
        return 1.0


class SkipAdam(torch.optim.Adam):
    """Fused Adam that can skip the update of any param group (one SAE) from a flag on the device: no host sync.

    Before a step, `skip[group name]` may hold a 0-dim float tensor (1.0: skip). It reaches the fused kernel as
    that group's `found_inf`, the mechanism GradScaler uses for inf gradients: a skipped group's parameters,
    moments and step count stay exactly as they were. A `found_inf` set from outside (a GradScaler's) is added
    to every group's flag. The flags are cleared after each step.
    """

    def __init__(self, params, **kwargs):
        super().__init__(params, fused=True, **kwargs)
        self.skip: dict[str, torch.Tensor] = {}

    def step(self, closure=None):
        loss = None
        if closure is not None:  # the closure (Lightning's: forward, backward, clipping) sets the flags
            with torch.enable_grad():
                loss = closure()
        groups, outer = self.param_groups, self.__dict__.pop("found_inf", None)
        try:
            for group in groups:  # one group at a time, so that each gets its own flag
                flag = self.skip.get(group.get("name"))
                if outer is not None:
                    flag = outer if flag is None else (flag + outer.to(flag)).clamp(max=1)
                self.param_groups = [group]
                self.found_inf = flag
                super().step()
        finally:
            self.param_groups = groups
            self.__dict__.pop("found_inf", None)
            if outer is not None:
                self.found_inf = outer
            self.skip.clear()
        return loss
