"""`saelightning eval` on SAEs trained without a model: on their source's held-out activations.

An export's cfg.json records its source in metadata.trained_on: {"activations": DIR, "id", "held_out",
"val_tokens", "block"} or {"synthetic": FILE, "config", "val_tokens", "block"}. The evaluation reads the
held-out activations from their start as validation does (the directory's tail; the synthetic model's VAL
stream), in blocks of the training batch size, so `--tokens <val_tokens>` reproduces the logged val/*
figures. It reports the
reconstruction and sparsity metrics of `saelightning eval` and, for a synthetic source, the metrics against
the true features (groundtruth.py); there is no model, so no spliced CE/KL. `--data` points at another
activation directory or synthetic model file; `--batch_size` and `--context_size` are not read.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from saelightning import resolve
from saelightning.activations import HeldOut, read_activations
from saelightning.atomic import write_json
from saelightning.errors import SAELightningError
from saelightning.export import read_metadata
from saelightning.groundtruth import GroundTruthMetrics
from saelightning.metrics import SAEMetrics, weight_metrics
from saelightning.progress import progress_bar
from saelightning.synthetic import HOOK, SyntheticConfig, SyntheticVal, load_or_build, read_model


def _key(record: dict) -> tuple:
    if record.get("activations"):
        return ("activations", record["activations"], record.get("id"))
    return ("synthetic", record["synthetic"], str(record.get("config")))


def recorded_source(sae_paths: Sequence) -> dict | None:
    """The model-free source the SAEs' cfg.json record (one for all of them), or None: trained on a model."""
    records = []
    for path in sae_paths:
        trained_on = read_metadata(path).get("trained_on")
        records.append(trained_on if isinstance(trained_on, dict) else {})
    free = [r for r in records if r.get("activations") or r.get("synthetic")]
    if not free:
        return None
    if len(free) != len(records) or len({_key(r) for r in free}) > 1:
        raise SAELightningError("the SAEs were trained on different sources (a model, an activation directory or a "
                                "synthetic model); evaluate each source's SAEs in a run of their own")
    return free[0]


def _activations(record: dict, data: str | None, tokens: int, hooks: list[str]):
    folder = data or record["activations"]
    if not Path(folder).is_dir():
        raise SAELightningError(f"the SAEs were trained on the activations in {folder}, which are not there now; "
                                "pass --data DIR (where they are now)")
    info = read_activations(folder, record.get("held_out", record["val_tokens"]))
    if data is None and info["id"] != record.get("id"):
        raise SAELightningError(f"the activations in {folder} are not the ones the SAEs were trained on (other shards "
                                "or another held-out count); pass --data DIR to evaluate on them anyway")
    return info["d_in"], HeldOut(info, hooks, record["block"], tokens=tokens), None, info["dir"]


def _synthetic(record: dict, data: str | None, tokens: int, device):
    if data is not None:
        model = read_model(data)
    else:  # the recorded file; regenerated from the recorded config if it is gone (written nowhere)
        model = load_or_build(SyntheticConfig(**record["config"], file=record["synthetic"]), device, write=False)
    model.to(device)
    return {HOOK: model.d_in}, SyntheticVal(model, record["block"], tokens), model, str(data or record["synthetic"])


def _scores(metrics: SAEMetrics) -> dict:
    values = {k: float(v) for k, v in metrics.compute().items()}
    values["n_tokens"] = int(values["n_tokens"])
    return values


@torch.no_grad()
def evaluate_held_out(groups: dict[str, list], batches, encode_decode: Callable, truth=None, device=None,
                      progress=None) -> tuple[dict[str, list[dict]], int]:
    """Every metric of SAEs {hook: [sae, ...]} over held-out batches {"acts": {hook: x}, ("truth")}: per SAE
    {"metrics", "feature_density", ("per_latent")}, with `truth` (a SyntheticModel) the ground-truth metrics too;
    and the count of samples evaluated."""
    metrics = {h: [SAEMetrics(s.W_enc.shape[0], s.W_enc.shape[1], spliced=False).to(device) for s in g]
               for h, g in groups.items()}
    truths = {h: [GroundTruthMetrics(s.W_enc.shape[1]).to(device) for s in g] for h, g in groups.items()}
    if truth is not None:
        for hook, group in groups.items():
            for sae, gt in zip(group, truths[hook]):
                gt.set_dictionary(sae.W_dec, truth.features)
    evaluated = 0
    for batch in batches:
        for hook, group in groups.items():
            x = batch["acts"][hook].to(device)
            for sae, m, gt in zip(group, metrics[hook], truths[hook]):
                f, x_hat = encode_decode(sae, x)
                m.update(x, x_hat, f)
                if truth is not None:
                    gt.update(f, x, x_hat, batch["truth"].to(device))
        n = next(iter(batch["acts"].values())).shape[0]
        evaluated += n
        if progress is not None:
            progress.update(n)
    out = {}
    for hook, group in groups.items():
        out[hook] = []
        for sae, m, gt in zip(group, metrics[hook], truths[hook]):
            entry = {"metrics": {**_scores(m), **weight_metrics(sae.W_enc, sae.W_dec)},
                     "feature_density": m.feature_density().cpu().tolist()}
            if truth is not None:
                entry["metrics"].update({k: float(v) for k, v in gt.compute().items()})
                entry["per_latent"] = gt.per_latent()
            out[hook].append(entry)
    return out, evaluated


def run_eval(args, encode_decode: Callable) -> dict:
    """`saelightning eval` (its EvalArgs) on SAEs trained without a model; encode_decode is evaluate's (the one
    encode/decode of an SAE on raw activations). Returns the report."""
    record = recorded_source(args.sae)
    device = resolve.device(args.device)
    groups, where = resolve.load_saes(args.sae, device)
    if "activations" in record:
        widths, batches, truth, data = _activations(record, args.data, args.tokens, list(groups))
    else:
        widths, batches, truth, data = _synthetic(record, args.data, args.tokens, device)
    for hook, group in groups.items():
        if hook not in widths:
            raise SAELightningError(f"{data} has no hook {hook!r} (it holds {sorted(widths)}); pass the --data the "
                                    "SAE was trained on")
        for sae in group:
            if sae.W_enc.shape[0] != widths[hook]:
                raise SAELightningError(f"an SAE with d_in={sae.W_enc.shape[0]} cannot read {hook!r} of {data}, whose "
                                        f"width is {widths[hook]}; pass the --data the SAE was trained on")
    with progress_bar(batches.tokens, "eval", quiet=args.quiet) as bar:
        results, evaluated = evaluate_held_out(groups, batches, encode_decode, truth, device, bar)
    if evaluated < args.tokens:
        print(f"saelightning eval: the held-out activations ran out after {evaluated} of {args.tokens} tokens; the "
              "report covers those", file=sys.stderr)
    entries = [{"path": str(path), "hook_name": hook, **results[hook][i]} for path, (hook, i) in zip(args.sae, where)]
    report = {"model": None, "source": "activations" if "activations" in record else "synthetic", "data": data,
              "tokens_requested": args.tokens, "tokens_evaluated": evaluated, "saes": entries}
    if args.out:
        write_json(args.out, report, indent=2)
    return report
