"""Metrics against known features (a synthetic source), with the definitions of SAELens's synthetic evals.

  mcc            Hungarian matching of the SAE's decoder rows to the true feature directions on |cos|: the mean
                 |cos| of the min(d_sae, N) matched pairs (1 = every latent is a true feature).
  uniqueness     distinct best-matched features / d_sae; a latent's best match is the true feature of largest
                 |cos| with its decoder row.
  classification each latent as a detector of its best-matched feature: TP, FP, FN, TN over samples (the latent
                 fires: it is non-zero; the feature fires: its true activation is > 0); per latent precision
                 TP / (TP + FP), recall TP / (TP + FN), F1 and accuracy, 0 where undefined, and their means over
                 all latents (a dead latent counts 0).
  shrinkage      mean ||x̂|| / ||x|| over samples with ||x|| > 1e-6.
  dead_latents   latents that never fired on the samples.
  true_l0        mean number of active true features per sample.

Everything but mcc and uniqueness (which depend on the decoder alone) is a sum over samples in float64
(torchmetrics states), so batches and DDP ranks pool exactly. `GroundTruthMetrics` bundles them for one SAE.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchmetrics import Metric

F64 = torch.float64
TABLE_KEYS = ("mcc", "uniqueness", "classification/f1_score", "classification/precision", "classification/recall",
              "shrinkage", "dead_latents", "true_l0")


def abs_cosines(decoder: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """|cos| between every decoder row [d_sae, d] and every true feature [N, d] -> [d_sae, N] (norms clamped at
    1e-8, as SAELens does: a zero row has |cos| 0 with everything)."""
    a = decoder.detach().float()
    b = features.detach().to(a.device).float()
    a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-8)
    b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-8)
    return (a @ b.T).abs()


def best_matches(decoder: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Each latent's best-matched true feature (largest |cos|) [d_sae]."""
    return abs_cosines(decoder, features).argmax(dim=1)


def mcc(decoder: torch.Tensor, features: torch.Tensor) -> float:
    """Mean |cos| of the optimal one-to-one matching of decoder rows to true features (Hungarian, scipy)."""
    cos = abs_cosines(decoder, features).double().cpu()
    rows, cols = linear_sum_assignment((1 - cos).numpy())
    return float(cos[torch.as_tensor(rows), torch.as_tensor(cols)].mean())


def uniqueness(decoder: torch.Tensor, features: torch.Tensor) -> float:
    """Distinct best-matched true features per latent (1: no two latents track the same feature)."""
    if decoder.shape[0] == 0:
        return 0.0
    return len(best_matches(decoder, features).unique()) / decoder.shape[0]


def _fires(latents) -> torch.Tensor:
    return latents != 0


class Classification(Metric):
    """Each latent as a binary detector of its best-matched true feature: TP / FP / FN / TN counts per latent.

    `matches` (the best match of each latent, [d_sae]) must be set before update(); it is the same on every rank.
    compute() gives the means over latents; per_latent() the per-latent precision, recall, F1 and accuracy."""

    full_state_update = False

    def __init__(self, d_sae: int, **kwargs):
        super().__init__(**kwargs)
        for name in ("tp", "fp", "fn", "tn"):
            self.add_state(name, torch.zeros(d_sae, dtype=F64), dist_reduce_fx="sum")
        self.matches: torch.Tensor | None = None

    def update(self, latents: torch.Tensor, truth: torch.Tensor) -> None:
        """latents [n, d_sae] (dense); truth: the true feature activations [n, N]."""
        if self.matches is None:
            raise RuntimeError("Classification.matches must be set (best_matches of the decoder) before update")
        sae = _fires(latents.detach())
        true = truth.detach()[:, self.matches.to(truth.device)] > 0
        self.tp += (sae & true).sum(0).to(F64)
        self.fp += (sae & ~true).sum(0).to(F64)
        self.fn += (~sae & true).sum(0).to(F64)
        self.tn += (~sae & ~true).sum(0).to(F64)

    def per_latent(self) -> dict[str, torch.Tensor]:
        tp, fp, fn, tn = self.tp, self.fp, self.fn, self.tn
        zero = torch.zeros_like(tp)
        precision = torch.where(tp + fp > 0, tp / (tp + fp).clamp_min(1), zero)
        recall = torch.where(tp + fn > 0, tp / (tp + fn).clamp_min(1), zero)
        f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp_min(1e-300), zero)
        accuracy = (tp + tn) / (tp + fp + fn + tn).clamp_min(1e-8)
        return {"precision": precision, "recall": recall, "f1_score": f1, "accuracy": accuracy}

    def compute(self) -> dict[str, torch.Tensor]:
        return {k: v.mean() for k, v in self.per_latent().items()}


