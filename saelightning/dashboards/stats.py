"""Per-latent feature statistics from one bounded-memory stream over the val shard.

Two passes over the same deterministic token stream (the model and SAE run twice):
  pass 1: firing count (density), sum and max of each latent's activation, and the top-k
          activating contexts (a per-latent top-k kept by merging each batch's candidates);
  pass 2: with each latent's max known, an exact histogram on fixed bins over (0, max] and, per
          equal-width activation interval, a uniform sample of contexts (reservoir by random
          priority: keep the S events with the largest U(0,1) key, which is the same merge).
Memory is O(features x (bins + k x window)), independent of the number of tokens: no activation
matrix is ever kept beyond one batch. BOS positions are excluded (their activations are zeroed
and they are not counted), as in training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saelightning.errors import SAELightningError
from saelightning.hooks import parse_hook


@dataclass
class StatsConfig:
    top_k: int = 20  # top-activating contexts kept per latent
    n_intervals: int = 10  # equal-width activation intervals over (0, max] for the quantile samples
    per_interval: int = 5  # contexts sampled uniformly per interval
    n_bins: int = 40  # histogram bins over (0, max]; a multiple of n_intervals
    before: int = 12  # context tokens shown before the activating token
    after: int = 4  # context tokens shown after it
    n_logits: int = 10  # boosted and suppressed tokens kept per latent
    logit_bins: int = 40  # bins of the histogram of a latent's logit effect over the vocabulary
    seed: int = 0  # seeds the sampling priorities

    def __post_init__(self):
        for name in ("top_k", "n_intervals", "per_interval", "n_bins", "n_logits", "logit_bins"):
            if getattr(self, name) < 1:
                raise SAELightningError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.before < 0 or self.after < 0:
            raise SAELightningError(f"before/after must be >= 0, got {self.before}/{self.after}")
        if self.n_bins % self.n_intervals:
            raise SAELightningError(f"n_bins {self.n_bins} must be a multiple of n_intervals {self.n_intervals}")

    @property
    def window(self) -> int:
        return self.before + 1 + self.after


class GroupTopK:
    """For each of G groups, the K events with the largest key seen so far, with their payload.

    Kept sorted by key (descending) per group; empty slots have key -inf and token -1.
    """

    def __init__(self, n_groups: int, k: int, window: int, device=None):
        self.k = k
        self.keys = torch.full((n_groups, k), float("-inf"), device=device)
        self.values = torch.zeros(n_groups, k, device=device)  # activation at the marked token
        self.tokens = torch.full((n_groups, k, window), -1, dtype=torch.long, device=device)
        self.acts = torch.zeros(n_groups, k, window, device=device)  # the latent along the window

    def threshold(self) -> torch.Tensor:
        """[G]: the key an event must beat to enter its group."""
        return self.keys[:, -1]

    def push(self, groups, keys, values, tokens, acts) -> None:
        """Merge events (group [E], key [E], value [E], tokens [E, W], acts [E, W]) into the state."""
        if groups.numel() == 0:
            return
        touched = torch.unique(groups)  # only these groups change: merge just their rows
        local = torch.searchsorted(touched, groups)
        n, K = len(touched), self.k
        old = torch.arange(n, device=groups.device).repeat_interleave(K)
        g = torch.cat([old, local])
        k = torch.cat([self.keys[touched].flatten(), keys])
        # sort by key (desc), then stably by group: earlier entries win ties, so old beats new
        order = torch.argsort(k, descending=True, stable=True)
        order = order[torch.argsort(g[order], stable=True)]
        counts = torch.bincount(g, minlength=n)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(len(order), device=g.device) - starts[g[order]]
        # each group holds >= K entries (K old ones), so the kept ones are exactly K per group, in order
        sel = order[rank < K]
        self.keys[touched] = k[sel].view(n, K)
        self.values[touched] = torch.cat([self.values[touched].flatten(), values])[sel].view(n, K)
        self.tokens[touched] = torch.cat([self.tokens[touched].flatten(0, 1), tokens])[sel].view(n, K, -1)
        self.acts[touched] = torch.cat([self.acts[touched].flatten(0, 1), acts])[sel].view(n, K, -1)


@dataclass
class FeatureStats:
    """Everything the dashboards show about a set of latents (row i describes latent features[i])."""

    features: torch.Tensor  # [F] latent indices
    n_tokens: int  # token positions counted (BOS excluded)
    n_rows: int  # rows (prompts) the model read
    n_fire: torch.Tensor  # [F] int64, positions where the latent is > 0
    sum_act: torch.Tensor  # [F] float64, sum of activations
    max_act: torch.Tensor  # [F] max activation (0 if never fired)
    hist: torch.Tensor  # [F, n_bins] int64; bin j of latent i covers (j, j+1] * max_act[i] / n_bins
    top: GroupTopK  # groups = latents, top_k entries, key = activation
    samples: GroupTopK  # groups = latent * n_intervals + interval, key = random priority
    config: StatsConfig

    @property
    def density(self) -> torch.Tensor:
        return self.n_fire.double() / max(self.n_tokens, 1)

    @property
    def mean_act(self) -> torch.Tensor:
        """Mean activation over the positions where the latent fires."""
        return self.sum_act / self.n_fire.clamp(min=1)

    def bin_edges(self, i: int) -> torch.Tensor:
        return torch.linspace(0.0, float(self.max_act[i]), self.config.n_bins + 1)


# ---------------------------------------------------------------------------------------------
# The passes


@torch.inference_mode()
def latents_of(model, sae, hook_name: str, idx: torch.Tensor, features: torch.Tensor, bos_id: int) -> torch.Tensor:
    """[B, T, F] activations of the chosen latents, zero at BOS positions."""
    acts = model.run_with_cache(idx, [hook_name])[hook_name]
    B, T, d = acts.shape
    z = sae.encode(acts.reshape(B * T, d).to(sae.W_dec.dtype)).float()[:, features]
    z = z.view(B, T, -1)
    return z.masked_fill((idx == bos_id).unsqueeze(-1), 0.0)


def _windows(idx, z, b, t, f, cfg: StatsConfig):
    """Token ids and the latent's activations on the window around each event (b, t, f)."""
    pos = t.unsqueeze(1) + torch.arange(cfg.window, device=t.device)  # positions in the padded row
    ids = torch.nn.functional.pad(idx, (cfg.before, cfg.after), value=-1)
    zp = torch.nn.functional.pad(z, (0, 0, cfg.before, cfg.after))
    return ids[b.unsqueeze(1), pos], zp[b.unsqueeze(1), pos, f.unsqueeze(1)]


