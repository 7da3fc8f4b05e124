"""InterpretableModel: read and steer a frozen nanochat model's features through exported SAEs.

    im = InterpretableModel(load_nanochat(path), [load_sae(d) for d in sae_dirs])
    with im.track(top_n=8) as trace:          # record the active latents, output unchanged
        logits = im(tokens)
    values, indices = trace.latents("blocks.1.hook_resid_post")   # [B, T, 8] each
    with im.steering([Steer("blocks.1.hook_resid_post", 123, "add", 4.0)]):
        for step in im.generate("The", max_tokens=20, top_features=5):
            print(step.tokens, step.features)

Steering always edits the activation as x + (f' - f) @ W_dec over the changed latents only (a transcoder or CLT
latent: read at its MLP input, the change added to every MLP output it writes), so the
SAE's reconstruction error stays in the stream (replacing x by the reconstruction would drop it).
BOS positions are never steered: their activation is an outlier the SAE was not trained on.

The names of the seed extension (nanochat PR #169, sae/runtime.py) are kept as thin forms of these:
`interpretation_enabled()` + `get_active_features(hook_point, top_k)` track, `steering_enabled({hook:
(feature_idx, strength)})` and `steer(ids, feature_id=(hook, idx), strength=s)` steer ("add" by default).

A prompt longer than the model's context (config.sequence_len) is cut on the left with a warning, or
refused with truncate="error"; see InterpretableModel.fit_context.
"""

from __future__ import annotations

import math
import sys
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch

from saelightning import resolve
from saelightning.command import parse
from saelightning.errors import SAELightningError
from saelightning.export import load_sae
from saelightning.hooks import hook_width, parse_hook
from saelightning.nanochat.model import KVCache, check_sampling, decode_batched
from saelightning.saes.clt import CrossLayerTranscoder
from saelightning.saes.crosscoder import OneModel

STEER_MODES = ("add", "clamp", "scale")
TRUNCATE_MODES = ("left", "error")  # a prompt longer than the context: keep its last tokens (warned), or refuse


class ContextWarning(UserWarning):
    """A prompt was cut to the model's context, or generation runs past it (InterpretableModel.fit_context)."""


@dataclass(frozen=True)
class Steer:
    hook: str  # hook point of the SAE whose latent is steered
    latent: int  # latent index in that SAE
    mode: str  # "add": f += value (adds value * decoder row); "clamp": f = value; "scale": f *= value
    value: float  # strength, clamp value or factor

    def __post_init__(self):
        if self.mode not in STEER_MODES:
            raise SAELightningError(f"unknown steer mode {self.mode!r}; use one of {STEER_MODES}")
        if not math.isfinite(self.value):
            raise SAELightningError(f"steer value {self.value} for latent {self.latent} on {self.hook} "
                                    "must be a finite number (NaN/inf would poison every logit)")


def parse_steer(spec: str, mode: str, default_hook: str | None = None) -> Steer:
    """'HOOK:LATENT:VALUE' (or 'LATENT:VALUE' when only one SAE is loaded) -> Steer."""
    parts = spec.rsplit(":", 2)
    if len(parts) == 2 and default_hook is not None:
        parts = [default_hook, *parts]
    try:
        hook, latent, value = parts[0], int(parts[1]), float(parts[2])
    except (ValueError, IndexError):
        raise SAELightningError(f"bad --{'steer' if mode == 'add' else mode} {spec!r}; "
                                "write HOOK:LATENT:VALUE, e.g. blocks.1.hook_resid_post:123:4.0") from None
    return Steer(hook, latent, mode, value)


