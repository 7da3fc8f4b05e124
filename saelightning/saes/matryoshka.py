"""Matryoshka SAE (Bussmann et al. 2025): BatchTopK latents, and every nested prefix of the dictionary
(latents 0..m-1 for m in the configured prefixes) must reconstruct x on its own; the loss is the sum.

The early latents then carry general features and later ones refine them, instead of the wide
dictionary splitting or absorbing features.
"""

import torch
import torch.nn.functional as F

from saelightning.saes.batchtopk import BatchTopKSAE


class MatryoshkaSAE(BatchTopKSAE):
    def __init__(self, config, shard=None):
        super().__init__(config, shard)
        # on the SAE's device from the start: a per-step torch.tensor(list, device="cuda") is a host copy
        self.register_buffer("prefix_ends", torch.tensor(config.prefixes), persistent=False)

    def forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None, sparse: bool = False,
                target: torch.Tensor | None = None):
        x = self._check_input(x)
        y = self.target_of(x, target)
        pre, latents, _ = self.sparse_latents(x)
        x_hats = self.prefix_reconstructions(latents)
        if self.config.skip_connection:  # every prefix's prediction has the skip term
            x_hats = x_hats + self.with_skip(torch.zeros_like(x_hats[:, 0]), x).unsqueeze(1)
        err = (x_hats - y.to(x_hats.dtype).unsqueeze(1)).float().pow(2).sum((0, 2))
        total_variance = (y - y.mean(0)).float().pow(2).sum().clamp_min(1e-12)
        x_hat = x_hats[:, -1]  # the last prefix is the whole dictionary
        losses = self.reconstruction_stats(y, x_hat)
        losses["prefix_loss"] = (err / total_variance).sum()
        losses["auxk_loss"] = self._aux(x, y, x_hat, pre, dead_mask)
        losses["loss"] = losses["prefix_loss"] + self.sparsity_penalty(losses)
        return x_hat, (latents if sparse else latents.dense()), losses

    def prefix_reconstructions(self, latents) -> torch.Tensor:
        """x̂ of every prefix, [N, n_prefixes, d_in], from one sparse decode.

        Each latent belongs to one band [prefix_{j-1}, prefix_j); one embedding_bag with a bag per
        (token, band) decodes every entry once, and a cumulative sum over bands gives the prefixes.
        The entries are sorted by token and, within a token, by latent (batch_topk_ragged and
        nonzero both give that order), so (token, band) keys are already sorted.
        """
        n, n_bands = latents.shape[0], len(self.prefix_ends)
        key = latents.rows * n_bands + torch.searchsorted(self.prefix_ends, latents.indices, right=True)
        offsets = torch.searchsorted(key, torch.arange(n * n_bands, device=key.device, dtype=key.dtype))
        bands = F.embedding_bag(self._local_columns(latents.indices), self.W_dec, offsets,
                                per_sample_weights=latents.values.to(self.W_dec.dtype), mode="sum")
        # latent-sharded: each rank's bands from its own latents, summed over the shards (one all-reduce)
        return self._latent_sum(bands).view(n, n_bands, -1).cumsum(1) + self.b_dec
