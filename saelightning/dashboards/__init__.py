"""Feature dashboards: `saelightning viz` writes a static HTML site about an exported SAE's latents.

stats.py computes the per-latent statistics in one bounded-memory stream over the val shard,
records.py turns them into JSON-ready records, html.py writes the site. `compute_records` is
shared with `saelightning neuronpedia`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

from saelightning.dashboards.stats import StatsConfig, density_summary  # noqa: F401  (public API)
from saelightning.errors import SAELightningError

LATENT_BUDGET = 2**26  # floats of dense latents per batch (256 MB in fp32)

__all__ = ["cli_main", "compute_records", "density_summary", "parse_features", "add_common_args"]


def parse_features(spec: str | None, d_sae: int) -> list[int] | None:
    """'0-99,120,200-210' -> sorted unique latent indices (inclusive ranges); None -> all latents."""
    if spec is None or spec.strip() in ("", "all"):
        return None
    out = set()
    try:
        for part in spec.split(","):
            lo, _, hi = part.strip().partition("-")
            lo, hi = int(lo), int(hi) if hi else int(lo)
            if lo > hi:
                raise ValueError
            out.update(range(lo, hi + 1))
    except ValueError:
        raise SAELightningError(f"--features {spec!r} is not a list like 0-99,120; use indices and inclusive ranges") from None
    bad = [i for i in out if not 0 <= i < d_sae]
    if bad:
        raise SAELightningError(f"--features names latent {bad[0]}, but the SAE has latents 0..{d_sae - 1}")
    return sorted(out)


def add_common_args(p: argparse.ArgumentParser, default_tokens: int) -> None:
    p.add_argument("--sae", required=True, help="exported SAE directory (SAELens layout)")
    p.add_argument("--model", required=True, help='nanochat checkpoint or base dir, or "demo" for the bundled model')
    p.add_argument("--tokens", type=int, default=default_tokens,
                   help=f"token positions of the val shard to read (default {default_tokens})")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--features", default=None, help="latents to include, e.g. 0-99,120 (default: all)")
    p.add_argument("--data", default=None, help='parquet shard dir (last shard = val) or "demo"')
    p.add_argument("--context-size", type=int, default=None,
                   help="tokens per row (default: the SAE's training context, at most 128)")
    p.add_argument("--batch-rows", type=int, default=None,
                   help="rows per forward pass (default: as many as keep a batch's latents near 256 MB, at most 32)")
    p.add_argument("--top-k", type=int, default=20, help="top-activating contexts per latent (default 20)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")


def compute_records(args) -> tuple[dict, list[dict], object]:
    """Load model, tokenizer and SAE, stream the val shard; returns (meta, records, sae)."""
    from saelightning.dashboards.records import feature_records
    from saelightning.dashboards.stats import collect_stats, logit_effect, token_batches
    from saelightning.evaluate import load_cli_model, resolve_data_dir, resolve_model_path
    from saelightning.export import load_sae
    from saelightning.hooks import parse_hook
    from saelightning.nanochat.shards import TextStream, list_shards

    device, nc = load_cli_model(args.model, args.device)
    sae = load_sae(args.sae, device=device).eval()
    hook = (getattr(sae, "metadata", None) or {}).get("hook_name")
    if not hook:
        raise SAELightningError(f"{args.sae}: cfg.json metadata has no hook_name; re-export the SAE with it")
    layer, _ = parse_hook(hook, nc.model.n_layer)
    d_sae, d_in = sae.W_dec.shape  # W_dec is [d_sae, d_in]
    context = args.context_size or min(int(sae.metadata.get("context_size") or 128), 128, nc.model.config.sequence_len)
    if not 2 <= context <= nc.model.config.sequence_len:
        raise SAELightningError(f"--context-size must be in [2, {nc.model.config.sequence_len}], got {context}")
    # a batch's dense latents are rows x context x d_sae floats: keep them near 256 MB
    rows = args.batch_rows or max(1, min(32, LATENT_BUDGET // (context * d_sae)))
    cfg = StatsConfig(n_tokens=args.tokens, context_size=context, batch_rows=rows, top_k=args.top_k)
    features = parse_features(args.features, d_sae)
    _, val = list_shards(resolve_data_dir(args.data, args.model))

    def batches():  # the same deterministic stream for both passes
        return token_batches(nc.tokenizer, TextStream([val], loop=False, shuffle=False), cfg)

    stats = collect_stats(nc.model, sae, hook, batches, nc.tokenizer.bos_id, features, cfg, device)
    effects = logit_effect(nc.model, sae, hook, stats.features, cfg)
    records = feature_records(stats, effects, nc.tokenizer.token_str)
    meta = {"title": f"{Path(args.sae).name}: {hook}", "sae": str(args.sae), "model": resolve_model_path(args.model),
            "hook_name": hook, "layer": layer, "n_layer": nc.model.n_layer, "n_tokens": stats.n_tokens,
            "n_rows": stats.n_rows, "d_sae": d_sae, "d_in": d_in, "context_size": context, "val_shard": str(val)}
    return meta, records, sae


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="saelightning viz", description=(
        "Write a static HTML site (index + one page per latent) about an exported SAE's latents, "
        "from one streaming pass over the val shard. Open OUT/index.html from disk."))
    add_common_args(p, default_tokens=100_000)
    return p


def cli_main(argv: Sequence[str]) -> int:
    from saelightning.dashboards.html import write_site

    args = _parser().parse_args(list(argv))
    if args.tokens < 2:
        raise SAELightningError("--tokens must be >= 2")
    start = time.perf_counter()
    meta, records, _ = compute_records(args)
    index = write_site(args.out, meta, records)
    print(f"{len(records)} latent pages over {meta['n_tokens']} tokens in {time.perf_counter() - start:.1f}s; "
          f"open {index}", file=sys.stderr)
    return 0
