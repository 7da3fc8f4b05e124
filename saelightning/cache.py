"""Activation cache: run the frozen model once, store its activations on disk, train many SAEs from them.

`saelightning cache --model PATH --hooks H [H ...] --tokens N --out DIR` writes DIR/shard_XXXXX.safetensors
and DIR/manifest.json. Each shard holds, per BOS-free token: `acts.<hook>` [n, d_in] (bf16 or fp32),
`token_ids` int32, `positions` int32 (row-relative: the token's index in the context_size row the
model saw; the missing positions of a row are its BOS tokens), `rows` int64 (global row number in
stream order: tokens with equal rows shared one context) and `docs` int64 (document number in
stream order: BOS tokens seen before it, minus one). With --models (a crosscoder's data.models) every model runs
on the same token rows and each hook is stored per model as `acts.<name>/<hook>`; with --chat/--chat-fraction
the rows mix in conversations as data.chat does. The manifest names every model and the mix.

Two passes with bounded memory (one chunk + one shard):
1. stream: token batches (the same packing as the live data module) go through the model; the
   BOS-free activations are cut into chunks of --shard-tokens, each permuted with a seed of its own
   and written to DIR/.chunks/.
2. shuffle: output shard j takes the j-th of S equal slices of every (permuted) chunk and permutes
   them, so each output shard is a random sample of the whole stream and every document is spread
   over all shards. --no-shuffle skips both permutations: the shards are then the stream in order
   (a recording of the live stream, which the data module replays exactly).

Resumable: DIR/.progress.json is rewritten after every chunk and shard (each written atomically);
re-running the same command continues from it, and a finished cache (manifest.json present) is left
as it is. The data module reads a cache through CacheBlocks (bottom of this file).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import IterableDataset

from saelightning import resolve
from saelightning.atomic import atomic_path, sha256_file, write_json
from saelightning.command import parse
from saelightning.errors import SAELightningError
from saelightning.hooks import hook_width, parse_hook
from saelightning.progress import progress_bar
from saelightning.resolve import ModelSource, split_key, tokenizer_fingerprint
from saelightning.tokens import ChatMix, TokenBatches

MANIFEST = "manifest.json"
PROGRESS = ".progress.json"
CHUNKS = ".chunks"
FORMAT = 1
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
COLUMNS = {"token_ids": torch.int32, "positions": torch.int32, "rows": torch.int64, "docs": torch.int64}
COLUMN_BYTES = 4 + 4 + 8 + 8


@dataclass
class CacheConfig:
    """Run the frozen nanochat model once over the train shards and store its activations (BOS dropped) as
    globally shuffled safetensors shards with a manifest. Re-running the same command resumes.

    Args:
        model: nanochat checkpoint dir or base dir, or "demo".
        hooks: hook points to store, e.g. blocks.3.hook_resid_post.
        tokens: BOS-free tokens to store.
        out: output directory.
        data: folder of nanochat parquet shards (train = all but the last), or "demo".
        dtype: storage dtype.
        shard_tokens: tokens per shard (and per chunk of the model pass).
        context_size: tokens per row (default: the model's sequence_len).
        batch_rows: rows per model forward.
        seed: document order and shuffle seed.
        shuffle: shuffle across shards (false: the shards are the stream in order, a recording the trainer
            replays exactly).
        step: checkpoint step (default: the latest).
        era: override the era detected from the checkpoint.
        device: where the model runs: cpu, cuda, cuda:1 (not part of the cache's fingerprint).
        compile_model: run the model's truncated forward under torch.compile (compiles first; not part of the
            fingerprint).
        quiet: no progress bars (they show only on a terminal in any case; not part of the fingerprint).
        models: two or more models run on the same token rows, as data.models for a crosscoder (each a ModelSource:
            name, path (default --model), source, step, model_tag, era): every hook is stored for every model, keyed
            "<name>/<hook>" as the data module keys them.
        chat: conversations mixed into the text, as data.chat ("demo" or a JSONL file; its train split).
        chat_fraction: the share of the tokens that are conversations, as data.chat_fraction (0: text only).
    """

    ALIASES: ClassVar[dict[str, str]] = {"compile": "compile_model"}  # the flag's earlier name

    model: str
    hooks: list[str]
    tokens: int
    out: str
    data: str = "demo"
    dtype: Literal["bf16", "fp32"] = "fp32"
    shard_tokens: int = 262_144
    context_size: int | None = None
    batch_rows: int = 8
    seed: int = 0
    shuffle: bool = True
    step: int | None = None
    era: Literal["original", "current"] | None = None
    device: str = "cpu"
    compile_model: bool = False
    quiet: bool = False
    models: list[ModelSource] | None = None
    chat: str | None = None
    chat_fraction: float = 0.0


# --- small helpers ---

def _seed(*parts: int) -> int:
    value = 0
    for p in parts:
        value = (value * 1_000_003 + p) % (2**63)
    return value


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors file written atomically (tests interrupt a run by patching this)."""
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))


