"""nanochat's GPT, both architecture eras, with named hook points, a KV cache and streaming generation.

"original" is karpathy/nanochat as first published (Oct-Dec 2025: plain pre-norm blocks, full causal
attention, RoPE base 10000, rotary tables rounded to bf16, wte kept in bf16). "current" is HEAD
(value embeddings with a per-head gate, resid/x0 lambdas, sliding windows, smear, backout, QK scale
1.2, RoPE base 100000). The module tree and parameter names equal nanochat's, so a nanochat
state_dict loads as it is and forward hooks on transformer.h[i] see the residual stream after block i.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from saelightning.errors import SAELightningError
from saelightning.hooks import parse_hook

ERAS = ("original", "current")
SOFTCAP = 15.0  # both eras squash logits to [-15, 15]
ROPE_BASE = {"original": 10000, "current": 100000}
QK_SCALE = 1.2  # current era: q and k are each multiplied by this after QK-norm
VE_GATE_CHANNELS = 12  # current era: the value-embedding gate reads the first 12 channels
SMEAR_CHANNELS = 24  # current era: the smear gate reads the first 24 channels
VE_GATE_SCALE = 3.0  # current era: the value-embedding gate's range is (0, 3)

Hooks = Mapping[str, Callable[[torch.Tensor], "torch.Tensor | None"]]


@dataclass
class GPTConfig:
    sequence_len: int = 2048  # training context; sets the sliding-window sizes of the current era
    vocab_size: int = 32768  # tokenizer vocabulary incl. special tokens (logits are cropped to it)
    n_layer: int = 12  # number of transformer blocks
    n_head: int = 6  # query heads
    n_kv_head: int = 6  # key/value heads (GQA when fewer than n_head)
    n_embd: int = 768  # model width d_model
    window_pattern: str | None = None  # per-layer S/L tiling; None = "SSSL" (current) or "L" (original)
    era: str = "current"  # "original" (Oct-Dec 2025 layout) or "current" (HEAD 92d63d4)

    def __post_init__(self):
        if self.era not in ERAS:
            raise SAELightningError(f"unknown nanochat era {self.era!r}; use one of {ERAS}")
        if self.window_pattern is None:
            self.window_pattern = "SSSL" if self.era == "current" else "L"
        self.window_pattern = self.window_pattern.upper()
        if not self.window_pattern or set(self.window_pattern) - set("SL"):
            raise SAELightningError(f"window_pattern {self.window_pattern!r} must be letters S and L only")
        if self.era == "original" and "S" in self.window_pattern:
            raise SAELightningError("the original era has no sliding windows; use window_pattern 'L'")
        for name in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            if int(getattr(self, name)) < 1:
                raise SAELightningError(f"GPTConfig.{name} must be a positive integer, got {getattr(self, name)}")
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise SAELightningError(
                f"n_embd {self.n_embd} must split into {self.n_head} heads of even size; change n_embd or n_head"
            )
        if self.n_kv_head > self.n_head or self.n_head % self.n_kv_head:
            raise SAELightningError(f"n_head {self.n_head} must be a multiple of n_kv_head {self.n_kv_head}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def norm(x: torch.Tensor) -> torch.Tensor:
    """RMS norm without weights (nanochat has no norm parameters)."""
    return F.rms_norm(x, (x.size(-1),))


def has_value_embed(layer: int, n_layer: int) -> bool:
    """Current era: value embeddings on alternate layers, the last layer always included."""
    return layer % 2 == (n_layer - 1) % 2


def window_sizes(config: GPTConfig) -> list[int]:
    """Left attention window per layer: S = ceil(seq_len/4 to a multiple of 128), L = seq_len; last is L.

    The original era has no windows at all (-1 = unlimited); at HEAD even "L" is a window of sequence_len.
    """
    if config.era == "original":
        return [-1] * config.n_layer
    long = config.sequence_len
    short = -(-long // 4 // 128) * 128  # quarter context, ceil to the 128 tile: 2048 -> 512, 3000 -> 768
    sizes = [short if config.window_pattern[i % len(config.window_pattern)] == "S" else long
             for i in range(config.n_layer)]
    sizes[-1] = long
    return sizes


def rotary_tables(length: int, head_dim: int, era: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [1, length, 1, head_dim/2] in fp32, computed with nanochat's exact op order.

    The original era rounds the tables to bf16 (and keeps them so even when the model runs in fp32):
    rounding here and promoting back reproduces its products exactly.
    """
    channels = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
    inv_freq = 1.0 / (ROPE_BASE[era] ** (channels / head_dim))
    t = torch.arange(length, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)
    cos, sin = freqs.cos(), freqs.sin()
    if era == "original":
        cos, sin = cos.bfloat16().float(), sin.bfloat16().float()
    return cos[None, :, None, :], sin[None, :, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split RoPE as nanochat writes it (a rotation by -theta; only relative angles matter)."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos], dim=-1)


class KVCache:
    """Keys/values per layer ([B, n_kv_head, T, head_dim]), the position, and the last embedding for smear."""

    def __init__(self, n_layer: int):
        self.keys: list[torch.Tensor | None] = [None] * n_layer
        self.values: list[torch.Tensor | None] = [None] * n_layer
        self.pos = 0  # tokens already in the cache
        self.prev_embedding: torch.Tensor | None = None  # normed embedding of the last token (pre-smear)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


def attend(q, k, v, window: int) -> torch.Tensor:
    """Causal attention of Tq queries (the last Tq positions) over Tk keys, optionally windowed.

    window = how many earlier tokens a query may see (-1: all). The branches follow nanochat's SDPA
    path so that the kernels (and so the rounding) are the same ones nanochat runs on CPU.
    """
    tq, tk = q.size(2), k.size(2)
    if k.size(1) != q.size(1):  # GQA: each kv head serves n_head/n_kv_head query heads
        k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
        v = v.repeat_interleave(q.size(1) // v.size(1), dim=1)
    if tq == tk and (window < 0 or window >= tq):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if tq == 1:  # one decoding step: keep the last window+1 keys
        if 0 <= window < tk:
            k, v = k[:, :, tk - window - 1:], v[:, :, tk - window - 1:]
        return F.scaled_dot_product_attention(q, k, v)
    row = (tk - tq) + torch.arange(tq, device=q.device).unsqueeze(1)
    col = torch.arange(tk, device=q.device).unsqueeze(0)
    mask = col <= row
    if 0 <= window < tk:
        mask = mask & (row - col <= window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.layer, self.era = layer, config.era
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        d, kv = config.n_embd, config.n_kv_head * config.head_dim
        self.c_q = nn.Linear(d, config.n_head * config.head_dim, bias=False)
        self.c_k = nn.Linear(d, kv, bias=False)
        self.c_v = nn.Linear(d, kv, bias=False)
        self.c_proj = nn.Linear(d, d, bias=False)
        gated = config.era == "current" and has_value_embed(layer, config.n_layer)
        self.ve_gate = nn.Linear(VE_GATE_CHANNELS, config.n_kv_head, bias=False) if gated else None

    def forward(self, x, ve, cos_sin, window: int, kv_cache: KVCache | None):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:  # value residual: a gated per-token embedding added to v
            gate = VE_GATE_SCALE * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        cos, sin = cos_sin
        q, k = apply_rotary(q, cos, sin).to(x.dtype), apply_rotary(k, cos, sin).to(x.dtype)
        q, k = norm(q), norm(k)
        if self.era == "current":
            q, k = q * QK_SCALE, k * QK_SCALE
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.append(self.layer, k, v)
        y = attend(q, k, v, window)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x, hook=None):
        h = F.relu(self.c_fc(x)).square()
        return self.c_proj(_call_hook(hook, h, "mlp.hook_post"))


def _call_hook(hook, x: torch.Tensor, name: str) -> torch.Tensor:
    """Run a hook; a returned tensor replaces the activation (same shape), None keeps it."""
    if hook is None:
        return x
    out = hook(x)
    if out is None:
        return x
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise SAELightningError(
            f"hook at {name} returned {shape}; return None or a tensor of shape {tuple(x.shape)}"
        )
    return out.to(x.dtype)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos_sin, window: int, kv_cache=None, hooks: dict | None = None):
        h = hooks or {}
        x = _call_hook(h.get("hook_resid_pre"), x, "hook_resid_pre")
        attn_out = _call_hook(h.get("hook_attn_out"), self.attn(norm(x), ve, cos_sin, window, kv_cache),
                              "hook_attn_out")
        x = _call_hook(h.get("hook_resid_mid"), x + attn_out, "hook_resid_mid")
        mlp_in = _call_hook(h.get("hook_mlp_in"), norm(x), "hook_mlp_in")
        mlp_out = _call_hook(h.get("hook_mlp_out"), self.mlp(mlp_in, h.get("mlp.hook_post")), "hook_mlp_out")
        return _call_hook(h.get("hook_resid_post"), x + mlp_out, "hook_resid_post")


class GPT(nn.Module):
    """nanochat's GPT. forward(idx) returns fp32 softcapped logits [B, T, vocab_size]."""

    def __init__(self, config: GPTConfig, pad_vocab_size_to: int | None = None):
        super().__init__()
        self.config = config
        # HEAD pads the vocabulary to a multiple of 64 (cropped in forward); Oct-Nov 2025 did not
        pad = pad_vocab_size_to or (64 if config.era == "current" else 1)
        self.padded_vocab_size = -(-config.vocab_size // pad) * pad
        self.window_sizes = window_sizes(config)
        V, d = self.padded_vocab_size, config.n_embd
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(V, d),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = nn.Linear(d, V, bias=False)
        if config.era == "current":
            self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
            self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
            self.smear_gate = nn.Linear(SMEAR_CHANNELS, 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
            self.backout_lambda = nn.Parameter(torch.full((1,), 0.2))
            kv_dim = config.n_kv_head * config.head_dim
            self.value_embeds = nn.ModuleDict({
                str(i): nn.Embedding(V, kv_dim) for i in range(config.n_layer) if has_value_embed(i, config.n_layer)
            })
        self._rotary: tuple[torch.Tensor, torch.Tensor] | None = None  # grown on demand, never saved
        self.init_weights()

    # -- public attributes other parts rely on
    @property
    def n_layer(self) -> int:
        return self.config.n_layer

    @property
    def d_model(self) -> int:
        return self.config.n_embd

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return norm(x)

    @torch.no_grad()
    def init_weights(self):
        """nanochat's own initialisation for the era (so the demo model trains like nanochat does)."""
        if self.config.era == "original":
            self._init_original()
        else:
            self._init_current()

    def _init_original(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):  # https://arxiv.org/abs/2310.17813
                fan_out, fan_in = m.weight.shape
                nn.init.normal_(m.weight, 0.0, 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in)))
        nn.init.normal_(self.transformer.wte.weight, 0.0, 1.0)
        nn.init.zeros_(self.lm_head.weight)
        for block in self.transformer.h:
            nn.init.zeros_(block.mlp.c_proj.weight)
            nn.init.zeros_(block.attn.c_proj.weight)
        self.transformer.wte.to(torch.bfloat16)  # the original era keeps its embedding in bf16

    def _init_current(self):
        n, d = self.config.n_layer, self.config.n_embd
        nn.init.normal_(self.transformer.wte.weight, 0.0, 0.8)
        nn.init.normal_(self.lm_head.weight, 0.0, 0.001)
        s = 3**0.5 * d**-0.5  # uniform bound with the std of N(0, 1/d)
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
                nn.init.uniform_(lin.weight, -s, s)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.uniform_(block.mlp.c_fc.weight, -0.4 * s, 0.4 * s)
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.uniform_(block.attn.ve_gate.weight, 0.0, 0.02)
        for i in range(n):
            self.resid_lambdas[i] = 1.15 - 0.10 * i / max(n - 1, 1)
            self.x0_lambdas[i] = 0.20 - 0.15 * i / max(n - 1, 1)
        nn.init.zeros_(self.smear_lambda)
        nn.init.constant_(self.backout_lambda, 0.2)
        nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)
        for ve in self.value_embeds.values():
            nn.init.uniform_(ve.weight, -s, s)

    # -- forward
    def _cos_sin(self, start: int, length: int, device, dtype):
        need = start + length
        if self._rotary is None or self._rotary[0].size(1) < need or self._rotary[0].device != device:
            size = max(need, 10 * self.config.sequence_len)  # nanochat precomputes 10x the context
            with torch.inference_mode(False):  # a cache built during generate must still serve training
                self._rotary = rotary_tables(size, self.config.head_dim, self.config.era, device)
        cos, sin = self._rotary
        return cos[:, start:need].to(dtype), sin[:, start:need].to(dtype)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def _embed(self, idx: torch.Tensor, kv_cache: KVCache | None) -> torch.Tensor:
        x = norm(self.transformer.wte(idx).to(self.compute_dtype))
        if self.config.era == "original":
            return x
        # smear: add a gated share of the previous token's embedding (cheap bigram information)
        prev = x[:, :-1]
        if kv_cache is not None:
            if kv_cache.prev_embedding is not None:  # decoding: the predecessor's embedding was cached
                prev = torch.cat([kv_cache.prev_embedding, prev], dim=1)
            kv_cache.prev_embedding = x[:, -1:]
        if prev.size(1) == 0:
            return x
        k = x.size(1) - prev.size(1)  # leading positions without a predecessor (1, or 0 when decoding)
        gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(x[:, k:, :SMEAR_CHANNELS]))
        return torch.cat([x[:, :k], x[:, k:] + gate * prev], dim=1)

    def forward(self, idx: torch.Tensor, hooks: Hooks | None = None, stop_at_layer: int | None = None,
                kv_cache: KVCache | None = None) -> torch.Tensor | None:
        """Logits (fp32, softcapped, padding cropped), or None when stop_at_layer is given.

        hooks: {hook name: fn(activation) -> replacement or None}. stop_at_layer: run blocks
        0..stop_at_layer only (for activations) and compute no logits. kv_cache: positions continue
        from kv_cache.pos and the cache is extended.
        """
        n = self.config.n_layer
        per_layer = self._split_hooks(hooks)
        if stop_at_layer is not None:
            if not 0 <= stop_at_layer < n:
                raise SAELightningError(f"stop_at_layer {stop_at_layer} is out of range: "
                                        f"the model has layers 0..{n - 1}")
            if kv_cache is not None:
                raise SAELightningError("stop_at_layer cannot be used with a KV cache "
                                        "(later layers would miss entries)")
        T0 = kv_cache.pos if kv_cache is not None else 0
        x = self._embed(idx, kv_cache)
        cos_sin = self._cos_sin(T0, idx.size(1), idx.device, x.dtype)
        x0, x_backout = x, None
        last = n - 1 if stop_at_layer is None else stop_at_layer
        for i in range(last + 1):
            ve = None
            if self.config.era == "current":
                # 0-dim lambdas keep x's dtype without a cast, exactly as nanochat writes it
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
                if str(i) in self.value_embeds:
                    ve = self.value_embeds[str(i)](idx).to(x.dtype)
            x = self.transformer.h[i](x, ve, cos_sin, self.window_sizes[i], kv_cache, per_layer.get(i))
            if i == n // 2:
                x_backout = x
        if kv_cache is not None:
            kv_cache.pos += idx.size(1)
        if stop_at_layer is not None:
            return None
        if self.config.era == "current":  # backout: remove the mid-stack residual before the head
            x = x - self.backout_lambda.to(x.dtype) * x_backout
        logits = self.lm_head(norm(x))[..., : self.config.vocab_size].float()
        return SOFTCAP * torch.tanh(logits / SOFTCAP)

    def _split_hooks(self, hooks: Hooks | None) -> dict[int, dict]:
        per_layer: dict[int, dict] = {}
        for name, fn in (hooks or {}).items():
            layer, kind = parse_hook(name, self.config.n_layer)
            per_layer.setdefault(layer, {})[kind] = fn
        return per_layer

    def run_with_cache(self, idx: torch.Tensor, names, hooks: Hooks | None = None) -> dict[str, torch.Tensor]:
        """Activations at the named hook points, running blocks only up to the deepest one needed."""
        names = list(names)
        if not names:
            raise SAELightningError("run_with_cache needs at least one hook name")
        cache: dict[str, torch.Tensor] = {}
        all_hooks = dict(hooks or {})
        for name in names:
            all_hooks[name] = _capture(cache, name, all_hooks.get(name))
        deepest = max(parse_hook(nm, self.config.n_layer)[0] for nm in names)
        self.forward(idx, hooks=all_hooks, stop_at_layer=deepest)
        return {name: cache[name] for name in names}

    def capturer(self, compiled: bool = False):
        """run_with_cache itself, or run_with_cache under torch.compile: Inductor fuses the truncated forward's
        norms, rotary embeddings and MLP activations (the first call compiles: tens of seconds)."""
        return torch.compile(self.run_with_cache) if compiled else self.run_with_cache

    # -- generation
    @torch.inference_mode()
    def generate(self, tokens, max_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 seed: int = 42, hooks: Hooks | None = None):
        """Yield, per step, the next token id of each prompt (a list). Prefill once, then T=1 steps.

        tokens: one prompt (list[int]) or several (list[list[int]]); prompts of equal length share a
        batch. temperature 0 is greedy; top_k keeps the k most likely tokens before sampling.
        """
        prompts = [tokens] if tokens and isinstance(tokens[0], int) else list(tokens)
        if not prompts or any(len(p) == 0 for p in prompts):
            raise SAELightningError("generate needs non-empty prompts (lists of token ids)")
        yield from decode_batched(
            prompts, self.config.n_layer, self.lm_head.weight.device, max_tokens, temperature, top_k, seed,
            lambda idx, cache, rows: self.forward(idx, hooks=hooks, kv_cache=cache)[:, -1, :])


