"""Evaluate exported SAEs: reconstruction metrics and the model's loss with the SAE spliced in.

Names and definitions follow SAELens / SAEBench (../shared/SAE_REFERENCE.md). The core,
`spliced_scores`, works on one batch of token rows and returns float64 *sums*, so batches (and
ranks, under DDP) combine by addition; `finalize_scores` turns the sums into the metrics. Lightning
validation calls the same two functions; `saelightning eval` runs them over N tokens of the val shard.

Positions: BOS positions are never spliced (their activation is kept) and never scored. A
next-token prediction at position t is scored when neither tokens[t] nor tokens[t+1] is BOS, i.e.
only predictions inside a document; CE and KL use the same positions.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F

from saelightning.errors import SAELightningError
from saelightning.hooks import hook_width, parse_hook


def as_sae_groups(saes) -> dict[str, list]:
    """{hook: sae or [sae, ...]} -> {hook: [sae, ...]}: several SAEs may share a hook point."""
    if not isinstance(saes, Mapping):
        raise SAELightningError("saes must be a mapping {hook_name: sae or list of saes}; "
                                "build it from each SAE's metadata['hook_name']")
    groups = {}
    for hook, group in saes.items():
        group = list(group) if isinstance(group, (list, tuple)) else [group]
        if not group:
            raise SAELightningError(f"no SAE given for hook point {hook!r}; drop the key or add an SAE")
        groups[hook] = group
    return groups


def check_saes(model, groups: Mapping[str, Sequence]) -> None:
    """Every hook exists in the model and every SAE's d_in matches its hook point's width."""
    for hook, group in groups.items():
        parse_hook(hook, model.n_layer)  # raises with the list of valid names
        width = hook_width(hook, model.n_layer, model.d_model)
        for sae in group:
            d_in = sae.W_enc.shape[0]
            if d_in != width:
                raise SAELightningError(
                    f"SAE with d_in={d_in} cannot read hook point {hook!r}, whose width is {width} "
                    f"in this model; use an SAE trained on this model's {hook}")


def _log_probs(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities [M, V] at the scored positions (mask [B, T-1])."""
    return F.log_softmax(logits[:, :-1][mask].float(), dim=-1)


