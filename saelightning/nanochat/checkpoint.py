"""Read and write nanochat checkpoints in nanochat's own layout, and tell the two eras apart.

A checkpoint dir holds model_{step:06d}.pt (a torch.save'd state_dict) and meta_{step:06d}.json
(with "model_config" = the GPTConfig kwargs). A nanochat base dir holds base_checkpoints/d{depth}/,
chatsft_checkpoints/, ... and tokenizer/. Era-defining constants (RoPE base, QK scale, windows) are
not stored, so the era is read off the state dict's keys and shapes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import NamedTuple

import torch

from saelightning.atomic import atomic_file, write_text
from saelightning.errors import SAELightningError
from saelightning.nanochat.model import ERAS, GPT, SMEAR_CHANNELS, VE_GATE_CHANNELS, GPTConfig, has_value_embed
from saelightning.nanochat.tokenizer import Tokenizer, load_tokenizer

SOURCES = {"base": "base_checkpoints", "mid": "mid_checkpoints", "sft": "chatsft_checkpoints",
           "rl": "chatrl_checkpoints"}
_MODEL_FILE = re.compile(r"^model_(\d+)\.pt$")
_CONFIG_KEYS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd")


class Nanochat(NamedTuple):
    model: GPT  # frozen (eval mode, no grads)
    tokenizer: Tokenizer | None  # None when no <base>/tokenizer/ was found above the checkpoint
    meta: dict  # nanochat's meta json + "path", "step", "era", "model_config" (our GPTConfig as a dict)


# -- locating files
def _model_steps(ckpt_dir: Path) -> list[int]:
    return sorted(int(m.group(1)) for f in os.listdir(ckpt_dir) if (m := _MODEL_FILE.match(f)))


def _largest_tag(checkpoints_dir: Path) -> str:
    """nanochat's default model tag: the deepest d{N}, else the most recently modified subdir."""
    tags = [p for p in checkpoints_dir.iterdir() if p.is_dir()]
    if not tags:
        raise SAELightningError(f"no model directories in {checkpoints_dir}; train a model or pass a checkpoint dir")
    depths = [(int(m.group(1)), p.name) for p in tags if (m := re.match(r"d(\d+)", p.name))]
    if depths:
        return max(depths)[1]
    return max(tags, key=lambda p: p.stat().st_mtime).name


def resolve_checkpoint_dir(path, source: str = "base", model_tag: str | None = None) -> tuple[Path, int | None]:
    """The checkpoint dir behind a path (a model_*.pt file, a checkpoint dir or a nanochat base dir)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise SAELightningError(f"nanochat checkpoint path {path} does not exist; pass a checkpoint dir or base dir")
    if path.is_file():
        m = _MODEL_FILE.match(path.name)
        if m is None:
            raise SAELightningError(f"{path} is not a nanochat model_XXXXXX.pt file; pass its directory instead")
        return path.parent, int(m.group(1))
    if _model_steps(path):
        return path, None
    if source not in SOURCES:
        raise SAELightningError(f"unknown checkpoint source {source!r}; use one of {sorted(SOURCES)}")
    checkpoints_dir = path / SOURCES[source]
    if not checkpoints_dir.is_dir():
        raise SAELightningError(
            f"no model_*.pt in {path} and no {SOURCES[source]}/ under it; pass a nanochat checkpoint or base dir"
        )
    tag = model_tag or _largest_tag(checkpoints_dir)
    ckpt_dir = checkpoints_dir / tag
    if not ckpt_dir.is_dir() or not _model_steps(ckpt_dir):
        raise SAELightningError(f"no model_*.pt files in {ckpt_dir}; check model_tag or the base dir")
    return ckpt_dir, None


def find_tokenizer_dir(ckpt_dir: Path, levels: int = 4) -> Path | None:
    """<base>/tokenizer: nanochat keeps it beside base_checkpoints/, so walk up a few levels."""
    for p in [ckpt_dir, *ckpt_dir.parents][:levels]:
        if (p / "tokenizer" / "tokenizer.pkl").is_file():
            return p / "tokenizer"
    return None


# -- reading
def read_meta(ckpt_dir: Path, step: int) -> dict:
    meta_path = ckpt_dir / f"meta_{step:06d}.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SAELightningError(f"{meta_path} is missing; nanochat writes it beside model_{step:06d}.pt") from None
    except (OSError, ValueError) as e:
        raise SAELightningError(f"cannot read {meta_path} as JSON ({_one_line(e)}); re-copy it") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model_config"), dict):
        raise SAELightningError(f"{meta_path} has no model_config dict; it is not a nanochat meta file")
    return meta


def read_state_dict(model_path: Path) -> dict[str, torch.Tensor]:
    """torch.load with weights_only=True; strips torch.compile's "_orig_mod." key prefix."""
    try:
        sd = torch.load(model_path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, foreign objects: all mean "not a usable file"
        raise SAELightningError(
            f"cannot load {model_path} ({type(e).__name__}: {_one_line(e)}); "
            "the file is corrupt or truncated, re-copy it"
        ) from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise SAELightningError(f"{model_path} is not a state dict of tensors; it is not a nanochat model file")
    return {k.removeprefix("_orig_mod."): v for k, v in sd.items()}


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:200] + ("..." if len(text) > 200 else "")