def _capture(cache: dict, name: str, inner):
    def hook(x):
        out = inner(x) if inner is not None else None
        cache[name] = x if out is None else out
        return out
    return hook


@torch.inference_mode()
def check_sampling(temperature: float, top_k: int | None) -> None:
    if not (math.isfinite(temperature) and temperature >= 0):
        raise SAELightningError(f"temperature {temperature} must be a finite number >= 0 (0 = greedy)")
    if top_k is not None and top_k < 1:
        raise SAELightningError(f"top_k {top_k} must be >= 1 (or None: sample from every token)")


def decode_batched(prompts: list[list[int]], n_layer: int, device, max_tokens: int, temperature: float,
                   top_k: int | None, seed: int, step_logits):
    """Yield, per step, the next token id of every prompt, decoding with a KV cache.

    Prompts of one length share a batch and a cache: a prefill, then one token per step.
    step_logits(idx [B, T], cache, rows) returns the last position's logits [B, V] of the prompts
    `rows`. temperature 0 is greedy; sampling is seeded.
    """
    check_sampling(temperature, top_k)
    rng = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
    groups: dict[int, list[int]] = {}
    for j, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(j)
    caches = {L: KVCache(n_layer) for L in groups}
    inputs = {L: torch.tensor([prompts[j] for j in js], dtype=torch.long, device=device) for L, js in groups.items()}
    for _ in range(max_tokens):
        step = [0] * len(prompts)
        for L, js in groups.items():
            nxt = sample_next(step_logits(inputs[L], caches[L], js), temperature, top_k, rng)
            inputs[L] = nxt[:, None]
            for j, t in zip(js, nxt.tolist()):
                step[j] = t
        yield step


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, rng) -> torch.Tensor:
    """Next token per row of [B, V] logits: argmax at temperature 0, else top-k filtered sampling."""
    if top_k is not None and top_k > 0:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = logits.masked_fill(logits < v[:, [-1]], -float("inf"))
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = F.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=rng)[:, 0]
