"""Evaluate exported SAEs: reconstruction metrics and the model's loss with the SAE spliced in.

Names and definitions follow SAELens / SAEBench (../shared/SAE_REFERENCE.md) and live in metrics.py.
The core, `evaluate_batch`, runs the model on one batch of token rows and updates each SAE's
SAEMetrics (torchmetrics, so batches and DDP ranks pool exactly). Lightning validation calls it on
the val rows of tokens.py; `saelightning eval` on the same rows (the first ones of the val shard).

A transcoder (an SAE with d_out, and metadata["hook_name_out"]) reads its hook and is spliced at its output hook:
the model's activation there (an MLP's output) is replaced by the transcoder's prediction from the clean input,
the ablation baseline zeroes that output, and the reconstruction metrics compare the prediction with the real one.

Positions: BOS positions are never spliced (their activation is kept) and never scored. A
next-token prediction at position t is scored when neither tokens[t] nor tokens[t+1] is BOS, i.e.
only predictions inside a document; CE and KL use the same positions.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from saelightning import resolve
from saelightning.atomic import write_json
from saelightning.command import parse
from saelightning.errors import SAELightningError
from saelightning.groundtruth import TABLE_KEYS as TRUTH_KEYS
from saelightning.heldout import recorded_source
from saelightning.heldout import run_eval as run_heldout_eval
from saelightning.hooks import forward_position, hook_width, parse_hook
from saelightning.metrics import SAEMetrics, weight_metrics
from saelightning.progress import progress_bar
from saelightning.saes.base import CROSSCODERS
from saelightning.saes.clt import CrossLayerTranscoder
from saelightning.tokens import rows_for_tokens, val_batches


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


def output_hook(sae, hook: str) -> str:
    """Where an SAE's output goes: a transcoder's hook_name_out (its metadata), else the hook it reads (a
    cross-layer transcoder: its last output hook; it writes every MLP output of its span)."""
    if isinstance(sae, CrossLayerTranscoder):
        return sae.metadata["hook_names_out"][-1]
    if not sae.config.is_transcoder:
        return hook
    out = sae.metadata.get("hook_name_out")
    if not out:
        raise SAELightningError(f"the transcoder reading {hook} has no metadata['hook_name_out']; set it to the hook "
                                "point it predicts (exports record it)")
    return out


def check_saes(model, groups: Mapping[str, Sequence]) -> None:
    """Every hook exists in the model and every SAE's d_in (a transcoder's d_out) matches its hook point's width."""
    for hook, group in groups.items():
        parse_hook(hook, model.n_layer)  # raises with the list of valid names
        width = hook_width(hook, model.n_layer, model.d_model)
        for sae in group:
            if isinstance(sae, CrossLayerTranscoder):
                _check_clt(model, hook, sae)
                continue
            d_in = sae.W_enc.shape[0]
            if d_in != width:
                raise SAELightningError(
                    f"SAE with d_in={d_in} cannot read hook point {hook!r}, whose width is {width} "
                    f"in this model; use an SAE trained on this model's {hook}")
            out = output_hook(sae, hook)
            if out != hook:
                _check_transcoder_out(model, hook, out, sae.W_dec.shape[1])


def _check_clt(model, hook: str, clt) -> None:
    ins, outs = clt.metadata.get("hook_names_in"), clt.metadata.get("hook_names_out")
    if not ins or ins[0] != hook or len(ins) != clt.n_layers or len(outs or ()) != clt.n_layers:
        raise SAELightningError(f"the cross-layer transcoder at {hook} lacks metadata hook_names_in/out for its "
                                f"{clt.n_layers} layers; re-export it")
    for name in ins + outs:
        if hook_width(name, model.n_layer, model.d_model) != clt.d:
            raise SAELightningError(f"cross-layer transcoder of width {clt.d} cannot read/write {name!r} of this "
                                    "model; use one trained on this model")


