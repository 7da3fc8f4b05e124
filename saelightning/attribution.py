"""Attribution graphs (Ameisen et al., "Circuit Tracing", 2025) of a nanochat model through its transcoders.

For one prompt, the *local replacement model* is the nanochat forward in which every MLP output is replaced by
what the transcoders (a CLT, or one transcoder per MLP) write plus their error at that (layer, position), and in
which everything that is not linear is frozen at its value on the prompt:

  - every RMS norm (the attention's and the MLP's input, QK-norm is inside the frozen pattern, the final norm):
    x -> x * r with r = rsqrt(mean(x^2) + eps) computed on the prompt and held constant;
  - the attention patterns softmax(q k^T / sqrt(head_dim)) (rotary, QK-norm, the QK scale, windows, causality);
  - the current era's gates: the smear gate on the embedding, the value-embedding gates;
  - the logit softcap 15·tanh(z/15), as the constant ratio c_v = 15·tanh(z_v/15) / z_v per vocabulary entry
    (1 where z_v = 0): logits = c ⊙ z is then linear in the residual stream and equal to the model's logits;
  - the transcoders' activation functions: a latent's activation is a node (a constant of the graph), its
    pre-activation the target that edges point into.

With its error nodes the replacement model reproduces the model's logits on the prompt up to fp32 rounding, and
it is affine in its sources: token embeddings (the normed wte row and the value embeddings of that token),
active latents, and error nodes. The edge source -> target is the source's direct effect on the target's input
through that frozen model: A[t, s] = value_s · ∂input_t/∂value_s, computed by one backward pass per target
(batched). A feature's input is its pre-activation (minus b_enc); a logit's is the softcapped logit minus the
mean softcapped logit over the vocabulary (circuit-tracer's demeaned unembedding).

Nodes are ordered as circuit-tracer's Graph: [features, errors (layer-major, then position), tokens, logits];
adjacency rows are targets, columns sources. Pruning, influence and the replacement and completeness scores
follow circuit-tracer's definitions (README, Attribution graphs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from saelightning.errors import SAELightningError
from saelightning.hooks import parse_hook
from saelightning.nanochat.model import (
    QK_SCALE,
    SMEAR_CHANNELS,
    SOFTCAP,
    VE_GATE_CHANNELS,
    VE_GATE_SCALE,
    apply_rotary,
    rotary_tables,
)
from saelightning.saes.clt import CrossLayerTranscoder

MAX_N_LOGITS = 10  # circuit-tracer's defaults: at most 10 logit nodes, covering 95% of the probability
DESIRED_LOGIT_PROB = 0.95


# ---------------------------------------------------------------------------------------------
# The dictionaries: a CLT or per-layer transcoders, as (encode, pre_acts_at, write_at) per model layer, in raw units


class Transcoders:
    """What reads and writes each MLP: `layers` (model layers covered), `encode(layer, x)` -> the prompt's dense
    latents, and on the active latents' slots only `pre_acts_at(layer, x, idx)` -> pre-activations minus b_enc and
    `write_at(layer, values, idx, x)` -> {model layer: output without bias}; `bias(layer)`, `latent_rows`."""

    def __init__(self, saes, n_layer: int):
        saes = list(saes) if isinstance(saes, (list, tuple)) else [saes]
        if not saes:
            raise SAELightningError("attribute needs a CLT or transcoders (--sae)")
        self.clt, self.per_layer = None, {}
        for sae in saes:
            if isinstance(sae, CrossLayerTranscoder):
                if len(saes) > 1:
                    raise SAELightningError("give one CLT, or per-layer transcoders, not both or several CLTs")
                self.clt = sae
                self.clt_layers = [self._layer(h, "hook_mlp_in", n_layer) for h in sae.hook_names_in]
            else:
                self._add_transcoder(sae, n_layer)
        self.layers = self.clt_layers if self.clt is not None else sorted(self.per_layer)

    @staticmethod
    def _layer(hook: str, kind: str, n_layer: int) -> int:
        layer, got = parse_hook(hook, n_layer)
        if got != kind:
            raise SAELightningError(f"attribution needs transcoders from blocks.L.hook_mlp_in to blocks.L.hook_mlp_out;"
                                    f" got {hook}; train one on those hooks (configs/demo_transcoder.yaml)")
        return layer

    def _add_transcoder(self, sae, n_layer: int) -> None:
        meta = sae.metadata or {}
        if not sae.config.is_transcoder:
            raise SAELightningError(f"the SAE on {meta.get('hook_name')} is not a transcoder; attribution graphs are "
                                    "built from transcoders or a CLT (hook_name_out set)")
        layer = self._layer(meta.get("hook_name", ""), "hook_mlp_in", n_layer)
        if self._layer(meta.get("hook_name_out", ""), "hook_mlp_out", n_layer) != layer:
            raise SAELightningError(f"the transcoder on {meta['hook_name']} writes {meta['hook_name_out']}; "
                                    "attribution needs each to replace its own layer's MLP (hook_mlp_out of the "
                                    "same block)")
        if layer in self.per_layer:
            raise SAELightningError(f"two transcoders for layer {layer}; give one per MLP layer")
        self.per_layer[layer] = sae

    def n_features(self, layer: int) -> int:
        return self.clt.config.d_sae if self.clt is not None else self.per_layer[layer].config.d_sae

    def _encoder(self, layer: int):
        """(the dictionary of layer `layer` as an SAE, its input scale)."""
        if self.clt is not None:
            i = self.clt_layers.index(layer)
            return self.clt.encoders[i], self.clt.input_scales[i]
        return self.per_layer[layer], self.per_layer[layer].input_scale

    def encode(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Dense latents [..., d_sae] of layer `layer`'s dictionary on raw MLP input x [..., d] (the prompt's)."""
        enc, s_in = self._encoder(layer)
        return enc.encode(x.to(enc.W_enc.dtype) * s_in.to(enc.W_enc.dtype))

    def pre_acts_at(self, layer: int, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Pre-activations minus b_enc [..., T, m] of the latents idx [T, m] (m slots a position) on raw MLP input
        x [..., T, d]: only those encoder columns, gathered once and shared by every copy of the batch."""
        enc, s_in = self._encoder(layer)
        cols = enc.W_enc.T[idx]  # [T, m, d]
        return torch.einsum("...td,...tmd->...tm", x.to(cols.dtype) * s_in.to(cols.dtype), cols)

    def write_at(self, layer: int, values: torch.Tensor, idx: torch.Tensor, x: torch.Tensor) -> dict:
        """What the latents idx [T, m] of layer `layer` with values [..., T, m] (on MLP input x [..., T, d]) write
        into each MLP output, biases left out: their decoder rows gathered once, never [..., T, d_sae]."""
        enc, s_in = self._encoder(layer)
        rows = enc.W_dec[idx]  # [T, m, d_out]: a CLT layer's rows to every later layer side by side
        out = torch.einsum("...tm,...tmd->...td", values.to(rows.dtype), rows)
        if self.clt is not None:
            i, d = self.clt_layers.index(layer), self.clt.d
            return {self.clt_layers[i + k]: part / self.clt.output_scales[i + k]
                    for k, part in enumerate(out.split(d, dim=-1))}
        if enc.config.skip_connection:  # the skip is a linear path of the frozen model, not a node
            out = out + (x.to(enc.W_skip.dtype) * s_in) @ enc.W_skip.T
        return {layer: out / enc.output_scale.to(out.dtype)}

    def latent_rows(self, layer: int, latent: int) -> dict[int, torch.Tensor]:
        """The raw-unit vector one unit of latent `latent` of layer `layer` adds to each MLP output it writes."""
        if self.clt is not None:
            i = self.clt_layers.index(layer)
            return {self.clt_layers[j]: self.clt.decoder(i, j)[latent] / self.clt.output_scales[j]
                    for j in range(i, len(self.clt_layers))}
        sae = self.per_layer[layer]
        return {layer: sae.W_dec[latent] / sae.output_scale.to(sae.W_dec.dtype)}

    def bias(self, layer: int) -> torch.Tensor:
        if self.clt is not None:
            j = self.clt_layers.index(layer)
            return self.clt.b_dec[j] / self.clt.output_scales[j]
        sae = self.per_layer[layer]
        return sae.b_dec / sae.output_scale.to(sae.b_dec.dtype)


def active_slots(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx, mask) [..., m] of dense latents f [..., d_sae]: each position's active latents in increasing order,
    padded to the largest count m with inactive ones (mask False, value 0)."""
    active = f != 0
    m = int(active.sum(-1).max()) if f.numel() else 0
    idx = torch.argsort((~active).to(torch.int8), dim=-1, stable=True)[..., :m]
    return idx, active.gather(-1, idx)


# ---------------------------------------------------------------------------------------------
# The local replacement model


def _rms(x: torch.Tensor) -> torch.Tensor:
    """The factor F.rms_norm multiplies by (eps = the dtype's machine epsilon, as F.rms_norm's default)."""
    return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + torch.finfo(x.dtype).eps)