# -- era detection
def _n_layer(sd: dict) -> int:
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"transformer\.h\.(\d+)\.", k))}
    return max(layers) + 1 if layers else 0


def expected_layout(sd: dict, era: str) -> dict[str, tuple[int, ...] | None]:
    """Key -> expected shape (None = any) for an era, sized from the state dict's own wte and c_k."""
    n = _n_layer(sd)
    wte = sd.get("transformer.wte.weight")
    V = wte.shape[0] if wte is not None and wte.dim() == 2 else None
    layout: dict[str, tuple[int, ...] | None] = {"transformer.wte.weight": None, "lm_head.weight": None}
    for i in range(n):
        for name in ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            layout[f"transformer.h.{i}.{name}.weight"] = None
    if era == "original":
        return layout
    layout.update({"resid_lambdas": (n,), "x0_lambdas": (n,), "smear_gate.weight": (1, SMEAR_CHANNELS),
                   "smear_lambda": (1,), "backout_lambda": (1,)})
    for i in range(n):
        if has_value_embed(i, n):
            ck = sd.get(f"transformer.h.{i}.attn.c_k.weight")
            kv = ck.shape[0] if ck is not None else None
            layout[f"value_embeds.{i}.weight"] = (V, kv) if V and kv else None
            layout[f"transformer.h.{i}.attn.ve_gate.weight"] = (None, VE_GATE_CHANNELS)
    return layout


def layout_mismatches(sd: dict, era: str) -> list[str]:
    """What in the state dict does not fit the era: missing/unexpected keys and wrong shapes."""
    layout = expected_layout(sd, era)
    problems = [f"missing {k}" for k in layout if k not in sd]
    problems += [f"unexpected {k}" for k in sd if k not in layout]
    for k, shape in layout.items():
        if k in sd and shape is not None:
            got = tuple(sd[k].shape)
            if len(got) != len(shape) or any(s is not None and s != g for s, g in zip(shape, got)):
                want = "x".join("*" if s is None else str(s) for s in shape)
                problems.append(f"{k} has shape {'x'.join(map(str, got))}, expected {want}")
    return problems


def _describe(problems: list[str], limit: int = 6) -> str:
    more = f" (+{len(problems) - limit} more)" if len(problems) > limit else ""
    return "; ".join(problems[:limit]) + more


def check_era(sd: dict, era: str) -> None:
    """Raise unless the state dict has exactly the keys and shapes of the named era."""
    if era not in ERAS:
        raise SAELightningError(f"unknown nanochat era {era!r}; use one of {ERAS}")
    problems = layout_mismatches(sd, era)
    if problems:
        raise SAELightningError(f"state dict does not fit the {era!r} nanochat era: {_describe(problems)}")


def detect_era(state_dict: dict) -> str:
    """'original' or 'current' from keys and shapes; any other layout is refused naming what differs."""
    sd = {k.removeprefix("_orig_mod."): v for k, v in state_dict.items()}
    found = {era: layout_mismatches(sd, era) for era in ERAS}
    for era, problems in found.items():
        if not problems:
            return era
    # anything beyond the original key set means a later nanochat: report against the current era
    newer = any(k not in expected_layout(sd, "original") for k in sd)
    closest = "current" if newer else "original"
    raise SAELightningError(
        f"unsupported nanochat layout (an intermediate Jan-Mar 2026 era or not nanochat): closest era is "
        f"{closest!r} but {_describe(found[closest])}; only the 'original' and 'current' eras can be run"
    )


# -- building the model
def config_from_meta(model_config: dict, era: str, where: str = "meta json") -> GPTConfig:
    missing = [k for k in _CONFIG_KEYS if k not in model_config]
    if missing:
        raise SAELightningError(f"model_config in {where} lacks {', '.join(missing)}; it is not a nanochat meta file")
    kwargs = {k: model_config[k] for k in _CONFIG_KEYS}
    # checkpoints from before sliding windows have no window_pattern: they ran full context (as nanochat patches)
    kwargs["window_pattern"] = model_config.get("window_pattern") or "L"
    return GPTConfig(**kwargs, era=era)