def _fingerprint(cfg: CacheConfig) -> dict:
    keep = asdict(cfg)
    for key in ("device", "compile_model", "quiet", "out", "model", "step", "era", "models"):
        keep.pop(key)  # the models are identified by the loaded checkpoints' meta (path, step, era)
    return keep


def _who(record: dict) -> list[dict]:
    """Which checkpoints a cache (its progress or manifest) was made from: name, path, step and era of each."""
    return [{k: m.get(k) for k in ("name", "path", "step", "era")} for m in record.get("models") or [record["model"]]]


def chat_record(mix: ChatMix | None, source: str | None) -> dict | None:
    """What a cache records of its chat mix: the source, the fraction, and a fingerprint of the mixed conversations'
    tokens in their order (not of the source's spelling), which a fit's data.chat must reproduce."""
    if mix is None:
        return None
    return {"chat": source, "chat_fraction": mix.fraction, "conversations": len(mix.conversations),
            "fingerprint": ChatMix(mix.conversations, mix.fraction).fingerprint()}


def _slice(cols: dict[str, torch.Tensor], a: int, b: int | None = None) -> dict[str, torch.Tensor]:
    return {k: v[a:b] for k, v in cols.items()}


def _cat(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


# --- pass 1: the model over the token stream ---

def capture_columns(runs: dict[str, Callable], device: torch.device, tokens: torch.Tensor, hooks: list[str],
                    bos: int, dtype: torch.dtype, first_row: int,
                    docs_before: int) -> tuple[dict[str, torch.Tensor], int]:
    """The cache columns of one token batch (BOS dropped) and the document count after it. `runs` maps a key
    prefix ("" for one model, "<name>/" for each of several) to that model's capture function."""
    # the same autocast rule as the live data module, so a cache holds what training would see
    cache = {}
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for prefix, run in runs.items():
            got = run(tokens.to(device), hooks)
            cache.update({prefix + h: got[h] for h in hooks})
    rows_n, ctx = tokens.shape
    flat = tokens.reshape(-1)
    is_bos = flat == bos
    keep = ~is_bos
    docs = torch.cumsum(is_bos.long(), 0) + docs_before - 1
    cols = {f"acts.{k}": a.reshape(rows_n * ctx, -1)[keep.to(device)].to(dtype).cpu() for k, a in cache.items()}
    cols["token_ids"] = flat[keep].to(torch.int32)
    cols["positions"] = torch.arange(ctx, dtype=torch.int32).repeat(rows_n)[keep]
    cols["rows"] = (torch.arange(rows_n, dtype=torch.int64) + first_row).repeat_interleave(ctx)[keep]
    cols["docs"] = docs[keep]
    return cols, docs_before + int(is_bos.sum())


class _Builder:
    """Runs the two passes for one CacheConfig in one output directory, keeping .progress.json current.
    With --models, `loaded` holds each model and `sources` their ModelSources (else one model, no sources)."""

    def __init__(self, cfg: CacheConfig, loaded: list, sources: list[ModelSource], train_paths: list[Path]):
        self.cfg, self.loaded, self.sources, self.train_paths = cfg, loaded, sources, train_paths
        self.nanochat = loaded[0]
        self.out = Path(cfg.out).expanduser().absolute()
        self.model = self.nanochat.model
        self.n_chunks = math.ceil(cfg.tokens / cfg.shard_tokens)
        self.fingerprint = _fingerprint(cfg)
        self.prefixes = [f"{s.name}/" for s in sources] or [""]
        self.keys = [p + h for p in self.prefixes for h in cfg.hooks]  # the stored activations, "<name>/<hook>"
        self.chat = None
        if cfg.chat_fraction > 0:  # the train split, as the data module renders it (seeded by data.seed)
            self.chat = ChatMix.render(self.nanochat.tokenizer, resolve.conversations(cfg.chat), cfg.chat_fraction,
                                       "train", cfg.seed, cfg.chat)

    def head(self) -> dict:
        """What the progress file and the manifest say the cache was made from."""
        meta = self.nanochat.meta
        head = {"model": {"path": meta["path"], "step": meta["step"], "era": meta["era"],
                          "config": meta["model_config"]}}
        if self.sources:
            head["models"] = resolve.models_info(self.sources, self.loaded)
        return head

    def _chunk_size(self, c: int) -> int:
        return min(self.cfg.shard_tokens, self.cfg.tokens - c * self.cfg.shard_tokens)

    def _save_progress(self, progress: dict) -> None:
        write_json(self.out / PROGRESS, progress)

    def stream(self, progress: dict) -> None:
        """Pass 1: chunks written in stream order; progress names the batch the leftover tokens start in."""
        cfg, hooks, dtype = self.cfg, self.cfg.hooks, DTYPES[self.cfg.dtype]
        runs = {p: n.model.capturer(cfg.compile_model) for p, n in zip(self.prefixes, self.loaded)}
        device = next(self.model.parameters()).device
        chunks_dir = self.out / CHUNKS
        chunks_dir.mkdir(exist_ok=True)
        pos = progress["stream"]  # {"reader", "skip", "batch", "docs"}: the batch the next chunk starts in
        start = None if pos["reader"] is None else {"workers": {0: pos["reader"]}}
        batches = TokenBatches(self.train_paths, self.nanochat.tokenizer, cfg.context_size, cfg.batch_rows,
                               seed=cfg.seed, start=start, chat=self.chat)
        done = sum(c["tokens"] for c in progress["chunks"])
        bar = progress_bar(cfg.tokens, "cache: model pass", initial=done, quiet=cfg.quiet)
        reader_state, batch, docs, skip = pos["reader"], pos["batch"], pos["docs"], pos["skip"]
        pending: list[dict] = []
        n_pending = 0
        for item in batches:
            cols, docs_after = capture_columns(runs, device, item["tokens"], hooks, self.nanochat.tokenizer.bos_id,
                                               dtype, batch * cfg.batch_rows, docs)
            n_batch, offset = cols["token_ids"].shape[0], skip
            cols = _slice(cols, skip)
            pending.append(cols)
            n_pending += n_batch - skip
            while len(progress["chunks"]) < self.n_chunks and n_pending >= self._chunk_size(len(progress["chunks"])):
                c = len(progress["chunks"])
                size = self._chunk_size(c)
                merged = _cat(pending)
                chunk, rest = _slice(merged, 0, size), _slice(merged, size)
                pending, n_pending = [rest], n_pending - size
                offset = n_batch - n_pending  # the leftover is always a tail of the current batch
                self._write_chunk(c, chunk, progress)
                progress["stream"] = {"reader": reader_state, "skip": offset, "batch": batch, "docs": docs}
                self._save_progress(progress)
            written = sum(c["tokens"] for c in progress["chunks"])
            bar.update(min(written + n_pending, cfg.tokens) - bar.n)  # every batch, not only at chunk ends
            if len(progress["chunks"]) == self.n_chunks:
                break
            reader_state, batch, docs, skip = item["state"], batch + 1, docs_after, 0
        bar.close()

    def _write_chunk(self, c: int, chunk: dict[str, torch.Tensor], progress: dict) -> None:
        sumsq = {k: float(chunk[f"acts.{k}"].double().pow(2).sum()) for k in self.keys}
        if self.cfg.shuffle:  # permuted now, so pass 2 can take contiguous slices of it
            perm = torch.randperm(len(chunk["token_ids"]),
                                  generator=torch.Generator().manual_seed(_seed(self.cfg.seed, 1, c)))
            chunk = {k: v[perm] for k, v in chunk.items()}
        _save_tensors(chunk, self.out / CHUNKS / f"chunk_{c:05d}.safetensors")
        progress["chunks"].append({"tokens": len(chunk["token_ids"]), "sumsq": sumsq})

    def shuffle(self, progress: dict) -> None:
        """Pass 2: output shard j = slice j of every chunk, permuted (or the chunk itself without shuffle)."""
        counts = [c["tokens"] for c in progress["chunks"]]
        n_out = len(counts)
        bar = progress_bar(n_out, "cache: shuffle pass", unit="shard", initial=len(progress["shards"]),
                           quiet=self.cfg.quiet)
        for j in range(len(progress["shards"]), n_out):
            path = self.out / f"shard_{j:05d}.safetensors"
            if self.cfg.shuffle:
                shard = self._gather(j, counts)
                perm = torch.randperm(len(shard["token_ids"]),
                                      generator=torch.Generator().manual_seed(_seed(self.cfg.seed, 2, j)))
                _save_tensors({k: v[perm] for k, v in shard.items()}, path)
            elif (self.out / CHUNKS / f"chunk_{j:05d}.safetensors").exists():  # else moved before an interruption
                os.replace(self.out / CHUNKS / f"chunk_{j:05d}.safetensors", path)
            with safe_open(str(path), framework="pt") as f:
                n = f.get_slice("token_ids").get_shape()[0]
            progress["shards"].append({"file": path.name, "tokens": n, "bytes": path.stat().st_size,
                                       "sha256": sha256_file(path)})
            self._save_progress(progress)
            bar.update(1)
        bar.close()

    def _gather(self, j: int, counts: list[int]) -> dict[str, torch.Tensor]:
        parts = []
        n_out = len(counts)
        for c, n in enumerate(counts):
            a, b = j * n // n_out, (j + 1) * n // n_out
            with safe_open(str(self.out / CHUNKS / f"chunk_{c:05d}.safetensors"), framework="pt") as f:
                parts.append({k: f.get_slice(k)[a:b] for k in f.keys()})
        return _cat(parts)

    def manifest(self, progress: dict) -> dict:
        cfg = self.cfg
        n_layer, d_model = self.model.n_layer, self.model.d_model
        total = sum(c["tokens"] for c in progress["chunks"])
        msn = {k: sum(c["sumsq"][k] for c in progress["chunks"]) / total for k in self.keys}
        return {
            "format": FORMAT, "kind": "saelightning-activation-cache", **self.head(),
            "tokenizer": tokenizer_fingerprint(self.nanochat.tokenizer), "chat": chat_record(self.chat, cfg.chat),
            "hooks": list(self.keys), "d_in": {k: hook_width(split_key(k)[1], n_layer, d_model) for k in self.keys},
            "dtype": cfg.dtype, "tokens": total, "context_size": cfg.context_size, "batch_rows": cfg.batch_rows,
            "seed": cfg.seed, "shuffled": cfg.shuffle, "positions": "row-relative", "bos_dropped": True,
            "data": str(cfg.data), "train_shards": [p.name for p in self.train_paths],
            "mean_squared_norm": msn,  # E||x||² over the whole cache, per key (the trainer's scale comes from it)
            "shards": progress["shards"], "fingerprint": self.fingerprint,
        }


# --- driver ---

def estimate_bytes(cfg: CacheConfig, widths: dict[str, int]) -> int:
    """Peak disk use: the chunks and the shards coexist during the shuffle pass (widths: every stored key's)."""
    per_token = sum(widths.values()) * DTYPES[cfg.dtype].itemsize + COLUMN_BYTES
    return cfg.tokens * per_token * (2 if cfg.shuffle else 1)


def _check_disk(out: Path, needed: int) -> None:
    present = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) if out.exists() else 0
    probe = out if out.exists() else next(p for p in out.parents if p.exists())
    free = shutil.disk_usage(probe).free
    if needed - present > free:
        raise SAELightningError(
            f"the cache needs about {needed / 1e9:.2f} GB in {out} and {free / 1e9:.2f} GB are free; "
            "free space, lower --tokens, use --dtype bf16, or pick another --out")


