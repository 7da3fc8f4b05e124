"""Crosscoders: one latent space over the activations of M models at one hook point (model diffing).

After Anthropic's "Sparse Crosscoders for Cross-Layer Features and Model Diffing" (2024):
    f = σ(Σ_m x^m W_enc^m + b_enc),   x̂^m = f W_dec^m + b_dec^m.
Stacking the M models' activations side by side, x = [x^1 … x^M] of width M·d, makes this an SAE on x with
W_enc [M·d, d_sae] (block m = W_enc^m) and W_dec [d_sae, M·d] (block m of row i = d_i^m, latent i's decoder
vector in model m). So the crosscoder is an SAE here: the same sparse path, metrics, resampling and trainer.
What differs:
- the decoder is free (not unit-norm): the ratio of ‖d_i^A‖ to ‖d_i^B‖ is what model diffing reads;
- sparsity is weighted by each latent's summed decoder norms c_i = Σ_m ‖d_i^m‖: the L1 variant's penalty
  is λ Σ_i f_i c_i (Anthropic), and the BatchTopK variant (Minder et al. 2025, arXiv 2504.02922, with AuxK;
  the default, since the L1 penalty manufactures model-exclusive latents) keeps the k·N largest f_i c_i of a
  batch, and at inference the latents with f_i c_i above the EMA threshold θ (science-of-finetuning's rule);
- each model's activations are normalised on their own (input_scale [M]: E‖s_m x^m‖² = d); the export folds
  the scales into the weights and records them in `folded_scale`, so decoder norms are always read in the
  normalised units (‖d_i^m‖ · folded_scale_m), where the models are comparable.
x may be given as [N, M·d] or as [N, M, d]; latents are [N, d_sae]; x̂ is [N, M·d].
"""

import copy

import torch

from saelightning.errors import SAELightningError
from saelightning.saes.base import SAE
from saelightning.saes.batchtopk import BatchTopKSAE
from saelightning.saes.relu import ReLUSAE
from saelightning.saes.sparse import SparseLatents, batch_topk_ragged, gather_encode_ragged


class _CrossCoderParts:
    """What both crosscoders add to their SAE class: the per-model blocks, scales and decoder norms."""

    sharded_architecture = False  # the per-model blocks and code norms have no latent-sharded form yet

    config: object
    W_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor

    def _init_blocks(self) -> None:
        """Each model's block of a decoder row at norm init_norm, W_enc = W_decᵀ; scales per model."""
        M, d = self.n_models, self.d_model
        with torch.no_grad():
            blocks = self.W_dec.view(self.config.d_sae, M, d)
            blocks.div_(blocks.norm(dim=-1, keepdim=True).clamp_min(1e-12)).mul_(self.config.init_norm)
            self.W_enc.copy_(self.W_dec.T)
        self.register_buffer("input_scale", torch.ones(M, dtype=torch.float32))
        self.register_buffer("folded_scale", torch.ones(M, dtype=torch.float32))

    @property
    def n_models(self) -> int:
        return self.config.n_models

    @property
    def d_model(self) -> int:
        """The width of one model's activation (the crosscoder reads M of them)."""
        return self.config.d_in // self.config.n_models

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() >= 3 and tuple(x.shape[-2:]) == (self.n_models, self.d_model):
            x = x.reshape(*x.shape[:-2], self.config.d_in)
        return SAE._check_input(self, x)

    def forward(self, x: torch.Tensor, *args, **kwargs):
        return super().forward(self._check_input(x), *args, **kwargs)

    def input_scales(self) -> torch.Tensor:
        """The training scale of each input channel [M·d] (s_m on model m's block)."""
        return self.input_scale.repeat_interleave(self.d_model)

    def per_model(self, x: torch.Tensor) -> torch.Tensor:
        """[..., M·d] -> [..., M, d]."""
        return x.reshape(*x.shape[:-1], self.n_models, self.d_model)

    def model_decoder_norms(self) -> torch.Tensor:
        """‖d_i^m‖ in the normalised units the models are compared in: [M, d_sae]."""
        blocks = self.W_dec.detach().float().view(self.config.d_sae, self.n_models, self.d_model)
        return (blocks.norm(dim=-1) * self.folded_scale.to(blocks.device)).T

    def code_norms(self) -> torch.Tensor:
        """c_i = Σ_m ‖d_i^m‖ (normalised units) [d_sae]: the weight of latent i in the sparsity rule."""
        return self.model_decoder_norms().sum(0).to(self.W_enc.dtype)

    def decoder_norms(self) -> torch.Tensor:
        return self.code_norms()

    @torch.no_grad()
    def fold_input_scale(self):
        """A copy on raw activations: block m of W_enc times s_m, of W_dec and b_dec divided by s_m."""
        folded = copy.deepcopy(self)
        s = self.input_scales().to(self.W_enc.dtype)
        folded.W_enc.mul_(s[:, None])
        folded.W_dec.div_(s[None, :])
        folded.b_dec.div_(s)
        folded.folded_scale.mul_(self.input_scale)
        folded.input_scale.fill_(1.0)
        return folded

    def encoder_bias_folded(self) -> torch.Tensor:
        """b_enc of an encoder that does not subtract b_dec (science-of-finetuning's, the export's)."""
        if self.config.apply_b_dec_to_input:
            return self.b_enc - self.b_dec @ self.W_enc
        return self.b_enc

    # ---- the on-disk layout: science-of-finetuning's CrossCoder state dict names and shapes ----------------
    def saelens_architecture(self) -> str:
        return self.config.architecture

    def saelens_cfg(self) -> dict:
        return {"n_models": self.n_models, "activation_dim": self.d_model, "dict_size": self.config.d_sae,
                "num_layers": self.n_models}

    def saelens_tensors(self) -> dict[str, torch.Tensor]:
        M, d, F = self.n_models, self.d_model, self.config.d_sae
        return {"encoder.weight": self.W_enc.reshape(M, d, F), "encoder.bias": self.encoder_bias_folded(),
                "decoder.weight": self.W_dec.reshape(F, M, d).permute(1, 0, 2),
                "decoder.bias": self.b_dec.reshape(M, d), "folded_scale": self.folded_scale.to(self.W_enc.dtype)}

    def saelens_shapes(self) -> dict[str, tuple[int, ...]]:
        M, d, F = self.n_models, self.d_model, self.config.d_sae
        return {"encoder.weight": (M, d, F), "encoder.bias": (F,), "decoder.weight": (M, F, d),
                "decoder.bias": (M, d), "folded_scale": (M,)}

    @torch.no_grad()
    def load_saelens_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        M, d, F = self.n_models, self.d_model, self.config.d_sae
        self.W_enc.copy_(tensors["encoder.weight"].reshape(M * d, F))
        self.b_enc.copy_(tensors["encoder.bias"])
        self.W_dec.copy_(tensors["decoder.weight"].permute(1, 0, 2).reshape(F, M * d))
        self.b_dec.copy_(tensors["decoder.bias"].reshape(M * d))
        self.folded_scale.copy_(tensors["folded_scale"])