def clt_splice(clt, keep: torch.Tensor):
    """The replacement model's hooks for a cross-layer transcoder: at each layer's MLP input the latents of the
    activation there (in this forward: upstream MLP outputs are already replaced) add their contributions to the
    MLP outputs of that layer and the later ones; each MLP output is replaced by the sum it received."""
    pending: dict[int, torch.Tensor] = {}
    ins, outs = clt.metadata["hook_names_in"], clt.metadata["hook_names_out"]

    def read(layer):
        def hook(x):
            _, parts = clt.contributions(layer, x[keep])
            for i, part in enumerate(parts):
                pending[layer + i] = pending[layer + i] + part if layer + i in pending else part
        return hook

    def write(layer):
        def hook(y):
            out = y.clone()
            out[keep] = pending.pop(layer).to(y.dtype)
            return out
        return hook

    return {**{h: read(i) for i, h in enumerate(ins)}, **{h: write(i) for i, h in enumerate(outs)}}


def _zero_all(hooks, keep):
    return {h: splice_hook(None, keep) for h in hooks}


def _evaluate_clt(model, clt, tokens, keep, m, spliced, clean, mask, targets) -> None:
    """A cross-layer transcoder's metrics: the prediction from the clean inputs against the clean MLP outputs (all
    layers side by side), and the model with every MLP output of its span replaced (the replacement model)."""
    ins, outs = clt.metadata["hook_names_in"], clt.metadata["hook_names_out"]
    acts = model.run_with_cache(tokens, ins + outs)
    latents, preds = clt.predict([acts[h][keep] for h in ins])
    m.update(torch.cat([acts[h][keep] for h in outs], -1), torch.cat(preds, -1), torch.cat(latents, -1))
    if spliced:
        lp = _log_probs(model(tokens, hooks=clt_splice(clt, keep)), mask)
        ablated = _log_probs(model(tokens, hooks=_zero_all(outs, keep)), mask)
        m.spliced.update(clean, lp, ablated, targets)


def _check_transcoder_out(model, hook: str, out: str, d_out: int) -> None:
    width = hook_width(out, model.n_layer, model.d_model)
    if d_out != width:
        raise SAELightningError(f"transcoder with d_out={d_out} cannot write hook point {out!r}, whose width is "
                                f"{width} in this model; use a transcoder trained on this model's {out}")
    if forward_position(out, model.n_layer) <= forward_position(hook, model.n_layer):
        raise SAELightningError(f"the transcoder's output hook {out} comes before its input hook {hook} in the "
                                "forward; its metadata is wrong (re-export it)")