def _load(cfg: CacheConfig) -> tuple[list, list[ModelSource], list[Path]]:
    """The model (or --models' models, with their sources) and the train shards."""
    if cfg.models:
        sources, loaded = resolve.load_models(cfg.models, cfg.model, device=cfg.device)
    else:
        sources, loaded = [], [resolve.load_model(cfg.model, step=cfg.step, era=cfg.era, device=cfg.device)]
    train, _ = resolve.shards(cfg.data)
    return loaded, sources, train


def _check_config(cfg: CacheConfig, n_layer: int) -> None:
    if cfg.tokens < 1 or cfg.shard_tokens < 1 or cfg.batch_rows < 1:
        raise SAELightningError("--tokens, --shard-tokens and --batch-rows must be >= 1")
    if cfg.dtype not in DTYPES:
        raise SAELightningError(f"--dtype {cfg.dtype!r}: choose bf16 or fp32")
    if not cfg.hooks or len(set(cfg.hooks)) != len(cfg.hooks):
        raise SAELightningError("--hooks needs one or more distinct hook names")
    for h in cfg.hooks:
        if split_key(h)[0] is not None:
            raise SAELightningError(f"--hooks {h}: give the plain hook; with --models every hook is stored for every "
                                    "model, keyed <name>/<hook>")
        parse_hook(h, n_layer)
    if not 0.0 <= cfg.chat_fraction <= 1.0:
        raise SAELightningError(f"--chat_fraction {cfg.chat_fraction} must be in [0, 1] (the share of the tokens "
                                "that are chat conversations)")
    if cfg.chat_fraction > 0 and cfg.chat is None:
        raise SAELightningError(f"--chat_fraction {cfg.chat_fraction} but no --chat; give --chat (a JSONL file of "
                                "conversations, or demo)")