def _mask(T: int, window: int, device) -> torch.Tensor:
    row = torch.arange(T, device=device)[:, None]
    col = torch.arange(T, device=device)[None, :]
    mask = col <= row
    return mask & (row - col <= window) if window >= 0 else mask


@dataclass
class Frozen:
    """Everything non-linear on the prompt, held constant: per position [T] or [T, ·], per layer lists."""

    smear: torch.Tensor | None  # [T, 1] gate on the previous embedding (current era; row 0 unused)
    attn_rms: list  # [T, 1] per layer
    patterns: list  # [H, T, T] per layer
    ve_gates: list  # [T, n_kv] per layer, or None
    mlp_rms: list  # [T, 1] per layer
    final_rms: torch.Tensor  # [T, 1]
    softcap_ratio: torch.Tensor  # [T, V]


@dataclass
class Sources:
    """The values of the source nodes (batched [B, ...] when computing edges)."""

    embed: torch.Tensor  # [..., T, d] normed token embeddings norm(wte(token))
    value_embeds: dict  # layer -> [..., T, n_kv*head_dim] the token's value embedding (current era)
    latents: dict  # layer -> [..., T, m] the active latents' values in their slots (LocalReplacement.slots)
    errors: dict  # layer -> [..., T, d] MLP output minus what the transcoders write there