def _log_probs(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities [M, V] at the scored positions (mask [B, T-1])."""
    return F.log_softmax(logits[:, :-1][mask].float(), dim=-1)


def encode_decode(sae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents, reconstruction) of raw activations x [N, d], also for an SAE still in training.

    A training SAE works on x * input_scale (the data module's normalisation); its reconstruction
    is scaled back (a transcoder's prediction by its output_scale). Exported SAEs have scales 1 (folded into the
    weights), where this is exact.
    """
    scale = sae.input_scales() if hasattr(sae, "input_scales") else getattr(sae, "input_scale", None)
    dtype, x = x.dtype, x.to(sae.W_enc.dtype)
    if getattr(sae, "shard", None) is not None:  # latent-sharded (training): sparse latents, never [N, d_sae]
        f, x_hat = sae.encode_decode_sparse(x * scale.to(sae.W_enc.dtype))
        return f, (x_hat / scale.to(x_hat.dtype)).to(dtype)
    if scale is None:
        f = sae.encode(x)
        return f, sae.output(f, x).to(dtype)
    scale = scale.to(sae.W_enc.dtype)
    out_scale = sae.output_scale.to(scale.dtype) if sae.config.is_transcoder else scale
    f = sae.encode(x * scale)
    return f, (sae.output(f, x * scale) / out_scale).to(dtype)


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


def transcoder_splice(sae, keep: torch.Tensor, stats: dict | None = None):
    """Hooks {"in": capture, "out": replace} splicing a transcoder: its input hook records the clean activation
    at the kept positions, its output hook replaces the activation there by the transcoder's prediction from it.
    stats receives "x" (the real output activations), "f" and "x_hat" (the prediction), [N, d] each."""
    seen = {}

    def read(x):
        seen["x"] = x[keep]

    def write(y):
        if "x" not in seen:
            raise SAELightningError("internal: a transcoder's output hook ran before its input hook")
        f, y_hat = encode_decode(sae, seen.pop("x"))
        if stats is not None:
            stats.update(x=y[keep], f=f, x_hat=y_hat)
        out = y.clone()
        out[keep] = y_hat.to(y.dtype)
        return out

    return {"in": read, "out": write}


def sae_metrics(groups: Mapping[str, Sequence], spliced: bool = True, device=None) -> dict[str, list[SAEMetrics]]:
    """Fresh SAEMetrics for every SAE of {hook: [sae, ...]}, in the same layout (of a transcoder's output)."""
    return {hook: [SAEMetrics(sae.out_width, sae.n_latents, spliced).to(device or next(sae.parameters()).device)
                   for sae in group] for hook, group in groups.items()}


@torch.no_grad()
def evaluate_batch(model, saes, tokens: torch.Tensor, bos_id: int, metrics: Mapping[str, Sequence[SAEMetrics]],
                   spliced: bool = True) -> None:
    """Update each SAE's metrics with one batch of token rows [B, T] (T >= 2) on the model's device.

    saes: {hook_name: sae or [sae, ...]}; metrics: {hook_name: [SAEMetrics per SAE, in the same order]}.
    The activations the SAE reads are the clean ones at its hook (nothing upstream changes). With
    spliced=True this runs 1 + #hooks + #SAEs forwards (clean, zero-ablated per hook, each SAE spliced);
    without, one forward up to the deepest hook, for the reconstruction metrics alone.
    """
    groups = as_sae_groups(saes)
    check_saes(model, groups)
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise SAELightningError(f"tokens must be [batch, context >= 2], got shape {tuple(tokens.shape)}")
    keep = tokens != bos_id
    mask = keep[:, :-1] & keep[:, 1:]  # predictions inside a document only
    targets = tokens[:, 1:][mask]
    clean = _log_probs(model(tokens), mask) if spliced else None
    single: dict[str, list] = {}  # the SAEs and transcoders, with their metrics: each writes one hook
    for hook, group in groups.items():
        for sae, m in zip(group, metrics[hook]):
            if isinstance(sae, CrossLayerTranscoder):
                _evaluate_clt(model, sae, tokens, keep, m, spliced, clean, mask, targets)
            else:
                single.setdefault(hook, []).append((sae, m))
    if not single:
        return
    groups = {hook: [sae for sae, _ in pairs] for hook, pairs in single.items()}
    metrics = {hook: [m for _, m in pairs] for hook, pairs in single.items()}
    if not spliced:
        outs = [output_hook(sae, hook) for hook, group in groups.items() for sae in group]
        acts = model.run_with_cache(tokens, list(dict.fromkeys(list(groups) + outs)))
        for hook, group in groups.items():
            x = acts[hook][keep]
            for sae, m in zip(group, metrics[hook]):
                f, x_hat = encode_decode(sae, x)
                m.update(acts[output_hook(sae, hook)][keep], x_hat, f)
        return
    # zero-ablated at each hook an SAE writes (a transcoder: its output), kept while an SAE still needs it
    ablated: dict[str, torch.Tensor] = {}
    needed = Counter(output_hook(sae, hook) for hook, group in groups.items() for sae in group)
    for hook, group in groups.items():
        for sae, m in zip(group, metrics[hook]):
            out = output_hook(sae, hook)
            if out not in ablated:
                ablated[out] = _log_probs(model(tokens, hooks={out: splice_hook(None, keep)}), mask)
            seen = {}
            if out == hook:
                hooks = {hook: splice_hook(sae, keep, stats=seen)}
            else:
                pair = transcoder_splice(sae, keep, stats=seen)
                hooks = {hook: pair["in"], out: pair["out"]}
            lp = _log_probs(model(tokens, hooks=hooks), mask)
            m.update(seen["x"], seen["x_hat"], seen["f"])
            m.spliced.update(clean, lp, ablated[out], targets)
            needed[out] -= 1
            if not needed[out]:
                del ablated[out]


def _replace_hook(keep: torch.Tensor, x_hat: torch.Tensor):
    """A model hook putting the given reconstruction x_hat [N, d] at the kept positions (BOS keeps x)."""
    def hook(x):
        out = x.clone()
        out[keep] = x_hat.to(x.dtype)
        return out

    return hook


@torch.no_grad()
def evaluate_crosscoder_batch(models: Sequence, cc, hook: str, tokens: torch.Tensor, bos_id: int,
                              metrics: Sequence[SAEMetrics], spliced: bool = True) -> None:
    """Update each model's SAEMetrics (d_in = one model's width) with a crosscoder on one batch of token rows.

    models: the crosscoder's M nanochat models, in its order, on one device. The latents read every model's
    clean activation at `hook`; model m's metrics compare x^m with its own reconstruction x̂^m, and with
    spliced=True model m runs clean, zero-ablated at the hook and with x^m replaced by x̂^m (3 forwards each).
    """
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise SAELightningError(f"tokens must be [batch, context >= 2], got shape {tuple(tokens.shape)}")
    for model in models:
        parse_hook(hook, model.n_layer)
        if hook_width(hook, model.n_layer, model.d_model) != cc.d_model:
            raise SAELightningError(f"the crosscoder reads {cc.d_model} wide activations per model, {hook!r} is "
                                    f"{hook_width(hook, model.n_layer, model.d_model)} wide; give its models")
    keep = tokens != bos_id
    x = torch.cat([model.run_with_cache(tokens, [hook])[hook][keep].float() for model in models], -1)
    f, x_hat = encode_decode(cc, x)
    d = cc.d_model
    mask = keep[:, :-1] & keep[:, 1:]
    targets = tokens[:, 1:][mask]
    for i, (model, m) in enumerate(zip(models, metrics)):
        own = x_hat[:, i * d:(i + 1) * d]
        m.update(x[:, i * d:(i + 1) * d], own, f)
        if spliced:
            clean = _log_probs(model(tokens), mask)
            ablated = _log_probs(model(tokens, hooks={hook: splice_hook(None, keep)}), mask)
            lp = _log_probs(model(tokens, hooks={hook: _replace_hook(keep, own)}), mask)
            m.spliced.update(clean, lp, ablated, targets)


def evaluate_crosscoder(models: Sequence, cc, hook: str, batches, bos_id: int, progress=None,
                        spliced: bool = True) -> list[tuple[dict, torch.Tensor]]:
    """evaluate_crosscoder_batch over token batches: [(metrics, feature density) per model]."""
    device = next(models[0].parameters()).device
    metrics = [SAEMetrics(cc.d_model, cc.config.d_sae, spliced).to(device) for _ in models]
    seen = False
    for batch in batches:
        evaluate_crosscoder_batch(models, cc, hook, batch.to(device), bos_id, metrics, spliced)
        seen = True
        if progress is not None:
            progress.update(batch.numel())
    if not seen:
        raise SAELightningError("the val shard gave no token rows; give more data or a smaller --context-size")
    return [(scores(m), m.feature_density().cpu()) for m in metrics]


def scores(metrics: SAEMetrics) -> dict[str, float]:
    """The metrics as plain numbers (n_tokens an int); an error when no token was evaluated."""
    values = {k: float(v) for k, v in metrics.compute().items()}
    if values["n_tokens"] == 0:
        raise SAELightningError("no non-BOS tokens were evaluated; give longer rows or more tokens")
    values["n_tokens"] = int(values["n_tokens"])
    values["fvu"] = 1.0 - values["explained_variance"]  # the fraction of variance unexplained (Paulo et al.'s figure)
    return values


# ---------------------------------------------------------------------------------------------
# Token rows from the val shard, the evaluation loop, and `saelightning eval`.


def evaluate_saes(model, saes, batches, bos_id: int, progress=None, spliced: bool = True
                  ) -> dict[str, list[tuple[dict, torch.Tensor]]]:
    """Evaluate over token batches; {hook: [(metrics, feature density) per SAE]}."""
    groups = as_sae_groups(saes)
    device = next(model.parameters()).device
    metrics, seen = sae_metrics(groups, spliced, device), False
    for batch in batches:
        evaluate_batch(model, groups, batch.to(device), bos_id, metrics, spliced)
        seen = True
        if progress is not None:
            progress.update(batch.numel())
    if not seen:
        raise SAELightningError("the val shard gave no token rows; give more data or a smaller --context-size")
    return {hook: [(scores(m), m.feature_density().cpu()) for m in group] for hook, group in metrics.items()}


@dataclass
class EvalArgs:
    """Reconstruction metrics and spliced CE/KL scores of exported SAEs on the val shard.

    Args:
        sae: exported SAE directories (SAELens layout); each names its hook point in cfg.json metadata. Or one
            crosscoder: every model it reads is evaluated, each with its own reconstruction spliced in.
        models: a crosscoder's models (checkpoint dirs, in its order) where they moved; default: the ones its
            cfg.json records.
        model: nanochat checkpoint dir or base dir, or "demo" for the bundled model; default: the one the SAEs'
            cfg.json records (the model and step they were trained on).
        out: also write the report as JSON here (written atomically); the table is printed either way.
        tokens: token positions of the val shard to evaluate (the first ceil(tokens / context_size) rows).
        data: parquet shard dir (the last shard is val), or "demo"; default: the shards the SAEs were trained
            on (cfg.json), else the demo shards for the demo model, else $NANOCHAT_BASE_DIR/base_data[_climbmix].
        chat: conversations mixed into the val rows ("demo" or a JSONL file; its held-out tenth); default: the
            data.chat the SAEs were trained with, so that eval reads validation's rows.
        chat_fraction: their share of the tokens, in [0, 1]; default: the trained data.chat_fraction (0 without).
        batch_size: rows per forward.
        context_size: tokens per row; default: the SAEs' training context size.
        device: cpu or cuda; default: cuda when there is a GPU.
        quiet: no progress bar (it shows only on a terminal in any case).
    """

    sae: list[str]
    model: str | None = None
    models: list[str] | None = None
    out: str | None = None
    tokens: int = 100_000
    data: str | None = None
    chat: str | None = None
    chat_fraction: float | None = None
    batch_size: int = 8
    context_size: int | None = None
    device: str | None = None
    quiet: bool = False


def _default_context(groups, model) -> int:
    sizes = {int(s.metadata["context_size"]) for g in groups.values() for s in g if s.metadata.get("context_size")}
    return min(min(sizes) if sizes else 256, model.config.sequence_len)


_TABLE_KEYS = ("explained_variance", "fvu", "mse", "cossim", "l2_ratio", "relative_reconstruction_bias", "l0",
               "l1", "frac_alive", "freq_over_1_percent", "freq_over_10_percent", "normalized_freq_over_1_percent",
               "normalized_freq_over_10_percent", "average_max_encoder_cosine_sim", "average_max_decoder_cosine_sim",
               "average_encoder_decoder_cosine_sim", "ce_loss_without_sae", "ce_loss_with_sae",
               "ce_loss_with_ablation", "ce_loss_score", "kl_div_with_sae", "kl_div_with_ablation", "kl_div_score")


def format_table(entries: list[dict]) -> str:
    """One column per SAE, one row per metric (the ground-truth ones for SAEs of a synthetic source; without a
    model, no spliced CE/KL rows)."""
    heads = [f"#{i} {e['hook_name']}" + (f" -> {e['hook_name_out']}" if e.get("hook_name_out") else "")
             for i, e in enumerate(entries)]
    width = max([len(h) for h in heads] + [12])
    lines = [f"{'metric':<36}" + "".join(f"{h:>{width + 2}}" for h in heads)]
    for key in [k for k in _TABLE_KEYS + TRUTH_KEYS if all(k in e["metrics"] for e in entries)]:
        lines.append(f"{key:<36}" + "".join(f"{e['metrics'][key]:>{width + 2}.5g}" for e in entries))
    if not all("ce_loss_score" in e["metrics"] for e in entries):
        lines.append("(trained without a model: no spliced CE/KL)")
    lines += [f"#{i}: {e['path']}" for i, e in enumerate(entries)]
    return "\n".join(lines)


def run_eval(args: EvalArgs) -> dict:
    """The whole `saelightning eval` run: load, evaluate, write the report; returns it."""
    if args.tokens < 2 or args.batch_size < 1:
        raise SAELightningError("--tokens must be >= 2 and --batch_size >= 1")
    if args.model is None and recorded_source(args.sae) is not None:  # trained on activations or synthetic data
        return run_heldout_eval(args, encode_decode)
    device = resolve.device(args.device)
    groups, where = resolve.load_saes(args.sae, device)
    crosscoders = [p for p, (hook, i) in zip(args.sae, where) if groups[hook][i].config.architecture in CROSSCODERS]
    if crosscoders:
        if len(args.sae) > 1:
            raise SAELightningError(f"{crosscoders[0]} is a crosscoder; evaluate it alone (one --sae), it runs its "
                                    "own models")
        return _run_crosscoder_eval(args, groups[where[0][0]][0], where[0][0], device)
    model, load, data = resolve.sources(args.sae, args.model, args.data)
    nc = resolve.load_model(model, device=device, dtype=torch.float32, **load)
    check_saes(nc.model, groups)
    context = args.context_size or _default_context(groups, nc.model)
    if not 2 <= context <= nc.model.config.sequence_len:
        raise SAELightningError(f"--context_size must be in [2, {nc.model.config.sequence_len}], got {context}")
    data_dir = resolve.data_dir(data, model)
    _, val_shard = resolve.shards(data_dir)
    chat = resolve.val_chat(nc.tokenizer, args.sae, args.chat, args.chat_fraction)
    rows = list(val_batches(val_shard, nc.tokenizer, context, rows_for_tokens(args.tokens, context), args.batch_size,
                            chat=chat))
    evaluated = sum(r.numel() for r in rows)
    with progress_bar(evaluated, "eval", quiet=args.quiet) as bar:
        results = evaluate_saes(nc.model, groups, rows, nc.tokenizer.bos_id, progress=bar)
    if evaluated < args.tokens:
        print(f"saelightning eval: the val shard ran out after {evaluated} of {args.tokens} tokens; "
              "the report covers those", file=sys.stderr)
    entries = []
    for path, (hook, i) in zip(args.sae, where):
        metrics, density = results[hook][i]
        sae = groups[hook][i]
        if not isinstance(sae, CrossLayerTranscoder):
            metrics = {**metrics, **weight_metrics(sae.W_enc, sae.W_dec)}
        entry = {"path": str(path), "hook_name": hook, "metrics": metrics, "feature_density": density.tolist()}
        if output_hook(sae, hook) != hook:
            entry["hook_name_out"] = output_hook(sae, hook)
        entries.append(entry)
    report = {"model": resolve.model_path(model), "data": str(data_dir), "context_size": context,
              "tokens_requested": args.tokens, "tokens_evaluated": evaluated, "saes": entries}
    if args.out:
        write_json(args.out, report, indent=2)
    return report


def _run_crosscoder_eval(args: EvalArgs, cc, hook: str, device) -> dict:
    """`saelightning eval` on one crosscoder: every model's figures on the same val rows (model m spliced with x̂^m)."""
    infos, models = resolve.crosscoder_models(cc, args.sae[0], args.models, device)
    trained_on = cc.metadata.get("trained_on") or {}
    data_dir = resolve.data_dir(args.data if args.data is not None else trained_on.get("data"), infos[0]["path"])
    _, val_shard = resolve.shards(data_dir)
    tokenizer = models[0].tokenizer
    shortest = min(m.model.config.sequence_len for m in models)
    context = args.context_size or min(int(cc.metadata.get("context_size") or 256), shortest)
    if not 2 <= context <= shortest:
        raise SAELightningError(f"--context_size must be in [2, {shortest}], got {context}")
    chat = resolve.val_chat(tokenizer, args.sae, args.chat, args.chat_fraction)
    rows = list(val_batches(val_shard, tokenizer, context, rows_for_tokens(args.tokens, context), args.batch_size,
                            chat=chat))
    evaluated = sum(r.numel() for r in rows)
    with progress_bar(evaluated, "eval", quiet=args.quiet) as bar:
        results = evaluate_crosscoder([m.model for m in models], cc, hook, rows, tokenizer.bos_id, progress=bar)
    if evaluated < args.tokens:
        print(f"saelightning eval: the val shard ran out after {evaluated} of {args.tokens} tokens; "
              "the report covers those", file=sys.stderr)
    entries = [{"path": str(args.sae[0]), "hook_name": f"{info['name']}/{hook}", "model": info,
                "metrics": metrics, "feature_density": density.tolist()}
               for info, (metrics, density) in zip(infos, results)]
    report = {"model": [info["path"] for info in infos], "data": str(data_dir), "context_size": context,
              "tokens_requested": args.tokens, "tokens_evaluated": evaluated, "saes": entries}
    if args.out:
        write_json(args.out, report, indent=2)
    return report


def cli_main(argv: Sequence[str]) -> int:
    args = parse(EvalArgs, argv, "saelightning eval")
    if args is None:
        return 0
    report = run_eval(args)
    print(format_table(report["saes"]))
    if args.out:
        print(f"report written to {args.out}")
    return 0