def _pass_one(batches, model, sae, hook, features, bos_id, cfg, device):
    F = len(features)
    n_fire = torch.zeros(F, dtype=torch.long, device=device)
    sum_act = torch.zeros(F, dtype=torch.float64, device=device)
    max_act = torch.zeros(F, device=device)
    top = GroupTopK(F, cfg.top_k, cfg.window, device)
    n_tokens = n_rows = 0
    for idx in batches:
        idx = idx.to(device)
        z = latents_of(model, sae, hook, idx, features, bos_id)
        flat = z.flatten(0, 1)
        n_tokens, n_rows = n_tokens + int((idx != bos_id).sum()), n_rows + len(idx)
        n_fire += (flat > 0).sum(0)
        sum_act += flat.sum(0, dtype=torch.float64)
        max_act = torch.maximum(max_act, flat.max(0).values)
        # only a batch's own top-k of a latent can enter that latent's top-k
        vals, pos = flat.topk(min(cfg.top_k, flat.shape[0]), dim=0)  # [k, F]
        f = torch.arange(F, device=device).expand_as(vals)
        keep = (vals > 0) & (vals > top.threshold()[f])
        vals, pos, f = vals[keep], pos[keep], f[keep]
        b, t = pos // idx.shape[1], pos % idx.shape[1]
        tokens, acts = _windows(idx, z, b, t, f, cfg)
        top.push(f, vals, vals, tokens, acts)
    return n_tokens, n_rows, n_fire, sum_act, max_act, top


