"""ReLU ("standard") SAE, Anthropic's April 2024 recipe.

loss = E||x - x̂||² + λ·warm-up · E Σ_i f_i ||W_dec,i||. Weighting the L1 by the decoder norm makes the
penalty invariant to trading encoder scale against decoder scale, so the decoder is left free
(rows start at norm 0.1, W_enc = W_decᵀ) instead of being projected to unit norm.
"""

import torch

from saelightning.saes.base import SAE


class ReLUSAE(SAE):
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self._gathered_dense(self._local_encode(x))

    def _local_encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.pre_acts(x).relu()

    def forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None, target: torch.Tensor | None = None):
        x = self._check_input(x)
        y = self.target_of(x, target)
        latents = self.pre_acts(x).relu()  # latent-sharded: this rank's latents only
        x_hat = self.output(latents, x)
        losses = self.reconstruction_stats(y, x_hat)
        losses["l1_loss"] = self._latent_sum((latents * self.decoder_norms()).sum(-1)).mean()
        losses["loss"] = losses["sse"] + self.sparsity_penalty(losses)
        return x_hat, latents, losses

    def sparsity_penalty(self, losses: dict) -> torch.Tensor:
        return self.config.l1_coefficient * self.penalty_scale() * losses["l1_loss"]

    def saelens_architecture(self) -> str:
        return "standard"