def _open_progress(out: Path, fingerprint: dict, head: dict) -> dict | None:
    """The finished manifest or the progress of this same cache in `out`; refuses anything else there."""
    for name in (MANIFEST, PROGRESS):
        path = out / name
        if path.is_file():
            record = json.loads(path.read_text())
            if (record.get("fingerprint"), _who(record)) != (fingerprint, _who(head)):
                raise SAELightningError(
                    f"{out} holds {'a cache' if name == MANIFEST else 'an unfinished cache'} made with other settings "
                    "or another model; use the same command to finish it, or another --out")
            return record
    if out.exists() and any(out.iterdir()):
        raise SAELightningError(f"--out {out} exists and is not a saelightning cache; pass a new or empty directory")
    return None


def build_cache(cfg: CacheConfig) -> dict:
    """Build (or finish, or leave as it is) the cache described by cfg; returns its manifest."""
    loaded, sources, train = _load(cfg)
    model = loaded[0].model
    _check_config(cfg, model.n_layer)
    cfg.context_size = cfg.context_size or min(n.model.config.sequence_len for n in loaded)
    builder = _Builder(cfg, loaded, sources, train)
    out = builder.out
    record = _open_progress(out, builder.fingerprint, builder.head())
    if record is not None and record.get("kind") == "saelightning-activation-cache":
        shutil.rmtree(out / CHUNKS, ignore_errors=True)
        print(f"cache: {out} is complete ({record['tokens']} tokens); nothing to do", file=sys.stderr)
        return record
    widths = {k: hook_width(split_key(k)[1], model.n_layer, model.d_model) for k in builder.keys}
    _check_disk(out, estimate_bytes(cfg, widths))
    out.mkdir(parents=True, exist_ok=True)
    progress = record or {"fingerprint": builder.fingerprint, **builder.head(), "chunks": [], "shards": [],
                          "stream": {"reader": None, "skip": 0, "batch": 0, "docs": 0}}
    if record is None:  # first thing in `out`: a run stopped before its first chunk is this cache, unfinished
        builder._save_progress(progress)
    if len(progress["chunks"]) < builder.n_chunks:
        builder.stream(progress)
    builder.shuffle(progress)
    manifest = builder.manifest(progress)
    write_json(out / MANIFEST, manifest)
    (out / PROGRESS).unlink(missing_ok=True)
    shutil.rmtree(out / CHUNKS, ignore_errors=True)
    return manifest


