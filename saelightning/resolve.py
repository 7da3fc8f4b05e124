"""What a command or config names, turned into things: "demo", model paths, shard dirs, exported SAEs.

The one place that knows that "demo" is the bundled model and its stdlib shards, where nanochat keeps
its shards, and what a missing tokenizer or hook name means, so that every command says it the same way.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from saelightning.demo import DEMO_MODEL_DIR, ensure_demo_shards
from saelightning.errors import SAELightningError
from saelightning.export import load_sae
from saelightning.nanochat.checkpoint import Nanochat, load_nanochat
from saelightning.nanochat.shards import list_shards


def model_path(model: str) -> str:
    """'demo' -> the bundled model's directory; anything else is a path the user gave."""
    return str(DEMO_MODEL_DIR) if model == "demo" else model


def load_model(model: str, device=None, dtype=None, step: int | None = None, era: str | None = None,
               source: str = "base", model_tag: str | None = None) -> Nanochat:
    """A frozen nanochat model with its tokenizer (refused without one: every command needs it)."""
    nanochat = load_nanochat(model_path(model), step=step, era=era, device=device, dtype=dtype, source=source,
                             model_tag=model_tag)
    if nanochat.tokenizer is None:
        raise SAELightningError(f"no tokenizer/ found above {nanochat.meta['path']}; put nanochat's tokenizer/ "
                                "directory in the nanochat base dir, beside base_checkpoints/")
    return nanochat


def device(name: str | None) -> torch.device:
    """--device, default cuda when there is a GPU."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def data_dir(data: str | None, model: str) -> Path:
    """The shard directory: `data`, the demo shards ("demo", or by default for the demo model), or
    nanochat's base_data next to $NANOCHAT_BASE_DIR."""
    if data == "demo" or (data is None and model == "demo"):
        return Path(ensure_demo_shards())
    if data is not None:
        return Path(data).expanduser()
    base = Path(os.environ.get("NANOCHAT_BASE_DIR", Path.home() / ".cache" / "nanochat"))
    for name in ("base_data_climbmix", "base_data"):
        if (base / name).is_dir():
            return base / name
    raise SAELightningError(f"no --data given and no base_data under {base}; pass --data DIR (parquet shards)")


def shards(data: str | os.PathLike) -> tuple[list[Path], Path]:
    """(train shards, val shard) of a shard directory, or of the demo shards for "demo"."""
    return list_shards(ensure_demo_shards() if str(data) == "demo" else data)


def sae_hook(sae, path) -> str:
    """The hook point an exported SAE reads (cfg.json metadata.hook_name)."""
    hook = (getattr(sae, "metadata", None) or {}).get("hook_name")
    if not hook:
        raise SAELightningError(f"{path}: cfg.json metadata has no hook_name; re-export the SAE with it")
    return hook


def load_saes(paths: Sequence, device=None) -> tuple[dict[str, list], list[tuple[str, int]]]:
    """Exported SAEs grouped by hook point; also each path's (hook, index in its group)."""
    groups, where = {}, []
    for path in paths:
        sae = load_sae(path, device=device).eval()
        hook = sae_hook(sae, path)
        groups.setdefault(hook, []).append(sae)
        where.append((hook, len(groups[hook]) - 1))
    return groups, where
