"""Activations from any source: a directory of safetensors shards with a minimal manifest (`data.activations`).

The shards are the activation cache's (cache.py): DIR/<shard>.safetensors holds `acts.<hook>` [n, d_in] per
hook (any float dtype; other tensors are ignored), and DIR/manifest.json lists them:

    {"format": 1,
     "hooks": ["<hook>", ...],                                  # the names SAEs read (model.saes[i].hook_name)
     "shards": [{"file": "shard_00000.safetensors", "tokens": n}, ...]}

Optional keys: "d_in" {hook: width} (checked against the shards), "val_tokens" (held out for validation:
the last val_tokens activations in shard order; default data.val_batches x data.batch_size),
"mean_squared_norm" {hook: E||x||²} (the normalisation constant; default: estimated from the first
data.scale_batches x data.batch_size training activations), "sha256" per shard (identifies the data for a
resume; default: file names, token counts and sizes), "source" (anything JSON: what wrote them, recorded in
exports). A `saelightning cache` directory is one such directory. `write_activations(dir, {hook: tensor})`
writes one from Python.

No model is needed: training reads the shards before the held-out tail (disjoint shards per rank and
DataLoader worker, as a cache is read), validation reads the tail.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from saelightning.atomic import atomic_dir, sha256_file
from saelightning.errors import SAELightningError

MANIFEST = "manifest.json"
FORMAT = 1
KIND = "saelightning-activations"
_HINT = "saelightning.write_activations(dir, {hook: tensor}) writes one (README: activations from anywhere)"


def _check_tensors(activations) -> tuple[dict[str, torch.Tensor], int]:
    if not isinstance(activations, Mapping) or not activations:
        raise SAELightningError("write_activations needs a non-empty mapping {hook_name: tensor [n, d_in]}")
    tensors, n = {}, None
    for hook, x in activations.items():
        if not isinstance(hook, str) or not hook:
            raise SAELightningError(f"hook name {hook!r} must be a non-empty string")
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
            raise SAELightningError(f"activations for {hook!r} must be a 2-d float tensor [n, d_in], got "
                                    f"{type(x).__name__} {tuple(getattr(x, 'shape', ()))}")
        if n is not None and x.shape[0] != n:
            raise SAELightningError(f"activations for {hook!r} have {x.shape[0]} rows, the others {n}: every hook "
                                    "needs one row per token")
        if not bool(torch.isfinite(x).all()):
            raise SAELightningError(f"activations for {hook!r} hold NaN or inf; drop those rows first")
        n = x.shape[0]
        tensors[hook] = x.detach().cpu().contiguous()
    return tensors, n


def write_activations(out_dir, activations: Mapping[str, torch.Tensor], val_tokens: int | None = None,
                      shard_tokens: int = 262_144, source=None) -> dict:
    """Write activations {hook_name: tensor [n, d_in]} (row i of every tensor = token i) as a directory that
    `data.activations` trains on; returns its manifest.

    val_tokens: the last val_tokens rows are held out for validation (default n // 10, at least 1).
    shard_tokens: rows per shard (DDP ranks and DataLoader workers read whole shards: write at least as many
        shards as devices x data.num_workers). source: anything JSON-serialisable saying where they came from.
    The rows are stored in the order given, in their dtype; shuffle them first if neighbours are correlated
    (the trainer's shuffle buffer mixes data.buffer_tokens at a time). An existing out_dir must be empty or an
    earlier write_activations output; it is replaced whole (atomically).
    """
    tensors, n = _check_tensors(activations)
    if n < 2:
        raise SAELightningError(f"write_activations needs at least 2 rows (one to train on, one held out), got {n}")
    val_tokens = max(1, n // 10) if val_tokens is None else val_tokens
    if isinstance(val_tokens, bool) or not isinstance(val_tokens, int) or not 1 <= val_tokens < n:
        raise SAELightningError(f"val_tokens={val_tokens!r} must be an integer in [1, {n - 1}] (rows held out "
                                "for validation, the rest train)")
    if isinstance(shard_tokens, bool) or not isinstance(shard_tokens, int) or shard_tokens < 1:
        raise SAELightningError(f"shard_tokens={shard_tokens!r} must be a positive integer")
    try:
        json.dumps(source)
    except (TypeError, ValueError) as err:
        raise SAELightningError(f"source must be JSON-serialisable ({err})") from None
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and _kind(out) != KIND)):
        raise SAELightningError(f"{out} exists and is not an empty directory or an earlier write_activations "
                                "output; pass a new or empty directory")
    train = n - val_tokens
    msn = {h: float(x[:train].double().pow(2).sum(-1).mean()) for h, x in tensors.items()}
    shards = []
    with atomic_dir(out) as tmp:
        for i, a in enumerate(range(0, n, shard_tokens)):
            name = f"shard_{i:05d}.safetensors"
            b = min(a + shard_tokens, n)
            save_file({f"acts.{h}": x[a:b].contiguous() for h, x in tensors.items()}, str(tmp / name))
            shards.append({"file": name, "tokens": b - a, "bytes": (tmp / name).stat().st_size,
                           "sha256": sha256_file(tmp / name)})
        manifest = {"format": FORMAT, "kind": KIND, "hooks": list(tensors),
                    "d_in": {h: x.shape[1] for h, x in tensors.items()},
                    "dtype": {h: str(x.dtype).removeprefix("torch.") for h, x in tensors.items()},
                    "tokens": n, "val_tokens": val_tokens, "mean_squared_norm": msn, "shards": shards,
                    "source": source}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def _kind(folder: Path) -> str | None:
    try:
        return json.loads((folder / MANIFEST).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


# --- reading ---

def _field(manifest: dict, key: str, kind, path: Path):
    value = manifest.get(key)
    if not isinstance(value, kind) or not value:
        raise SAELightningError(f"{path} needs a non-empty {key!r} ({kind.__name__}); {_HINT}")
    return value


def read_activations(folder, default_val_tokens: int) -> dict:
    """The checked description of an activation directory: {"dir", "hooks", "d_in", "shards", "tokens",
    "train_tokens", "val_tokens", "mean_squared_norm" (maybe partial), "source", "id"}.

    Every shard header is read: each listed hook must be there as acts.<hook> [tokens, d_in], with one width per
    hook across shards (and the manifest's d_in, when given)."""
    root = Path(folder).expanduser().absolute()
    path = root / MANIFEST
    if not path.is_file():
        unfinished = (root / ".progress.json").is_file()
        hint = "it is an unfinished `saelightning cache`: re-run its command" if unfinished else _HINT
        raise SAELightningError(f"data.activations: {root} has no {MANIFEST}; {hint}")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise SAELightningError(f"{path} is not valid JSON ({err}); fix or rewrite it") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SAELightningError(f"{path} must be a JSON object with \"format\": {FORMAT}; {_HINT}")
    hooks = _field(manifest, "hooks", list, path)
    if not all(isinstance(h, str) and h for h in hooks) or len(set(hooks)) != len(hooks):
        raise SAELightningError(f"{path}: \"hooks\" must be distinct non-empty names, got {hooks}")
    shards = _field(manifest, "shards", list, path)
    widths = dict(manifest.get("d_in") or {})
    checked = []
    for entry in shards:
        count = entry.get("tokens") if isinstance(entry, dict) else None
        if not isinstance(entry.get("file") if isinstance(entry, dict) else None, str) or isinstance(count, bool) \
                or not isinstance(count, int) or count < 0:
            raise SAELightningError(f"{path}: each shard needs \"file\" and \"tokens\" (an integer >= 0), got {entry}")
        checked.append(_check_shard(root, entry, hooks, widths))
    tokens = sum(s["tokens"] for s in checked)
    val = manifest.get("val_tokens", default_val_tokens)
    if isinstance(val, bool) or not isinstance(val, int) or not 1 <= val < tokens:
        raise SAELightningError(
            f"{root} holds {tokens} activations and {val!r} are to be held out for validation "
            f"({'its manifest' if 'val_tokens' in manifest else 'data.val_batches x data.batch_size'}): hold out "
            f"between 1 and {tokens - 1} (set \"val_tokens\" in the manifest, or lower data.val_batches)")
    ident = [(s["file"], s["tokens"], s.get("sha256") or s["bytes"]) for s in checked] + [val]
    return {"dir": str(root), "hooks": list(hooks), "d_in": {h: widths[h] for h in hooks}, "shards": checked,
            "tokens": tokens, "train_tokens": tokens - val, "val_tokens": val,
            "mean_squared_norm": dict(manifest.get("mean_squared_norm") or {}), "source": manifest.get("source"),
            "id": hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16]}


def _check_shard(root: Path, entry: dict, hooks: list[str], widths: dict) -> dict:
    file = root / entry["file"]
    if not file.is_file():
        raise SAELightningError(f"data.activations: the manifest lists {entry['file']}, which is not in {root}; "
                                "copy it there or fix the manifest")
    try:
        with safe_open(str(file), framework="pt") as f:
            keys = set(f.keys())
            shapes = {h: f.get_slice(f"acts.{h}").get_shape() for h in hooks if f"acts.{h}" in keys}
    except Exception as err:  # safetensors raises its own error type for every kind of damage
        raise SAELightningError(f"{file} is not a readable safetensors file ({str(err).splitlines()[0]}); "
                                "rewrite it") from None
    for hook in hooks:
        if hook not in shapes:
            raise SAELightningError(f"{file} has no tensor acts.{hook} (the manifest lists hook {hook!r}); "
                                    "rewrite the shard or drop the hook from the manifest")
        shape = shapes[hook]
        if len(shape) != 2 or shape[0] != entry["tokens"]:
            raise SAELightningError(f"{file}: acts.{hook} has shape {list(shape)}, the manifest says "
                                    f"[{entry['tokens']}, d_in]; fix the manifest's token count or rewrite the shard")
        if widths.setdefault(hook, shape[1]) != shape[1]:
            raise SAELightningError(f"{file}: acts.{hook} has width {shape[1]}, the manifest (or an earlier shard) "
                                    f"says d_in={widths[hook]}; every shard of a hook needs one width")
    return {**entry, "bytes": file.stat().st_size}


def train_view(info: dict) -> dict:
    """The training part as a cache manifest that cache.CacheBlocks reads: every shard cut before the held-out
    tail (a shard wholly in it is left out)."""
    left, shards = info["train_tokens"], []
    for s in info["shards"]:
        take = min(s["tokens"], left)
        if take > 0:
            shards.append({"file": s["file"], "tokens": take})
        left -= take
    return {"dir": info["dir"], "shards": shards, "shuffled": True, "batch_rows": 1}


def _segments(info: dict, start: int, end: int) -> list[tuple[str, int, int]]:
    """(file, first, end) row ranges covering global rows [start, end) in shard order."""
    out, offset = [], 0
    for s in info["shards"]:
        a, b = max(start, offset), min(end, offset + s["tokens"])
        if a < b:
            out.append((s["file"], a - offset, b - offset))
        offset += s["tokens"]
    return out


def read_rows(info: dict, hooks: list[str], start: int, end: int) -> dict[str, torch.Tensor]:
    """Global rows [start, end) of the given hooks, fp32."""
    parts: dict[str, list[torch.Tensor]] = {h: [] for h in hooks}
    for file, a, b in _segments(info, start, end):
        with safe_open(str(Path(info["dir"]) / file), framework="pt") as f:
            for h in hooks:
                parts[h].append(f.get_slice(f"acts.{h}")[a:b].float())
    return {h: torch.cat(p) for h, p in parts.items()}


def mean_squared_norms(info: dict, hooks: list[str], tokens: int) -> dict[str, float]:
    """E||x||² per hook: the manifest's, else over the first `tokens` training activations (file order: the same
    on every rank)."""
    known = {h: float(info["mean_squared_norm"][h]) for h in hooks if h in info["mean_squared_norm"]}
    missing = [h for h in hooks if h not in known]
    if missing:
        rows = read_rows(info, missing, 0, min(tokens, info["train_tokens"]))
        known.update({h: float(x.double().pow(2).sum(-1).mean()) for h, x in rows.items()})
    for h, value in known.items():
        if not (math.isfinite(value) and value > 0):
            raise SAELightningError(f"the activations of {h!r} in {info['dir']} have mean squared norm {value}; "
                                    "they cannot be normalised (set data.normalize false or check the data)")
    return known


class HeldOut:
    """The held-out tail as validation batches {"acts": {hook: [<= block, d_in]}} (raw units), read from disk at each
    pass; rank r of `world` takes blocks r, r + world, ... (the ranks together read every held-out row once)."""

    def __init__(self, info: dict, hooks: list[str], block: int, rank: int = 0, world: int = 1,
                 tokens: int | None = None):
        self.info, self.hooks, self.block, self.rank, self.world = info, list(hooks), block, rank, world
        self.tokens = info["val_tokens"] if tokens is None else min(tokens, info["val_tokens"])
        self.starts = list(range(info["train_tokens"], info["train_tokens"] + self.tokens, block))[rank::world]

    def __len__(self) -> int:
        return len(self.starts)

    def __iter__(self) -> Iterator[dict]:
        end = self.info["train_tokens"] + self.tokens
        for a in self.starts:
            yield {"acts": read_rows(self.info, self.hooks, a, min(a + self.block, end))}
