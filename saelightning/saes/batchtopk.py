"""BatchTopK SAE (Bussmann et al. 2024): the top k·N latents across a batch of N tokens while training.

The per-token count varies (k on average). An EMA of the smallest kept activation is the threshold
used outside training, where the SAE is a JumpReLU with that threshold for every latent (and is
exported as one).

The training forward is sparse like TopK's: the encoder product runs once without autograd, the
k·N winners are gathered with a sparse backward (gather_encode_ragged) and decoded from their rows
of W_dec (embedding_bag with per-token offsets); no dense [N, d_sae] latents are built.
"""

import torch

from saelightning.saes.base import SAE
from saelightning.saes.sparse import (
    SparseLatents,
    batch_topk_ragged,
    gather_encode,
    gather_encode_ragged,
    sparse_decode_ragged,
)
from saelightning.saes.topk import TopKSAE


class BatchTopKSAE(TopKSAE):
    step_buffers = ("threshold", "threshold_updates")

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
        rows, columns, _ = batch_topk_ragged(pre, self.config.k)
        return torch.zeros_like(pre).index_put((rows, columns), pre[rows, columns].relu())

    @torch.no_grad()
    def _update_threshold(self, values: torch.Tensor) -> None:
        """EMA of the smallest positive kept activation; no host sync.

        The first batch sets it; the n-th update decays by min(threshold_ema, (1 + n) / (10 + n)) (the
        num_updates warm-up of TensorFlow's ExponentialMovingAverage). The batch minimum falls steeply
        while the SAE is young, and a fixed 0.99 would still carry those first batches hundreds of
        steps later: a short run's exported JumpReLU then keeps far fewer than k latents per token.
        """
        batch_min = torch.where(values > 0, values, torch.inf).min().float()
        seen = torch.isfinite(batch_min)  # a batch with nothing positive leaves the threshold alone
        n = self.threshold_updates.float()
        decay = torch.clamp((1 + n) / (10 + n), max=self.config.threshold_ema)
        ema = torch.where(self.threshold_updates == 0, batch_min, self.threshold * decay + (1 - decay) * batch_min)
        self.threshold.copy_(torch.where(seen, ema, self.threshold))
        self.threshold_updates += seen.long()

    def sparse_latents(self, x: torch.Tensor) -> tuple[torch.Tensor, SparseLatents, torch.Tensor]:
        """(pre-activations, ragged latents, per-token offsets): the batch top k·N while training,
        else the threshold's."""
        x = self._check_input(x)
        x_c = x - self.b_dec if self.config.apply_b_dec_to_input else x
        # the dense product is only read at the selected entries: gather_encode gives the gradient
        with torch.no_grad():
            pre = torch.addmm(self.b_enc, x_c, self.W_enc)
            if self.training:
                rows, columns, offsets = batch_topk_ragged(pre, self.config.k)
            else:  # evaluation: the JumpReLU latents (a host sync for their count is fine here)
                rows, columns = (self._threshold_acts(pre) != 0).nonzero(as_tuple=True)
                offsets = torch.searchsorted(rows, torch.arange(pre.shape[0], device=pre.device, dtype=rows.dtype))
        values = gather_encode_ragged(pre, x_c, self.W_enc, self.b_enc, rows, columns, offsets,
                                      self.encoder_shift).relu()
        if self.training:
            self._update_threshold(values.detach())
        return pre, SparseLatents(values, columns, self.config.d_sae, rows, pre.shape[0]), offsets

    def _aux(self, x, y, x_hat, pre, dead_mask) -> torch.Tensor:
        """AuxK from the top k_aux dead latents per token (TopK's sparse path); 0 when none is dead."""
        aux_indices, aux_weight = self._aux_indices(pre, dead_mask)
        if aux_indices is None:
            return x_hat.new_zeros(()).float()
        values = gather_encode(pre, self.centered(x), self.W_enc, self.b_enc, aux_indices,
                               self.encoder_shift).relu() * aux_weight
        aux = self._auxk_from(y, x_hat, values, aux_indices)
        return aux * aux_weight.amax() if torch.is_tensor(aux_weight) else aux

    def forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None, sparse: bool = False,
                target: torch.Tensor | None = None):
        y = self.target_of(self._check_input(x), target)
        pre, latents, offsets = self.sparse_latents(x)
        x_hat = self.with_skip(sparse_decode_ragged(latents.values, latents.indices, offsets, self.W_dec) + self.b_dec,
                               self._check_input(x))
        losses = self.reconstruction_stats(y, x_hat)
        losses["auxk_loss"] = self._aux(x, y, x_hat, pre, dead_mask)
        losses["loss"] = losses["fvu"] + self.sparsity_penalty(losses)
        return x_hat, (latents if sparse else latents.dense()), losses

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