class LocalReplacement:
    """The frozen linear model of one prompt: run `forward(sources)` for (feature inputs per layer, logits)."""

    def __init__(self, model, transcoders: Transcoders, idx: torch.Tensor, bos_id: int | None = None):
        if idx.dim() != 1 or idx.numel() == 0:
            raise SAELightningError("attribution needs one non-empty prompt (a 1-d tensor of token ids)")
        if idx.numel() > model.config.sequence_len:
            raise SAELightningError(f"the prompt is {idx.numel()} tokens, longer than the model's context of "
                                    f"{model.config.sequence_len}; shorten it")
        self.model, self.tc, self.idx = model, transcoders, idx
        self.T, self.n_layer = idx.numel(), model.config.n_layer
        self.keep = (idx != bos_id) if bos_id is not None else torch.ones_like(idx, dtype=torch.bool)
        self.slots: dict = {}  # layer -> (idx [T, m] latent of each slot, mask [T, m] active), set by _record
        with torch.no_grad():
            self.frozen, self.sources, self.logits, self.mlp_inputs = self._record()

    # -- the prompt's forward, recording what gets frozen
    def _record(self):
        m, cfg, idx, T = self.model, self.model.config, self.idx, self.T
        x = m.transformer.wte(idx).to(m.compute_dtype)
        embed = x * _rms(x)
        smear = None
        x0 = embed
        if cfg.era == "current":
            smear = torch.zeros(T, 1, dtype=embed.dtype, device=embed.device)
            if T > 1:
                smear[1:] = m.smear_lambda.to(embed.dtype) * torch.sigmoid(m.smear_gate(embed[1:, :SMEAR_CHANNELS]))
            x0 = self._smear(embed, smear)
        cos, sin = rotary_tables(T, cfg.head_dim, cfg.era, idx.device)
        cos, sin = cos[0].to(x.dtype), sin[0].to(x.dtype)  # [T, 1, hd/2]
        fr = self.frozen = Frozen(smear, [], [], [], [], None, None)
        src = Sources(embed, {}, {}, {})
        x, mlp_inputs, written, backout = x0, {}, {}, None
        for i, block in enumerate(m.transformer.h):
            attn = block.attn
            if cfg.era == "current":
                x = m.resid_lambdas[i] * x + m.x0_lambdas[i] * x0
            fr.attn_rms.append(_rms(x))
            h = x * fr.attn_rms[i]
            q = attn.c_q(h).view(T, attn.n_head, attn.head_dim)
            k = attn.c_k(h).view(T, attn.n_kv_head, attn.head_dim)
            q, k = apply_rotary(q, cos, sin).to(h.dtype), apply_rotary(k, cos, sin).to(h.dtype)
            q, k = F.rms_norm(q, (q.size(-1),)), F.rms_norm(k, (k.size(-1),))
            if cfg.era == "current":
                q, k = q * QK_SCALE, k * QK_SCALE
            k = k.repeat_interleave(attn.n_head // attn.n_kv_head, dim=1)
            scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(attn.head_dim)
            scores = scores.masked_fill(~_mask(T, m.window_sizes[i], idx.device), float("-inf"))
            fr.patterns.append(scores.softmax(-1))
            gate = None
            if cfg.era == "current" and str(i) in m.value_embeds:
                src.value_embeds[i] = m.value_embeds[str(i)](idx).to(h.dtype)
                gate = VE_GATE_SCALE * torch.sigmoid(attn.ve_gate(h[..., :VE_GATE_CHANNELS]))
            fr.ve_gates.append(gate)
            x = x + self._attention(i, h, src.value_embeds.get(i))
            fr.mlp_rms.append(_rms(x))
            mlp_in = x * fr.mlp_rms[i]
            mlp_inputs[i] = mlp_in
            mlp_out = block.mlp(mlp_in)
            if i in self.tc.layers:
                f = self.tc.encode(i, mlp_in) * self.keep[:, None]  # no features at <|bos|>: there it is all error
                self.slots[i] = active_slots(f)
                src.latents[i] = f.gather(-1, self.slots[i][0])
                for j, part in self.tc.write_at(i, src.latents[i], self.slots[i][0], mlp_in).items():
                    written[j] = written.get(j, 0) + part
            recon = written.get(i, 0) + (self.tc.bias(i) if i in self.tc.layers else 0)
            src.errors[i] = mlp_out - recon
            x = x + mlp_out
            if i == cfg.n_layer // 2:
                backout = x
        if cfg.era == "current":
            x = x - m.backout_lambda.to(x.dtype) * backout
        fr.final_rms = _rms(x)
        self.final_resid = x  # [T, d] what the final norm reads
        z = m.lm_head(x * fr.final_rms)[..., :cfg.vocab_size].float()
        logits = SOFTCAP * torch.tanh(z / SOFTCAP)
        fr.softcap_ratio = torch.where(z == 0, torch.ones_like(z), logits / z)
        return fr, src, logits, mlp_inputs

    @staticmethod
    def _smear(embed: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        prev = torch.cat([torch.zeros_like(embed[..., :1, :]), embed[..., :-1, :]], dim=-2)
        return embed + gate * prev

    def _attention(self, i: int, h: torch.Tensor, ve: torch.Tensor | None) -> torch.Tensor:
        """Layer i's attention output with its pattern frozen: v from h (and the gated value embedding)."""
        attn, fr = self.model.transformer.h[i].attn, self.frozen
        v = attn.c_v(h).unflatten(-1, (attn.n_kv_head, attn.head_dim))
        if ve is not None:
            v = v + fr.ve_gates[i].unsqueeze(-1) * ve.unflatten(-1, (attn.n_kv_head, attn.head_dim))
        v = v.repeat_interleave(attn.n_head // attn.n_kv_head, dim=-2)
        y = torch.einsum("hqk,...khd->...qhd", fr.patterns[i], v)
        return attn.c_proj(y.flatten(-2))

    # -- the frozen, affine model
    def forward(self, src: Sources, last_only: bool = False) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """(feature inputs {layer: [..., T, m]} (the slots' pre-activations minus b_enc), logits [..., T, V]) of the
        frozen model on these source values; last_only: the logits of the last position only [..., 1, V]."""
        m, cfg, fr = self.model, self.model.config, self.frozen
        x0 = self._smear(src.embed, fr.smear) if cfg.era == "current" else src.embed
        x, inputs, written, backout = x0, {}, {}, None
        for i in range(self.n_layer):
            if cfg.era == "current":
                x = m.resid_lambdas[i] * x + m.x0_lambdas[i] * x0
            x = x + self._attention(i, x * fr.attn_rms[i], src.value_embeds.get(i))
            mlp_in = x * fr.mlp_rms[i]
            out = src.errors[i]
            if i in self.tc.layers:
                idx = self.slots[i][0]
                inputs[i] = self.tc.pre_acts_at(i, mlp_in, idx)
                for j, part in self.tc.write_at(i, src.latents[i], idx, mlp_in).items():
                    written[j] = written.get(j, 0) + part
                out = out + written.get(i, 0) + self.tc.bias(i)
            x = x + out
            if i == cfg.n_layer // 2:
                backout = x
        if cfg.era == "current":
            x = x - m.backout_lambda.to(x.dtype) * backout
        rms, ratio = (fr.final_rms[-1:], fr.softcap_ratio[-1:]) if last_only else (fr.final_rms, fr.softcap_ratio)
        if last_only:  # the logit nodes are at the last position: no [..., T, V] in the backward batches
            x = x[..., -1:, :]
        z = m.lm_head(x * rms)[..., :cfg.vocab_size].float()
        return inputs, z * ratio

    def dense_latents(self, layer: int) -> torch.Tensor:
        """The prompt's latents of layer `layer` as a dense [T, d_sae] tensor."""
        idx = self.slots[layer][0]
        values = self.sources.latents[layer]
        return values.new_zeros(self.T, self.tc.n_features(layer)).scatter(-1, idx, values)

    def slot_of(self, layer: int, pos: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        """The slot of each active latent (pos[k], feature[k]) of layer `layer` (an inactive one: an error)."""
        idx, mask = self.slots[layer]
        hit = (idx[pos] == feature[:, None]) & mask[pos]
        if not bool(hit.any(-1).all()):
            raise SAELightningError(f"a latent of layer {layer} asked for is not active on the prompt")
        return hit.to(torch.int8).argmax(-1)

    def batched(self, n: int, grad: bool = True) -> Sources:
        """n copies of the prompt's sources as leaves (one per target of a backward batch)."""
        def rep(t):
            return t.detach().unsqueeze(0).repeat(n, *[1] * t.dim()).requires_grad_(grad)
        s = self.sources
        return Sources(rep(s.embed), {k: rep(v) for k, v in s.value_embeds.items()},
                       {k: rep(v) for k, v in s.latents.items()}, {k: rep(v) for k, v in s.errors.items()})


# ---------------------------------------------------------------------------------------------
# The graph


@dataclass
class Graph:
    """An attribution graph: node lists in circuit-tracer's order and the dense adjacency matrix."""

    tokens: list[int]  # the prompt's token ids
    features: torch.Tensor  # [N, 3] (layer, position, feature) of each active latent (layer-major order)
    activations: torch.Tensor  # [N] their activations
    error_layers: list[int]  # the layers with error nodes (every model layer), T nodes each
    logit_ids: torch.Tensor  # [K] the logit nodes' token ids (the target first)
    logit_probs: torch.Tensor  # [K] their probabilities (the nodes' weights in influence)
    adjacency: torch.Tensor  # [n, n] rows targets, columns sources
    bias: torch.Tensor = None  # [n] what the biases (b_enc excluded, b_dec, nothing else) add to each target input
    target_inputs: torch.Tensor = None  # [n] each target's input on the prompt (0 for non-targets)
    meta: dict = field(default_factory=dict)

    @property
    def n_features(self) -> int:
        return self.features.shape[0]

    @property
    def n_pos(self) -> int:
        return len(self.tokens)

    @property
    def error_slice(self) -> slice:
        return slice(self.n_features, self.n_features + len(self.error_layers) * self.n_pos)

    @property
    def token_slice(self) -> slice:
        start = self.error_slice.stop
        return slice(start, start + self.n_pos)

    @property
    def logit_slice(self) -> slice:
        start = self.token_slice.stop
        return slice(start, start + len(self.logit_ids))

    @property
    def logit_weights(self) -> torch.Tensor:
        w = torch.zeros(self.adjacency.shape[0], dtype=self.adjacency.dtype)
        w[self.logit_slice] = self.logit_probs.to(w.dtype)
        return w


def select_logits(logits: torch.Tensor, target: int | None, max_n_logits: int = MAX_N_LOGITS,
                  desired_prob: float = DESIRED_LOGIT_PROB) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids, probabilities) of the logit nodes: the given target, or the most likely tokens up to the first
    whose cumulative probability reaches desired_prob (at most max_n_logits), as circuit-tracer picks them."""
    probs = logits.float().softmax(-1)
    if target is not None:
        return torch.tensor([target]), probs[target].reshape(1)
    top_p, top_i = probs.topk(min(max_n_logits, probs.numel()))
    cut = int(torch.searchsorted(top_p.cumsum(0), torch.tensor(desired_prob, dtype=top_p.dtype))) + 1
    return top_i[:cut], top_p[:cut]


def _target_values(rm: LocalReplacement, src: Sources, feats: torch.Tensor, logit_ids: torch.Tensor):
    """Inputs of every target node [..., N + K]: the features' pre-activations, the logits' demeaned values."""
    inputs, logits = rm.forward(src, last_only=True)
    parts = []
    for layer in rm.tc.layers:
        sel = feats[feats[:, 0] == layer]
        parts.append(inputs[layer][..., sel[:, 1], rm.slot_of(layer, sel[:, 1], sel[:, 2])])
    last = logits[..., -1, :]
    parts.append(last[..., logit_ids] - last.mean(-1, keepdim=True))
    return torch.cat(parts, dim=-1)


def _rows(rm: LocalReplacement, feats: torch.Tensor, logit_ids: torch.Tensor, targets: torch.Tensor,
          batch_size: int) -> torch.Tensor:
    """Adjacency rows [len(targets), n_features + L*T + T] of the given target nodes (indices into features+logits)
    : one backward pass per batch of targets through the frozen model, each target's gradient dotted with the
    source values."""
    s = rm.sources
    out = []
    for start in range(0, len(targets), batch_size):
        chunk = targets[start:start + batch_size]
        src = rm.batched(len(chunk))
        values = _target_values(rm, src, feats, logit_ids)
        layers, ves = list(rm.tc.layers), list(s.value_embeds)
        leaves = ([src.latents[i] for i in layers] + [src.errors[i] for i in range(rm.n_layer)] + [src.embed]
                  + [src.value_embeds[i] for i in ves])
        grads = torch.autograd.grad(values[torch.arange(len(chunk)), chunk].sum(), leaves, allow_unused=True,
                                    materialize_grads=True)
        g_lat, g_err = grads[:len(layers)], grads[len(layers):len(layers) + rm.n_layer]
        g_emb, g_ve = grads[len(layers) + rm.n_layer], grads[len(layers) + rm.n_layer + 1:]
        row = []
        for layer, g in zip(layers, g_lat):
            p, f = feats[feats[:, 0] == layer][:, 1:].T
            slot = rm.slot_of(layer, p, f)
            row.append(g[:, p, slot] * s.latents[layer][p, slot])
        row += [(g * s.errors[i]).sum(-1) for i, g in zip(range(rm.n_layer), g_err)]
        tok = (g_emb * s.embed).sum(-1)
        for i, g in zip(ves, g_ve):
            tok = tok + (g * s.value_embeds[i]).sum(-1)
        out.append(torch.cat([*row, tok], dim=-1).detach().float())
    return torch.cat(out) if out else torch.zeros(0, feats.shape[0] + (rm.n_layer + 1) * rm.T)


def attribute(model, transcoders, idx: torch.Tensor, target: int | None = None, bos_id: int | None = None,
              max_n_logits: int = MAX_N_LOGITS, desired_logit_prob: float = DESIRED_LOGIT_PROB,
              max_feature_nodes: int | None = None, batch_size: int = 64) -> tuple[Graph, LocalReplacement]:
    """The attribution graph of prompt `idx` (1-d token ids) and its local replacement model.

    max_feature_nodes: keep only that many latents, chosen as circuit-tracer does: rows are computed in order of
    their influence on the logits so far (from the rows already computed), the most influential first.
    """
    tc = transcoders if isinstance(transcoders, Transcoders) else Transcoders(transcoders, model.config.n_layer)
    if target is not None and not 0 <= target < model.config.vocab_size:
        raise SAELightningError(f"target token id {target} is outside the vocabulary 0..{model.config.vocab_size - 1}")
    with torch.enable_grad():
        rm = LocalReplacement(model, tc, idx, bos_id)
        return _build(rm, target, max_n_logits, desired_logit_prob, max_feature_nodes, batch_size), rm


def _build(rm, target, max_n_logits, desired_logit_prob, max_feature_nodes, batch_size) -> Graph:
    s, T, L = rm.sources, rm.T, rm.n_layer
    feats = torch.cat([torch.cat([torch.full((len(p), 1), layer), torch.stack([p, rm.slots[layer][0][p, k]], 1)], 1)
                       for layer in rm.tc.layers for p, k in [rm.slots[layer][1].nonzero(as_tuple=True)]]
                      ) if rm.tc.layers else torch.zeros(0, 3, dtype=torch.long)
    feats = feats.long()
    logit_ids, logit_probs = select_logits(rm.logits[-1], target, max_n_logits, desired_logit_prob)
    n_all = feats.shape[0]
    K = len(logit_ids)
    logit_rows = _rows(rm, feats, logit_ids, torch.arange(n_all, n_all + K), batch_size)
    keep, feature_rows = _choose_features(rm, feats, logit_ids, logit_rows, logit_probs, max_feature_nodes, batch_size)
    # columns: the chosen features, then errors and tokens
    cols = torch.cat([keep, torch.arange(n_all, n_all + (L + 1) * T)])
    n = len(keep) + (L + 1) * T + K
    A = torch.zeros(n, n)
    A[:len(keep), :len(cols)] = feature_rows[:, cols]
    A[n - K:, :len(cols)] = logit_rows[:, cols]
    with torch.no_grad():
        feats_k = feats[keep]
        on_prompt = _target_values(rm, rm.sources, feats_k, logit_ids)
        zero = rm.batched(1, grad=False)
        for t in (zero.embed, *zero.value_embeds.values(), *zero.latents.values(), *zero.errors.values()):
            t.zero_()
        bias = _target_values(rm, zero, feats_k, logit_ids)[0]
    inputs, biases = torch.zeros(n), torch.zeros(n)
    inputs[:len(keep)], inputs[n - K:] = on_prompt[:len(keep)].float(), on_prompt[len(keep):].float()
    biases[:len(keep)], biases[n - K:] = bias[:len(keep)].float(), bias[len(keep):].float()
    acts = torch.cat([s.latents[layer][sel[:, 1], rm.slot_of(layer, sel[:, 1], sel[:, 2])]
                      for layer in rm.tc.layers for sel in [feats_k[feats_k[:, 0] == layer]]]) if len(keep) \
        else torch.zeros(0)
    return Graph(tokens=rm.idx.tolist(), features=feats_k, activations=acts.detach().float(),
                 error_layers=list(range(L)), logit_ids=logit_ids, logit_probs=logit_probs.detach().float(),
                 adjacency=A, bias=biases, target_inputs=inputs, meta={"n_active_features": n_all})


def _choose_features(rm, feats, logit_ids, logit_rows, logit_probs, max_feature_nodes, batch_size):
    """(kept feature indices in order, their rows): all of them, or the max_feature_nodes most influential."""
    n_all = feats.shape[0]
    if max_feature_nodes is None or max_feature_nodes >= n_all:
        keep = torch.arange(n_all)
        return keep, _rows(rm, feats, logit_ids, keep, batch_size)
    visited = torch.zeros(n_all, dtype=torch.bool)
    rows, order = [], []
    while len(order) < max_feature_nodes:
        done = torch.cat(rows) if rows else torch.zeros(0, logit_rows.shape[1])
        influence = _partial_influence(torch.cat([logit_rows, done]), logit_probs, len(logit_ids),
                                       torch.tensor(order, dtype=torch.long))
        rank = influence[:n_all].argsort(descending=True)
        pending = rank[~visited[rank]][:min(batch_size, max_feature_nodes - len(order))]
        rows.append(_rows(rm, feats, logit_ids, pending, batch_size))
        visited[pending] = True
        order += pending.tolist()
    keep = torch.tensor(order, dtype=torch.long)
    rows = torch.cat(rows)
    by_index = keep.argsort()  # back to the features' own (layer, position) order
    return keep[by_index], rows[by_index]


def _partial_influence(rows: torch.Tensor, logit_probs: torch.Tensor, K: int, feature_of_row: torch.Tensor):
    """Influence on the logits of every source column from the rows computed so far (logit rows first, then the
    features `feature_of_row`), by the same series as influence() over that partial graph."""
    A = normalize(rows)
    n_cols = rows.shape[1]
    weight = torch.zeros(rows.shape[0])
    weight[:K] = logit_probs.float()
    total = torch.zeros(n_cols)
    for _ in range(4 * n_cols + 10):
        contrib = weight @ A  # per column
        if not contrib.any():
            return total
        total += contrib
        weight = torch.zeros(rows.shape[0])
        weight[K:] = contrib[feature_of_row] if len(feature_of_row) else weight[K:]
    raise SAELightningError("influence did not converge: the graph has a cycle")


# ---------------------------------------------------------------------------------------------
# Influence, pruning and the scores (circuit-tracer's definitions)


def normalize(A: torch.Tensor) -> torch.Tensor:
    """|A| with each row divided by its sum (rows of zeros stay zero)."""
    a = A.abs()
    return a / a.sum(-1, keepdim=True).clamp_min(1e-10)


def influence(A_norm: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """weights (A + A² + A³ + ...): each node's total influence on the weighted nodes through every path. The graph
    is acyclic (sources come before their targets in the forward), so A is nilpotent and the series ends."""
    total = torch.zeros_like(weights)
    current = weights @ A_norm
    for _ in range(A_norm.shape[0] + 1):
        if not current.any():
            return total
        total = total + current
        current = current @ A_norm
    raise SAELightningError("influence did not converge: the adjacency matrix has a cycle")


def _threshold(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """The score above which the largest scores cover `fraction` of their sum."""
    ordered = scores.flatten().sort(descending=True).values
    cumulative = ordered.cumsum(0) / ordered.sum().clamp_min(1e-30)
    at = min(int(torch.searchsorted(cumulative, torch.tensor(fraction, dtype=cumulative.dtype))), len(ordered) - 1)
    return ordered[at]


@dataclass
class Pruned:
    node_mask: torch.Tensor  # [n] nodes kept
    edge_mask: torch.Tensor  # [n, n] edges kept
    cumulative: torch.Tensor  # [n] each node's cumulative influence fraction (its rank's share, as the JSON shows)
    node_influence: torch.Tensor  # [n] influence on the logits
    by_influence: torch.Tensor  # [n] the nodes the node threshold kept (before nodes left without edges were dropped)
    edge_scores: torch.Tensor  # [n, n] each edge's influence score (|Â| x its target's influence plus weight)
    edges_by_score: torch.Tensor  # [n, n] the edges the edge threshold kept (before the nodes' clean-up)


def prune(graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Pruned:
    """circuit-tracer's pruning: keep the nodes whose influence covers node_threshold of the total (tokens and logits
    always), then the edges (scored |Â| x the target's influence plus weight) covering edge_threshold, then drop
    features and errors left without outgoing (features also without incoming) edges, until nothing changes."""
    for name, v in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= v <= 1.0:
            raise SAELightningError(f"--{name.replace('_', '-')} {v} must be between 0 and 1")
    A, w = graph.adjacency, graph.logit_weights
    fixed = graph.token_slice.start  # tokens and logits come after this index
    node_inf = influence(normalize(A), w)
    node_mask = node_inf >= _threshold(node_inf, node_threshold)
    node_mask[fixed:] = True
    pruned = A.clone()
    pruned[~node_mask] = 0
    pruned[:, ~node_mask] = 0
    An = normalize(pruned)
    edge_scores = An * (influence(An, w) + w)[:, None]
    edge_mask = edge_scores >= _threshold(edge_scores, edge_threshold)
    by_influence, edges_by_score = node_mask.clone(), edge_mask.clone()
    nf = graph.n_features
    while True:
        before = node_mask.clone()
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
        node_mask[:fixed] &= edge_mask[:, :fixed].any(0)
        node_mask[:nf] &= edge_mask[:nf].any(1)
        if torch.equal(before, node_mask):
            break
    ordered, order = node_inf.sort(descending=True)
    cumulative = torch.zeros_like(node_inf)
    cumulative[order] = ordered.cumsum(0) / ordered.sum().clamp_min(1e-30)
    return Pruned(node_mask, edge_mask, cumulative, node_inf, by_influence, edge_scores, edges_by_score)


def scores(graph: Graph) -> tuple[float, float]:
    """(replacement score, completeness score), circuit-tracer's definitions.

    replacement: the tokens' share of the influence on the logits, against tokens + errors (1 = no error node lies
    on any path to the logits). completeness: over all nodes weighted by their influence on the logits plus their
    own logit weight, the mean share of their input (|edges|, normalised) that does not come from error nodes.
    """
    A, w = normalize(graph.adjacency), graph.logit_weights
    node_inf = influence(A, w)
    tokens, errors = node_inf[graph.token_slice].sum(), node_inf[graph.error_slice].sum()
    replacement = float(tokens / (tokens + errors).clamp_min(1e-30))
    non_error = 1 - A[:, graph.error_slice].sum(-1)
    weight = node_inf + w
    completeness = float((non_error * weight).sum() / weight.sum())
    return replacement, completeness
