"""Model diffing with a crosscoder: what each latent is in each model.

Per latent i, between two of the crosscoder's models A and B (decoder norms in the normalised units of
training, where the models' activations have the same E‖x‖², so the norms compare):
- Δ_i = ‖d_i^B‖ / (‖d_i^A‖ + ‖d_i^B‖), the relative decoder norm (Anthropic 2024): 0 = only in A, 1 = only in B;
- cos_i, the cosine between d_i^A and d_i^B;
- a class: "A-only" (Δ ≤ exclusive), "B-only" (Δ ≥ 1 − exclusive), "shared" (|Δ − ½| ≤ shared_halfwidth), else
  "other". The defaults, 0.1 and 0.1, cut the histogram where Anthropic's crosscoder paper sees its three
  clusters (around 0, ½ and 1) and are the thresholds Minder et al. 2025 use.

Latent Scaling (Minder et al. 2025, arXiv 2504.02922) asks whether a "B-only" latent is really absent from A:
for latent j with direction d = d_j^B, the β that best scales f_j(x) d onto a target y in model m,
    β_j^m = argmin_β Σ_x ‖β f_j(x) d − y^m(x)‖² = Σ_x f_j(x) ⟨d, y^m(x)⟩ / (‖d‖² Σ_x f_j(x)²)   (closed form),
for two targets: the reconstruction y^r,m = x̂^m, and the error y^ε,m = x^m − x̂^m + f_j d_j^m (what the other
latents leave, the latent's own contribution put back). ν^r = β^r,A / β^r,B and ν^ε = β^ε,A / β^ε,B: ν^ε near 1
flags Complete Shrinkage (the concept is in A's activations, but A's decoder norm was shrunk to zero, so it
sits in A's error), ν^r near 1 flags Latent Decoupling (other latents reconstruct it in A). A latent with both
ratios near 0 is B-only in fact. The sums are float64 and pool over batches and ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saelightning.errors import SAELightningError

CLASS_NAMES = ("A-only", "B-only", "shared", "other")


@dataclass
class DiffThresholds:
    """Where the classes of the relative decoder norm Δ are cut.

    Args:
        exclusive: Δ ≤ this is A-only, Δ ≥ 1 − this is B-only [0.1].
        shared_halfwidth: |Δ − 0.5| ≤ this is shared [0.1].
    """

    exclusive: float = 0.1
    shared_halfwidth: float = 0.1

    def __post_init__(self):
        if not 0 <= self.exclusive < 0.5 or not 0 <= self.shared_halfwidth < 0.5:
            raise SAELightningError(f"diff thresholds exclusive={self.exclusive}, shared_halfwidth="
                                    f"{self.shared_halfwidth} must each be in [0, 0.5)")
        if 0.5 - self.shared_halfwidth <= self.exclusive:
            raise SAELightningError(f"the shared band 0.5 ± {self.shared_halfwidth} overlaps the exclusive bands "
                                    f"[0, {self.exclusive}] and [{1 - self.exclusive}, 1]; narrow one of them")


def _pair(crosscoder, a: int, b: int) -> tuple[int, int]:
    M = crosscoder.n_models
    if not (0 <= a < M and 0 <= b < M and a != b):
        raise SAELightningError(f"models {a} and {b} are not two of this crosscoder's {M} models (0..{M - 1})")
    return a, b


def relative_norms(crosscoder, a: int = 0, b: int = 1) -> torch.Tensor:
    """Δ_i = ‖d_i^B‖ / (‖d_i^A‖ + ‖d_i^B‖) [d_sae], float32; 0.5 for a latent with no decoder in either."""
    a, b = _pair(crosscoder, a, b)
    norms = crosscoder.model_decoder_norms()
    total = norms[a] + norms[b]
    return torch.where(total > 0, norms[b] / total.clamp_min(1e-30), torch.full_like(total, 0.5))


def decoder_cosines(crosscoder, a: int = 0, b: int = 1) -> torch.Tensor:
    """cos(d_i^A, d_i^B) [d_sae] (0 where either vector is zero)."""
    a, b = _pair(crosscoder, a, b)
    blocks = crosscoder.W_dec.detach().float().view(crosscoder.config.d_sae, crosscoder.n_models, crosscoder.d_model)
    return torch.nn.functional.cosine_similarity(blocks[:, a], blocks[:, b], dim=-1, eps=1e-30)


def classify(delta: torch.Tensor, thresholds: DiffThresholds | None = None) -> torch.Tensor:
    """Class index per latent (CLASS_NAMES: 0 A-only, 1 B-only, 2 shared, 3 other), int64 [d_sae]."""
    t = thresholds or DiffThresholds()
    out = torch.full(delta.shape, 3, dtype=torch.long, device=delta.device)
    out[(delta - 0.5).abs() <= t.shared_halfwidth] = 2
    out[delta <= t.exclusive] = 0
    out[delta >= 1 - t.exclusive] = 1
    return out


def class_counts(classes: torch.Tensor) -> dict[str, int]:
    counts = torch.bincount(classes.flatten().cpu(), minlength=len(CLASS_NAMES))
    return {name: int(n) for name, n in zip(CLASS_NAMES, counts)}


def diff_summary(crosscoder, thresholds: DiffThresholds | None = None, names: tuple[str, str] | None = None,
                 a: int = 0, b: int = 1) -> dict:
    """Class counts (named after the models when given), Δ quartiles and the thresholds, for metadata and logs."""
    t = thresholds or DiffThresholds()
    delta = relative_norms(crosscoder, a, b)
    counts = class_counts(classify(delta, t))
    if names:
        counts = {class_name(k, names): v for k, v in counts.items()}
    q = torch.quantile(delta.double().cpu(), torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    return {"models": list(names) if names else [a, b], "class_counts": counts,
            "delta_quartiles": [float(v) for v in q], "thresholds": {"exclusive": t.exclusive,
                                                                   "shared_halfwidth": t.shared_halfwidth}}


def class_name(name: str, names: tuple[str, str]) -> str:
    """ "A-only" -> "base-only" with the models' names."""
    return {"A-only": f"{names[0]}-only", "B-only": f"{names[1]}-only"}.get(name, name)


