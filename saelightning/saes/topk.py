"""TopK SAE (Gao et al. 2024): ReLU then the k largest latents, unit-norm decoder, AuxK for dead latents."""

import torch

from saelightning.saes.base import SAE
from saelightning.saes.sparse import sparse_decode, to_dense, topk_sparse


class TopKSAE(SAE):
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        values, indices = self.encode_sparse(x)
        return torch.zeros(*values.shape[:-1], self.config.d_sae, dtype=values.dtype, device=values.device).scatter(-1, indices, values)

    def encode_sparse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return topk_sparse(self.pre_acts(x), self.config.k)

    def decode_sparse(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """x̂ from (values, indices) [..., m] by gathering the m active decoder rows per token."""
        lead = values.shape[:-1]
        flat = sparse_decode(values.reshape(-1, values.shape[-1]), indices.reshape(-1, indices.shape[-1]), self.W_dec)
        return flat.reshape(*lead, -1) + self.b_dec

    def forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None):
        pre = self.pre_acts(x)
        values, indices = topk_sparse(pre, self.config.k)
        x_hat = sparse_decode(values, indices, self.W_dec) + self.b_dec
        losses = self.reconstruction_stats(x, x_hat)
        losses["auxk_loss"] = self.auxk_loss(x, x_hat, pre, dead_mask)
        losses["loss"] = losses["fvu"] + self.config.aux_coefficient * losses["auxk_loss"]
        return x_hat, to_dense(values, indices, self.config.d_sae), losses

    def auxk_loss(self, x, x_hat, pre, dead_mask):
        """Reconstruct the residual e = x - x̂ from the top k_aux dead latents: ||e - ê||² / ||e - mean e||².

        The gradient reaches only the dead latents' encoder and decoder (e is detached), which pulls
        them towards directions the live latents miss.
        """
        if dead_mask is None or not bool(dead_mask.any()):
            return pre.new_zeros(()).float()
        k_aux = min(self.config.k_aux_resolved, int(dead_mask.sum()))
        masked = pre.masked_fill(~dead_mask.to(pre.device), float("-inf"))
        values, indices = topk_sparse(masked, k_aux)
        e = (x - x_hat).detach()
        e_hat = sparse_decode(values, indices, self.W_dec)
        return (e_hat - e).float().pow(2).sum() / (e - e.mean(0)).float().pow(2).sum().clamp_min(1e-12)

    def saelens_architecture(self) -> str:
        return "topk"

    def saelens_cfg(self) -> dict:
        return {"k": self.config.k, "rescale_acts_by_decoder_norm": False}