def cli_main(argv: Sequence[str]) -> int:
    cfg = parse(CacheConfig, argv, "saelightning cache")
    if cfg is None:
        return 0
    manifest = build_cache(cfg)
    size = sum(s["bytes"] for s in manifest["shards"])
    print(f"cache: {manifest['tokens']} tokens x {len(manifest['hooks'])} key(s) in {len(manifest['shards'])} "
          f"shard(s), {size / 1e6:.1f} MB, {cfg.out}/manifest.json", file=sys.stderr)
    return 0


# --- reading a cache (the data module's train source) ---

def read_manifest(cache_dir) -> dict:
    root = Path(cache_dir).expanduser()
    path = root / MANIFEST
    if not path.is_file():
        hint = "it is unfinished: re-run its `saelightning cache` command" if (root / PROGRESS).is_file() else \
            "build one with `saelightning cache`"
        raise SAELightningError(f"{root} has no {MANIFEST}; {hint}")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise SAELightningError(f"{path} has cache format {manifest.get('format')}, this saelightning reads {FORMAT}; "
                                "rebuild the cache")
    manifest["dir"] = str(root.absolute())
    return manifest


def _models_named(models: list[dict]) -> str:
    return ", ".join(f"{m['name']} ({m['path']}, {m['stage']}, step {m['step']})" for m in models)


