"""Matryoshka SAE (Bussmann et al. 2025): BatchTopK latents, and every nested prefix of the dictionary
(latents 0..m-1 for m in the configured prefixes) must reconstruct x on its own; the loss is the sum.

The early latents then carry general features and later ones refine them, instead of the wide
dictionary splitting or absorbing features.
"""

import torch

from saelightning.saes.batchtopk import BatchTopKSAE
from saelightning.saes.sparse import sparse_decode_ragged


class MatryoshkaSAE(BatchTopKSAE):
    def forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None):
        pre, latents, (values, columns, offsets) = self.sparse_latents(x)
        prefix_losses = []
        for size in self.config.prefixes:
            # a prefix decodes with only its latents: the others' values are masked to zero
            prefix_values = values * (columns < size).to(values.dtype)
            x_hat = sparse_decode_ragged(prefix_values, columns, offsets, self.W_dec) + self.b_dec
            prefix_losses.append(self.reconstruction_stats(x, x_hat)["fvu"])
        losses = self.reconstruction_stats(x, x_hat)  # the last prefix is the whole dictionary
        losses["prefix_loss"] = torch.stack(prefix_losses).sum()
        losses["auxk_loss"] = self.auxk_loss(x, x_hat, pre, dead_mask)
        losses["loss"] = losses["prefix_loss"] + self.config.aux_coefficient * losses["auxk_loss"]
        return x_hat, latents, losses
