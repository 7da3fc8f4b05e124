"""BatchTopK SAE (Bussmann et al. 2024): the top k·N latents across a batch of N tokens while training.

The per-token count varies (k on average). An EMA of the smallest kept activation is the threshold
used outside training, where the SAE is a JumpReLU with that threshold for every latent (and is
exported as one).
"""

import torch

from saelightning.saes.base import SAE
from saelightning.saes.sparse import dense_to_ragged, sparse_decode_ragged
from saelightning.saes.topk import TopKSAE


class BatchTopKSAE(TopKSAE):
    sparse_forward = False  # ragged latents: forward returns them dense
    def __init__(self, config):
        super().__init__(config)
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float32))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.long))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_acts(x)
        if self.training:
            flat = pre.reshape(-1, pre.shape[-1])
            return self._batch_topk(flat).reshape(pre.shape)
        return self._threshold_acts(pre)

    def encode_sparse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return SAE.encode_sparse(self, x)

    def _threshold_acts(self, pre: torch.Tensor) -> torch.Tensor:
        # same as SAELens's JumpReLU: ReLU(z) · 1[z > θ]
        return pre.relu() * (pre > self.threshold.to(pre.dtype))

    def _batch_topk(self, pre: torch.Tensor) -> torch.Tensor:
        """Dense latents [N, d_sae] keeping the k·N largest ReLU(pre) of the whole batch."""
        acts = pre.relu()
        flat = acts.flatten()
        n_keep = min(self.config.k * pre.shape[0], flat.numel())
        values, idx = flat.topk(n_keep, sorted=False)
        return torch.zeros_like(flat).scatter(0, idx, values).reshape(acts.shape)

    @torch.no_grad()
    def _update_threshold(self, latents: torch.Tensor) -> None:
        positive = latents[latents > 0]
        if positive.numel() == 0:
            return
        batch_min = positive.min().float()
        if int(self.threshold_updates) == 0:
            self.threshold.copy_(batch_min)
        else:
            decay = self.config.threshold_ema
            self.threshold.mul_(decay).add_((1 - decay) * batch_min)
        self.threshold_updates += 1

    def sparse_latents(self, x: torch.Tensor):
        """(pre-activations, dense latents, ragged (values, columns, offsets)) for a training or eval batch."""
        pre = self.pre_acts(x)
        latents = self._batch_topk(pre) if self.training else self._threshold_acts(pre)
        if self.training:
            self._update_threshold(latents.detach())
        return pre, latents, dense_to_ragged(latents)

    def forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None):
        pre, latents, (values, columns, offsets) = self.sparse_latents(x)
        x_hat = sparse_decode_ragged(values, columns, offsets, self.W_dec) + self.b_dec
        losses = self.reconstruction_stats(x, x_hat)
        losses["auxk_loss"] = self.auxk_loss(x, x_hat, pre, dead_mask)
        losses["loss"] = losses["fvu"] + self.config.aux_coefficient * losses["auxk_loss"]
        return x_hat, latents, losses

    # exported as JumpReLU: every latent's threshold is the learned batch threshold
    def saelens_architecture(self) -> str:
        return "jumprelu"

    def saelens_cfg(self) -> dict:
        return {}

    def saelens_tensors(self) -> dict[str, torch.Tensor]:
        tensors = super().saelens_tensors()
        tensors["threshold"] = self.threshold.to(self.W_enc.dtype).expand(self.config.d_sae).clone()
        return tensors

    def saelens_shapes(self) -> dict[str, tuple[int, ...]]:
        return {**super().saelens_shapes(), "threshold": (self.config.d_sae,)}