class Trace:
    """Active latents recorded while tracking: per hook, one (values, indices) pair per forward.

    values/indices are [B, T, top_n], largest first; slots past a token's active latents hold
    value 0 and index -1. In generation, the prefill is one record and every step one more (T=1).
    Where nothing is steered, a forward only keeps its activation and the SAE encodes all of them
    at once when `records` is first read: one large matmul instead of one per generated token.
    """

    def __init__(self, top_n: int | None = 8):
        self.top_n = top_n  # latents kept per token; None = all active ones (padded to the batch max)
        self._records: dict[str, list] = {}  # hook -> [(values, indices) or _Pending, ...]
        # hook -> the batch of each record: ("generate", call, prompt rows) for a generate group, else ("forward", B)
        self._batches: dict[str, list[tuple]] = {}
        self.batch: tuple | None = None  # set by generate around each prompt group's forward

    def record(self, hook: str, f: torch.Tensor) -> None:
        """Record dense latents f [B, T, d_sae] now."""
        self._append(hook, self._top(f), f.shape[0])

    def defer(self, hook: str, x: torch.Tensor, encode_top) -> None:
        """Record the activation x [B, T, d]; encode_top(x_flat [N, d], top_n) runs when read."""
        self._append(hook, _Pending(x, encode_top), x.shape[0])

    def _append(self, hook: str, rec, B: int) -> None:
        self._records.setdefault(hook, []).append(rec)
        self._batches.setdefault(hook, []).append(self.batch or ("forward", B))

    def _top(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return top_latents(f, self.top_n)

    @property
    def records(self) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
        for recs in self._records.values():
            slots = [i for i, r in enumerate(recs) if isinstance(r, _Pending)]
            if not slots:
                continue
            xs = [recs[i].x for i in slots]
            flat = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]) if len(xs) > 1 else xs[0].flatten(0, 1)
            # chunks bound the dense [N, d_sae] latents of a long generation
            parts = [recs[slots[0]].encode_top(chunk, self.top_n) for chunk in flat.split(_ENCODE_CHUNK)]
            values, indices = _cat_padded(parts)
            sizes = [x.shape[0] * x.shape[1] for x in xs]
            for i, x, v, j in zip(slots, xs, values.split(sizes), indices.split(sizes)):
                recs[i] = (v.view(x.shape[0], x.shape[1], -1), j.view(x.shape[0], x.shape[1], -1))
        return self._records

    def latents(self, hook: str) -> tuple[torch.Tensor, torch.Tensor]:
        """All records of a hook joined along T: [B, T, n]. The forwards must be of one batch of prompts
        (generate runs the prompts of each length as a batch of its own: read those with prompt_latents)."""
        records = self._checked(hook)
        if len(set(self._batches[hook])) > 1:
            raise SAELightningError(
                f"the records at {hook!r} come from {len(set(self._batches[hook]))} different batches (generate "
                f"runs each prompt length as its own batch); read one prompt's with prompt_latents({hook!r}, i)")
        return _cat_padded(records, dim=1)

    def prompt_latents(self, hook: str, prompt: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One prompt's records at a hook joined along T: [T, n]. `prompt` indexes the prompts of the
        generate call tracked (its prefill, then one position per step), or the batch rows of plain forwards."""
        records = self._checked(hook)
        batches = self._batches[hook]
        calls = {b[:2] if b[0] == "generate" else "forward" for b in batches}
        if len(calls) > 1:
            raise SAELightningError(f"the records at {hook!r} come from {len(calls)} generate calls or forwards; "
                                    "track each generate call in its own track() to read a prompt's latents")
        picked = []
        for (values, indices), b in zip(records, batches):
            rows = list(b[2]) if b[0] == "generate" else list(range(b[1]))
            if prompt in rows:
                r = rows.index(prompt)
                picked.append((values[r], indices[r]))
        if not picked:
            raise SAELightningError(f"no record at {hook!r} holds prompt {prompt}; the tracked batches hold "
                                    f"prompts 0..{max(max(b[2]) if b[0] == 'generate' else b[1] - 1 for b in batches)}")
        return _cat_padded(picked, dim=0)

    def _checked(self, hook: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        records = self.records
        if hook not in records:
            raise SAELightningError(f"nothing was tracked at {hook!r}; tracked: {sorted(records)}")
        return records[hook]


_ENCODE_CHUNK = 4096  # rows per deferred encode


@dataclass
class _Pending:
    x: torch.Tensor  # the activation as the hook saw it (the model never edits activations in place)
    encode_top: Callable  # (flat activations, top_n) -> (values, indices) [N, n]


def top_latents(f: torch.Tensor, top_n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The top_n largest latents of f [..., d_sae] (None: all active ones); inactive slots get index -1."""
    n = top_n or max(int((f != 0).sum(-1).max()), 1) if f.numel() else 1
    values, indices = f.topk(min(n, f.shape[-1]), dim=-1)
    return values, indices.masked_fill(values == 0, -1)


def _cat_padded(pairs, dim: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate (values, indices) pairs whose last dims differ, padding with 0 / -1."""
    width = max(v.shape[-1] for v, _ in pairs)
    if all(v.shape[-1] == width for v, _ in pairs):
        return torch.cat([v for v, _ in pairs], dim), torch.cat([i for _, i in pairs], dim)
    pad = torch.nn.functional.pad
    return (torch.cat([pad(v, (0, width - v.shape[-1])) for v, _ in pairs], dim),
            torch.cat([pad(i, (0, width - i.shape[-1]), value=-1) for _, i in pairs], dim))


def dense_latents(values: torch.Tensor, indices: torch.Tensor, d_sae: int) -> torch.Tensor:
    """(values, indices) [..., n] (inactive slots: index -1) -> dense latents [..., d_sae]."""
    active = indices >= 0
    dense = values.new_zeros(*values.shape[:-1], d_sae)
    # scatter_add: the masked slots all land on column 0 with value 0, which leaves a real latent 0 exact
    return dense.scatter_add_(-1, indices.clamp_min(0), values * active)


class TranscoderLatents(torch.nn.Module):
    """One layer of a transcoder or CLT as InterpretableModel reads and steers it: its latents are read at the MLP
    input hook (`hook`), and a steered latent's change times its decoder row is added to each output it writes
    (`writes`: {output hook: rows [d_sae, d] in raw units}; a CLT latent of layer l writes layers l..L-1), the
    transcoder's error left in the stream. The module behaves as an SAE for tracking (encode, W_enc, W_dec)."""

    def __init__(self, hook: str, encoder, input_scale, writes: dict):
        super().__init__()
        self.hook, self.encoder, self.input_scale_ = hook, encoder, float(input_scale)
        self.writes = writes
        self.config = encoder.config
        self.metadata = {"hook_name": hook}

    @classmethod
    def of_transcoder(cls, sae, hook: str) -> "TranscoderLatents":
        out = sae.metadata.get("hook_name_out")
        if not out:
            raise SAELightningError(f"the transcoder on {hook!r} has no metadata['hook_name_out']; re-export it")
        scale_out = float(getattr(sae, "output_scale", 1.0))
        return cls(hook, sae, float(sae.input_scale), {out: sae.W_dec / scale_out})

    @classmethod
    def of_clt(cls, clt) -> list["TranscoderLatents"]:
        ins, outs = clt.hook_names_in, clt.hook_names_out
        return [cls(ins[i], enc, float(clt.input_scales[i]),
                    {outs[j]: clt.decoder(i, j) / float(clt.output_scales[j]) for j in range(i, clt.n_layers)})
                for i, enc in enumerate(clt.encoders)]

    @property
    def W_enc(self) -> torch.Tensor:
        return self.encoder.W_enc

    @property
    def W_dec(self) -> torch.Tensor:
        """The rows it writes to its first output hook [d_sae, d] (d_sae = W_dec.shape[0], as for an SAE)."""
        return next(iter(self.writes.values()))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder.encode(x if self.input_scale_ == 1.0 else x * self.input_scale_)

    def encode_sparse(self, x: torch.Tensor):
        return self.encoder.encode_sparse(x if self.input_scale_ == 1.0 else x * self.input_scale_)


def _adding(deltas: list, inner):
    """An output hook that adds this forward's pending transcoder deltas, then runs `inner` (an SAE's hook there)."""
    def fn(y: torch.Tensor):
        if deltas:
            y = y + sum(deltas).to(y.dtype)
            deltas.clear()
        out = inner(y) if inner is not None else None
        return y if out is None else out
    return fn


@dataclass
class PromptFeatures:
    """The latents at every position of one prompt (InterpretableModel.prompt_features)."""

    token_ids: list[int]  # the tokens the model read (after any truncation), <|bos|> first when it was given
    tokens: list[str] | None  # their display text (None without a tokenizer)
    latents: dict[str, tuple[torch.Tensor, torch.Tensor]]  # hook -> (values, indices) [T, top_n], largest first;
    # slots past a token's active latents hold value 0 and index -1


@dataclass
class GenerationStep:
    """One streamed generation step (one new token per prompt)."""

    step: int  # 0 for the token sampled right after the prefill
    token_ids: list[int]  # the new token of each prompt
    tokens: list[str] | None  # their display text (None without a tokenizer)
    # per hook, per prompt: [(latent, value), ...] largest first, at the position that was just fed in
    # (the one whose logits produced the new token)
    features: dict[str, list[list[tuple[int, float]]]]


class InterpretableModel:
    """A frozen nanochat GPT with SAEs on several hook points: tracking, steering, generation."""

    def __init__(self, model, saes, tokenizer=None, bos_id: int | None = None):
        """model: a GPT or the Nanochat tuple from load_nanochat (its tokenizer is then used).
        saes: a list of exported SAEs (each at its metadata['hook_name']) or {hook_name: sae}."""
        if hasattr(model, "model") and hasattr(model, "tokenizer"):
            tokenizer = tokenizer or model.tokenizer
            model = model.model
        self.model, self.tokenizer = model, tokenizer
        self.bos_id = bos_id if bos_id is not None else (tokenizer.bos_id if tokenizer is not None else None)
        self.saes = self._index_saes(saes)
        # an SAE still in training reads x * input_scale; exported ones have 1.0 (skipped: exact, cheaper)
        self._scales = {h: float(getattr(s, "input_scale", 1.0)) for h, s in self.saes.items()}
        self.steers: list[Steer] = []
        self._trace: Trace | None = None
        self._calls = 0  # generate calls so far: a trace tells one call's prompt groups from another's
        self._interpretation: Trace | None = None  # the trace of interpretation_enabled()
        # a crosscoder view with partners (saes.OneModel): their activations of this forward, per hook, and
        # their KV caches, one per partner beside each of the main model's caches (dropped with it)
        self._partner_x: dict[str, list[torch.Tensor]] = {}
        self._partner_caches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def _index_saes(self, saes) -> dict[str, torch.nn.Module]:
        if isinstance(saes, Mapping):
            pairs = list(saes.items())
        else:
            # a CLT is placed by its own hook_names_in (each layer at its input hook): its name here is any
            pairs = [((getattr(s, "metadata", None) or {}).get("hook_name")
                      or ("blocks.0.hook_mlp_in" if isinstance(s, CrossLayerTranscoder) else None), s) for s in saes]
        out = {}
        for hook, sae in pairs:
            if not hook:
                raise SAELightningError("an SAE has no metadata['hook_name']; pass {hook_name: sae} instead")
            parse_hook(hook, self.model.n_layer)
            if isinstance(sae, CrossLayerTranscoder):  # one view per layer it reads, each at its own input hook
                for view in TranscoderLatents.of_clt(sae):
                    out[view.hook] = self._checked(view.hook, view, out)
                continue
            if getattr(getattr(sae, "config", None), "is_transcoder", False):
                sae = TranscoderLatents.of_transcoder(sae, hook)
            out[hook] = self._checked(hook, sae, out)
        return out

    def _checked(self, hook: str, sae, out: dict):
        if hook in out:
            raise SAELightningError(f"two SAEs on {hook!r}; an InterpretableModel takes one SAE per hook point")
        width = hook_width(hook, self.model.n_layer, self.model.d_model)
        if sae.W_enc.shape[0] != width:
            raise SAELightningError(f"SAE for {hook!r} has d_in={sae.W_enc.shape[0]} but the hook's width "
                                    f"is {width}; use an SAE trained on this model")
        for target in getattr(sae, "writes", {}):
            parse_hook(target, self.model.n_layer)
        self._check_partners(hook, sae)
        return sae.eval()

    def _check_partners(self, hook: str, sae) -> None:
        """A crosscoder view's partners read the same tokens as this model and have the hook (one-line errors)."""
        partners = getattr(sae, "partners", None)
        if not partners:
            return
        names = [m.get("name") for m in sae.metadata.get("models") or []]
        others = [i for i in range(sae.cc.n_models) if i != sae.model_index]
        for i, gpt, tokenizer in zip(others, partners, sae.partner_tokenizers):
            name = names[i] if i < len(names) else f"model {i}"
            if gpt.config.vocab_size != self.model.config.vocab_size:
                raise SAELightningError(f"partner {name!r} has vocabulary size {gpt.config.vocab_size} but the "
                                        f"model has {self.model.config.vocab_size}; give the crosscoder's own models "
                                        "(one nanochat run, one tokenizer)")
            if (tokenizer is not None and self.tokenizer is not None
                    and resolve.tokenizer_fingerprint(tokenizer) != resolve.tokenizer_fingerprint(self.tokenizer)):
                raise SAELightningError(f"partner {name!r} has another tokenizer than the model; the partners read "
                                        "the model's token ids: give the crosscoder's own models (one tokenizer/)")
            parse_hook(hook, gpt.n_layer)

    # -- tracking and steering switches
    @contextmanager
    def track(self, top_n: int | None = 8) -> Iterator[Trace]:
        """Record each tracked SAE's active latents (top_n per token) for every forward inside."""
        if self._trace is not None:
            raise SAELightningError("tracking is already on; use the trace of the enclosing track()")
        self._trace = Trace(top_n)
        try:
            yield self._trace
        finally:
            self._trace = None

    @contextmanager
    def steering(self, steers: Sequence[Steer]):
        """Apply the steers (on top of any already active) to every forward inside."""
        self.check_steers(steers)
        before = list(self.steers)
        self.steers = before + list(steers)
        try:
            yield self
        finally:
            self.steers = before

    def check_steers(self, steers: Sequence[Steer]) -> None:
        for s in steers:
            if s.hook not in self.saes:
                raise SAELightningError(f"steer on {s.hook!r}, which has no SAE; loaded: {sorted(self.saes)}")
            if not 0 <= s.latent < self.saes[s.hook].W_dec.shape[0]:
                raise SAELightningError(f"latent {s.latent} is out of range for the SAE on {s.hook!r} "
                                        f"(d_sae={self.saes[s.hook].W_dec.shape[0]})")

    # -- the seed extension's names (nanochat PR #169, sae/runtime.py), as thin forms of track and steering
    @contextmanager
    def interpretation_enabled(self):
        """track(top_n=None) under the seed extension's name: record every active latent of each forward inside;
        read them with get_active_features() inside the block (they are dropped when it ends, as there)."""
        with self.track(top_n=None) as trace:
            self._interpretation = trace
            try:
                yield self
            finally:
                self._interpretation = None

    def get_active_features(self, hook_point: str | None = None, top_k: int | None = None) -> dict:
        """The latents of the last forward inside interpretation_enabled(), as the seed extension returns them.

        Always a dict: {hook: dense latents [B*T, d_sae]} (rows in (batch, position) order), for every hook
        with an SAE (hook_point=None) or for that one hook; with top_k, {hook: (indices, values)} [B*T, top_k],
        largest first, where a slot past a token's active latents holds index -1 and value 0 (the seed's plain
        torch.topk would name some inactive latent there). Steered hooks give the steered latents.
        """
        trace = self._interpretation
        if trace is None:
            raise SAELightningError("no features: call get_active_features() inside `with m.interpretation_enabled():`"
                                    ", after a forward m(ids)")
        if top_k is not None and top_k < 1:
            raise SAELightningError(f"top_k {top_k} must be >= 1 (or None: the dense latents)")
        records = trace.records
        if hook_point is not None:
            if hook_point not in self.saes:
                raise SAELightningError(f"no SAE on {hook_point!r}; loaded: {sorted(self.saes)}")
            if not records.get(hook_point):
                raise SAELightningError(f"no features for {hook_point!r} yet: run a forward m(ids) inside "
                                        "interpretation_enabled() first")
            hooks = [hook_point]
        else:
            hooks = [h for h in self.saes if records.get(h)]
        out = {}
        for hook in hooks:
            values, indices = records[hook][-1]
            d_sae = self.saes[hook].W_dec.shape[0]
            dense = dense_latents(values, indices, d_sae).flatten(0, 1)
            if top_k is None:
                out[hook] = dense
            else:
                v, i = top_latents(dense, min(top_k, d_sae))
                out[hook] = (i, v)
        return out

    @contextmanager
    def steering_enabled(self, steering_config: Mapping, mode: str = "add"):
        """steering() under the seed extension's name: {hook: (feature_idx, strength)} (or a list of such pairs
        per hook). mode "add" (default) adds strength x the latent's decoder row, keeping the SAE's error term;
        "scale" multiplies the latent by strength (the seed's meaning of strength, but x + (f' - f) W_dec here
        too, not the seed's replacement of x by the reconstruction)."""
        if not isinstance(steering_config, Mapping):
            raise SAELightningError("steering_config must be a dict {hook: (feature_idx, strength)}")
        steers = []
        for hook, spec in steering_config.items():
            for pair in spec if isinstance(spec, list) else [spec]:
                try:
                    latent, strength = pair
                    valid, strength = int(latent) == latent, float(strength)
                except (TypeError, ValueError):
                    valid = False
                if not valid:
                    raise SAELightningError(f"steering_config[{hook!r}] = {spec!r}; give (feature_idx, strength) or "
                                            "a list of them, e.g. {'blocks.1.hook_resid_post': (123, 4.0)}")
                steers.append(Steer(hook, int(latent), mode, strength))  # Steer refuses a non-finite strength
        with self.steering(steers):
            yield self

    def steer(self, input_ids: torch.Tensor, feature_id: tuple[str, int], strength: float, mode: str = "add",
              **kwargs) -> torch.Tensor:
        """The logits of one forward with feature_id = (hook, latent) steered by strength (steering_enabled's
        modes); kwargs go to forward (kv_cache)."""
        hook, latent = feature_id
        with self.steering_enabled({hook: (latent, strength)}, mode):
            return self.forward(input_ids, **kwargs)

    # -- hooks
    def hooks(self, idx: torch.Tensor | None = None) -> dict:
        """The hook functions for model.forward(idx): one per SAE that is tracked or steered now.

        idx (the tokens of that forward) lets steering skip BOS positions; without it all are steered.
        A crosscoder view with partners needs forward(), which runs them first (the hooks refuse without).
        """
        keep = None
        if self.steers and idx is not None and self.bos_id is not None:
            keep = idx != self.bos_id
        out, pending = {}, {}  # pending: output hook -> what steered transcoder latents add there this forward
        for hook, sae in self.saes.items():
            steers = [s for s in self.steers if s.hook == hook]
            if steers or self._trace is not None:
                out[hook] = self._make_hook(hook, sae, steers, self._trace, keep, pending)
            if steers and isinstance(sae, TranscoderLatents):
                for target in sae.writes:
                    pending.setdefault(target, [])
        for target in pending:
            out[target] = _adding(pending[target], out.get(target))
        return out

    def _make_hook(self, hook: str, sae, steers: list[Steer], trace: Trace | None, keep, pending: dict):
        latents = sorted({s.latent for s in steers})
        column = {j: c for c, j in enumerate(latents)}
        needs_f = trace is not None or any(s.mode != "add" for s in steers)
        W = sae.W_dec[latents] if latents else None  # [m, d_in]: only the steered rows
        scale = self._scales[hook]
        partnered = bool(getattr(sae, "partners", None))

        def encode(flat: torch.Tensor) -> torch.Tensor:
            flat = flat.to(sae.W_enc.dtype)
            return sae.encode(flat if scale == 1.0 else flat * scale)

        def encode_top(flat: torch.Tensor, top_n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
            k = getattr(sae.config, "k", None) if sae.config.architecture == "topk" else None
            if k is None or (top_n or k) > k:
                return top_latents(encode(flat), top_n)
            # TopK: the k active latents come sparse, so skip the dense [N, d_sae] scatter and its top-n
            flat = flat.to(sae.W_enc.dtype)
            values, indices = sae.encode_sparse(flat if scale == 1.0 else flat * scale)
            values, order = values.topk(top_n or k, dim=-1)
            return values, indices.gather(-1, order).masked_fill(values == 0, -1)

        def encode_all(rows: torch.Tensor) -> torch.Tensor:  # a partnered crosscoder view: every model's rows
            return sae.encode_all(rows.to(sae.W_enc.dtype))

        def encode_all_top(rows: torch.Tensor, top_n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
            return top_latents(encode_all(rows), top_n)

        def fn(x: torch.Tensor):
            B, T, d = x.shape
            flat = x.reshape(B * T, d)
            # what the latents read: this activation, or with partners the crosscoder's stacked input [.., M·d]
            exact = hook in self._partner_x
            if not exact and partnered and (trace is not None or needs_f):
                raise SAELightningError(f"the crosscoder view on {hook!r} reads its partners' activations, which "
                                        "only InterpretableModel's forward computes; call im(idx), not "
                                        "model(idx, hooks=im.hooks(idx))")
            rows = sae.stack(x, self._partner_x[hook]) if exact else x
            if trace is not None and not steers:  # tracking only: encode later, all at once
                trace.defer(hook, rows, encode_all_top if exact else encode_top)
                return None
            f = (encode_all if exact else encode)(rows.reshape(B * T, -1)) if needs_f else None
            out = None
            if steers:
                old = f[:, latents] if f is not None else flat.new_zeros(B * T, len(latents), dtype=W.dtype)
                new = old.clone()
                for s in steers:  # in order, so "add" then "scale" composes as written
                    c = column[s.latent]
                    new[:, c] = s.value if s.mode == "clamp" else (
                        new[:, c] + s.value if s.mode == "add" else new[:, c] * s.value)
                if keep is not None:
                    new = torch.where(keep.reshape(B * T, 1), new, old)
                if isinstance(sae, TranscoderLatents):  # the MLP input stays; its outputs get the rows' change
                    for target, rows in sae.writes.items():
                        pending[target].append(((new - old) @ rows[latents].to(new.dtype)).view(B, T, -1))
                else:
                    delta = (new - old) @ W if scale == 1.0 else (new - old) @ W / scale
                    out = (flat + delta.to(flat.dtype)).view(B, T, d)
                if f is not None:
                    f[:, latents] = new
            if trace is not None:
                trace.record(hook, f.view(B, T, -1))
            return out

        return fn

    # -- forward and generation
    @torch.no_grad()
    def forward(self, idx: torch.Tensor, kv_cache=None) -> torch.Tensor:
        """Logits [B, T, V] with the active steers applied and tracked latents recorded.

        A crosscoder view with partners first runs each partner on idx (unsteered, with its own KV cache
        beside kv_cache), so that its latents read every model's activation.
        """
        self._partner_x = self._run_partners(idx, kv_cache)
        try:
            return self.model(idx, hooks=self.hooks(idx) or None, kv_cache=kv_cache)
        finally:
            self._partner_x = {}

    def _run_partners(self, idx: torch.Tensor, kv_cache) -> dict[str, list[torch.Tensor]]:
        """Each partnered view's partner activations at its hook [B, T, d], for the views that read latents now
        (with a KV cache: always, so the partners' caches keep step with the model's)."""
        out = {}
        for hook, sae in self.saes.items():
            partners = getattr(sae, "partners", None)
            needs = self._trace is not None or any(s.hook == hook and s.mode != "add" for s in self.steers)
            if not partners or not (needs or kv_cache is not None):
                continue
            caches = self._partner_caches.setdefault(kv_cache, {}) if kv_cache is not None else {}
            acts = []
            for j, gpt in enumerate(partners):
                if kv_cache is None:
                    acts.append(gpt.run_with_cache(idx, [hook])[hook])
                    continue
                cache = caches.setdefault((hook, j), KVCache(gpt.n_layer))
                if cache.pos != kv_cache.pos:
                    raise SAELightningError(f"the KV cache holds {kv_cache.pos} positions the crosscoder's partners "
                                            "never saw; run the whole generation through this InterpretableModel "
                                            "(its forward or generate), from a fresh cache")
                grabbed = []
                gpt(idx, hooks={hook: grabbed.append}, kv_cache=cache)
                acts.append(grabbed[0])
            out[hook] = acts
        return out

    __call__ = forward

    def encode_prompts(self, prompts) -> list[list[int]]:
        """A string, a list of strings, a list of ids, or a list of id lists -> list of id lists."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        out = []
        for p in prompts:
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise SAELightningError("text prompts need a tokenizer; pass token ids or a tokenizer")
                p = self.tokenizer.encode(p)
            if not p:
                raise SAELightningError("empty prompt; give at least one token")
            out.append(list(p))
        return out

    @property
    def context(self) -> int:
        """The model's context: the sequence length it was trained on."""
        return self.model.config.sequence_len

    def fit_context(self, prompts, truncate: str | None = "left", max_tokens: int = 0
                    ) -> tuple[list[list[int]], list[str]]:
        """Prompts (as encode_prompts takes them) fitted to the context, and the warnings to show (one line each).

        A prompt longer than the context: truncate="left" keeps its last `context` tokens (its <|bos|> and the
        last context - 1 when it starts with one, as nanochat's rows do) and warns; "error" refuses. Generating
        max_tokens tokens runs the model over len(prompt) + max_tokens - 1 positions (the last new token is never
        fed back): past the context, "left" warns and generation goes on (RoPE tables grow on demand and the KV
        cache by one position per step, so there is no hard bound), "error" refuses. None: no check.
        """
        prompts = self.encode_prompts(prompts)
        if truncate is None:
            return prompts, []
        if truncate not in TRUNCATE_MODES:
            raise SAELightningError(f"unknown truncate {truncate!r}; use one of {TRUNCATE_MODES}")
        context, notes, out = self.context, [], []
        name = (lambda r: f"prompt {r}") if len(prompts) > 1 else (lambda r: "the prompt")  # noqa: E731
        for r, p in enumerate(prompts):
            if len(p) > context:
                if truncate == "error":
                    raise SAELightningError(f"{name(r)} is {len(p)} tokens, longer than the model's context of "
                                            f"{context}; shorten it, or pass --truncate left to use only its last "
                                            f"{context} tokens")
                bos = self.bos_id is not None and p[0] == self.bos_id
                kept = f"<|bos|> and its last {context - 1} tokens" if bos else f"its last {context} tokens"
                notes.append(f"{name(r)} is {len(p)} tokens, longer than the model's context of {context}: only "
                             f"{kept} are used (--truncate error refuses instead)")
                p = [p[0], *p[len(p) - context + 1:]] if bos else p[-context:]
            out.append(p)
        if not out:
            raise SAELightningError("no prompts; give at least one")
        r = max(range(len(out)), key=lambda j: len(out[j]))
        n, positions = len(out[r]), len(out[r]) + max_tokens - 1
        if max_tokens and positions > context:
            if truncate == "error":
                raise SAELightningError(f"{name(r)}'s {n} tokens + --max_tokens {max_tokens} run the model over "
                                        f"{positions} positions, past its context of {context}; lower --max_tokens "
                                        f"to {context - n + 1} or shorten the prompt, or pass --truncate left to "
                                        "generate past the context with a warning")
            beyond = ("the earliest tokens, <|bos|> first, then fall out of even the longest attention window"
                      if self.model.config.era == "current" else
                      "attention then spans distances the model was never trained on")
            notes.append(f"{name(r)}'s {n} tokens + --max_tokens {max_tokens} run the model over {positions} "
                         f"positions, past its context of {context}: from step {context - n + 1} on, tokens are "
                         f"generated past it ({beyond}); --max_tokens {context - n + 1} stays inside it")
        return out, notes

    def _fitted(self, prompts, truncate: str | None, max_tokens: int = 0) -> list[list[int]]:
        prompts, notes = self.fit_context(prompts, truncate, max_tokens)
        for note in notes:
            warnings.warn(note, ContextWarning, stacklevel=3)
        return prompts

    def prompt_features(self, prompt, top_n: int | None = 5, truncate: str | None = "left") -> PromptFeatures:
        """Each SAE's top_n latents at every position of one prompt (text or ids): one tracked forward.

        Text is encoded with <|bos|> first. A prompt over the context is cut or refused as fit_context says
        (a ContextWarning when cut). Steers active now apply, and the latents are the steered ones.
        """
        prompts = self.encode_prompts(prompt)
        if len(prompts) != 1:
            raise SAELightningError(f"prompt_features takes one prompt, got {len(prompts)}; call it once per prompt")
        (ids,) = self._fitted(prompts, truncate)
        with self.track(top_n) as trace:
            self.forward(torch.tensor([ids], dtype=torch.long, device=self.model.lm_head.weight.device))
        latents = {}
        for hook in self.saes:
            values, indices = trace.latents(hook)
            latents[hook] = (values[0], indices[0])
        strs = [self.tokenizer.token_str(t) for t in ids] if self.tokenizer is not None else None
        return PromptFeatures(ids, strs, latents)

    def generate(self, prompts, max_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 seed: int = 42, top_features: int = 0, truncate: str | None = "left") -> Iterator[GenerationStep]:
        """Stream generation with the KV cache: a prefill per prompt length, then one token per step.

        Yields a GenerationStep per new token (all prompts at once). top_features > 0 reports, per
        SAE, the top latents at the position just fed in. Steers active now apply throughout.
        temperature 0 is greedy; sampling is seeded. truncate: a prompt over the context, or generation
        past it, as fit_context says ("left": cut / go on, with a ContextWarning; "error": refuse; None: as given).
        """
        prompts = self._fitted(prompts, truncate, max_tokens)

        def fresh() -> dict:  # this step's top features, filled by _step group by group
            return {h: [[] for _ in prompts] for h in self.saes} if top_features else {}

        feats = fresh()
        self._calls += 1
        steps = decode_batched(prompts, self.model.n_layer, self.model.lm_head.weight.device, max_tokens,
                               temperature, top_k, seed,
                               lambda idx, cache, rows: self._step(idx, cache, top_features, feats, rows))
        for step, ids in enumerate(steps):
            strs = [self.tokenizer.token_str(t) for t in ids] if self.tokenizer is not None else None
            yield GenerationStep(step, ids, strs, feats)
            feats = fresh()

    def _step(self, idx, cache, top_features: int, feats: dict, rows: list[int]) -> torch.Tensor:
        """One forward of a prompt group; fills feats at the last position; returns its last logits."""
        outer = self._trace
        if outer is not None:  # a user's trace: tag this group's records with its prompts
            outer.batch = ("generate", self._calls, tuple(rows))
        try:
            if not top_features:
                return self.forward(idx, kv_cache=cache)[:, -1]
            own = outer is None  # reuse an enclosing trace so user tracking sees every step too
            trace = self._trace = Trace(top_features) if own else outer
            try:
                logits = self.forward(idx, kv_cache=cache)
            finally:
                if own:
                    self._trace = None
        finally:
            if outer is not None:
                outer.batch = None
        for hook, recs in trace.records.items():  # reading records encodes this step's activations
            values, indices = recs[-1]
            values, indices = values[:, -1, :top_features].tolist(), indices[:, -1, :top_features].tolist()
            for r, vs, ix in zip(rows, values, indices):
                feats[hook][r] = [(i, v) for i, v in zip(ix, vs) if i >= 0]
        return logits[:, -1]


# ---------------------------------------------------------------------------------------------
# `saelightning generate`


@dataclass
class GenerateArgs:
    """Generate text with a nanochat model, printing each new token's top SAE features; steer latents.

    Args:
        model: nanochat checkpoint or base dir, or "demo" (default: the one the first --sae's cfg.json records).
        prompt: prompt text (several: a batch).
        sae: exported SAE directories.
        steer: HOOK:LATENT:STRENGTH: add STRENGTH x the latent's decoder direction (HOOK may be left out
            with one SAE).
        clamp: HOOK:LATENT:VALUE: set the latent to VALUE.
        scale: HOOK:LATENT:FACTOR: multiply the latent by FACTOR.
        top_features: features shown per token (0: none).
        max_tokens: tokens to generate.
        temperature: 0 = greedy.
        top_k: sample among the k most likely tokens (default: all).
        seed: sampling seed.
        crosscoder_model: with a crosscoder --sae (alone): the model whose forward is generated from and steered,
            by its name in the export's cfg.json models (e.g. chat); its other models run beside it on the same
            tokens so the latents are the crosscoder's own.
        models: with a crosscoder: its models' checkpoints in its order, where they moved (default: the paths
            its cfg.json records).
        truncate: a prompt longer than the model's context (its sequence_len): left = warn and use only its
            last tokens; error = refuse. Generating past the context: left = warn and go on; error = refuse.
        device: cpu or cuda (default: cuda when there is a GPU).
    """

    prompt: list[str]
    model: str | None = None
    sae: list[str] = field(default_factory=list)
    steer: list[str] = field(default_factory=list)
    clamp: list[str] = field(default_factory=list)
    scale: list[str] = field(default_factory=list)
    top_features: int = 5
    max_tokens: int = 32
    temperature: float = 0.0
    top_k: int | None = None
    seed: int = 42
    crosscoder_model: str | None = None
    models: list[str] | None = None
    truncate: Literal["left", "error"] = "left"
    device: str | None = None

    def __post_init__(self):
        if self.max_tokens < 1 or self.top_features < 0:
            raise SAELightningError("--max_tokens must be >= 1 and --top_features >= 0")
        check_sampling(self.temperature, self.top_k)
        if not self.prompt:
            raise SAELightningError("--prompt is required: give one or more prompts")


def _format_features(features: dict, row: int) -> str:
    parts = []
    for hook, per_prompt in features.items():
        shown = " ".join(f"{i}:{v:.2f}" for i, v in per_prompt[row])
        parts.append(f"{hook}[{shown}]")
    return "  ".join(parts)


def _warn(notes: list[str]) -> None:
    for note in notes:
        print(f"saelightning: warning: {note}", file=sys.stderr, flush=True)


def _load(a) -> tuple:
    """The model (--model, or the one the SAEs record) and an InterpretableModel over it and a.sae; a crosscoder
    --sae is read in its --crosscoder_model, its other models loaded beside it as partners (exact latents)."""
    device = resolve.device(a.device)
    saes = [load_sae(d, device=device) for d in a.sae]
    crosscoders = [(path, s) for path, s in zip(a.sae, saes) if s.config.n_models > 1]
    if not crosscoders:
        if a.crosscoder_model is not None or a.models is not None:
            raise SAELightningError("--crosscoder_model and --models apply to a crosscoder --sae only; drop them")
        model, load, _ = resolve.sources(a.sae, a.model, None)
        nc = resolve.load_model(model, device=device, dtype=torch.float32, **load)
        return nc, InterpretableModel(nc, saes)
    path, cc = crosscoders[0]
    names = [m.get("name") for m in cc.metadata.get("models") or []]
    if len(saes) > 1:
        raise SAELightningError(f"{path} is a crosscoder, read alone: give it as the only --sae")
    if a.model is not None:
        raise SAELightningError("--model does not apply to a crosscoder: its models are the ones its cfg.json "
                                "records; pass --models (one checkpoint per model, in its order) where they moved")
    if a.crosscoder_model is None:
        raise SAELightningError(f"{path} is a crosscoder over the models {names}; pass --crosscoder_model NAME, the "
                                "one to generate from and steer")
    view = OneModel(cc, a.crosscoder_model)  # refuses an unknown name before any model loads
    _, loaded = resolve.crosscoder_models(cc, path, a.models, device=device)
    m = view.model_index
    view = OneModel(cc, m, partners=[nc for i, nc in enumerate(loaded) if i != m])
    return loaded[m], InterpretableModel(loaded[m], {resolve.sae_hook(cc, path): view})


def cli_main(argv: Sequence[str]) -> int:
    a = parse(GenerateArgs, argv, "saelightning generate")
    if a is None:
        return 0
    nc, im = _load(a)
    only = next(iter(im.saes)) if len(im.saes) == 1 else None
    steers = [parse_steer(s, mode, only) for mode, specs in
              (("add", a.steer), ("clamp", a.clamp), ("scale", a.scale)) for s in specs]
    prompts, notes = im.fit_context(a.prompt, a.truncate, a.max_tokens)
    _warn(notes)
    completions = [[] for _ in prompts]
    if a.top_features and im.saes:
        print("step token            top latents (index:value) at the position that produced the token")
    with im.steering(steers):
        for step in im.generate(prompts, a.max_tokens, a.temperature, a.top_k, a.seed, a.top_features, None):
            for r, (tid, text) in enumerate(zip(step.token_ids, step.tokens)):
                completions[r].append(tid)
                tag = f"[{r}] " if len(prompts) > 1 else ""
                print(f"{tag}{step.step:>4} {text!r:<16} {_format_features(step.features, r)}".rstrip(), flush=True)
    for r, (prompt, ids) in enumerate(zip(a.prompt, completions)):
        print(f"--- completion {r}: {prompt}{nc.tokenizer.decode(ids)!s}")
    return 0


# ---------------------------------------------------------------------------------------------
# `saelightning features`


@dataclass
class FeaturesArgs:
    """Print every token of a prompt with each SAE's top latents at that position (one forward over the prompt).

    Args:
        sae: exported SAE directories (each reads its own hook point).
        text: the prompt (encoded with <|bos|> first, as nanochat's rows start).
        top_features: latents shown per token and SAE.
        model: nanochat checkpoint or base dir, or "demo" (default: the one the first --sae's cfg.json records).
        crosscoder_model: with a crosscoder --sae (alone): the model whose forward is generated from and steered,
            by its name in the export's cfg.json models (e.g. chat); its other models run beside it on the same
            tokens so the latents are the crosscoder's own.
        models: with a crosscoder: its models' checkpoints in its order, where they moved (default: the paths
            its cfg.json records).
        truncate: a prompt longer than the model's context (its sequence_len): left = warn and use only its
            last tokens; error = refuse.
        device: cpu or cuda (default: cuda when there is a GPU).
    """

    text: str
    sae: list[str] = field(default_factory=list)
    top_features: int = 5
    model: str | None = None
    crosscoder_model: str | None = None
    models: list[str] | None = None
    truncate: Literal["left", "error"] = "left"
    device: str | None = None

    def __post_init__(self):
        if not self.sae:
            raise SAELightningError("--sae is required: give one or more exported SAE directories")
        if self.top_features < 1:
            raise SAELightningError(f"--top_features {self.top_features} must be >= 1")
        if not self.text:
            raise SAELightningError("--text is empty; give the prompt whose tokens to show")


def features_cli_main(argv: Sequence[str]) -> int:
    a = parse(FeaturesArgs, argv, "saelightning features")
    if a is None:
        return 0
    _, im = _load(a)
    (ids,), notes = im.fit_context(a.text, a.truncate)
    _warn(notes)
    pf = im.prompt_features(ids, a.top_features, truncate=None)
    shown = {hook: [[(i, v) for i, v in zip(ix, vs) if i >= 0] for ix, vs in zip(ind.tolist(), val.tolist())]
             for hook, (val, ind) in pf.latents.items()}
    print(" pos token            top latents (index:value) per SAE hook")
    for pos, text in enumerate(pf.tokens):
        print(f"{pos:>4} {text!r:<16} {_format_features(shown, pos)}".rstrip())
    return 0