class CrossCoder(_CrossCoderParts, BatchTopKSAE):
    """The BatchTopK crosscoder (architecture "crosscoder"): the k·N largest f_i c_i of a batch while training,
    f_i c_i > θ at inference, AuxK for dead latents; the sparse training path of BatchTopK (no dense latents)."""

    def __init__(self, config, shard=None):
        super().__init__(config, shard)  # a shard is refused: sharded_architecture is False
        self._init_blocks()

    def _threshold_acts(self, pre: torch.Tensor) -> torch.Tensor:
        f = pre.relu()
        return f * (f * self.code_norms().to(pre.dtype) > self.threshold.to(pre.dtype))

    def _batch_topk(self, pre: torch.Tensor) -> torch.Tensor:
        rows, columns, _ = batch_topk_ragged(pre.relu() * self.code_norms().to(pre.dtype), self.config.k)
        return torch.zeros_like(pre).index_put((rows, columns), pre[rows, columns].relu())

    def sparse_latents(self, x: torch.Tensor) -> tuple[torch.Tensor, SparseLatents, torch.Tensor]:
        x = self._check_input(x)
        x_c = x - self.b_dec if self.config.apply_b_dec_to_input else x
        with torch.no_grad():
            pre = torch.addmm(self.b_enc, x_c, self.W_enc)
            norms = self.code_norms().to(pre.dtype)
            if self.training:
                rows, columns, offsets = batch_topk_ragged(pre.relu() * norms, self.config.k)
            else:
                rows, columns = (self._threshold_acts(pre) != 0).nonzero(as_tuple=True)
                offsets = torch.searchsorted(rows, torch.arange(pre.shape[0], device=pre.device, dtype=rows.dtype))
        values = gather_encode_ragged(pre, x_c, self.W_enc, self.b_enc, rows, columns, offsets,
                                      self.encoder_shift).relu()
        if self.training:  # θ is in the units of the ranking, f_i c_i
            self._update_threshold(values.detach() * norms[columns])
        return pre, SparseLatents(values, columns, self.config.d_sae, rows, pre.shape[0]), offsets

    def saelens_tensors(self) -> dict[str, torch.Tensor]:
        tensors = super().saelens_tensors()
        tensors["threshold"] = self.threshold.to(self.W_enc.dtype).clone()
        return tensors

    def saelens_shapes(self) -> dict[str, tuple[int, ...]]:
        return {**super().saelens_shapes(), "threshold": ()}

    def saelens_cfg(self) -> dict:
        return {**super().saelens_cfg(), "k": self.config.k}

    @torch.no_grad()
    def load_saelens_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_saelens_tensors(tensors)
        self.threshold.copy_(tensors["threshold"])
        self.threshold_updates.fill_(1)


