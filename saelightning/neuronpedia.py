"""`saelightning neuronpedia`: the batch files Neuronpedia imports, plus the SAE's weights.

OUT/batch-{n}.json: {model_id, layer, sae_set, features: [...]} in the layout SAEDashboard's
Neuronpedia runner writes (features_per_batch latents per file), and OUT/<hook_name>/: a copy of the
exported SAE (SAELens layout: cfg.json, sae_weights.safetensors, sparsity.safetensors), ready to
be uploaded to a Hugging Face repo. The statistics come from the same streaming pass as the
dashboards. A cross-layer transcoder gets OUT/layer{L}/batch-{n}.json per layer and OUT/clt/ (its export).
Nothing here touches the network.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from saelightning.atomic import atomic_dir
from saelightning.command import parse
from saelightning.dashboards import StatsArgs, clt_layers, compute_records, load_inputs
from saelightning.errors import SAELightningError
from saelightning.hooks import parse_hook
from saelightning.saes.clt import CrossLayerTranscoder

# hook kind -> the short name Neuronpedia-style source sets use (res-jb, att-kk, ...)
SET_PREFIX = {"hook_resid_pre": "res-pre", "hook_resid_mid": "res-mid", "hook_resid_post": "res",
              "hook_attn_out": "att", "hook_mlp_out": "mlp", "mlp.hook_post": "mlp-post", "hook_mlp_in": "mlp-in"}


def _activation(context: dict, bin_min: float, bin_max: float, bin_contains: float) -> dict:
    return {"bin_min": bin_min, "bin_max": bin_max, "bin_contains": bin_contains,
            "tokens": context["tokens"], "values": context["values"],
            "qualifying_token_index": context["index"]}


def feature_json(record: dict, n_prompts: int, context_size: int, dataset: str) -> dict:
    """One latent's Neuronpedia entry. Top activations are the bin (-1, max, -1), as SAEDashboard
    writes them; each activation interval gives bin_min/bin_max and the fraction of firings in it."""
    edges = record["hist"]["edges"]
    acts = [_activation(c, -1.0, record["max_act"], -1.0) for c in record["top"]]
    for interval in record["intervals"]:
        acts += [_activation(c, interval["min"], interval["max"], interval["contains"]) for c in interval["contexts"]]
    return {
        "feature_index": record["index"],
        "neg_str": [t for t, _ in record["logits"]["neg"]], "neg_values": [v for _, v in record["logits"]["neg"]],
        "pos_str": [t for t, _ in record["logits"]["pos"]], "pos_values": [v for _, v in record["logits"]["pos"]],
        "frac_nonzero": record["density"],
        "freq_hist_data_bar_heights": [float(h) for h in record["hist"]["heights"]],
        "freq_hist_data_bar_values": [round((a + b) / 2, 6) for a, b in zip(edges, edges[1:])],
        "logits_hist_data_bar_heights": [float(h) for h in record["logits"]["hist"]["heights"]],
        "logits_hist_data_bar_values": record["logits"]["hist"]["centres"],
        "n_prompts_total": n_prompts, "n_tokens_in_prompt": context_size, "dataset": dataset,
        "activations": acts,
    }


def _batch_files(directory: Path, meta: dict, records: list[dict], model_id: str, sae_set: str, layer: int,
                 per_batch: int) -> list[str]:
    """batch-{n}.json files of these latents' records in `directory`; their names."""
    dataset = meta["val_shard"] if not meta.get("chat") else \
        f"{meta['val_shard']} + chat {meta['chat']} (chat_fraction {meta['chat_fraction']})"
    directory.mkdir(parents=True, exist_ok=True)
    names = []
    for n, start in enumerate(range(0, len(records), per_batch)):
        features = [feature_json(r, meta["n_rows"], meta["context_size"], dataset)
                    for r in records[start:start + per_batch]]
        batch = {"model_id": model_id, "layer": layer, "sae_set": sae_set, "features": features}
        (directory / f"batch-{n}.json").write_text(json.dumps(batch, ensure_ascii=False, allow_nan=False))
        names.append(f"batch-{n}.json")
    return names