def _pass_two(batches, model, sae, hook, features, bos_id, cfg, max_act, device):
    F, H, Q = len(features), cfg.n_bins, cfg.n_intervals
    hist = torch.zeros(F * H, dtype=torch.long, device=device)
    samples = GroupTopK(F * Q, cfg.per_interval, cfg.window, device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    for idx in batches:
        idx = idx.to(device)
        z = latents_of(model, sae, hook, idx, features, bos_id)
        # a latent pass one never saw fire (possible only with nondeterministic kernels) is skipped
        b, t, f = torch.nonzero((z > 0) & (max_act > 0), as_tuple=True)
        v = z[b, t, f]
        # bin j holds (j, j+1] * max / H; the max itself lands in the last bin
        bins = (torch.ceil(v / max_act[f] * H).long() - 1).clamp(0, H - 1)
        hist += torch.bincount(f * H + bins, minlength=F * H)
        groups = f * Q + bins // (H // Q)
        keys = torch.rand(len(v), generator=gen, device=device)
        keep = keys > samples.threshold()[groups]
        b, t, f, v, groups, keys = b[keep], t[keep], f[keep], v[keep], groups[keep], keys[keep]
        tokens, acts = _windows(idx, z, b, t, f, cfg)
        samples.push(groups, keys, v, tokens, acts)
    return hist.view(F, H), samples


def collect_stats(model, sae, hook_name: str, batches_fn, bos_id: int, features=None,
                  cfg: StatsConfig | None = None, device=None) -> FeatureStats:
    """Run both passes. batches_fn() must return the same token batches on every call."""
    cfg = cfg or StatsConfig()
    d_sae = sae.W_dec.shape[0]
    features = torch.arange(d_sae) if features is None else torch.as_tensor(features, dtype=torch.long)
    if len(features) == 0 or int(features.min()) < 0 or int(features.max()) >= d_sae:
        raise SAELightningError(f"features must be latent indices in 0..{d_sae - 1}; check --features")
    device = torch.device(device or "cpu")
    features = features.to(device)
    n_tokens, n_rows, n_fire, sum_act, max_act, top = _pass_one(
        batches_fn(), model, sae, hook_name, features, bos_id, cfg, device)
    if n_tokens == 0:
        raise SAELightningError("the val shard gave no tokens; check --data (a dir of shard_*.parquet with text)")
    hist, samples = _pass_two(batches_fn(), model, sae, hook_name, features, bos_id, cfg, max_act, device)
    return FeatureStats(features.cpu(), n_tokens, n_rows, n_fire.cpu(), sum_act.cpu(), max_act.cpu(),
                        hist.cpu(), _to_cpu(top), _to_cpu(samples), cfg)


def _to_cpu(heap: GroupTopK) -> GroupTopK:
    for name in ("keys", "values", "tokens", "acts"):
        setattr(heap, name, getattr(heap, name).cpu())
    return heap


# ---------------------------------------------------------------------------------------------
# Logit effect


@torch.inference_mode()
def logit_effect(model, sae, hook_name: str, features: torch.Tensor, cfg: StatsConfig, chunk: int = 256):
    """Direct effect of each latent's decoder direction on the logits.

    For latent i with decoder row u_i (mapped through the MLP's c_proj first when the hook is the
    MLP hidden layer), this is lm_head(final_norm(u_i)): the logits the model would give if its last
    residual were u_i alone. The norm is nanochat's weightless RMS norm, so on a single direction it
    only rescales u_i to rms 1: the numbers are per unit-rms direction and the token ranking equals
    that of W_U u_i. Later layers, the norm's dependence on the rest of the residual, the current
    era's backout and the logit softcap are left out (the usual direct-logit-attribution view).
    Returns (top values, top ids, bottom values, bottom ids, hist heights [F, bins], hist centres).
    """
    layer, kind = parse_hook(hook_name, model.n_layer)
    V = model.config.vocab_size
    outs = []
    for start in range(0, len(features), chunk):
        u = sae.W_dec[features[start:start + chunk].to(sae.W_dec.device)].to(model.lm_head.weight)
        if kind == "mlp.hook_post":  # a hidden-layer direction reaches the residual through c_proj
            u = model.transformer.h[layer].mlp.c_proj(u)
        logits = model.lm_head(model.final_norm(u))[:, :V].float().cpu()
        n = min(cfg.n_logits, V)
        top, bottom = logits.topk(n, dim=1), logits.topk(n, dim=1, largest=False)
        lo, hi = logits.min(1, keepdim=True).values, logits.max(1, keepdim=True).values
        width = (hi - lo).clamp(min=1e-12) / cfg.logit_bins
        bins = ((logits - lo) / width).long().clamp(0, cfg.logit_bins - 1)
        heights = torch.zeros(len(u), cfg.logit_bins, dtype=torch.long).scatter_add_(1, bins, torch.ones_like(bins))
        centres = lo + width * (torch.arange(cfg.logit_bins) + 0.5)
        outs.append((top.values, top.indices, bottom.values, bottom.indices, heights, centres))
    return tuple(torch.cat(parts) for parts in zip(*outs))


# ---------------------------------------------------------------------------------------------
# A text summary for TensorBoard


def density_summary(density: torch.Tensor, tokenizer=None, n: int = 10, top_token_ids=None) -> str:
    """Markdown: alive/dead counts and the n most and least frequent latents.

    density: [d_sae] firing frequency per latent. top_token_ids: optional [d_sae] token id at which
    each latent fired most (then shown as text through tokenizer.token_str).
    """
    density = density.detach().double().cpu().flatten()
    if density.numel() == 0:
        raise SAELightningError("density_summary got an empty density tensor; pass one value per latent")
    alive = density > 0
    lines = [f"**{int(alive.sum())} of {density.numel()} latents alive** "
             f"({100 * alive.double().mean():.1f}%), {int((~alive).sum())} dead.", ""]
    show_tokens = tokenizer is not None and top_token_ids is not None

    def table(title, idx):
        rows = [f"**{title}**", "", "| latent | density | log10 density |" + (" top token |" if show_tokens else ""),
                "|---:|---:|---:|" + ("---|" if show_tokens else "")]
        for i in idx.tolist():
            d = float(density[i])
            cell = f"{torch.log10(torch.tensor(d)).item():.2f}" if d > 0 else "-inf"
            row = f"| {i} | {d:.3g} | {cell} |"
            if show_tokens:
                row += f" {_md_cell(tokenizer.token_str(int(top_token_ids[i])))} |"
            rows.append(row)
        return rows + [""]

    k = min(n, density.numel())
    lines += table("Most frequent", density.topk(k).indices)
    alive_idx = alive.nonzero().flatten()
    if len(alive_idx):
        least = alive_idx[density[alive_idx].topk(min(n, len(alive_idx)), largest=False).indices]
        lines += table("Least frequent (alive)", least)
    if (~alive).any():
        dead = (~alive).nonzero().flatten()
        more = f" ... ({len(dead) - n} more)" if len(dead) > n else ""
        lines.append("Dead latents: " + ", ".join(str(i) for i in dead[:n].tolist()) + more)
    return "\n".join(lines).rstrip() + "\n"


def _md_cell(text: str) -> str:
    """Token text made safe for one markdown table cell (TensorBoard renders markdown)."""
    return "`" + text.replace("`", "'").replace("|", "\\|").replace("\n", "\\n") + "`"