class L1CrossCoder(_CrossCoderParts, ReLUSAE):
    """The L1 crosscoder (architecture "crosscoder_l1", Anthropic 2024): ReLU latents, loss
    Σ_m ‖x^m − x̂^m‖² + λ Σ_i f_i Σ_m ‖d_i^m‖ with λ warmed up linearly."""

    def __init__(self, config, shard=None):
        super().__init__(config, shard)  # a shard is refused: sharded_architecture is False
        self._init_blocks()

    def decoder_norms(self) -> torch.Tensor:
        # the penalty needs its gradient to the decoder: the norms of the blocks as they are now
        blocks = self.W_dec.view(self.config.d_sae, self.n_models, self.d_model)
        return blocks.norm(dim=-1).sum(-1)


class OneModel(torch.nn.Module):
    """A crosscoder seen from one of its models, shaped as that model's SAE (for InterpretableModel, generate).

    Decoding and steering go through model m's decoder block: latent i writes f_i d_i^m (+ b_dec^m), so an
    InterpretableModel steer adds Δf · d_i^m to the model's own activation, its reconstruction error kept.
    model: its index in the crosscoder, or its name in cfg.json's metadata.models.
    partners: the crosscoder's other models (nanochat GPTs, or load_nanochat's Nanochat, whose tokenizer
    InterpretableModel then checks against its own), in the crosscoder's order without model m.
    Which encode is in use (`exact`):
    - with partners (exact): InterpretableModel runs every partner, unsteered, on the same token ids at each
      forward (each with its own KV cache in generation) and captures its activation at the hook; the latents
      are the crosscoder's own encode of every model's activation, f = σ(Σ_m W_enc^m x^m + b_enc) (encode_all);
    - without (approximate): encode reads x^m alone, the other models' blocks reading zero (the part of each
      latent this model drives; exact only for a latent that reads this model alone).
    """

    def __init__(self, cc, model: int | str, partners=None):
        super().__init__()
        names = [m.get("name") for m in (getattr(cc, "metadata", None) or {}).get("models") or []]
        if isinstance(model, str):
            if model not in names:
                raise SAELightningError(f"the crosscoder has no model named {model!r}; its models are {names} "
                                        f"(or give an index below {cc.n_models})")
            model = names.index(model)
        if not 0 <= model < cc.n_models:
            raise SAELightningError(f"model index {model} is out of range: the crosscoder reads {cc.n_models} models")
        self.cc, self.model_index, self.config = cc, model, cc.config
        self.input_scale = float(cc.input_scale[model])
        self._block = slice(model * cc.d_model, (model + 1) * cc.d_model)
        self.partners, self.partner_tokenizers = self._partners(cc, model, names, partners)
        self.metadata = {**(getattr(cc, "metadata", None) or {}),
                         "crosscoder_model": names[model] if model < len(names) else model,
                         "crosscoder_tracking": "exact" if self.exact else "this model's block alone"}

    @staticmethod
    def _partners(cc, model: int, names: list, partners) -> tuple[list, list]:
        """The partner GPTs in order and their tokenizers (None where a bare GPT was given), width-checked."""
        if partners is None:
            return [], []
        partners = list(partners)
        others = [i for i in range(cc.n_models) if i != model]
        if len(partners) != len(others):
            raise SAELightningError(f"partners gives {len(partners)} model(s) but the crosscoder reads "
                                    f"{cc.n_models}: give the {len(others)} other one(s), in its order without "
                                    f"model {model}")
        gpts, tokenizers = [], []
        for i, p in zip(others, partners):
            gpt, tokenizer = (p.model, p.tokenizer) if hasattr(p, "model") and hasattr(p, "tokenizer") else (p, None)
            name = names[i] if i < len(names) else f"model {i}"
            if gpt.d_model != cc.d_model:
                raise SAELightningError(f"partner {name!r} has width {gpt.d_model}, the crosscoder reads "
                                        f"{cc.d_model}; give the models it was trained on")
            gpts.append(gpt.eval())
            tokenizers.append(tokenizer)
        return gpts, tokenizers

    @property
    def exact(self) -> bool:
        """True when the latents are the crosscoder's own (partners given), False for this block alone."""
        return bool(self.partners)

    @property
    def W_enc(self) -> torch.Tensor:
        return self.cc.W_enc[self._block]

    @property
    def W_dec(self) -> torch.Tensor:
        return self.cc.W_dec[:, self._block]

    @property
    def b_dec(self) -> torch.Tensor:
        return self.cc.b_dec[self._block]

    def stack(self, x: torch.Tensor, partner_x: list[torch.Tensor]) -> torch.Tensor:
        """Model m's activation x [..., d] and the partners' (in their order) -> the crosscoder's input [..., M·d]."""
        blocks = [p.to(x) for p in partner_x]
        blocks.insert(self.model_index, x)
        return torch.cat(blocks, dim=-1)

    def encode_all(self, x: torch.Tensor) -> torch.Tensor:
        """The crosscoder's latents of every model's raw activation [N, M·d] (its training scales applied)."""
        scales = self.cc.input_scales().to(x)
        return self.cc.encode(x if bool((scales == 1).all()) else x * scales)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The latents of model m's activation alone (already times input_scale), the other blocks zero."""
        full = x.new_zeros(*x.shape[:-1], self.config.d_in)
        full[..., self._block] = x
        return self.cc.encode(full)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.to(self.W_dec.dtype) @ self.W_dec + self.b_dec