class LatentScaling:
    """Accumulates the closed-form β of every latent in every model, for the reconstruction and the error.

    update() takes a batch of the models' raw activations x [N, M·d] (as evaluate.encode_decode takes them), the
    latents f [N, d_sae] and the raw reconstruction x̂ [N, M·d]. Direction of latent j: d_j^B. All is read in the
    normalised units (model m's raw activations times its scale s_m), so the β of the models compare.
    """

    def __init__(self, crosscoder, a: int = 0, b: int = 1):
        self.a, self.b = _pair(crosscoder, a, b)
        self.cc = crosscoder
        F, M = crosscoder.config.d_sae, crosscoder.n_models
        self.numerator = {k: torch.zeros(M, F, dtype=torch.float64) for k in ("reconstruction", "error")}
        self.f_squared = torch.zeros(F, dtype=torch.float64)

    def _blocks(self, t: torch.Tensor) -> torch.Tensor:
        """Raw [N, M·d] -> normalised [N, M, d] (float64): times s_m, which is the training input scale of a
        crosscoder in training and the folded one of an exported crosscoder (the other is 1)."""
        cc = self.cc
        scale = (cc.folded_scale * cc.input_scale).double().to(t.device)
        return t.double().view(t.shape[0], cc.n_models, cc.d_model) * scale[None, :, None]

    @torch.no_grad()
    def update(self, x: torch.Tensor, f: torch.Tensor, x_hat: torch.Tensor) -> None:
        cc = self.cc
        blocks = cc.W_dec.detach().double().view(cc.config.d_sae, cc.n_models, cc.d_model)
        decoder = blocks * cc.folded_scale.double().to(blocks.device)[None, :, None]  # normalised [F, M, d]
        d = decoder[:, self.b]  # the direction of each latent: its decoder in model B [F, d]
        f = f.double()
        h, h_hat = self._blocks(x), self._blocks(x_hat)
        for m in range(cc.n_models):
            along_rec = h_hat[:, m] @ d.T  # ⟨d_j, x̂^m⟩ [N, F]
            along_err = (h[:, m] - h_hat[:, m]) @ d.T + f * (decoder[:, m] * d).sum(-1)  # ⟨d_j, x − x̂ + f_j d_j^m⟩
            self.numerator["reconstruction"][m] += (f * along_rec).sum(0).cpu()
            self.numerator["error"][m] += (f * along_err).sum(0).cpu()
        self.f_squared += f.pow(2).sum(0).cpu()

    def compute(self) -> dict[str, torch.Tensor]:
        """beta_{reconstruction,error} [M, d_sae] and their ratios nu = β^A / β^B [d_sae] (NaN for a latent that
        never fired or whose β^B is 0)."""
        cc = self.cc
        blocks = cc.W_dec.detach().double().cpu().view(cc.config.d_sae, cc.n_models, cc.d_model)
        d_sq = (blocks[:, self.b] * cc.folded_scale.double().cpu()[self.b]).pow(2).sum(-1)
        den = d_sq * self.f_squared
        out = {}
        for kind, num in self.numerator.items():
            beta = torch.where(den > 0, num / den.clamp_min(1e-300), torch.full_like(num, float("nan")))
            out[f"beta_{kind}"] = beta
            ref = beta[self.b]
            out[f"nu_{kind}"] = torch.where(ref != 0, beta[self.a] / ref, torch.full_like(ref, float("nan")))
        return out
