"""Gated SAE (Rajamanoharan et al. 2024).

π_gate = (x - b_dec) W_gate + b_gate decides which latents fire; the magnitude path shares its
directions, W_mag = exp(r_mag) ⊙ W_gate, so f = 1[π_gate > 0] ⊙ ReLU((x - b_dec) W_mag + b_mag).
The step 1[π_gate > 0] has no gradient, so the gate learns from the L1 on ReLU(π_gate) and from the
auxiliary loss: ReLU(π_gate) must reconstruct x through a stop-gradient copy of the decoder.
W_enc is W_gate (SAELens's name for it).
"""

import torch
from torch import nn

from saelightning.saes.base import SAE


class GatedSAE(SAE):
    has_b_enc = False
    sharded_architecture = False  # its gate and magnitude paths are not split over latent shards

    def __init__(self, config, shard=None):
        super().__init__(config, shard)
        dtype = self.W_enc.dtype
        self.b_gate = nn.Parameter(torch.zeros(config.d_sae, dtype=dtype))
        self.b_mag = nn.Parameter(torch.zeros(config.d_sae, dtype=dtype))
        self.r_mag = nn.Parameter(torch.zeros(config.d_sae, dtype=dtype))

    def paths(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(π_gate, π_mag) pre-activations [N, d_sae]."""
        centered = self.centered(x)
        gate = centered @ self.W_enc + self.b_gate
        mag = centered @ (self.W_enc * self.r_mag.exp()) + self.b_mag
        return gate, mag

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        return self.paths(x)[0]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        gate, mag = self.paths(x)
        return (gate > 0).to(mag.dtype) * mag.relu()

    def forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None, target: torch.Tensor | None = None):
        x = self.target_of(x, target)  # refuses a target: the config has no gated transcoder
        gate, mag = self.paths(x)
        latents = (gate > 0).to(mag.dtype) * mag.relu()
        x_hat = self.decode(latents)
        losses = self.reconstruction_stats(x, x_hat)
        gate_acts = gate.relu()
        losses["l1_loss"] = (gate_acts * self.decoder_norms()).sum(-1).mean()
        x_hat_gate = gate_acts @ self.W_dec.detach() + self.b_dec.detach()  # stop-gradient decoder
        losses["aux_loss"] = (x_hat_gate - x).float().pow(2).sum(-1).mean()
        lam = self.config.l1_coefficient * self.penalty_scale()
        losses["loss"] = losses["sse"] + lam * losses["l1_loss"] + losses["aux_loss"]
        return x_hat, latents, losses

    def _reset_latent_biases(self, indices: torch.Tensor) -> None:
        self.b_gate[indices] = 0.0
        self.b_mag[indices] = 0.0
        self.r_mag[indices] = 0.0

    def saelens_architecture(self) -> str:
        return "gated"

    def saelens_tensors(self) -> dict[str, torch.Tensor]:
        return {"W_enc": self.W_enc, "b_gate": self.b_gate, "b_mag": self.b_mag, "r_mag": self.r_mag,
                "W_dec": self.W_dec, "b_dec": self.b_dec}

    def saelens_shapes(self) -> dict[str, tuple[int, ...]]:
        d_in, d_sae = self.config.d_in, self.config.d_sae
        return {"W_enc": (d_in, d_sae), "b_gate": (d_sae,), "b_mag": (d_sae,), "r_mag": (d_sae,),
                "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
