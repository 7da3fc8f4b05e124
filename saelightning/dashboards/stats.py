"""Per-latent feature statistics from one bounded-memory stream over the val shard.

Two passes over the same deterministic token stream (the model and SAE run twice):
  pass 1: firing count (density) of every latent of the SAE, sum and max of each chosen latent's
          activation, and the top-k activating contexts (a per-latent top-k kept by merging each
          batch's candidates);
  pass 2: with each latent's max known, an exact histogram on fixed bins over (0, max] and, per
          equal-width activation interval, a uniform sample of contexts (reservoir by random
          priority: keep the S events with the largest U(0,1) key, which is the same merge).
Both passes also count co-firing: for each chosen latent f and every latent j, the tokens where
both are > 0 (`CoFire`, int32 counts, features x d_sae of them at most `StatsConfig.cofire_budget`
at once; past that the chosen latents are split into blocks, one block counted per pass, and each
block beyond the second costs one more pass over the tokens).
Memory is O(features x (bins + k x window) + min(features x d_sae, cofire_budget)), independent of
the number of tokens: no activation matrix is ever kept beyond one batch. BOS positions are
excluded (their activations are zeroed and they are not counted), as in training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saelightning.errors import SAELightningError
from saelightning.hooks import parse_hook

PAIR_CHUNK = 2**24  # co-firing pairs formed at once (int64 keys: 128 MB)


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
    n_neighbours: int = 10  # nearest latents (decoder cosine) and co-firing latents listed per latent
    cofire_budget: int = 2**28  # co-firing counts (int32) held at once: 1 GiB, all pairs of a 16k-latent SAE
    seed: int = 0  # seeds the sampling priorities

    def __post_init__(self):
        for name in ("top_k", "n_intervals", "per_interval", "n_bins", "n_logits", "logit_bins", "n_neighbours",
                     "cofire_budget"):
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


class CoFire:
    """Co-firing counts of a block of latents against every latent of the SAE.

    counts[r, j] = the tokens where latent rows[r] and latent j are both > 0 (the diagonal entry,
    j = rows[r], is the latent's own firing count). Counted from the sparse set of active latents:
    each token adds one to (f, j) for every pair of its active latents with f in the block, so the
    work is the sum over tokens of (active latents of the block) x (active latents), not d_sae**2.
    """

    def __init__(self, rows: torch.Tensor, d_sae: int, device=None):
        self.rows = rows.to(device)
        self.counts = torch.zeros(len(rows), d_sae, dtype=torch.int32, device=device)
        self.row_of = torch.full((d_sae,), -1, dtype=torch.long, device=device)
        self.row_of[self.rows] = torch.arange(len(rows), device=device)

    def add(self, tok: torch.Tensor, lat: torch.Tensor, n_tok: int) -> None:
        """Add the active entries (token [E], latent [E]) of one batch of n_tok tokens, sorted by token."""
        if len(tok) == 0:
            return
        d_sae, device = self.counts.shape[1], tok.device
        per_tok = torch.bincount(tok, minlength=n_tok)
        width = int(per_tok.max())
        # table[t]: the latents active on token t, padded with -1 to the batch's largest count
        slot = torch.arange(len(tok), device=device) - (torch.cumsum(per_tok, 0) - per_tok)[tok]
        table = torch.full((n_tok, width), -1, dtype=torch.long, device=device)
        table[tok, slot] = lat
        padded = bool((per_tok < width).any())
        row = self.row_of[lat]
        sel = torch.nonzero(row >= 0).squeeze(1)  # entries of a latent of this block
        flat = self.counts.view(-1)
        step = max(1, PAIR_CHUNK // width)
        for lo in range(0, len(sel), step):  # about PAIR_CHUNK pairs at a time
            s = sel[lo:lo + step]
            partners = table[tok[s]]  # [S, width]: every latent active with entry s
            keys = row[s].unsqueeze(1) * d_sae + partners
            keys = keys[partners >= 0] if padded else keys.flatten()
            flat.index_add_(0, keys, torch.ones(len(keys), dtype=torch.int32, device=device))

    def top(self, n: int, n_fire_all: torch.Tensor, chunk: int = 2**24) -> tuple[torch.Tensor, torch.Tensor]:
        """The n latents (other than itself) that fire with each row's latent on the most tokens:
        (latents [R, n] with -1 where fewer than n ever fired with it, counts [R, n]). Ties: the rarer
        latent (fewer firings of its own) first, then the lower index."""
        R, d = self.counts.shape
        n = min(n, d - 1)
        device = self.counts.device
        # pref[j]: the order of preference among equal counts, d-1 for the rarest latent (ties: lower index)
        order = torch.argsort(-n_fire_all.to(device) * d + (d - 1 - torch.arange(d, device=device)))
        pref = torch.empty(d, dtype=torch.long, device=device)
        pref[order] = torch.arange(d, device=device)
        latents = torch.full((R, n), -1, dtype=torch.long)
        counts = torch.zeros(R, n, dtype=torch.long)
        step = max(1, chunk // d)
        for lo in range(0, R, step):
            c = self.counts[lo:lo + step].clone()
            b = len(c)
            c[torch.arange(b, device=device), self.rows[lo:lo + step]] = 0  # not itself
            # the candidates: counts >= each row's n-th largest (ties included), and > 0
            floor = c.topk(n, dim=1).values[:, -1].clamp(min=1)
            r, j = torch.nonzero(c >= floor.unsqueeze(1), as_tuple=True)
            got = c[r, j].long()
            key = got * d + pref[j]
            by = torch.argsort(key, descending=True, stable=True)
            by = by[torch.argsort(r[by], stable=True)]  # grouped by row, best first
            r, j, got = r[by], j[by], got[by]
            per_row = torch.bincount(r, minlength=b)
            place = torch.arange(len(r), device=device) - (torch.cumsum(per_row, 0) - per_row)[r]
            keep = place < n
            r, j, got, place = r[keep].cpu() + lo, j[keep].cpu(), got[keep].cpu(), place[keep].cpu()
            latents[r, place], counts[r, place] = j, got
        return latents, counts


def cofire_blocks(features: torch.Tensor, d_sae: int, budget: int) -> list[torch.Tensor]:
    """The chosen latents split into blocks of at most budget // d_sae (at least 1) latents."""
    size = max(1, budget // d_sae)
    return list(features.split(size))


class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n: int = 1) -> None:
        pass


def _no_bar(desc: str) -> _NoBar:
    return _NoBar()


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
    n_fire_all: torch.Tensor | None = None  # [d_sae] int64, firing count of every latent of the SAE
    cofire_latents: torch.Tensor | None = None  # [F, n_neighbours] the latents firing most with it (-1: none)
    cofire_counts: torch.Tensor | None = None  # [F, n_neighbours] tokens where both fire
    n_passes: int = 2  # passes over the tokens (more than 2 when co-firing needed extra blocks)

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
def encode_all(model, sae, hook_name: str, idx: torch.Tensor, bos_id: int) -> torch.Tensor:
    """[B, T, d_sae] activations of every latent, zero at BOS positions."""
    acts = model.run_with_cache(idx, [hook_name])[hook_name]
    B, T, d = acts.shape
    z = sae.encode(acts.reshape(B * T, d).to(sae.W_dec.dtype)).float().view(B, T, -1)
    return z.masked_fill((idx == bos_id).unsqueeze(-1), 0.0)


def latents_of(model, sae, hook_name: str, idx: torch.Tensor, features: torch.Tensor, bos_id: int) -> torch.Tensor:
    """[B, T, F] activations of the chosen latents, zero at BOS positions."""
    return encode_all(model, sae, hook_name, idx, bos_id)[..., features.to(idx.device)]


class _Stream:
    """One pass: each batch's activations of every latent and of the chosen ones, with the progress bar."""

    def __init__(self, model, sae, hook, features, bos_id, device):
        self.model, self.sae, self.hook, self.bos_id, self.device = model, sae, hook, bos_id, device
        self.features = features
        self.every = len(features) == sae.W_dec.shape[0] and bool((features == torch.arange(
            len(features), device=features.device)).all())

    def __call__(self, batches, bar, cofire: CoFire | None = None, count_all: bool = False):
        """Yield (idx, z of the chosen latents, firing count of every latent in the batch or None)."""
        d_sae = self.sae.W_dec.shape[0]
        with bar as b:
            for idx in batches:
                idx = idx.to(self.device)
                z_all = encode_all(self.model, self.sae, self.hook, idx, self.bos_id)
                z = z_all if self.every else z_all[..., self.features]
                fired = None
                if cofire is not None or count_all:
                    tok, lat = torch.nonzero(z_all.flatten(0, 1) > 0, as_tuple=True)  # sorted by token
                    if cofire is not None:
                        cofire.add(tok, lat, idx.numel())
                    fired = torch.bincount(lat, minlength=d_sae) if count_all else None
                yield idx, z, fired
                b.update(idx.numel())


def _pass_one(stream, batches, cfg, bar, cofire, d_sae):
    F, device = len(stream.features), stream.device
    n_fire = torch.zeros(F, dtype=torch.long, device=device)
    n_fire_all = torch.zeros(d_sae, dtype=torch.long, device=device)
    sum_act = torch.zeros(F, dtype=torch.float64, device=device)
    max_act = torch.zeros(F, device=device)
    top = GroupTopK(F, cfg.top_k, cfg.window, device)
    n_tokens = n_rows = 0
    for idx, z, fired in stream(batches, bar, cofire, count_all=True):
        flat = z.flatten(0, 1)
        n_tokens, n_rows = n_tokens + int((idx != stream.bos_id).sum()), n_rows + len(idx)
        n_fire_all += fired
        n_fire += fired if stream.every else fired[stream.features]
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
    return n_tokens, n_rows, n_fire, n_fire_all, sum_act, max_act, top


def _windows(idx, z, b, t, f, cfg: StatsConfig):
    """Token ids and the latent's activations on the window around each event (b, t, f)."""
    pos = t.unsqueeze(1) + torch.arange(cfg.window, device=t.device)  # positions in the padded row
    ids = torch.nn.functional.pad(idx, (cfg.before, cfg.after), value=-1)
    zp = torch.nn.functional.pad(z, (0, 0, cfg.before, cfg.after))
    return ids[b.unsqueeze(1), pos], zp[b.unsqueeze(1), pos, f.unsqueeze(1)]


def _pass_two(stream, batches, cfg, max_act, bar, cofire):
    F, H, Q, device = len(stream.features), cfg.n_bins, cfg.n_intervals, stream.device
    hist = torch.zeros(F * H, dtype=torch.long, device=device)
    samples = GroupTopK(F * Q, cfg.per_interval, cfg.window, device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    for idx, z, _ in stream(batches, bar, cofire):
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
                  cfg: StatsConfig | None = None, device=None, progress=None) -> FeatureStats:
    """Run both passes (and the extra co-firing passes, if any). batches_fn() must return the same
    token batches on every call. progress(desc) -> a context manager with update(n_tokens) (a tqdm bar,
    e.g. saelightning.progress.progress_bar); None shows none."""
    cfg = cfg or StatsConfig()
    progress = progress or _no_bar
    d_sae = sae.W_dec.shape[0]
    features = torch.arange(d_sae) if features is None else torch.as_tensor(features, dtype=torch.long)
    if len(features) == 0 or int(features.min()) < 0 or int(features.max()) >= d_sae:
        raise SAELightningError(f"features must be latent indices in 0..{d_sae - 1}; check --features")
    device = torch.device(device or "cpu")
    features = features.to(device)
    blocks = cofire_blocks(features, d_sae, cfg.cofire_budget)
    n_passes = max(2, len(blocks))
    stream = _Stream(model, sae, hook_name, features, bos_id, device)

    def bar(k):
        what = {1: "densities, top contexts", 2: "histograms, samples"}.get(k, "co-firing")
        return progress(f"pass {k}/{n_passes}: {what}")

    cofire = CoFire(blocks[0], d_sae, device)
    n_tokens, n_rows, n_fire, n_fire_all, sum_act, max_act, top = _pass_one(
        stream, batches_fn(), cfg, bar(1), cofire, d_sae)
    if n_tokens == 0:
        raise SAELightningError("the val shard gave no tokens; check --data (a dir of shard_*.parquet with text)")
    tops = [cofire.top(cfg.n_neighbours, n_fire_all)]
    cofire = None  # freed before the next block's counts exist
    cofire = CoFire(blocks[1], d_sae, device) if len(blocks) > 1 else None
    hist, samples = _pass_two(stream, batches_fn(), cfg, max_act, bar(2), cofire)
    if cofire is not None:
        tops.append(cofire.top(cfg.n_neighbours, n_fire_all))
        cofire = None
    for k in range(2, len(blocks)):  # each further block of latents: one more pass for its counts
        cofire = CoFire(blocks[k], d_sae, device)
        for _ in stream(batches_fn(), bar(k + 1), cofire):
            pass
        tops.append(cofire.top(cfg.n_neighbours, n_fire_all))
        cofire = None
    cofire_latents, cofire_counts = (torch.cat(parts) for parts in zip(*tops))
    return FeatureStats(features.cpu(), n_tokens, n_rows, n_fire.cpu(), sum_act.cpu(), max_act.cpu(),
                        hist.cpu(), _to_cpu(top), _to_cpu(samples), cfg, n_fire_all.cpu(), cofire_latents,
                        cofire_counts, n_passes)


def _to_cpu(heap: GroupTopK) -> GroupTopK:
    for name in ("keys", "values", "tokens", "acts"):
        setattr(heap, name, getattr(heap, name).cpu())
    return heap


# ---------------------------------------------------------------------------------------------
# Nearest latents by decoder direction


@torch.inference_mode()
def nearest_latents(W_dec: torch.Tensor, features: torch.Tensor, n: int, block: int = 2**24):
    """For each chosen latent, the n other latents whose decoder rows (W_dec is [d_sae, d_in]) have the
    largest cosine similarity with its own: (cosines [F, n] descending, latents [F, n]).

    Computed a block of chosen latents at a time against all d_sae rows, so at most `block` similarities
    exist at once (never the d_sae x d_sae matrix). A zero decoder row has cosine 0 with every row."""
    W = torch.nn.functional.normalize(W_dec.detach().float(), dim=1)
    d = W.shape[0]
    n = min(n, d - 1)
    features = torch.as_tensor(features, dtype=torch.long).to(W.device)
    step = max(1, block // d)
    cos, latents = [], []
    for lo in range(0, len(features), step):
        f = features[lo:lo + step]
        sim = W[f] @ W.T  # [b, d_sae]
        sim[torch.arange(len(f), device=W.device), f] = float("-inf")  # not itself
        v, j = sim.topk(n, dim=1)
        cos.append(v.cpu()), latents.append(j.cpu())
    return torch.cat(cos), torch.cat(latents)


# ---------------------------------------------------------------------------------------------
# Logit effect


@torch.inference_mode()
def logit_effect(model, sae, hook_name: str, features: torch.Tensor, cfg: StatsConfig, chunk: int = 256):
    """Direct effect of each latent's decoder direction on the logits.

    For latent i with decoder row u_i (mapped through the MLP's c_proj first when the hook is the
    MLP hidden layer; a transcoder's output hook decides), this is lm_head(final_norm(u_i)): the
    logits the model would give if its last residual were u_i alone. The norm is nanochat's
    weightless RMS norm, so on a single direction it only rescales u_i to rms 1: the numbers are per
    unit-rms direction and the token ranking equals that of W_U u_i. Later layers, the norm's
    dependence on the rest of the residual, the current era's backout and the logit softcap are left
    out (the usual direct-logit-attribution view).
    Returns (top values, top ids, bottom values, bottom ids, hist heights [F, bins], hist centres).
    """
    # a transcoder's decoder writes its output hook's space (a crosscoder's per-model block has no config)
    if getattr(getattr(sae, "config", None), "is_transcoder", False):
        hook_name = sae.metadata.get("hook_name_out") or hook_name
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
