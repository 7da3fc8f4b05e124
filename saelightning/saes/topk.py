"""TopK SAE (Gao et al. 2024): ReLU then the k largest latents, unit-norm decoder, AuxK for dead latents.

With `normalize_decoder: false` the decoder rows keep their own norms and the k largest are taken of each
latent's contribution to x̂, pre_i ||W_dec,i|| (SAELens's rescale_acts_by_decoder_norm, its TopK default); the
export folds the norms into the encoder, so the exported SAE is an ordinary unit-norm TopK SAE.
"""

import torch

from saelightning.saes.base import SAE
from saelightning.saes.latent import global_topk
from saelightning.saes.sparse import SparseLatents, gather_encode, sparse_decode, topk_sparse


class TopKSAE(SAE):
    reconstruction_loss = "fvu"

    def sparsity_penalty(self, losses: dict) -> torch.Tensor:
        return self.config.aux_coefficient * losses["auxk_loss"]  # no penalty: AuxK for dead latents

    def grad_clip_scale(self) -> float:
        # the loss is the normalised MSE (fvu), about E||x - x̂||² / d_in at E||x||² = d_in: without this a
        # clip of 1 never bites, where in SAELens's units it bites on most steps (and helps: BENCHMARKS.md)
        return 1.0 / self.config.d_in

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        values, indices = self.encode_sparse(x)
        return torch.zeros(*values.shape[:-1], self.config.d_sae, dtype=values.dtype,
                           device=values.device).scatter(-1, indices, values)

    def encode_sparse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pre = self.pre_acts(x)
        if self.shard is not None:  # the global top k from every shard's candidates (global indices)
            lead = pre.shape[:-1]
            pre = pre.reshape(-1, pre.shape[-1])
            values, _, indices = global_topk(self._ranking(pre), pre, self.config.k, self.shard)
            return values.relu().reshape(*lead, -1), indices.reshape(*lead, -1)
        if self.config.unit_norm_decoder:
            return topk_sparse(pre, self.config.k)
        indices = self._ranking(pre).topk(self.config.k, dim=-1, sorted=False).indices
        return pre.gather(-1, indices).relu(), indices

    def _ranking(self, pre: torch.Tensor) -> torch.Tensor:
        """What the k largest are taken of: the pre-activations; with a decoder whose rows are not unit-norm, each
        latent's contribution to x̂, pre_i ||W_dec,i|| (SAELens's rescale_acts_by_decoder_norm)."""
        if self.config.unit_norm_decoder:
            return pre
        return pre * self.W_dec.detach().norm(dim=1).to(pre.dtype)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        if self.shard is None:
            return SAE.reconstruct(self, x)
        return self.decode_sparse(*self.encode_sparse(x))

    def encode_decode_sparse(self, x: torch.Tensor):
        """Evaluation of a latent-sharded TopK SAE: the global winners (the same on every rank, [N, k]) and x̂."""
        values, indices = self.encode_sparse(x)
        return SparseLatents(values, indices, self.config.d_sae), self.decode_sparse(values, indices)

    def decode_sparse(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """x̂ from (values, indices) [..., m] by gathering the m active decoder rows per token."""
        lead = values.shape[:-1]
        values, indices = values.reshape(-1, values.shape[-1]), indices.reshape(-1, indices.shape[-1])
        if self.shard is not None:  # global indices: this rank decodes its own, the shards' parts are summed
            indices, mine = self.shard.own(indices)
            values = values * mine
        flat = self._latent_sum(sparse_decode(values, indices, self.W_dec))
        return flat.reshape(*lead, -1) + self.b_dec

    sparse_forward = True  # forward(..., sparse=True) returns SparseLatents (the trainer never needs dense ones)

    def _training_pre_acts(self, x: torch.Tensor, target: torch.Tensor | None = None):
        """(x checked, the target (x itself for an SAE), the encoder's input x_c, the pre-activations, what the top k
        is taken of), the products without autograd: the dense product is only read at the selected entries, and
        gather_encode gives their gradient."""
        x = self._check_input(x)
        y = self.target_of(x, target)
        x_c = x - self.b_dec if self.config.apply_b_dec_to_input else x
        with torch.no_grad():
            pre = torch.addmm(self.b_enc, x_c, self.W_enc)
            return x, y, x_c, pre, self._ranking(pre)

    def forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None, sparse: bool = False,
                target: torch.Tensor | None = None):
        if self.shard is not None:  # never a transcoder: those refuse sharding
            return self._forward_sharded(x, dead_mask, sparse)
        x, y, x_c, pre, ranking = self._training_pre_acts(x, target)
        k = self.config.k
        with torch.no_grad():
            indices = ranking.topk(k, dim=-1, sorted=False).indices
            aux_indices, aux_weight = self._aux_indices(ranking, dead_mask)
        chosen = indices if aux_indices is None else torch.cat([indices, aux_indices], 1)
        # one sparse backward for both
        gathered = gather_encode(pre, x_c, self.W_enc, self.b_enc, chosen, self.encoder_shift).relu()
        values = gathered[:, :k]
        x_hat = self.with_skip(sparse_decode(values, indices, self.W_dec) + self.b_dec, x)
        losses = self.reconstruction_stats(y, x_hat)
        if aux_indices is None:
            losses["auxk_loss"] = x_hat.new_zeros(()).float()
        else:
            aux = self._auxk_from(y, x_hat, gathered[:, k:] * aux_weight, aux_indices)
            losses["auxk_loss"] = aux * aux_weight.amax() if torch.is_tensor(aux_weight) else aux  # 0 when none is dead
        losses["loss"] = losses["fvu"] + self.sparsity_penalty(losses)
        latents = SparseLatents(values, indices, self.config.d_sae)
        return x_hat, (latents if sparse else latents.dense()), losses

    def _forward_sharded(self, x: torch.Tensor, dead_mask: torch.Tensor | None, sparse: bool):
        """forward on this rank's latents: the global top k from the gathered local candidates, this rank's winners
        encoded (sparse backward) and decoded, the partial reconstructions summed. Returns this rank's own entries
        with global indices (full_latents gathers them all)."""
        x, _, x_c, pre, ranking = self._training_pre_acts(x)
        k = self.config.k
        with torch.no_grad():
            _, _, winners = global_topk(ranking, pre, k, self.shard)
            chosen, mine = self.shard.own(winners)
            aux_indices, aux_weight, any_dead = self._aux_sharded(ranking, dead_mask)
        weight = mine.to(pre.dtype)
        if aux_indices is not None:
            chosen = torch.cat([chosen, aux_indices], 1)
            weight = torch.cat([weight, aux_weight], 1)
        gathered = gather_encode(pre, x_c, self.W_enc, self.b_enc, chosen, self.encoder_shift).relu() * weight
        values = gathered[:, :k]
        x_hat = self._latent_sum(sparse_decode(values, chosen[:, :k], self.W_dec)) + self.b_dec
        losses = self.reconstruction_stats(x, x_hat)
        if aux_indices is None:
            losses["auxk_loss"] = x_hat.new_zeros(()).float()
        else:
            e_hat = self._latent_sum(sparse_decode(gathered[:, k:], aux_indices, self.W_dec))
            losses["auxk_loss"] = self._auxk_loss(x, x_hat, e_hat) * any_dead
        losses["loss"] = losses["fvu"] + self.sparsity_penalty(losses)
        latents = SparseLatents(values.detach(), winners, self.config.d_sae)
        return x_hat, (latents if sparse else self.full_latents(latents).dense()), losses

    @torch.no_grad()
    def _aux_sharded(self, ranking: torch.Tensor, dead_mask: torch.Tensor | None):
        """The global top k_aux dead latents per row from every shard's local top k_aux dead ones: (this rank's
        local indices, a 0/1 weight: 1 where the latent is dead and this rank's, 1 if any latent is dead), or
        Nones without a mask."""
        if dead_mask is None:
            return None, None, None
        dead = dead_mask.to(ranking.device)
        k_aux = min(self.config.k_aux_resolved, self.config.d_sae)
        masked = ranking.masked_fill(~dead, float("-inf"))
        # live candidates are -inf and weighted 0: no host sync for the dead count, as on CUDA unsharded
        _, scores, winners = global_topk(masked, masked, k_aux, self.shard)
        local, mine = self.shard.own(winners)
        dead_picks = torch.isfinite(scores)
        return local, (mine & dead_picks).to(ranking.dtype), dead_picks.any().to(ranking.dtype)

    def _auxk_loss(self, x, x_hat, e_hat):
        e = (x - x_hat).detach()
        return (e_hat - e).float().pow(2).sum() / (e - e.mean(0)).float().pow(2).sum().clamp_min(1e-12)

    def _aux_indices(self, pre: torch.Tensor, dead_mask: torch.Tensor | None, sync_free: bool | None = None):
        """Top k_aux dead latents per row (None when none is dead) and a 0/1 weight on their values."""
        if dead_mask is None:
            return None, None
        dead_mask = dead_mask.to(pre.device)
        if pre.is_cuda if sync_free is None else sync_free:
            # no host sync: a fixed k_aux over masked pre-activations, live picks weighted 0
            k_aux = min(self.config.k_aux_resolved, pre.shape[1])
            picked = pre.masked_fill(~dead_mask, float("-inf")).topk(k_aux, dim=-1, sorted=False).indices
            return picked, dead_mask[picked].to(pre.dtype)
        dead = dead_mask.nonzero().squeeze(1)  # on CPU the sync is free and the dead columns are usually few
        if dead.numel() == 0:
            return None, None
        k_aux = min(self.config.k_aux_resolved, dead.numel())
        picked = pre.index_select(1, dead).topk(k_aux, dim=-1, sorted=False).indices
        return dead[picked], 1.0

    def _auxk_from(self, x, x_hat, values, indices):
        """AuxK: reconstruct the residual e = x - x̂ (x the target: a transcoder's y) from the top k_aux dead latents,
        ||e - ê||² / ||e - mean e||².

        The gradient reaches only the dead latents' encoder and decoder (e is detached), which pulls
        them towards directions the live latents miss.
        """
        return self._auxk_loss(x, x_hat, sparse_decode(values, indices, self.W_dec))

    def saelens_architecture(self) -> str:
        return "topk"

    def saelens_tensors(self) -> dict[str, torch.Tensor]:
        tensors = super().saelens_tensors()
        if self.config.unit_norm_decoder or self.config.architecture != "topk":
            return tensors
        # ranking by pre_i ||d_i|| with rows d_i is ranking by pre'_i with W_enc' = W_enc ||d||, b_enc' = b_enc ||d||
        # and unit rows d_i / ||d_i||: the same latents, the same x̂, and SAELens's TopK reads it as it is
        norms = self.W_dec.norm(dim=1).clamp_min(1e-12)
        return {**tensors, "W_enc": self.W_enc * norms, "b_enc": self.b_enc * norms,
                "W_dec": self.W_dec / norms[:, None]}

    def saelens_cfg(self) -> dict:
        return {"k": self.config.k, "rescale_acts_by_decoder_norm": False}
