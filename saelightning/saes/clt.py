"""Cross-layer transcoder (CLT; Anthropic, "Circuit Tracing", 2025): the object attribution graphs are built from.

Layer l's encoder reads layer l's MLP input x_l; its latents f_l write to the MLP outputs of layers l..L-1:

    ŷ_j = Σ_{l ≤ j} f_l W_dec^(l→j) + b_dec^(j),        loss = Σ_j recon(y_j, ŷ_j) + Σ_l penalty_l

Each layer's encoder is an ordinary transcoder of the SAE base (topk, batchtopk, relu or jumprelu) whose decoder
writes the concatenation of the L - l outputs it reaches, W_dec^(l) [d_sae, (L - l)·d]: the sparse TopK path, the
decoder-norm constraint (of the whole concatenated row, as Anthropic's penalty weights it) and every penalty are
the architecture's own. recon is the architecture's reconstruction term per output layer (fvu for the TopK family,
E||y - ŷ||² for the L1/L0 recipes), summed over the L layers. The output biases are encoder 0's; the others' stay 0.
AuxK does not apply (a dead latent's residual is not one layer's): dead latents get no auxiliary loss here.

Memory: Σ_l (L - l) = L(L+1)/2 decoder blocks of d_sae x d (README, Transcoders: the d20 sizing).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from saelightning.errors import SAELightningError
from saelightning.saes import build_sae
from saelightning.saes.base import SAEConfig
from saelightning.saes.sparse import SparseLatents

CLT_ARCHITECTURES = ("topk", "batchtopk", "relu", "jumprelu")


class CrossLayerTranscoder(nn.Module):
    """A CLT over n_layers consecutive layers of width config.d_in, config.d_sae latents per layer."""

    def __init__(self, config: SAEConfig, n_layers: int):
        super().__init__()
        if config.architecture not in CLT_ARCHITECTURES:
            raise SAELightningError(f"architecture {config.architecture!r} has no cross-layer transcoder here; use one "
                                    f"of {', '.join(CLT_ARCHITECTURES)}")
        if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
            raise SAELightningError(f"a cross-layer transcoder needs n_layers >= 1, got {n_layers!r}")
        if config.skip_connection:
            raise SAELightningError("skip_connection is not available for a cross-layer transcoder; drop it")
        self.n_layers, self.d, self.config = n_layers, config.d_in, config
        self.metadata: dict = {}  # hook names and the export's metadata, as an SAE's
        self.encoders = nn.ModuleList(
            build_sae(dataclasses.replace(config, d_out=(n_layers - src) * config.d_in, apply_b_dec_to_input=None))
            for src in range(n_layers))
        with torch.no_grad():
            for enc in self.encoders[1:]:
                enc.b_dec.zero_()
        for enc in self.encoders[1:]:
            enc.b_dec.requires_grad_(False)  # one bias per output: encoder 0's (it reaches every layer)
        # the trainer's per-layer scales: s_in,l for x_l and s_out,j for y_j (E||s·a||² = d)
        self.register_buffer("input_scales", torch.ones(n_layers, dtype=torch.float32))
        self.register_buffer("output_scales", torch.ones(n_layers, dtype=torch.float32))

    @property
    def n_latents(self) -> int:
        """Latents over every layer (layer l's are l·d_sae .. (l+1)·d_sae - 1 when side by side)."""
        return self.n_layers * self.config.d_sae

    @property
    def out_width(self) -> int:
        """The width of every output layer side by side."""
        return self.n_layers * self.d

    @property
    def hook_names_in(self) -> list[str]:
        """The MLP input hook each layer reads (metadata hook_names_in, as training sets it; blocks.0.. without)."""
        return self.metadata.get("hook_names_in") or [f"blocks.{i}.hook_mlp_in" for i in range(self.n_layers)]

    @property
    def hook_names_out(self) -> list[str]:
        """The MLP output hook each layer writes (metadata hook_names_out; blocks.0.. without)."""
        return self.metadata.get("hook_names_out") or [f"blocks.{i}.hook_mlp_out" for i in range(self.n_layers)]

    @property
    def step_buffers(self) -> tuple[str, ...]:
        return tuple(f"encoders.{i}.{b}" for i, enc in enumerate(self.encoders) for b in enc.step_buffers)

    def grad_clip_scale(self) -> float:
        return self.encoders[0].grad_clip_scale()

    @property
    def b_dec(self) -> torch.Tensor:
        """The output biases [L, d] (b_dec^(j) for each output layer j)."""
        return self.encoders[0].b_dec.view(self.n_layers, self.d)

    def decoder(self, source: int, target: int) -> torch.Tensor:
        """W_dec^(source→target) [d_sae, d], a view into encoder `source`'s concatenated decoder."""
        if not 0 <= source <= target < self.n_layers:
            raise SAELightningError(f"a CLT latent of layer {source} writes layers {source}..{self.n_layers - 1}, "
                                    f"not {target}")
        start = (target - source) * self.d
        return self.encoders[source].W_dec[:, start:start + self.d]

    def _check(self, name: str, acts) -> list[torch.Tensor]:
        if len(acts) != self.n_layers:
            raise SAELightningError(f"a CLT over {self.n_layers} layers needs {self.n_layers} {name} tensors, "
                                    f"got {len(acts)}")
        return list(acts)

    def encode(self, xs) -> list[torch.Tensor]:
        """Dense latents [N, d_sae] per layer."""
        return [enc.encode(x) for enc, x in zip(self.encoders, self._check("input", xs))]

    def decode(self, latents) -> list[torch.Tensor]:
        """ŷ_j [N, d] for every output layer j from every layer's dense latents."""
        outs = [enc.decode(f) for enc, f in zip(self.encoders, self._check("latent", latents))]
        return self._gather_outputs(outs)

    def _gather_outputs(self, outs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Sum each encoder's concatenated output [N, (L - l)·d] into the output layers it reaches."""
        preds = [None] * self.n_layers
        for src, out in enumerate(outs):
            for j, part in enumerate(out.split(self.d, dim=-1), start=src):
                preds[j] = part if preds[j] is None else preds[j] + part
        return preds

    def contributions(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Layer `layer`'s latents from raw x and what they write to each later output, in raw units (the trainer's
        scales applied and undone): (latents [N, d_sae], [contribution to layers layer..L-1])."""
        enc = self.encoders[layer]
        f = enc.encode(x.to(enc.W_enc.dtype) * self.input_scales[layer].to(enc.W_enc.dtype))
        parts = enc.decode(f).split(self.d, dim=-1)
        return f, [p / self.output_scales[layer + i].to(p.dtype) for i, p in enumerate(parts)]

    @torch.no_grad()
    def layer_transcoder(self, layer: int) -> nn.Module:
        """Layer `layer`'s latents as one ordinary transcoder on raw activations, for the tools that read one
        dictionary at one hook (the dashboards): its encoder with the input scale folded in (the same latents as
        contributions(layer, x)), and as latent i's decoder row the sum of the raw-unit rows it writes into
        layers layer..L-1, Σ_j W_dec^(layer→j)[i] / s_out,j: everything it adds to the residual stream, since
        every MLP output joins it. b_dec is the sum of those layers' output biases."""
        if not 0 <= layer < self.n_layers:
            raise SAELightningError(f"the CLT has layers 0..{self.n_layers - 1}, not {layer}")
        enc = self.encoders[layer]
        view = build_sae(dataclasses.replace(enc.config, d_out=self.d))
        scales = self.output_scales[layer:, None].to(enc.W_dec.dtype)
        state = dict(enc.state_dict(), W_enc=enc.W_enc * self.input_scales[layer].to(enc.W_enc.dtype),
                     W_dec=(enc.W_dec.view(-1, self.n_layers - layer, self.d) / scales).sum(1),
                     b_dec=(self.b_dec[layer:] / scales).sum(0))
        view.load_state_dict(state)
        return view.eval().requires_grad_(False)

    def predict(self, xs) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(latents per layer, ŷ per output layer) from raw inputs, in raw units (what eval compares)."""
        latents, preds = [], [0.0] * self.n_layers
        for layer, x in enumerate(self._check("input", xs)):
            f, parts = self.contributions(layer, x)
            latents.append(f)
            for i, p in enumerate(parts):
                preds[layer + i] = preds[layer + i] + p
        return latents, preds

    def forward(self, xs, ys, sparse: bool = False):
        """(ŷ per layer, latents per layer, losses): losses["loss"] the sum over output layers of the architecture's
        reconstruction term plus every encoder's penalty; "fvu" (pooled over layers) and "fvu/layer{j}" logged."""
        xs, ys = self._check("input", xs), self._check("target", ys)
        outs, latents, penalty = [], [], 0.0
        for src, (enc, x) in enumerate(zip(self.encoders, xs)):
            # the encoder's own forward gives its latents, output and penalty; its target term is not used
            zeros = x.new_zeros(x.shape[0], (self.n_layers - src) * self.d)
            extra = {"sparse": sparse} if enc.sparse_forward else {}
            out, f, losses = enc(x, target=zeros, **extra)
            outs.append(out)
            latents.append(f)
            penalty = penalty + enc.sparsity_penalty(losses)
        preds = self._gather_outputs(outs)
        stats = [self.encoders[0].reconstruction_stats(y.to(p.dtype), p) for y, p in zip(ys, preds)]
        key = self.encoders[0].reconstruction_loss
        total = {"loss": sum(s[key] for s in stats) + penalty}
        variances = [(y - y.mean(0)).float().pow(2).sum().clamp_min(1e-12) for y in ys]
        total["fvu"] = sum(s["fvu"] * v for s, v in zip(stats, variances)) / sum(variances)
        total.update({f"fvu/layer{j}": s["fvu"] for j, s in enumerate(stats)})
        return preds, latents, total

    # ---- the trainer's latent-parallel protocol: a CLT is never sharded -------------------------------------
    shard = None

    def shard_latents(self, shard) -> None:
        raise SAELightningError("a cross-layer transcoder has no latent-sharded form; train it replicated (its "
                                "spec's shard_latents: false)")

    def sharded_names(self) -> list[str]:
        return []

    def shard_firing_counts(self, latents) -> torch.Tensor:
        """Tokens in which each latent (every layer's, side by side) fired, from concat_latents' output."""
        if isinstance(latents, SparseLatents):
            return latents.firing_counts()
        return (latents != 0).sum(0).to(torch.float64)

    def full_latents(self, latents):
        return latents

    def gathered(self) -> "CrossLayerTranscoder":
        return self

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        return nn.utils.clip_grad_norm_([p for p in self.parameters() if p.grad is not None], max_norm)

    # ---- training hooks: each encoder's own ----------------------------------------------------------------
    def set_training_step(self, step: int) -> None:
        for enc in self.encoders:
            enc.set_training_step(step)

    def before_optimizer_step(self) -> None:
        for enc in self.encoders:
            enc.before_optimizer_step()

    def after_optimizer_step(self, skipped: torch.Tensor | None = None) -> None:
        for enc in self.encoders:
            enc.after_optimizer_step(skipped)

    @torch.no_grad()
    def init_from_batch(self, ys) -> None:
        """The output biases start at each layer's mean output (in the trained space)."""
        self.b_dec.copy_(torch.stack([y.reshape(-1, self.d).mean(0) for y in self._check("target", ys)]))

    @torch.no_grad()
    def fold_scales(self) -> "CrossLayerTranscoder":
        """A copy on raw activations: encoder l reads raw x_l, and its block to layer j writes raw y_j."""
        out = type(self)(self.config, self.n_layers)
        out.load_state_dict(self.state_dict())
        for src, enc in enumerate(out.encoders):
            enc.W_enc.mul_(float(self.input_scales[src]))
            for j in range(src, self.n_layers):
                out.decoder(src, j).div_(float(self.output_scales[j]))
        out.b_dec.div_(self.output_scales[:, None])
        out.input_scales.fill_(1.0)
        out.output_scales.fill_(1.0)
        return out

    @staticmethod
    def concat_latents(latents) -> SparseLatents | torch.Tensor:
        """Every layer's latents side by side, [N, L·d_sae], for the metrics that count firings: TopK's padded sparse
        latents stay sparse (indices shifted by each layer's offset), others are made dense."""
        if all(isinstance(f, SparseLatents) and f.rows is None for f in latents):
            d_sae = latents[0].d_sae
            return SparseLatents(torch.cat([f.values for f in latents], dim=1),
                                 torch.cat([f.indices + i * d_sae for i, f in enumerate(latents)], dim=1),
                                 d_sae * len(latents))
        return torch.cat([f.dense() if isinstance(f, SparseLatents) else f for f in latents], dim=-1)