def _check_models(manifest: dict, model_info: dict) -> None:
    """The models of a cache against data.models (or data.model): the same ones, named alike, in one order."""
    theirs, ours = manifest.get("models"), model_info.get("models")
    if ours is None and theirs is None:
        theirs, ours = manifest["model"], model_info
        if (theirs["step"], theirs["era"], theirs["config"]) != (ours["step"], ours["era"], ours["config"]):
            raise SAELightningError(f"the cache was made from {theirs['path']} (step {theirs['step']}, "
                                    f"era {theirs['era']}), data.model is {ours['path']} "
                                    f"(step {ours['step']}); point data.model/data.step at the cached checkpoint")
    elif theirs is None:
        raise SAELightningError(f"the cache {manifest['dir']} holds one model's activations "
                                f"({manifest['model']['path']}), data.models names several; build a cache of every "
                                "model with `saelightning cache --models` (the same entries as data.models)")
    elif ours is None:
        raise SAELightningError(f"the cache {manifest['dir']} holds the activations of {_models_named(theirs)}; train "
                                "on it with those models as data.models, or cache data.model alone")
    else:
        same = lambda m: (m["name"], m["stage"], m["step"], m["era"], m["config"])  # noqa: E731 (a path may move)
        if [same(m) for m in theirs] != [same(m) for m in ours]:
            raise SAELightningError(f"the cache {manifest['dir']} was made from {_models_named(theirs)}, data.models "
                                    f"is {_models_named(ours)}; give data.models the cached models (names, stages, "
                                    "steps, in order) or cache these")


def check_origin(manifest: dict, model_info: dict, tokenizer: str, chat: dict | None) -> None:
    """Refuse a cache that comes from other model checkpoints or another tokenizer, or mixed other conversations
    into its text than data.chat / data.chat_fraction would (the data module asks before anything is written)."""
    _check_models(manifest, model_info)
    if manifest.get("tokenizer", tokenizer) != tokenizer:  # a cache older than this check records none
        raise SAELightningError(f"the cache {manifest['dir']} was tokenized by another tokenizer than data.model's; "
                                "rebuild the cache with the model's tokenizer/ beside its checkpoints")
    theirs = manifest.get("chat")
    if (theirs or {}).get("fingerprint") != (chat or {}).get("fingerprint"):
        def mix(record):
            return "no chat" if record is None else f"chat {record['chat']} at chat_fraction {record['chat_fraction']}"
        raise SAELightningError(f"the cache {manifest['dir']} mixed {mix(theirs)} into its text, this run asks for "
                                f"{mix(chat)} (data.chat, data.chat_fraction, data.seed); train with the cache's mix "
                                "or cache this one")


def check_cache(manifest: dict, widths: dict[str, int]) -> None:
    """Refuse a cache that lacks one of the SAEs' activation keys or has another width for it."""
    for hook, d_in in widths.items():
        if hook not in manifest["hooks"]:
            raise SAELightningError(f"the cache {manifest['dir']} has no {hook} (it holds {manifest['hooks']}); "
                                    "cache that hook or train an SAE on a cached one")
        if manifest["d_in"][hook] != d_in:
            raise SAELightningError(f"the cache's {hook} has d_in={manifest['d_in'][hook]}, the SAE's is {d_in}; "
                                    "the cache comes from another model: point data.model at the cached one")


