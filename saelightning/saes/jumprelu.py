"""JumpReLU SAE (Rajamanoharan et al. 2024): f = z · 1[z > θ] with a learned threshold θ per latent.

The step has no useful derivative in θ, so θ learns through a straight-through estimator: in the
backward pass 1[z > θ] is treated as having ∂/∂θ = -(1/ε)·K((z - θ)/ε), K the rectangle kernel
1[|u| < 1/2] of bandwidth ε (Gemma Scope). The penalty is λ·L0 (the step count), or Anthropic's 2025
variant λ Σ tanh(c · f_i · ||W_dec,i||), optionally with its pre-act loss for dead latents.
"""

import torch
from torch import nn

from saelightning.saes.base import SAE


def _kernel(z, threshold, bandwidth):
    return ((z - threshold).abs() < bandwidth / 2).to(z.dtype) / bandwidth


def _sum_to(grad, like):
    return grad.reshape(-1, grad.shape[-1]).sum(0).to(like.dtype)


class StepSTE(torch.autograd.Function):
    """1[z > θ]; gradient to θ only: -(1/ε) K((z - θ)/ε)."""

    @staticmethod
    def forward(ctx, z, threshold, bandwidth):
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return (z > threshold).to(z.dtype)

    @staticmethod
    def backward(ctx, grad):
        z, threshold = ctx.saved_tensors
        grad_threshold = -_kernel(z, threshold, ctx.bandwidth) * grad
        return None, _sum_to(grad_threshold, threshold), None


class JumpReLUSTE(torch.autograd.Function):
    """z · 1[z > θ]; ∂/∂z = 1[z > θ], ∂/∂θ = -(θ/ε) K((z - θ)/ε)."""

    @staticmethod
    def forward(ctx, z, threshold, bandwidth):
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return z * (z > threshold).to(z.dtype)

    @staticmethod
    def backward(ctx, grad):
        z, threshold = ctx.saved_tensors
        grad_z = grad * (z > threshold).to(grad.dtype)
        grad_threshold = -threshold * _kernel(z, threshold, ctx.bandwidth) * grad
        return grad_z, _sum_to(grad_threshold, threshold), None


class JumpReLUSAE(SAE):
    def __init__(self, config, shard=None):
        super().__init__(config, shard)
        self.threshold = nn.Parameter(torch.full((self.d_latents,), config.threshold_init, dtype=self.W_enc.dtype))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self._gathered_dense(self._local_encode(x))

    def _local_encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_acts(x)
        # ReLU(z) · 1[z > θ], exactly SAELens's JumpReLU (equal to z · 1[z > θ] for θ ≥ 0)
        return pre.relu() * (pre > self.threshold).to(pre.dtype)

    def forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None, target: torch.Tensor | None = None):
        x = self._check_input(x)
        y = self.target_of(x, target)
        pre = self.pre_acts(x)
        bandwidth = self.config.bandwidth
        latents = JumpReLUSTE.apply(pre, self.threshold, bandwidth)
        x_hat = self.output(latents, x)
        losses = self.reconstruction_stats(y, x_hat)
        norms = self.decoder_norms()
        if self.config.sparsity_penalty == "l0":
            losses["l0_loss"] = self._latent_sum(StepSTE.apply(pre, self.threshold, bandwidth).sum(-1)).mean()
        else:
            losses["tanh_loss"] = self._latent_sum(torch.tanh(self.config.tanh_scale * latents * norms).sum(-1)).mean()
        if self.config.preact_coefficient > 0:
            # pushes latents that never clear θ back up towards it (Anthropic, January 2025)
            losses["preact_loss"] = self._latent_sum(((self.threshold - pre).relu() * norms).sum(-1)).mean()
        losses["loss"] = losses["sse"] + self.sparsity_penalty(losses)
        return x_hat, latents, losses

    def sparsity_penalty(self, losses: dict) -> torch.Tensor:
        lam = self.config.l0_coefficient * self.penalty_scale()
        penalty = lam * losses["l0_loss" if self.config.sparsity_penalty == "l0" else "tanh_loss"]
        if self.config.preact_coefficient > 0:
            penalty = penalty + self.config.preact_coefficient * losses["preact_loss"]
        return penalty

    @torch.no_grad()
    def after_optimizer_step(self, skipped: torch.Tensor | None = None) -> None:
        super().after_optimizer_step(skipped)
        self.threshold.clamp_(min=0.0)  # a negative θ would let ReLU alone decide

    def _reset_latent_biases(self, indices: torch.Tensor) -> None:
        super()._reset_latent_biases(indices)
        self.threshold[indices] = self.config.threshold_init

    def saelens_architecture(self) -> str:
        return "jumprelu"

    def saelens_tensors(self) -> dict[str, torch.Tensor]:
        return {**super().saelens_tensors(), "threshold": self.threshold}

    def saelens_shapes(self) -> dict[str, tuple[int, ...]]:
        return {**super().saelens_shapes(), "threshold": (self.config.d_sae,)}
