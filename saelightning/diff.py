"""`saelightning diff`: what a crosscoder's latents are in each of its models (the report a researcher reads).

Runs every model the crosscoder's cfg.json names on the same val rows (eval's: the first ceil(tokens / context)
rows of the val shard, with the held-out chat conversations mixed in as the crosscoder was trained: data.chat),
encodes their activations at its hook, and reports per latent: Δ (relative decoder norm)
and the decoder cosine between models A and B, its class, its firing density and largest activation, and Latent
Scaling's β (reconstruction and error, in every model) with the ratios ν (modeldiff.py); per model the explained
variance of its reconstruction. JSON with --out (atomic), and a printed table.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from saelightning import resolve
from saelightning.atomic import write_json
from saelightning.command import parse
from saelightning.diffsite import Contexts, logit_effects, pick_latents, write_diff_site
from saelightning.errors import SAELightningError
from saelightning.evaluate import encode_decode
from saelightning.export import load_sae
from saelightning.metrics import ReconstructionMetrics
from saelightning.modeldiff import (
    CLASS_NAMES,
    DiffThresholds,
    LatentScaling,
    class_name,
    classify,
    decoder_cosines,
    relative_norms,
)
from saelightning.progress import progress_bar
from saelightning.saes.base import CROSSCODERS
from saelightning.tokens import REGIONS, chat_regions, rows_for_tokens, val_batches


@dataclass
class DiffArgs:
    """Model diffing with an exported crosscoder: Δ, decoder cosines, classes and Latent Scaling per latent.

    Args:
        sae: the exported crosscoder directory (architecture crosscoder or crosscoder_l1).
        models: the models' checkpoint dirs, in the crosscoder's order; default: the paths its cfg.json records.
        a: index of model A among the crosscoder's models (Δ = ‖d^B‖ / (‖d^A‖ + ‖d^B‖)).
        b: index of model B.
        exclusive: Δ ≤ this is A-only, ≥ 1 − this B-only.
        shared_halfwidth: |Δ − 0.5| ≤ this is shared.
        tokens: val tokens to run (the first ceil(tokens / context_size) rows of the val shard).
        data: parquet shard dir or "demo"; default: the shards the crosscoder was trained on.
        chat: conversations mixed into the val text ("demo" or a JSONL file; its held-out tenth is read); default:
            the data.chat the crosscoder was trained with.
        chat_fraction: their share of the tokens, in [0, 1]; default: the trained data.chat_fraction (0 without).
        batch_size: rows per forward.
        context_size: tokens per row; default: the training context size.
        top: latents of each exclusive class printed (by Δ; the JSON has every latent).
        out: also write the JSON report here.
        site: also write a static site here (index.html by Δ, latents/<i>.html: each latent's top contexts on the
            same text in every model side by side, and every model's logit effect).
        site_latents: latents given a page: the ones furthest from Δ = 0.5.
        device: cpu or cuda; default: cuda when there is a GPU.
        quiet: no progress bar.
    """

    sae: str
    models: list[str] | None = None
    a: int = 0
    b: int = 1
    exclusive: float = 0.1
    shared_halfwidth: float = 0.1
    tokens: int = 20_000
    data: str | None = None
    chat: str | None = None
    chat_fraction: float | None = None
    batch_size: int = 8
    context_size: int | None = None
    top: int = 10
    out: str | None = None
    site: str | None = None
    site_latents: int = 40
    device: str | None = None
    quiet: bool = False


def run_diff(args: DiffArgs) -> dict:
    thresholds = DiffThresholds(args.exclusive, args.shared_halfwidth)
    if args.tokens < 2 or args.batch_size < 1 or args.top < 0 or args.site_latents < 1:
        raise SAELightningError("--tokens must be >= 2, --batch_size >= 1, --top >= 0 and --site_latents >= 1")
    device = resolve.device(args.device)
    cc = load_sae(args.sae, device)
    if cc.config.architecture not in CROSSCODERS:
        raise SAELightningError(f"{args.sae} is a {cc.config.architecture} SAE, not a crosscoder; diff reads "
                                "crosscoders (architecture crosscoder or crosscoder_l1)")
    hook = cc.metadata.get("hook_name")
    if not hook:
        raise SAELightningError(f"{args.sae}'s cfg.json names no hook_name; re-export the crosscoder")
    infos, models = resolve.crosscoder_models(cc, args.sae, args.models, device)
    names = tuple(info["name"] for info in infos)
    pair = (names[args.a], names[args.b]) if max(args.a, args.b) < len(names) else names[:2]
    scaling = LatentScaling(cc, args.a, args.b)  # checks a and b
    trained_on = cc.metadata.get("trained_on") or {}
    data_dir = resolve.data_dir(args.data if args.data is not None else trained_on.get("data"), infos[0]["path"])
    _, val_shard = resolve.shards(data_dir)
    tokenizer = models[0].tokenizer
    context = args.context_size or min(int(cc.metadata.get("context_size") or 256),
                                       min(m.model.config.sequence_len for m in models))
    mix = resolve.val_chat(tokenizer, [args.sae], args.chat, args.chat_fraction)
    rows = list(val_batches(val_shard, tokenizer, context, rows_for_tokens(args.tokens, context), args.batch_size,
                            chat=mix))
    d_sae = cc.config.d_sae
    fired = torch.zeros(d_sae, dtype=torch.float64)
    max_act = torch.zeros(d_sae, dtype=torch.float64)
    recon = [ReconstructionMetrics(cc.d_model) for _ in models]
    n_tokens = 0
    # where each latent fires: text, user turn, assistant turn, and on the chat markers (with a chat mix)
    regions = chat_regions(torch.cat(rows), tokenizer) if mix is not None else None
    fired_in = torch.zeros(d_sae, len(REGIONS) + 1, dtype=torch.float64)
    tokens_in = torch.zeros(len(REGIONS) + 1, dtype=torch.float64)
    row = 0
    gathered = Contexts(pick_latents(relative_norms(cc, args.a, args.b).cpu(), args.site_latents), cc.n_models) \
        if args.site else None
    with progress_bar(sum(r.numel() for r in rows), "diff", quiet=args.quiet) as bar, torch.no_grad():
        for batch in rows:
            batch = batch.to(device)
            keep = batch.reshape(-1) != tokenizer.bos_id
            acts = [m.model.run_with_cache(batch, [hook])[hook].reshape(-1, cc.d_model)[keep].float() for m in models]
            x = torch.cat(acts, -1)
            f, x_hat = encode_decode(cc, x)
            scaling.update(x, f, x_hat)
            if gathered is not None:
                gathered.update(cc, batch, keep, x, f)
            fired += (f > 0).sum(0).double().cpu()
            max_act = torch.maximum(max_act, f.max(0).values.double().cpu())
            for m, metric in enumerate(recon):
                metric.update(x[:, m * cc.d_model:(m + 1) * cc.d_model], x_hat[:, m * cc.d_model:(m + 1) * cc.d_model])
            if regions is not None:
                region, marker = (r[row:row + len(batch)].reshape(-1)[keep.cpu()] for r in regions)
                where = torch.cat([torch.nn.functional.one_hot(region, len(REGIONS)), marker[:, None].long()], 1)
                fired_in += (f > 0).double().cpu().T @ where.double()
                tokens_in += where.sum(0).double()
            row += len(batch)
            n_tokens += x.shape[0]
            bar.update(batch.numel())
    beta = scaling.compute()
    delta, cosine = relative_norms(cc, args.a, args.b).cpu(), decoder_cosines(cc, args.a, args.b).cpu()
    classes = classify(delta, thresholds)
    counts = torch.bincount(classes, minlength=len(CLASS_NAMES))

    def num(v) -> float | None:
        v = float(v)
        return v if math.isfinite(v) else None

    latents = [{"latent": i, "delta": num(delta[i]), "cosine": num(cosine[i]),
                "class": class_name(CLASS_NAMES[int(classes[i])], pair), "density": num(fired[i] / max(n_tokens, 1)),
                "max_activation": num(max_act[i]),
                "beta_reconstruction": [num(v) for v in beta["beta_reconstruction"][:, i]],
                "beta_error": [num(v) for v in beta["beta_error"][:, i]],
                "nu_reconstruction": num(beta["nu_reconstruction"][i]), "nu_error": num(beta["nu_error"][i]),
                **({"fires_on": dict(zip((*REGIONS, "chat_markers"), fired_in[i].long().tolist()))} if mix else {})}
               for i in range(d_sae)]
    report = {"sae": str(args.sae), "hook_name": hook, "models": infos, "a": pair[0], "b": pair[1],
              "data": str(data_dir), "context_size": context, "tokens_evaluated": n_tokens,
              "thresholds": {"exclusive": thresholds.exclusive, "shared_halfwidth": thresholds.shared_halfwidth},
              "class_counts": {class_name(c, pair): int(n) for c, n in zip(CLASS_NAMES, counts)},
              "explained_variance": {info["name"]: num(m.compute()["explained_variance"])
                                     for info, m in zip(infos, recon)},
              "latents": latents}
    if mix is not None:
        report["chat"] = {"chat": mix.source, "chat_fraction": mix.fraction,
                          "tokens_on": dict(zip((*REGIONS, "chat_markers"), tokens_in.long().tolist())),
                          "by_class": _chat_by_class(latents, fired_in, pair)}
    if n_tokens < args.tokens:
        print(f"saelightning diff: the val shard ran out after {n_tokens} of {args.tokens} tokens", file=sys.stderr)
    if gathered is not None:
        effects = logit_effects(models, list(names), cc, hook, gathered.latents)
        report["site"] = str(write_diff_site(args.site, report, gathered, effects, tokenizer.token_str))
    if args.out:
        write_json(args.out, report, indent=1)
    return report


CHAT_LATENT = 0.9  # a latent with this share of its firings on conversation tokens is a "chat latent"
MARKER_LATENT = 0.5  # ... with this share on the chat markers, a "marker latent"


def _chat_by_class(latents: list[dict], fired_in: torch.Tensor, pair) -> dict:
    """Per class: the latents that fire, how many of them are chat latents and marker latents, and their firings'
    share on conversation tokens (user and assistant turns) and on the chat markers."""
    fired = fired_in[:, :len(REGIONS)].sum(1)
    chat_share = fired_in[:, 1:len(REGIONS)].sum(1) / fired.clamp_min(1)
    marker_share = fired_in[:, len(REGIONS)] / fired.clamp_min(1)
    out = {}
    for cls in (class_name(c, pair) for c in CLASS_NAMES):
        idx = torch.tensor([lat["latent"] for lat in latents if lat["class"] == cls], dtype=torch.long)
        idx = idx[fired[idx] > 0] if len(idx) else idx
        firings = fired[idx].sum().item()
        out[cls] = {"firing": len(idx), "chat_latents": int((chat_share[idx] >= CHAT_LATENT).sum()),
                    "marker_latents": int((marker_share[idx] >= MARKER_LATENT).sum()),
                    "chat_share": fired_in[idx, 1:len(REGIONS)].sum().item() / firings if firings else None,
                    "marker_share": fired_in[idx, len(REGIONS)].sum().item() / firings if firings else None}
    return out


def _fmt(v, spec=".3f") -> str:
    return "-" if v is None else format(v, spec)


def format_report(report: dict, top: int = 10) -> str:
    a, b = report["a"], report["b"]
    lines = [f"{report['sae']} at {report['hook_name']}: {a} (A) vs {b} (B), {report['tokens_evaluated']} tokens",
             "classes: " + ", ".join(f"{k} {v}" for k, v in report["class_counts"].items()),
             "explained variance: " + ", ".join(f"{k} {_fmt(v)}" for k, v in report["explained_variance"].items())]
    if "chat" in report:
        on = report["chat"]["tokens_on"]
        total = max(sum(on[r] for r in REGIONS), 1)
        lines.append(f"chat mix: {on['user'] + on['assistant']} of {total} tokens in conversations "
                     f"({on['chat_markers']} chat markers); per class, firing latents / chat latents (>= "
                     f"{CHAT_LATENT:.0%} of firings in conversations) / marker latents (>= {MARKER_LATENT:.0%} on "
                     "markers), share of firings in conversations / on markers:")
        for cls, row in report["chat"]["by_class"].items():
            lines.append(f"  {cls:>12}: {row['firing']} / {row['chat_latents']} / {row['marker_latents']}, "
                         f"{_fmt(row['chat_share'])} / {_fmt(row['marker_share'])}")
    alive = [lat for lat in report["latents"] if lat["density"]]
    for cls, reverse in ((f"{b}-only", True), (f"{a}-only", False)):
        chosen = sorted((lat for lat in alive if lat["class"] == cls), key=lambda lat: lat["delta"], reverse=reverse)
        if not chosen:
            continue
        lines.append(f"\n{cls} latents (firing), by Δ; ν near 1 flags an artefact (error: Complete Shrinkage, "
                     "reconstruction: Latent Decoupling):")
        lines.append(f"{'latent':>7} {'delta':>6} {'cosine':>7} {'density':>9} {'max_act':>8} {'nu_error':>9} "
                     f"{'nu_recon':>9}")
        for lat in chosen[:top]:
            lines.append(f"{lat['latent']:>7} {_fmt(lat['delta']):>6} {_fmt(lat['cosine']):>7} "
                         f"{_fmt(lat['density'], '.2e'):>9} {_fmt(lat['max_activation'], '.2f'):>8} "
                         f"{_fmt(lat['nu_error']):>9} {_fmt(lat['nu_reconstruction']):>9}")
    return "\n".join(lines)


def cli_main(argv: Sequence[str]) -> int:
    args = parse(DiffArgs, argv, "saelightning diff")
    if args is None:
        return 0
    report = run_diff(args)
    print(format_report(report, args.top))
    if args.out:
        print(f"report written to {args.out}")
    if args.site:
        print(f"site written to {report['site']}")
    return 0