class Shrinkage(Metric):
    """Mean ||x̂|| / ||x|| over the samples whose ||x|| > min_norm (SAELens's definition; 0 with none)."""

    full_state_update = False

    def __init__(self, min_norm: float = 1e-6, **kwargs):
        super().__init__(**kwargs)
        self.min_norm = min_norm
        self.add_state("total", torch.zeros((), dtype=F64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=F64), dist_reduce_fx="sum")

    def update(self, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        norm = x.detach().to(F64).norm(dim=-1)
        keep = norm > self.min_norm
        self.total += torch.where(keep, x_hat.detach().to(F64).norm(dim=-1) / norm.clamp_min(self.min_norm), 0).sum()
        self.count += keep.sum()

    def compute(self) -> torch.Tensor:
        return self.total / self.count if self.count > 0 else torch.zeros((), dtype=F64)


class TrueL0(Metric):
    """Mean number of active true features per sample."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("total", torch.zeros((), dtype=F64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=F64), dist_reduce_fx="sum")

    def update(self, truth: torch.Tensor) -> None:
        self.total += (truth.detach() > 0).sum().to(F64)
        self.count += truth.shape[0]

    def compute(self) -> torch.Tensor:
        return self.total / self.count.clamp_min(1)


class GroundTruthMetrics(nn.Module):
    """Every ground-truth metric of one SAE. set_dictionary(decoder, features) before the first update (the
    decoder of the SAE being evaluated, fixed during an evaluation); compute() returns SAELens's names."""

    def __init__(self, d_sae: int):
        super().__init__()
        self.classification, self.shrinkage, self.true_l0 = Classification(d_sae), Shrinkage(), TrueL0()
        self._dictionary: tuple[torch.Tensor, torch.Tensor] | None = None

    def set_dictionary(self, decoder: torch.Tensor, features: torch.Tensor) -> None:
        self._dictionary = (decoder.detach(), features.detach())
        self.classification.matches = best_matches(decoder, features)

    def update(self, latents: torch.Tensor, x: torch.Tensor, x_hat: torch.Tensor, truth: torch.Tensor) -> None:
        self.classification.update(latents, truth)
        self.shrinkage.update(x, x_hat)
        self.true_l0.update(truth)

    @property
    def seen(self) -> bool:
        return bool(self.true_l0.update_count)

    def compute(self) -> dict[str, torch.Tensor]:
        decoder, features = self._dictionary
        fired = self.classification.tp + self.classification.fp
        out = {"mcc": torch.tensor(mcc(decoder, features), dtype=F64),
               "uniqueness": torch.tensor(uniqueness(decoder, features), dtype=F64)}
        out.update({f"classification/{k}": v for k, v in self.classification.compute().items()})
        out.update(shrinkage=self.shrinkage.compute(), dead_latents=(fired == 0).sum().to(F64),
                   true_l0=self.true_l0.compute())
        return out

    def per_latent(self) -> dict[str, list]:
        """Per latent: its best-matched feature, |cos| with it, precision, recall, F1 (for a report)."""
        decoder, features = self._dictionary
        cos = abs_cosines(decoder, features)
        values, matches = cos.max(dim=1)
        out = {"best_match": matches.tolist(), "best_match_cos": values.tolist()}
        out.update({k: v.tolist() for k, v in self.classification.per_latent().items()})
        return out

    def reset(self) -> None:
        for metric in (self.classification, self.shrinkage, self.true_l0):
            metric.reset()
