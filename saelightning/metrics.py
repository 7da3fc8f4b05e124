"""torchmetrics Metric classes for SAE training and validation (names and definitions as SAELens / SAEBench).

Every state is a sum (or a max) accumulated in float64, so a metric pooled over ranks under DDP
equals the metric computed by one process on the union of their tokens. All take `x` (the SAE's
input), `x_hat` (its reconstruction) and/or `latents` ([N, d_sae] dense, or the SparseLatents of a
k-sparse SAE: the same sums from its N·k values, without a dense pass), one row per token.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

from saelightning.saes.sparse import SparseLatents

F64 = torch.float64


def firing_counts(latents) -> torch.Tensor:
    """Tokens in which each latent is non-zero ([d_sae], float64), from dense or sparse latents."""
    if isinstance(latents, SparseLatents):
        return latents.firing_counts()
    return (latents != 0).sum(0).to(F64)  # int64 sum: far faster on CPU than a float64 reduction


def _values(latents) -> torch.Tensor:
    return latents.values if isinstance(latents, SparseLatents) else latents


def _scalar() -> torch.Tensor:
    return torch.zeros((), dtype=F64)


class _MeanPerToken(Metric):
    """The mean over tokens of a per-token statistic of the latents (a sum state and a token count)."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("total", _scalar(), dist_reduce_fx="sum")
        self.add_state("count", _scalar(), dist_reduce_fx="sum")

    def per_token_sum(self, values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def update(self, latents: torch.Tensor) -> None:
        self.total += self.per_token_sum(_values(latents).detach()).to(F64)
        self.count += latents.shape[0]

    def compute(self) -> torch.Tensor:
        return self.total / self.count


class L0(_MeanPerToken):
    """Mean number of non-zero latents per token."""

    def per_token_sum(self, values: torch.Tensor) -> torch.Tensor:
        return (values != 0).sum()


class L1(_MeanPerToken):
    """Mean sum of |latents| per token."""

    def per_token_sum(self, values: torch.Tensor) -> torch.Tensor:
        return values.to(F64).abs().sum()


class ReconstructionMetrics(Metric):
    """explained_variance, mse, cossim, l2_ratio and relative_reconstruction_bias from one set of sums.

    explained_variance = 1 - E||x - x̂||² / (E||x||² - ||E x||²): pooled over tokens, summed over
    dimensions (SAELens; = 1 - FVU of sparsify). mse = E||x - x̂||² / d_in. cossim and l2_ratio are
    means over tokens; relative_reconstruction_bias = E||x̂||² / E<x, x̂>.
    """

    full_state_update = False

    def __init__(self, d_in: int, **kwargs):
        super().__init__(**kwargs)
        self.d_in = d_in
        for name in ("sse", "sum_sq", "sum_sq_hat", "sum_dot", "sum_cos", "sum_ratio", "count"):
            self.add_state(name, _scalar(), dist_reduce_fx="sum")
        self.add_state("sum_x", torch.zeros(d_in, dtype=F64), dist_reduce_fx="sum")

    def update(self, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        x, x_hat = x.detach().to(F64), x_hat.detach().to(F64)
        norm_x, norm_hat = x.norm(dim=-1), x_hat.norm(dim=-1)
        dot = (x * x_hat).sum(-1)
        self.sse += (x - x_hat).pow(2).sum()
        self.sum_sq += norm_x.pow(2).sum()
        self.sum_sq_hat += norm_hat.pow(2).sum()
        self.sum_dot += dot.sum()
        # eps keeps an all-zero row (rare; e.g. a dead MLP unit) from turning a mean into NaN
        self.sum_cos += (dot / (norm_x * norm_hat).clamp_min(1e-12)).sum()
        self.sum_ratio += (norm_hat / norm_x.clamp_min(1e-12)).sum()
        self.sum_x += x.sum(0)
        self.count += x.shape[0]

    def compute(self) -> dict[str, torch.Tensor]:
        n = self.count
        variance = self.sum_sq / n - (self.sum_x / n).pow(2).sum()
        return {
            "explained_variance": 1 - (self.sse / n) / variance,
            "mse": self.sse / (n * self.d_in),
            "cossim": self.sum_cos / n,
            "l2_ratio": self.sum_ratio / n,
            "relative_reconstruction_bias": self.sum_sq_hat / self.sum_dot,
        }


class ExplainedVariance(ReconstructionMetrics):
    """explained_variance alone (a scalar Metric, so it can be passed to LightningModule.log)."""

    def compute(self) -> torch.Tensor:
        return super().compute()["explained_variance"]


class MSE(ReconstructionMetrics):
    """mse alone: E||x - x̂||² / d_in."""

    def compute(self) -> torch.Tensor:
        return super().compute()["mse"]


class FeatureDensity(Metric):
    """Firing frequency per latent over the tokens seen since the last reset ([d_sae])."""

    full_state_update = False

    def __init__(self, d_sae: int, **kwargs):
        super().__init__(**kwargs)
        self.d_sae = d_sae
        self.add_state("fired", torch.zeros(d_sae, dtype=F64), dist_reduce_fx="sum")
        self.add_state("tokens", _scalar(), dist_reduce_fx="sum")

    def update(self, latents: torch.Tensor) -> None:
        self.update_counts(firing_counts(latents), latents.shape[0])

    def update_counts(self, counts: torch.Tensor, tokens: int) -> None:
        """Add per-latent firing counts of `tokens` tokens (when the caller has them already)."""
        self.fired += counts
        self.tokens += tokens

    def compute(self) -> torch.Tensor:
        return self.fired / self.tokens.clamp_min(1)


class DeadFraction(FeatureDensity):
    """Fraction of latents that did not fire once in the window of tokens since the last reset."""

    def compute(self) -> torch.Tensor:
        return (self.fired == 0).to(F64).mean()


def log10_density(density: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """SAELens's sparsity.safetensors value: log10 of the firing frequency (eps keeps dead ones finite)."""
    return torch.log10(density.to(torch.float32) + eps)
