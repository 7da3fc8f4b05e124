"""Feature dashboards: `saelightning viz` writes a static HTML site about an exported SAE's latents.

stats.py computes the per-latent statistics in one bounded-memory stream over the val shard,
records.py turns them into JSON-ready records, html.py writes the site, serve.py serves it with live
pages (`viz --serve`). `load_inputs` loads the model and SAE once; `compute_records` (shared with
`saelightning neuronpedia`) streams the val shard through them, and the server reuses them.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from saelightning import resolve
from saelightning.atomic import atomic_dir
from saelightning.command import parse
from saelightning.dashboards import serve
from saelightning.dashboards.html import layers_page, write_site
from saelightning.dashboards.records import density_histogram, export_figures, feature_records
from saelightning.dashboards.stats import StatsConfig, collect_stats, density_summary, logit_effect, nearest_latents
from saelightning.errors import SAELightningError
from saelightning.export import load_sae
from saelightning.hooks import parse_hook
from saelightning.nanochat.checkpoint import Nanochat
from saelightning.probe import read_latent_concepts
from saelightning.progress import progress_bar
from saelightning.saes.clt import CrossLayerTranscoder
from saelightning.tokens import rows_for_tokens, val_batches

LATENT_BUDGET = 2**26  # floats of dense latents per batch (256 MB in fp32)

__all__ = ["Loaded", "StatsArgs", "VizArgs", "cli_main", "compute_records", "density_summary",
           "load_inputs", "parse_features", "write_clt_sites"]


def parse_features(spec: str | None, d_sae: int) -> list[int] | None:
    """'0-99,120,200-210' -> sorted unique latent indices (inclusive ranges); None -> all latents."""
    if spec is None or str(spec).strip() in ("", "all"):
        return None
    out = set()
    try:
        for part in str(spec).split(","):
            lo, _, hi = part.strip().partition("-")
            lo, hi = int(lo), int(hi) if hi else int(lo)
            if lo > hi:
                raise ValueError
            out.update(range(lo, hi + 1))
    except ValueError:
        raise SAELightningError(f"--features {spec!r} is not a list like 0-99,120; "
                                "use indices and inclusive ranges") from None
    bad = [i for i in out if not 0 <= i < d_sae]
    if bad:
        raise SAELightningError(f"--features names latent {bad[0]}, but the SAE has latents 0..{d_sae - 1}")
    return sorted(out)


@dataclass
class StatsArgs:
    """The options of the two streaming passes over the val shard that viz and neuronpedia share.

    Args:
        sae: exported SAE directory (SAELens layout).
        model: nanochat checkpoint or base dir, or "demo" for the bundled model (default: the one the SAE's
            cfg.json records).
        out: output directory (written atomically).
        tokens: token positions of the val shard to read (the first ceil(tokens / context_size) rows, as eval).
        features: latents to include, e.g. 0-99,120 (default: all).
        data: parquet shard dir (the last shard is val), or "demo" (default: the shards the SAE was trained on).
        context_size: tokens per row (default: the SAE's training context, as eval).
        batch_rows: rows per forward (default: as many as keep a batch's dense latents near 256 MB, at most 32).
        top_k: top-activating contexts per latent.
        device: cpu or cuda (default: cuda when there is a GPU).
        quiet: no progress bars (they show only on a terminal in any case).
        chat: conversations mixed into the val rows, rendered in nanochat's conversation format as data.chat does
            ("demo" or a JSONL file; its held-out tenth, in order); default: the data.chat the SAE was trained with.
        chat_fraction: their share of the tokens, in [0, 1] (1: conversations only, 0: the val shard alone);
            default: the trained data.chat_fraction (0 without).
    """

    sae: str
    out: str
    model: str | None = None
    tokens: int = 100_000
    features: str | None = None
    data: str | None = None
    context_size: int | None = None
    batch_rows: int | None = None
    top_k: int = 20
    device: str | None = None
    quiet: bool = False
    chat: str | None = None
    chat_fraction: float | None = None


@dataclass
class VizArgs(StatsArgs):
    """Write a static HTML site (index + one page per latent) about an exported SAE's latents, from two
    streaming passes over the val shard. Open OUT/index.html from disk, or serve it with live pages (--serve).

    Args:
        serve: after writing the site, serve it over HTTP at http://HOST:PORT/ until Ctrl-C, with a live page
            per latent (type text: tokens shaded by the latent's activation; the next-token distribution
            plain and steered; the latent's note, saved to OUT/notes.json). The model and SAE stay loaded.
        host: address to listen on with --serve, and the only one: 127.0.0.1 answers this machine only; an
            address of another interface (or 0.0.0.0) lets other machines run the model and write notes.
        port: TCP port to listen on with --serve (0: a free one, printed).
        probe: a `saelightning probe --out` report of this SAE: each latent's page then shows its best-matching
            concept (by F1 of "fires => concept"), with precision and recall.
    """

    serve: bool = False
    host: str = "127.0.0.1"
    port: int = 8000
    probe: str | None = None


@dataclass
class Loaded:
    """What the dashboards load once: the frozen model with its tokenizer, the SAE, and what they came from."""

    nanochat: Nanochat
    sae: torch.nn.Module
    hook: str  # the hook point the SAE reads
    model: str  # --model as resolved ("demo" or a path)
    data: str | None  # --data as resolved (None: nanochat's base_data)
    device: torch.device


def load_inputs(args: StatsArgs) -> Loaded:
    """Load the model (fp32, frozen), its tokenizer and the SAE named by args."""
    device = resolve.device(args.device)
    model, load, data = resolve.sources([args.sae], args.model, args.data)
    nc = resolve.load_model(model, device=device, dtype=torch.float32, **load)
    sae = load_sae(args.sae, device=device).eval()
    return Loaded(nc, sae, resolve.sae_hook(sae, args.sae), model, data, device)


def compute_records(args: StatsArgs, loaded: Loaded | None = None) -> tuple[dict, list[dict], object]:
    """Stream the val shard through the model and SAE (loaded here unless given); returns (meta, records, sae)."""
    if args.tokens < 2 or args.top_k < 1:
        raise SAELightningError("--tokens must be >= 2 and --top_k >= 1")
    loaded = loaded or load_inputs(args)
    nc, sae, hook, model, data, device = (loaded.nanochat, loaded.sae, loaded.hook, loaded.model, loaded.data,
                                          loaded.device)
    layer, _ = parse_hook(hook, nc.model.n_layer)
    d_sae, d_in = sae.W_dec.shape  # W_dec is [d_sae, d_in]
    seq_len = nc.model.config.sequence_len
    context = args.context_size or min(int(sae.metadata.get("context_size") or 256), seq_len)
    if not 2 <= context <= seq_len:
        raise SAELightningError(f"--context_size must be in [2, {seq_len}], got {context}")
    # a batch's dense latents are rows x context x d_sae floats: keep them near 256 MB
    rows = args.batch_rows or max(1, min(32, LATENT_BUDGET // (context * d_sae)))
    cfg = StatsConfig(top_k=args.top_k)
    features = parse_features(args.features, d_sae)
    _, val = resolve.shards(resolve.data_dir(data, model))
    n_rows = rows_for_tokens(args.tokens, context)
    chat = resolve.val_chat(nc.tokenizer, [args.sae], args.chat, args.chat_fraction)

    def batches():  # the same rows as `saelightning eval --tokens N` (its chat mix too), for both passes
        return val_batches(val, nc.tokenizer, context, n_rows, rows, chat=chat)

    command = "viz" if isinstance(args, VizArgs) else "neuronpedia"

    def progress(desc):  # one bar per pass over the n_rows x context token positions
        return progress_bar(n_rows * context, f"{command} {desc}", unit="tok", quiet=args.quiet)

    stats = collect_stats(nc.model, sae, hook, batches, nc.tokenizer.bos_id, features, cfg, device, progress)
    effects = logit_effect(nc.model, sae, hook, stats.features, cfg)
    nearest = nearest_latents(sae.W_dec, stats.features, cfg.n_neighbours)
    records = feature_records(stats, effects, nc.tokenizer.token_str, nearest)
    meta = {"title": f"{Path(args.sae).name}: {hook}", "sae": str(args.sae), "model": resolve.model_path(model),
            "hook_name": hook, "layer": layer, "n_layer": nc.model.n_layer, "n_tokens": stats.n_tokens,
            "n_rows": stats.n_rows, "d_sae": d_sae, "d_in": d_in, "context_size": context, "val_shard": str(val),
            "n_passes": stats.n_passes, "density_hist": density_histogram(stats.n_fire_all, stats.n_tokens),
            "figures": export_figures(sae.metadata), "chat": chat.source if chat else None,
            "chat_fraction": chat.fraction if chat else 0.0}
    return meta, records, sae


def clt_layers(loaded: Loaded) -> Iterator[tuple[int, int, Loaded]]:
    """(rank in the CLT, model layer, the inputs as one transcoder's) for each layer a loaded CLT reads: layer l's
    latents as CrossLayerTranscoder.layer_transcoder gives them (read at blocks.l.hook_mlp_in, the decoder rows
    summed over the layers they write), what the dashboards and the Neuronpedia batches of a CLT are made of."""
    clt, n_layer = loaded.sae, loaded.nanochat.model.n_layer
    for rank, hook in enumerate(clt.hook_names_in):
        layer, _ = parse_hook(hook, n_layer)
        view = clt.layer_transcoder(rank)
        view.metadata = {**clt.metadata, "hook_name": hook, "hook_name_out": f"blocks.{layer}.hook_mlp_out"}
        yield rank, layer, dataclasses.replace(loaded, sae=view, hook=hook)


def write_clt_sites(args: StatsArgs, loaded: Loaded) -> Path:
    """A cross-layer transcoder's dashboards: OUT/layer{L}/ for each model layer L it reads, each an ordinary
    viz site of that layer's latents (CrossLayerTranscoder.layer_transcoder: activations on blocks.L.hook_mlp_in,
    logit effects of the decoder rows summed over the layers it writes), and OUT/index.html listing them; the
    whole OUT is written atomically. Returns the index path."""
    out = Path(args.out).expanduser().absolute()
    sites = []
    with atomic_dir(out, "viz", {"meta": {"cross_layer_transcoder": str(args.sae)}}) as tmp:
        for rank, layer, layer_loaded in clt_layers(loaded):
            meta, records, _ = compute_records(args, layer_loaded)
            write_site(tmp / f"layer{layer}", {**meta, "clt_layer": rank}, records, notes_from=out / f"layer{layer}")
            sites.append(meta)
        first = sites[0]
        meta = {"title": f"{Path(args.sae).name}: cross-layer transcoder over {len(sites)} layers",
                "sae": str(args.sae), "model": first["model"], "n_tokens": first["n_tokens"],
                "d_sae": first["d_sae"], "context_size": first["context_size"], "figures": first["figures"]}
        (tmp / "index.html").write_text(layers_page(meta, sites), encoding="utf-8")
    return out / "index.html"


def cli_main(argv: Sequence[str]) -> int:
    args = parse(VizArgs, argv, "saelightning viz")
    if args is None:
        return 0
    start = time.perf_counter()
    listening = serve.Server(args.host, args.port) if args.serve else None  # a busy port fails before the work
    try:
        loaded = load_inputs(args)
        if isinstance(loaded.sae, CrossLayerTranscoder):
            if args.serve or args.probe:
                raise SAELightningError("--serve and --probe read one SAE at one hook; a cross-layer transcoder gets "
                                        "static pages per layer only: drop them")
            index = write_clt_sites(args, loaded)
            print(f"{loaded.sae.n_latents} latent pages ({loaded.sae.n_layers} layers) in "
                  f"{time.perf_counter() - start:.1f}s; open {index}", file=sys.stderr)
            return 0
        concepts = read_latent_concepts(args.probe, loaded.hook, loaded.sae.W_dec.shape[0]) if args.probe else None
        meta, records, _ = compute_records(args, loaded)
        for record in records if concepts else ():
            if concepts[record["index"]]:
                record["concept"] = concepts[record["index"]]
        index = write_site(args.out, meta, records)  # carries OUT/notes.json over
        print(f"{len(records)} latent pages over {meta['n_tokens']} tokens in {time.perf_counter() - start:.1f}s; "
              f"open {index}", file=sys.stderr)
        if listening is None:
            return 0
        live = serve.Live(loaded.nanochat.model, loaded.nanochat.tokenizer, loaded.sae, loaded.hook)
        return serve.run(listening, index.parent, meta, records, live)
    finally:
        if listening is not None:
            listening.close()
