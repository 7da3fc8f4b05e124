"""The metrics, each defined once as a torchmetrics Metric (names and definitions as SAELens / SAEBench).

Training, validation and `saelightning eval` all compute their figures with these classes, so the same
SAE on the same tokens gets the same numbers from every command. Every state is a sum accumulated in
float64, so a metric pooled over ranks under DDP (or over batches) equals the metric computed by one
process on the union of their tokens. Reconstruction metrics take `x` (the activation, in the model's
raw units) and `x_hat` (its reconstruction); sparsity metrics take `latents` ([N, d_sae] dense, or the
SparseLatents of a k-sparse SAE: the same sums from its N·k values, without a dense pass); SplicedLoss
takes the next-token log-probabilities of the clean, spliced and zero-ablated model. `SAEMetrics`
bundles them for one SAE.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
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
        # a zero activation has no defined ratio; it counts as 0 rather than poisoning the mean
        self.sum_ratio += torch.where(norm_x > 0, norm_hat / norm_x.clamp_min(1e-300), 0.0).sum()
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
            "n_tokens": n.clone(),
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


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return num / den if den != 0 else torch.full_like(num, float("nan"))


class SplicedLoss(Metric):
    """The model's next-token loss with the SAE spliced in, against the clean and the zero-ablated model.

    update() takes log-probabilities [M, V] at the M scored positions and their targets [M]. ce_* are mean
    cross-entropies; kl_div_with_* the mean KL(clean || spliced or ablated); ce_loss_score =
    (CE_ablation - CE_sae) / (CE_ablation - CE_clean) and kl_div_score = 1 - KL_sae / KL_ablation.
    """

    full_state_update = False
    NAMES = ("ce_loss_without_sae", "ce_loss_with_sae", "ce_loss_with_ablation", "ce_loss_score",
             "kl_div_with_sae", "kl_div_with_ablation", "kl_div_score")

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for name in ("ce_clean", "ce_sae", "ce_ablation", "kl_sae", "kl_ablation", "predictions"):
            self.add_state(name, _scalar(), dist_reduce_fx="sum")

    @staticmethod
    def _ce(lp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return -lp.gather(-1, targets.unsqueeze(-1)).to(F64).sum()

    @staticmethod
    def _kl(lp: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        return F.kl_div(lp, clean, log_target=True, reduction="none").sum(-1).to(F64).sum()

    def update(self, clean: torch.Tensor, spliced: torch.Tensor, ablated: torch.Tensor, targets: torch.Tensor) -> None:
        self.ce_clean += self._ce(clean, targets)
        self.ce_sae += self._ce(spliced, targets)
        self.ce_ablation += self._ce(ablated, targets)
        self.kl_sae += self._kl(spliced, clean)
        self.kl_ablation += self._kl(ablated, clean)
        self.predictions += targets.numel()

    def compute(self) -> dict[str, torch.Tensor]:
        n = self.predictions
        clean, sae, ablation = self.ce_clean / n, self.ce_sae / n, self.ce_ablation / n
        kl_sae, kl_ablation = self.kl_sae / n, self.kl_ablation / n
        return {"ce_loss_without_sae": clean, "ce_loss_with_sae": sae, "ce_loss_with_ablation": ablation,
                "ce_loss_score": _ratio(ablation - sae, ablation - clean), "kl_div_with_sae": kl_sae,
                "kl_div_with_ablation": kl_ablation, "kl_div_score": _ratio(kl_ablation - kl_sae, kl_ablation)}


class SAEMetrics(nn.Module):
    """Every metric of one SAE over a stream of tokens: reconstruction, sparsity, density and (spliced=True)
    the spliced CE/KL. compute() returns them by their SAELens / SAEBench names (float64 scalars), plus
    dead_fraction = 1 - frac_alive (latents that never fired on these tokens) and n_tokens, and SAEBench core's
    density figures (density_metrics)."""

    def __init__(self, d_in: int, d_sae: int, spliced: bool = True):
        super().__init__()
        self.rec, self.l0, self.l1 = ReconstructionMetrics(d_in), L0(), L1()
        self.density = FeatureDensity(d_sae)
        self.spliced = SplicedLoss() if spliced else None

    def update(self, x: torch.Tensor, x_hat: torch.Tensor, latents) -> None:
        """One batch of activations x [N, d_in], reconstructions x_hat and latents (dense or sparse)."""
        self.rec.update(x, x_hat)
        self.l0.update(latents)
        self.l1.update(latents)
        self.density.update(latents)

    def compute(self) -> dict[str, torch.Tensor]:
        out = dict(self.rec.compute())
        density = self.density.compute()
        alive = (density > 0).to(F64).mean()
        out.update(l0=self.l0.compute(), l1=self.l1.compute(), frac_alive=alive, dead_fraction=1 - alive)
        out.update(density_metrics(density))
        if self.spliced is not None and self.spliced.update_count:
            out.update(self.spliced.compute())
        return out

    def feature_density(self) -> torch.Tensor:
        """Firing frequency of each latent over the tokens seen (float64 [d_sae])."""
        return self.density.compute()

    def reset(self) -> None:
        for metric in self.children():
            metric.reset()


def density_metrics(density: torch.Tensor) -> dict[str, torch.Tensor]:
    """SAEBench core's high-frequency figures of the firing frequencies [d_sae]: the fraction of latents firing
    on more than 1% / 10% of tokens, and the share of all firings that those latents make
    (normalized_freq_over_*; 0 when nothing fired)."""
    density = density.to(F64)
    total = density.sum()
    out = {}
    for name, cut in (("1_percent", 0.01), ("10_percent", 0.1)):
        over = density > cut
        out[f"freq_over_{name}"] = over.to(F64).mean()
        out[f"normalized_freq_over_{name}"] = _ratio(density[over].sum(), total) if total > 0 else total * 0
    return out


def max_cosine_sim(vectors: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """For each row of vectors [F, D], the largest cosine similarity to any other row (SAEBench's
    calculate_max_cosine_sim); F x block similarities at a time, never F x F. -inf for a single row."""
    unit = F.normalize(vectors.to(torch.float32), dim=1)
    out = torch.empty(unit.shape[0], dtype=unit.dtype, device=unit.device)
    for start in range(0, unit.shape[0], block):
        sims = unit[start:start + block] @ unit.T
        rows = torch.arange(sims.shape[0], device=unit.device)
        sims[rows, rows + start] = float("-inf")  # not itself
        out[start:start + block] = sims.max(dim=1).values
    return out


@torch.no_grad()
def weight_metrics(W_enc: torch.Tensor, W_dec: torch.Tensor) -> dict[str, float]:
    """SAEBench core's weight-based figures of an SAE (W_enc [d_in, d_sae], W_dec [d_sae, d_in]): the mean over
    latents of the largest encoder cosine similarity to another latent, the same for the decoder, and the mean
    cosine between each latent's encoder and decoder vectors (SAEBench keeps that one per latent as
    encoder_decoder_cosine_sim; its mean is ours)."""
    enc, dec = W_enc.T.to(torch.float32), W_dec.to(torch.float32)
    out = {"average_max_encoder_cosine_sim": float(max_cosine_sim(enc).mean()),
           "average_max_decoder_cosine_sim": float(max_cosine_sim(dec).mean())}
    if enc.shape[1] == dec.shape[1]:  # a transcoder between widths has no encoder-decoder cosine
        out["average_encoder_decoder_cosine_sim"] = float(F.cosine_similarity(enc, dec, dim=1).mean())
    return out


def log10_density(density: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """SAELens's sparsity.safetensors value: log10 of the firing frequency (eps keeps dead ones finite)."""
    return torch.log10(density.to(torch.float32) + eps)