def build_model(sd: dict, config: GPTConfig, device=None, dtype=None) -> GPT:
    """A frozen GPT holding the state dict's weights (cast to dtype; the original era's bf16 wte kept)."""
    dtype = dtype or torch.float32
    wte = sd["transformer.wte.weight"]
    # Dec 2025 original-era checkpoints already padded the vocabulary to a multiple of 64
    pad = 64 if config.era == "original" and wte.shape[0] != config.vocab_size else None
    with torch.device("meta"):
        model = GPT(config, pad_vocab_size_to=pad)
    cast = {}
    for k, v in sd.items():
        keep_bf16 = config.era == "original" and k == "transformer.wte.weight" and v.dtype == torch.bfloat16
        cast[k] = v if keep_bf16 or not v.is_floating_point() else v.to(dtype)
    try:
        model.load_state_dict(cast, strict=True, assign=True)
    except RuntimeError as e:
        raise SAELightningError(
            f"weights do not fit model_config {dataclasses.asdict(config)}: {_one_line(e)}"
        ) from None
    model.to(device or "cpu").eval()
    model.requires_grad_(False)
    return model


def load_nanochat(path, step: int | None = None, era: str | None = None, device=None, dtype=None,
                  source: str = "base", model_tag: str | None = None) -> Nanochat:
    """Load a nanochat checkpoint as a frozen GPT (+ tokenizer and meta).

    path: a checkpoint dir (model_XXXXXX.pt + meta_XXXXXX.json), one model_XXXXXX.pt, or a nanochat
    base dir (then <source>_checkpoints/<model_tag or deepest d*>). step: default the highest.
    era: "original" | "current" to override detection. dtype: default fp32 (bf16 weights are cast).
    """
    ckpt_dir, file_step = resolve_checkpoint_dir(path, source, model_tag)
    steps = _model_steps(ckpt_dir)
    step = step if step is not None else (file_step if file_step is not None else steps[-1])
    if step not in steps:
        raise SAELightningError(f"no model_{step:06d}.pt in {ckpt_dir}; available steps: {steps}")
    meta = read_meta(ckpt_dir, step)
    sd = read_state_dict(ckpt_dir / f"model_{step:06d}.pt")
    if era is None:
        era = detect_era(sd)
    else:
        check_era(sd, era)
    config = config_from_meta(meta["model_config"], era, str(ckpt_dir / f"meta_{step:06d}.json"))
    model = build_model(sd, config, device, dtype)
    tokenizer = _load_matching_tokenizer(ckpt_dir, config)
    meta = {**meta, "path": str(ckpt_dir), "step": step, "era": era, "model_config": dataclasses.asdict(config)}
    return Nanochat(model, tokenizer, meta)


def _load_matching_tokenizer(ckpt_dir: Path, config: GPTConfig) -> Tokenizer | None:
    tok_dir = find_tokenizer_dir(ckpt_dir)
    if tok_dir is None:
        return None
    tokenizer = load_tokenizer(tok_dir)
    if tokenizer.vocab_size != config.vocab_size:
        raise SAELightningError(
            f"tokenizer in {tok_dir} has {tokenizer.vocab_size} tokens but the model's vocab_size is "
            f"{config.vocab_size}; use the tokenizer the model was trained with"
        )
    return tokenizer


# -- writing
def save_nanochat_checkpoint(ckpt_dir, step: int, state_dict: dict, model_config: dict,
                             extra_meta: dict | None = None) -> Path:
    """Write model_{step:06d}.pt and meta_{step:06d}.json as nanochat does; returns the model file.

    model_config may be our GPTConfig as a dict: "era" is dropped (nanochat's GPTConfig has no such
    field) and so is window_pattern for the original era, whose GPTConfig did not have it either.
    """
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in model_config.items() if k != "era"}
    if model_config.get("era") == "original":
        config.pop("window_pattern", None)
    meta = {"step": step, "model_config": config, **(extra_meta or {})}
    # meta first: a model_*.pt (which marks the latest step) never exists without its meta
    write_text(ckpt_dir / f"meta_{step:06d}.json", json.dumps(meta, indent=2))
    model_path = ckpt_dir / f"model_{step:06d}.pt"
    with atomic_file(model_path) as f:
        torch.save(dict(state_dict), f)
    return model_path