def cache_scales(manifest: dict, hooks: list[str]) -> dict[str, float]:
    """The normalisation constant per hook (E||s·x||² = d_in) from the manifest's statistics."""
    return {h: math.sqrt(manifest["d_in"][h] / manifest["mean_squared_norm"][h]) for h in hooks}


class CacheBlocks(IterableDataset):
    """Blocks of cached activations {hook: [n, d]} for one reader, with its position after each block.

    Reader slot = rank * num_workers + worker of world = world_size * num_workers: it reads shards
    slot, slot + world, ... of each epoch's shard order (file order in epoch 0, shuffled with seed +
    epoch after). A shuffled cache is read in blocks of `block_tokens`; an unshuffled one block per
    model batch (its rows // batch_rows), so its blocks are exactly the live stream's captures.
    Yields {"tokens": block, "worker": id, "state": {"position": ...}} (TokenReader's item layout).
    """

    def __init__(self, manifest: dict, hooks: list[str], block_tokens: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, start: dict | None = None):
        self.manifest, self.hooks, self.block_tokens = manifest, list(hooks), block_tokens
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.root = Path(manifest["dir"])
        self.counts = [s["tokens"] for s in manifest["shards"]]
        self.replay = not manifest["shuffled"]
        self.start = {int(k): dict(v["position"]) for k, v in ((start or {}).get("workers") or {}).items()}

    def _mine(self, epoch: int, slot: int, world: int) -> list[int]:
        order = list(range(len(self.counts)))
        if epoch > 0:
            random.Random(self.seed + epoch).shuffle(order)
        mine = order[slot::world]
        if not mine:
            raise SAELightningError(f"cache reader {slot} of {world} gets none of the {len(order)} shards; "
                                    "use fewer devices x data.num_workers or rebuild the cache with a smaller "
                                    "--shard-tokens")
        return mine

    def _batch_ids(self, shard: int, cached: dict) -> torch.Tensor:
        if shard not in cached:
            cached.clear()  # one shard's row ids at a time (8 bytes a token)
            with safe_open(str(self.root / self.manifest["shards"][shard]["file"]), framework="pt") as f:
                cached[shard] = f.get_tensor("rows") // self.manifest["batch_rows"]
        return cached[shard]

    def _read(self, shard: int, a: int, b: int) -> dict[str, torch.Tensor]:
        with safe_open(str(self.root / self.manifest["shards"][shard]["file"]), framework="pt") as f:
            return {h: f.get_slice(f"acts.{h}")[a:b] for h in self.hooks}

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (0, 1) if info is None else (info.id, info.num_workers)
        slot, world = self.rank * n_workers + worker, self.world_size * n_workers
        pos = dict(self.start.get(worker) or {"epoch": 0, "cursor": 0, "row": 0})
        ids: dict = {}
        while True:
            parts, batch_id = [], None
            while True:  # a block; in replay mode it may continue into the next shard (a batch cut by a shard end)
                mine = self._mine(pos["epoch"], slot, world)
                shard, n, a = mine[pos["cursor"]], self.counts[mine[pos["cursor"]]], pos["row"]
                if self.replay:
                    bids = self._batch_ids(shard, ids)
                    if batch_id is not None and bids[a].item() != batch_id:
                        break
                    batch_id = bids[a].item()
                    other = (bids[a:] != batch_id).nonzero()
                    b = a + int(other[0]) if len(other) else n
                else:
                    b = min(a + self.block_tokens, n)
                parts.append(self._read(shard, a, b))
                pos["row"] = b
                if b == n:
                    pos["cursor"], pos["row"] = pos["cursor"] + 1, 0
                    if pos["cursor"] == len(mine):
                        pos["epoch"], pos["cursor"] = pos["epoch"] + 1, 0
                if not self.replay or b < n:
                    break
            block = parts[0] if len(parts) == 1 else _cat(parts)
            yield {"tokens": block, "worker": worker, "state": {"position": dict(pos)}}
