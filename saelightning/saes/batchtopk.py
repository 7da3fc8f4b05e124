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
from saelightning.saes.latent import all_gather_cat
from saelightning.saes.sparse import (
    SparseLatents,
    _top_flat_indices,
    batch_topk_ragged,
    gather_encode,
    gather_encode_ragged,
    sparse_decode,
    sparse_decode_ragged,
)
from saelightning.saes.topk import TopKSAE


class BatchTopKSAE(TopKSAE):
    step_buffers = ("threshold", "threshold_updates")

    def __init__(self, config, shard=None):
        super().__init__(config, shard)
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float32))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.long))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.shard is None:
            pre = self.pre_acts(x)
            return self._batch_topk(pre.reshape(-1, pre.shape[-1])).reshape(pre.shape)
        return self._gathered_dense(self._local_encode(x))

    def _local_encode(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's latents: in training the batch-wide top k·N (over every shard), else the JumpReLU form."""
        pre = self.pre_acts(x)
        if not self.training:
            return self._threshold_acts(pre)
        flat = pre.reshape(-1, pre.shape[-1])
        rows, columns, _, _ = self._batch_topk_sharded(flat.detach())
        local = torch.zeros_like(flat).index_put((rows, columns), flat[rows, columns].relu())
        return local.reshape(pre.shape)

    def encode_sparse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return SAE.encode_sparse(self, x)

    def encode_decode_sparse(self, x: torch.Tensor):
        return SAE.encode_decode_sparse(self, x)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return SAE.reconstruct(self, x)

    def _threshold_acts(self, pre: torch.Tensor) -> torch.Tensor:
        # same as SAELens's JumpReLU: ReLU(z) · 1[z > θ]
        return pre.relu() * (pre > self.threshold.to(pre.dtype))

    def _batch_topk(self, pre: torch.Tensor) -> torch.Tensor:
        """Dense latents [N, d_sae] keeping the k·N largest ReLU(pre) of the whole batch."""
        rows, columns, _ = batch_topk_ragged(pre, self.config.k)
        return torch.zeros_like(pre).index_put((rows, columns), pre[rows, columns].relu())

    @torch.no_grad()
    def _batch_topk_sharded(self, pre: torch.Tensor):
        """The batch's top k·N over all shards, as this rank's (rows, local columns, offsets), and the k·N kept
        values after ReLU (the same on every rank, for the threshold). The k·N-th largest of the gathered local
        top k·N is the global cut: every global winner is among its shard's top k·N. Communication: n·k·N values."""
        n, d_local = pre.shape
        n_keep = min(self.config.k * n, n * self.config.d_sae)
        flat_indices = _top_flat_indices(pre, min(n_keep, pre.numel()))
        values = pre.reshape(-1)[flat_indices]
        kept = all_gather_cat(values, self.shard, 0).topk(n_keep, sorted=False).values
        flat = flat_indices[values >= kept.min()]  # sorted: rows in order, columns in order within a row
        rows, columns = flat // d_local, flat % d_local
        offsets = torch.searchsorted(rows, torch.arange(n, device=pre.device, dtype=rows.dtype))
        return rows, columns, offsets, kept.relu()

    def _local_columns(self, indices: torch.Tensor) -> torch.Tensor:
        return indices if self.shard is None else indices - self.shard.offset

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
            if self.training and self.shard is not None:
                rows, columns, offsets, kept = self._batch_topk_sharded(pre)
            elif self.training:
                rows, columns, offsets = batch_topk_ragged(pre, self.config.k)
            else:  # evaluation: the JumpReLU latents (a host sync for their count is fine here)
                rows, columns = (self._threshold_acts(pre) != 0).nonzero(as_tuple=True)
                offsets = torch.searchsorted(rows, torch.arange(pre.shape[0], device=pre.device, dtype=rows.dtype))
        values = gather_encode_ragged(pre, x_c, self.W_enc, self.b_enc, rows, columns, offsets,
                                      self.encoder_shift).relu()
        if self.training:
            self._update_threshold(values.detach() if self.shard is None else kept)
        indices = columns if self.shard is None else columns + self.shard.offset  # global latent indices
        return pre, SparseLatents(values, indices, self.config.d_sae, rows, pre.shape[0]), offsets

    def _aux(self, x, y, x_hat, pre, dead_mask) -> torch.Tensor:
        """AuxK from the top k_aux dead latents per token (TopK's sparse path); 0 when none is dead."""
        if self.shard is not None:
            aux_indices, aux_weight, any_dead = self._aux_sharded(pre.detach(), dead_mask)
            if aux_indices is None:
                return x_hat.new_zeros(()).float()
            values = gather_encode(pre, self.centered(x), self.W_enc, self.b_enc, aux_indices,
                                   self.encoder_shift).relu() * aux_weight
            e_hat = self._latent_sum(sparse_decode(values, aux_indices, self.W_dec))
            return self._auxk_loss(y, x_hat, e_hat) * any_dead
        aux_indices, aux_weight = self._aux_indices(pre, dead_mask)
        if aux_indices is None:
            return x_hat.new_zeros(()).float()
        values = gather_encode(pre, self.centered(x), self.W_enc, self.b_enc, aux_indices,
                               self.encoder_shift).relu() * aux_weight
        aux = self._auxk_from(y, x_hat, values, aux_indices)
        return aux * aux_weight.amax() if torch.is_tensor(aux_weight) else aux

    def forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None, sparse: bool = False,
                target: torch.Tensor | None = None):
        x = self._check_input(x)
        y = self.target_of(x, target)
        pre, latents, offsets = self.sparse_latents(x)
        partial = sparse_decode_ragged(latents.values, self._local_columns(latents.indices), offsets, self.W_dec)
        x_hat = self.with_skip(self._latent_sum(partial) + self.b_dec, x)
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
        tensors["threshold"] = self.threshold.to(self.W_enc.dtype).expand(self.W_enc.shape[1]).clone()
        return tensors

    def saelens_shapes(self) -> dict[str, tuple[int, ...]]:
        return {**super().saelens_shapes(), "threshold": (self.config.d_sae,)}
