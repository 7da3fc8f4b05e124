"""Neuronpedia export: every field of the batch files has the listed type and consistent values,
batches are split as asked, the weights are copied as exported; the command runs end to end."""

import json

from saelightning.cli import main
from saelightning.dashboards.records import feature_records
from saelightning.dashboards.stats import logit_effect
from saelightning.neuronpedia import feature_json
from tests.test_dashboards import CFG, HOOK, exported_sae, model, sae, streamed, tokenizer  # noqa: F401

BATCH_FIELDS = {"model_id": str, "layer": int, "sae_set": str, "features": list}
FEATURE_FIELDS = {
    "feature_index": int, "neg_str": [str], "neg_values": [float], "pos_str": [str], "pos_values": [float],
    "frac_nonzero": float, "freq_hist_data_bar_heights": [float], "freq_hist_data_bar_values": [float],
    "logits_hist_data_bar_heights": [float], "logits_hist_data_bar_values": [float], "activations": list,
    "n_prompts_total": int, "n_tokens_in_prompt": int, "dataset": str,
}
ACTIVATION_FIELDS = {"bin_min": float, "bin_max": float, "bin_contains": float, "tokens": [str],
                     "values": [float], "qualifying_token_index": int}


def _is(value, kind) -> bool:
    if isinstance(kind, list):
        return isinstance(value, list) and all(_is(v, kind[0]) for v in value)
    if kind is float:  # JSON numbers: an int is a valid float, a bool is not
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind) and not (kind is int and isinstance(value, bool))


def check_fields(obj: dict, fields: dict, where: str) -> None:
    missing = set(fields) - set(obj)
    assert not missing, f"{where} lacks {missing}"
    for key, kind in fields.items():
        assert _is(obj[key], kind), f"{where}.{key} = {obj[key]!r:.80} is not {kind}"


def validate_feature(f: dict, n_logits: int) -> None:
    check_fields(f, FEATURE_FIELDS, f"feature {f.get('feature_index')}")
    assert len(f["pos_str"]) == len(f["pos_values"]) == n_logits == len(f["neg_str"]) == len(f["neg_values"])
    assert f["pos_values"] == sorted(f["pos_values"], reverse=True) and f["neg_values"] == sorted(f["neg_values"])
    assert min(f["pos_values"]) >= max(f["neg_values"])
    assert 0.0 <= f["frac_nonzero"] <= 1.0
    assert len(f["freq_hist_data_bar_heights"]) == len(f["freq_hist_data_bar_values"])
    assert len(f["logits_hist_data_bar_heights"]) == len(f["logits_hist_data_bar_values"])
    top = [a for a in f["activations"] if a["bin_min"] == -1]
    assert (f["frac_nonzero"] > 0) == bool(top)
    for a in f["activations"]:
        check_fields(a, ACTIVATION_FIELDS, f"feature {f['feature_index']} activation")
        assert len(a["tokens"]) == len(a["values"]) and 0 <= a["qualifying_token_index"] < len(a["tokens"])
        marked = a["values"][a["qualifying_token_index"]]
        if a["bin_min"] == -1:  # top activations: bin_max is the latent's max, contains -1
            assert a["bin_contains"] == -1 and 0 < marked <= a["bin_max"] * (1 + 1e-3)
        else:
            assert a["bin_min"] * (1 - 1e-3) <= marked <= a["bin_max"] * (1 + 1e-3)
            assert 0 < a["bin_contains"] <= 1
    if top:  # the strongest context is the max activation
        assert abs(top[0]["values"][top[0]["qualifying_token_index"]] - top[0]["bin_max"]) <= 1e-3 * top[0]["bin_max"]


def test_feature_json_fields_and_values(streamed, model, sae, tokenizer):  # noqa: F811
    stats, rows = streamed
    records = feature_records(stats, logit_effect(model, sae, HOOK, stats.features, CFG), tokenizer.token_str)
    for rec in records:
        f = feature_json(rec, n_prompts=22, context_size=32, dataset="val.parquet")
        validate_feature(json.loads(json.dumps(f)), CFG.n_logits)
        assert sum(f["freq_hist_data_bar_heights"]) == rec["n_fire"]
        n_intervals = sum(1 for a in f["activations"] if a["bin_min"] != -1)
        assert n_intervals == sum(len(b["contexts"]) for b in rec["intervals"])
    # bin_contains of the intervals adds up to all firings (intervals with no firings are left out)
    contains = {(a["bin_min"], a["bin_contains"]) for a in feature_json(records[0], 1, 1, "")["activations"]
                if a["bin_min"] != -1}
    assert abs(sum(c for _, c in contains) - 1.0) < 1e-9


def test_neuronpedia_command_writes_batches_and_weights(exported_sae, nanochat_current_dir, tiny_shards_dir,  # noqa: F811
                                                        tmp_path):
    out = tmp_path / "np"
    argv = ["neuronpedia", "--sae", str(exported_sae), "--model", str(nanochat_current_dir), "--data",
            str(tiny_shards_dir), "--tokens", "400", "--out", str(out), "--features", "0-9",
            "--features-per-batch", "4", "--sae-set", "res-test"]
    assert main(argv) == 0
    batches = [json.loads((out / f"batch-{n}.json").read_text()) for n in range(3)]
    assert not (out / "batch-3.json").exists()
    indices = []
    for batch in batches:
        check_fields(batch, BATCH_FIELDS, "batch")
        assert (batch["model_id"], batch["layer"], batch["sae_set"]) == ("nanochat-d2", 1, "res-test")
        for f in batch["features"]:
            validate_feature(f, 10)
            assert f["n_tokens_in_prompt"] == 32 and f["n_prompts_total"] == 13  # ceil(400 / 32) rows of 32
            indices.append(f["feature_index"])
    assert indices == list(range(10))
    assert any(f["frac_nonzero"] > 0 for b in batches for f in b["features"])
    weights = out / "blocks.1.hook_resid_post"
    for name in ("cfg.json", "sae_weights.safetensors"):
        assert (weights / name).read_bytes() == (exported_sae / name).read_bytes()
    # a second run replaces the first; a bad option is one line and exit 2
    assert main(argv[:-2] + ["--model-id", "my-nanochat"]) == 0
    assert json.loads((out / "batch-0.json").read_text())["model_id"] == "my-nanochat"
    assert main(argv + ["--model-id", "Bad Name"]) == 2