def write_batches(out_dir, meta: dict, records: list[dict], sae_dir, model_id: str, sae_set: str,
                  per_batch: int = 128) -> list[Path]:
    """batch-{n}.json files and the weights copy, written atomically into out_dir."""
    weights = Path(sae_dir)
    if not (weights / "cfg.json").is_file() or not (weights / "sae_weights.safetensors").is_file():
        raise SAELightningError(f"{weights} is not an exported SAE (cfg.json + sae_weights.safetensors); "
                                "export it with `saelightning export` first")
    manifest = {"model_id": model_id, "layer": meta["layer"], "sae_set": sae_set, "hook_name": meta["hook_name"],
                "n_features": len(records), "n_tokens": meta["n_tokens"]}
    with atomic_dir(out_dir, "neuronpedia", manifest) as tmp:
        names = _batch_files(tmp, meta, records, model_id, sae_set, meta["layer"], per_batch)
        shutil.copytree(weights, tmp / meta["hook_name"])
    out = Path(out_dir).expanduser().absolute()
    return [out / name for name in names]


def write_clt_batches(args: NeuronpediaArgs, loaded, model_id: str, sae_set: str) -> list[Path]:
    """A cross-layer transcoder's batches: OUT/layer{L}/batch-{n}.json for each model layer L it reads (layer L's
    latents, as its dashboards show them: dashboards.clt_layers), and OUT/clt/: a copy of its export
    (circuit-tracer's layout), written atomically."""
    out = Path(args.out).expanduser().absolute()
    paths, n_latents, n_tokens = [], 0, 0
    with atomic_dir(out, "neuronpedia", {"model_id": model_id, "sae_set": sae_set,
                                         "cross_layer_transcoder": str(args.sae)}) as tmp:
        for _, layer, layer_loaded in clt_layers(loaded):
            meta, records, _ = compute_records(args, layer_loaded)
            names = _batch_files(tmp / f"layer{layer}", meta, records, model_id, sae_set, layer,
                                 args.features_per_batch)
            paths += [out / f"layer{layer}" / name for name in names]
            n_latents, n_tokens = n_latents + len(records), meta["n_tokens"]
        shutil.copytree(Path(args.sae), tmp / "clt")
    print(f"{len(paths)} batch file(s) for {n_latents} latents of {loaded.sae.n_layers} layers ({model_id} "
          f"{sae_set}, {n_tokens} tokens) and the CLT in {out / 'clt'}", file=sys.stderr)
    return paths


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")


@dataclass
class NeuronpediaArgs(StatsArgs):
    """Write Neuronpedia batch files (batch-{n}.json) and a copy of the SAE's weights; no network.

    Args:
        model_id: Neuronpedia model id (default: nanochat-d<n_layer>).
        sae_set: Neuronpedia source set name (default: from the hook, e.g. res-saelightning).
        features_per_batch: latents per batch file.
    """

    model_id: str | None = None
    sae_set: str | None = None
    features_per_batch: int = 128


def cli_main(argv: Sequence[str]) -> int:
    args = parse(NeuronpediaArgs, argv, "saelightning neuronpedia")
    if args is None:
        return 0
    if args.features_per_batch < 1:
        raise SAELightningError("--features_per_batch must be >= 1")
    loaded = load_inputs(args)
    clt = isinstance(loaded.sae, CrossLayerTranscoder)
    n_layer = loaded.nanochat.model.n_layer
    model_id = args.model_id or f"nanochat-d{n_layer}"
    if clt:
        sae_set = args.sae_set or "clt-saelightning"
    else:
        sae_set = args.sae_set or f"{SET_PREFIX[parse_hook(loaded.hook, n_layer)[1]]}-saelightning"
    if _slug(model_id) != model_id or _slug(sae_set) != sae_set:
        raise SAELightningError(f"--model_id {model_id!r} / --sae_set {sae_set!r}: "
                                "use lowercase letters, digits and '-'")
    if clt:
        write_clt_batches(args, loaded, model_id, sae_set)
        return 0
    meta, records, _ = compute_records(args, loaded)
    layer = meta["layer"]
    paths = write_batches(args.out, meta, records, args.sae, model_id, sae_set, args.features_per_batch)
    print(f"{len(paths)} batch file(s) for {len(records)} latents ({model_id} layer {layer} {sae_set}) "
          f"and the weights in {Path(args.out) / meta['hook_name']}", file=sys.stderr)
    return 0