def encode_decode(sae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents, reconstruction) of raw activations x [N, d], also for an SAE still in training.

    A training SAE works on x * input_scale (the data module's normalisation); its reconstruction
    is scaled back. Exported SAEs have input_scale 1 (folded into the weights), where this is exact.
    """
    scale = getattr(sae, "input_scale", None)
    if scale is None:
        f = sae.encode(x.to(sae.W_enc.dtype))
        return f, sae.decode(f).to(x.dtype)
    scale = scale.to(sae.W_enc.dtype)
    f = sae.encode(x.to(sae.W_enc.dtype) * scale)
    return f, (sae.decode(f) / scale).to(x.dtype)


def splice_hook(sae, keep: torch.Tensor, with_error: bool = False, stats: dict | None = None):
    """A model hook replacing the activation x by the SAE's reconstruction at the kept positions.

    keep: bool [B, T] (False at BOS: those positions keep x). sae=None zero-ablates instead.
    with_error=True adds the reconstruction error back (x_hat + (x - x_hat)), which must leave the
    model's output unchanged: a check that the splice itself is sound. stats, when given, receives
    the kept activations "x", latents "f" and reconstructions "x_hat" ([N, d] each).
    """
    def hook(x):
        x_kept = x[keep]
        if sae is None:
            x_hat = torch.zeros_like(x_kept)
        else:
            f, x_hat = encode_decode(sae, x_kept)
            if stats is not None:
                stats.update(x=x_kept, f=f, x_hat=x_hat)
        if with_error:
            x_hat = x_hat + (x_kept - x_hat)
        out = x.clone()
        out[keep] = x_hat
        return out

    return hook


def _loss_sums(lp: torch.Tensor, clean_lp: torch.Tensor, targets: torch.Tensor) -> tuple:
    """(Σ CE, Σ KL(clean || this)) over the scored positions, in float64."""
    ce = -lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    kl = F.kl_div(lp, clean_lp, log_target=True, reduction="none").sum(-1)
    return ce.double().sum(), kl.double().sum()


def _reconstruction_sums(x: torch.Tensor, x_hat: torch.Tensor, f: torch.Tensor) -> dict:
    """Sums over tokens [N, d] for the reconstruction metrics, in float64."""
    x, x_hat = x.double(), x_hat.double()
    x_norm, x_hat_norm = x.norm(dim=-1), x_hat.norm(dim=-1)
    return {
        "n_tokens": torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device),
        "sq_err_sum": (x - x_hat).pow(2).sum(),
        "x_sq_sum": x.pow(2).sum(),
        "x_sum": x.sum(0),
        "xhat_sq_sum": x_hat.pow(2).sum(),
        "inner_sum": (x * x_hat).sum(),
        "cos_sum": F.cosine_similarity(x, x_hat, dim=-1, eps=1e-12).sum(),
        # a zero activation has no defined ratio; count it as 0 rather than poison the mean
        "l2_ratio_sum": torch.where(x_norm > 0, x_hat_norm / x_norm.clamp_min(1e-30), 0.0).sum(),
        "l0_sum": (f != 0).double().sum(),
        "l1_sum": f.double().abs().sum(),
        "fire_count": (f != 0).double().sum(0),
    }


@torch.no_grad()
def spliced_scores(model, saes, tokens: torch.Tensor, bos_id: int) -> dict[str, list[dict[str, torch.Tensor]]]:
    """Metric sums for one batch of token rows [B, T] (T >= 2) on the model's device.

    saes: {hook_name: sae or [sae, ...]} (exported SAEs, working on raw activations).
    Returns {hook_name: [sums of each SAE, in the given order]}; each sums dict maps a name to a
    float64 tensor (scalars, plus "x_sum" [d_in] and "fire_count" [d_sae]). Add dicts of several
    batches with `add_sums`, then call `finalize_scores`. Runs 1 + (#hooks) + (#SAEs) forwards.
    """
    groups = as_sae_groups(saes)
    check_saes(model, groups)
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise SAELightningError(f"tokens must be [batch, context >= 2], got shape {tuple(tokens.shape)}")
    keep = tokens != bos_id
    mask = keep[:, :-1] & keep[:, 1:]  # predictions inside a document only
    targets = tokens[:, 1:][mask]

    clean_lp = _log_probs(model(tokens), mask)
    clean_ce, _ = _loss_sums(clean_lp, clean_lp, targets)
    n_pred = torch.tensor(float(targets.numel()), dtype=torch.float64, device=tokens.device)

    out = {}
    for hook, group in groups.items():
        ablation_lp = _log_probs(model(tokens, hooks={hook: splice_hook(None, keep)}), mask)
        abl_ce, abl_kl = _loss_sums(ablation_lp, clean_lp, targets)
        del ablation_lp
        out[hook] = []
        for sae in group:
            seen = {}  # the SAE sees the clean activation: nothing upstream of its hook changes
            sae_lp = _log_probs(model(tokens, hooks={hook: splice_hook(sae, keep, stats=seen)}), mask)
            sae_ce, sae_kl = _loss_sums(sae_lp, clean_lp, targets)
            sums = _reconstruction_sums(seen["x"], seen["x_hat"], seen["f"])
            sums.update(n_predictions=n_pred, ce_clean_sum=clean_ce, ce_ablation_sum=abl_ce,
                        kl_ablation_sum=abl_kl, ce_sae_sum=sae_ce, kl_sae_sum=sae_kl)
            out[hook].append(sums)
    return out


def add_sums(total: dict | None, new: dict) -> dict:
    """Combine the sums of two batches (either a single SAE's dict or spliced_scores' output)."""
    if total is None:
        return new
    if isinstance(new, dict) and all(isinstance(v, torch.Tensor) for v in new.values()):
        return {k: total[k] + v for k, v in new.items()}
    if isinstance(new, dict):
        return {k: add_sums(total[k], v) for k, v in new.items()}
    return [add_sums(a, b) for a, b in zip(total, new)]


def _ratio(num: float, den: float) -> float:
    return num / den if den != 0 else float("nan")


def finalize_scores(sums: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """The metrics (SAELens/SAEBench names) from one SAE's accumulated sums."""
    s = {k: v.double().cpu() for k, v in sums.items()}
    n, n_pred = s["n_tokens"].item(), s["n_predictions"].item()
    if n == 0 or n_pred == 0:
        raise SAELightningError("no non-BOS tokens were evaluated; give longer rows or more tokens")
    d_in = s["x_sum"].numel()
    mean = s["x_sum"] / n
    total_var = s["x_sq_sum"].item() / n - mean.pow(2).sum().item()
    ce = {k: s[f"ce_{k}_sum"].item() / n_pred for k in ("clean", "sae", "ablation")}
    kl_sae, kl_abl = s["kl_sae_sum"].item() / n_pred, s["kl_ablation_sum"].item() / n_pred
    return {
        "mse": s["sq_err_sum"].item() / n / d_in,
        "explained_variance": 1.0 - _ratio(s["sq_err_sum"].item() / n, total_var),
        "cossim": s["cos_sum"].item() / n,
        "l2_ratio": s["l2_ratio_sum"].item() / n,
        "relative_reconstruction_bias": _ratio(s["xhat_sq_sum"].item(), s["inner_sum"].item()),
        "l0": s["l0_sum"].item() / n,
        "l1": s["l1_sum"].item() / n,
        "frac_alive": (s["fire_count"] > 0).double().mean().item(),
        "ce_loss_without_sae": ce["clean"],
        "ce_loss_with_sae": ce["sae"],
        "ce_loss_with_ablation": ce["ablation"],
        "ce_loss_score": _ratio(ce["ablation"] - ce["sae"], ce["ablation"] - ce["clean"]),
        "kl_div_with_sae": kl_sae,
        "kl_div_with_ablation": kl_abl,
        "kl_div_score": _ratio(kl_abl - kl_sae, kl_abl),
        "n_tokens": int(n),
    }


def feature_density(sums: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Firing frequency of each latent over the evaluated (non-BOS) tokens, float64 [d_sae]."""
    return sums["fire_count"].double().cpu() / max(sums["n_tokens"].item(), 1.0)


# ---------------------------------------------------------------------------------------------
# Token rows from the val shard, the evaluation loop, and `saelightning eval`.


def val_token_rows(data_dir, tokenizer, n_tokens: int, context_size: int, batch_size: int) -> Iterator[torch.Tensor]:
    """Batches [<=B, T] of the val shard's documents (BOS-prefixed, concatenated, cut into rows)."""
    from saelightning.nanochat.shards import TextStream, list_shards

    _, val_shard = list_shards(data_dir)
    n_rows = max(1, math.ceil(n_tokens / context_size))
    buffer, rows = [], []
    for doc in TextStream([val_shard], loop=False, shuffle=False):  # the shard's first N tokens
        buffer.extend(tokenizer.encode(doc))
        while len(buffer) >= context_size and n_rows > 0:
            rows.append(buffer[:context_size])
            del buffer[:context_size]
            n_rows -= 1
            if len(rows) == batch_size:
                yield torch.tensor(rows, dtype=torch.long)
                rows = []
        if n_rows == 0:
            break
    if rows:
        yield torch.tensor(rows, dtype=torch.long)


def evaluate_saes(model, saes, batches, bos_id: int, progress=None) -> dict[str, list[tuple[dict, torch.Tensor]]]:
    """Run spliced_scores over token batches; {hook: [(metrics, feature density) per SAE]}."""
    device = next(model.parameters()).device
    total = None
    for batch in batches:
        total = add_sums(total, spliced_scores(model, saes, batch.to(device), bos_id))
        if progress is not None:
            progress.update(batch.numel())
    if total is None:
        raise SAELightningError("the val shard gave no token rows; give more data or a smaller --context-size")
    return {hook: [(finalize_scores(s), feature_density(s)) for s in group] for hook, group in total.items()}


@dataclass
class EvalArgs:
    sae: list[str]  # exported SAE directories (SAELens layout); each names its hook in cfg metadata
    model: str  # nanochat checkpoint dir / base dir, or "demo" for the bundled model
    tokens: int  # how many tokens of the val shard to evaluate on
    out: str  # report.json path (written atomically)
    data: str | None  # parquet shard dir (last shard = val), or "demo"; default: from the model
    batch_size: int  # rows per forward
    context_size: int | None  # tokens per row; default: the SAEs' training context size
    device: str | None  # cpu / cuda; default cuda when available


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="saelightning eval", description=(
        "Reconstruction metrics and spliced CE/KL scores of exported SAEs on the val shard."))
    p.add_argument("--sae", nargs="+", required=True, metavar="DIR", help="exported SAE directories")
    p.add_argument("--model", required=True, help='nanochat checkpoint or base dir, or "demo"')
    p.add_argument("--tokens", type=int, default=100_000, help="tokens of the val shard (default 100000)")
    p.add_argument("--out", required=True, help="where to write the JSON report")
    p.add_argument("--data", default=None, help='parquet shard dir (last shard = val) or "demo" (default: the '
                   'demo shards for --model demo, else $NANOCHAT_BASE_DIR/base_data[_climbmix])')
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward (default 8)")
    p.add_argument("--context-size", type=int, default=None, help="tokens per row (default: SAE metadata)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    return p


def resolve_model_path(model: str) -> str:
    """'demo' -> the bundled model's directory; anything else is a path given by the user."""
    if model == "demo":
        from saelightning.demo import DEMO_MODEL_DIR

        return str(DEMO_MODEL_DIR)
    return model


def load_cli_model(model: str, device: str | None):
    """(device, nanochat) for a command's --model/--device: 'demo' resolved, fp32 weights, a tokenizer required."""
    from saelightning.nanochat.checkpoint import load_nanochat

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model_path = resolve_model_path(model)
    nc = load_nanochat(model_path, device=device, dtype=torch.float32)
    if nc.tokenizer is None:
        raise SAELightningError(f"no tokenizer found for {model_path}; put tokenizer/ in the nanochat base dir")
    return device, nc


def resolve_data_dir(data: str | None, model: str) -> Path:
    """The shard directory: --data, the demo shards, or nanochat's base_data next to the model."""
    if data == "demo" or (data is None and model == "demo"):
        from saelightning.demo import ensure_demo_shards

        return Path(ensure_demo_shards())
    if data is not None:
        return Path(data)
    base = Path(os.environ.get("NANOCHAT_BASE_DIR", Path.home() / ".cache" / "nanochat"))
    for name in ("base_data_climbmix", "base_data"):
        if (base / name).is_dir():
            return base / name
    raise SAELightningError(f"no --data given and no base_data under {base}; pass --data DIR (parquet shards)")


def load_sae_groups(paths: Sequence[str], device) -> tuple[dict[str, list], list[tuple[str, int]]]:
    """Load exported SAEs, grouped by metadata hook_name; also each path's (hook, index in group)."""
    from saelightning.export import load_sae

    groups, where = {}, []
    for path in paths:
        sae = load_sae(path, device=device).eval()
        hook = (getattr(sae, "metadata", None) or {}).get("hook_name")
        if not hook:
            raise SAELightningError(f"{path}: cfg.json metadata has no hook_name; re-export the SAE with it")
        groups.setdefault(hook, []).append(sae)
        where.append((hook, len(groups[hook]) - 1))
    return groups, where


def _default_context(groups, model) -> int:
    sizes = {int(s.metadata["context_size"]) for g in groups.values() for s in g if s.metadata.get("context_size")}
    return min(min(sizes) if sizes else 256, model.config.sequence_len)


def write_json_atomic(path, obj) -> None:
    """Write JSON to a temp file beside `path`, then rename: never a half-written report."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, allow_nan=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


_TABLE_KEYS = ("explained_variance", "mse", "cossim", "l2_ratio", "relative_reconstruction_bias", "l0",
               "l1", "frac_alive", "ce_loss_without_sae", "ce_loss_with_sae", "ce_loss_with_ablation",
               "ce_loss_score", "kl_div_with_sae", "kl_div_with_ablation", "kl_div_score")


def format_table(entries: list[dict]) -> str:
    """One column per SAE, one row per metric."""
    heads = [f"#{i} {e['hook_name']}" for i, e in enumerate(entries)]
    width = max([len(h) for h in heads] + [12])
    lines = [f"{'metric':<28}" + "".join(f"{h:>{width + 2}}" for h in heads)]
    for key in _TABLE_KEYS:
        lines.append(f"{key:<28}" + "".join(f"{e['metrics'][key]:>{width + 2}.5g}" for e in entries))
    lines += [f"#{i}: {e['path']}" for i, e in enumerate(entries)]
    return "\n".join(lines)


def run_eval(args: EvalArgs) -> dict:
    """The whole `saelightning eval` run: load, evaluate, write the report; returns it."""
    from tqdm import tqdm

    if args.tokens < 2 or args.batch_size < 1:
        raise SAELightningError("--tokens must be >= 2 and --batch-size >= 1")
    device, nc = load_cli_model(args.model, args.device)
    groups, where = load_sae_groups(args.sae, device)
    check_saes(nc.model, groups)
    context = args.context_size or _default_context(groups, nc.model)
    if not 2 <= context <= nc.model.config.sequence_len:
        raise SAELightningError(f"--context-size must be in [2, {nc.model.config.sequence_len}], got {context}")
    data_dir = resolve_data_dir(args.data, args.model)
    rows = list(val_token_rows(data_dir, nc.tokenizer, args.tokens, context, args.batch_size))
    evaluated = sum(r.numel() for r in rows)
    with tqdm(total=evaluated, unit="tok", desc="eval", disable=None, file=sys.stderr) as bar:
        results = evaluate_saes(nc.model, groups, rows, nc.tokenizer.bos_id, progress=bar)
    if evaluated < args.tokens:
        print(f"saelightning eval: the val shard ran out after {evaluated} of {args.tokens} tokens; "
              "the report covers those", file=sys.stderr)
    entries = []
    for path, (hook, i) in zip(args.sae, where):
        metrics, density = results[hook][i]
        entries.append({"path": str(path), "hook_name": hook, "metrics": metrics,
                        "feature_density": density.tolist()})
    report = {"model": resolve_model_path(args.model), "data": str(data_dir), "context_size": context,
              "tokens_requested": args.tokens, "tokens_evaluated": evaluated, "saes": entries}
    write_json_atomic(args.out, report)
    return report


def cli_main(argv: Sequence[str]) -> int:
    ns = _parser().parse_args(list(argv))
    report = run_eval(EvalArgs(**vars(ns)))
    print(format_table(report["saes"]))
    print(f"report written to {ns.out}")
    return 0
