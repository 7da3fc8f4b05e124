"""data.synthetic: the generator's rules (by hand and by sampling), its file, its streams, and fits of every
architecture on it: export, eval, exact resume, DDP, bad input."""

import json
import math

import pytest
import torch
import yaml

from saelightning.cli import main
from saelightning.errors import SAELightningError
from saelightning.synthetic import (
    TRAIN,
    SyntheticBlocks,
    SyntheticConfig,
    build_hierarchy,
    build_model,
    check_config,
    compensate,
    load_or_build,
    read_model,
    zipf_probabilities,
)
from tests.fits import ddp_fit, fit_config

ARCHS = ["topk", "batchtopk", "matryoshka", "relu", "gated", "jumprelu"]
TINY = dict(num_features=48, d_in=12, hierarchy_roots=2, hierarchy_branching=2, hierarchy_depth=2, correlation_rank=3,
            orthogonalize_steps=5, seed=1)


@pytest.mark.parametrize("bad, says", [
    (dict(hierarchy_roots=16, hierarchy_branching=4, hierarchy_depth=3), "needs 1360 features and num_features is 48"),
    (dict(min_prob=0.5, max_prob=0.4), "0 < min_prob <= max_prob <= 1"),
    (dict(num_features=0), "num_features=0"),
    (dict(mutually_exclusive=1.5), "mutually_exclusive=1.5"),
    (dict(magnitude_mean_end=0.0), "magnitude_mean_end=0.0"),
    (dict(hierarchy_roots=2, hierarchy_branching=1), "hierarchy_branching=1"),
    (dict(correlation_rank=-1), "correlation_rank=-1"),
    (dict(noise_std=float("nan")), "must be a finite number"),
])
def test_an_impossible_synthetic_model_is_one_line_naming_the_field(bad, says):
    with pytest.raises(SAELightningError, match=r"^data\.synthetic") as err:
        check_config(SyntheticConfig(**{**dict(num_features=48, d_in=12), **bad}))
    assert says in str(err.value) and "\n" not in str(err.value)


def test_zipf_hierarchy_and_compensation_by_hand():
    # p_r = min + (max - min) (r^-a - n^-a) / (1 - n^-a); n = 3, a = 1: r^-1 = 1, 1/2, 1/3
    assert zipf_probabilities(3, 1.0, 0.4, 0.1).tolist() == pytest.approx([0.4, 0.1 + 0.3 * (1 / 6) / (2 / 3), 0.1])
    # breadth first: roots 0, 1; their children 2, 3 | 4, 5; then 6, 7 | 8, 9 | 10, 11 | 12, 13
    cfg = SyntheticConfig(num_features=15, d_in=4, hierarchy_roots=2, hierarchy_branching=2, hierarchy_depth=2,
                          mutually_exclusive=0.0)
    parent, depth, exclusive = build_hierarchy(cfg)
    assert parent.tolist() == [-1, -1, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, -1]
    assert depth.tolist() == [0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, -1] and not exclusive.any()
    assert build_hierarchy(SyntheticConfig(**{**vars(cfg), "mutually_exclusive": 1.0}))[2].sum() == 6
    # a child's p is divided by its parent's; under mutual exclusion also times 1 + (sum of the siblings' p) / p_parent
    base = torch.tensor([0.5, 0.2, 0.1, 0.3], dtype=torch.float64)
    par, excl = torch.tensor([-1, 0, 0, -1]), torch.tensor([True, False, False, False])
    assert compensate(base, par, excl).tolist() == pytest.approx([0.5, 0.4 * (1 + 0.1 / 0.5), 0.2 * (1 + 0.2 / 0.5),
                                                                  0.3])
    assert compensate(base, par, torch.zeros(4, dtype=torch.bool)).tolist() == pytest.approx([0.5, 0.4, 0.2, 0.3])


def test_samples_follow_the_hierarchy_exclusion_and_seeds():
    cfg = SyntheticConfig(num_features=30, d_in=8, hierarchy_roots=2, hierarchy_branching=3, hierarchy_depth=2,
                          max_prob=0.6, min_prob=0.2, scale_children_by_parent=False, correlation_rank=2,
                          orthogonalize_steps=0, noise_std=0.0, seed=5)
    model = build_model(cfg)
    x, acts = model.block(TRAIN, 0, 0, 4000)
    parent = model.tensors["parent"]
    kids = (parent >= 0).nonzero().flatten()
    active = acts > 0
    assert not (active[:, kids] & ~active[:, parent[kids]]).any()  # a child fires only with its parent
    siblings = active[:, 2:26].reshape(4000, 8, 3)  # the 8 parents' children (all exclusive: portion 1.0)
    assert siblings.sum(-1).max() == 1 and siblings.any()
    assert (acts >= 0).all() and active.float().mean() > 0.05
    assert torch.allclose(x, acts @ model.features + model.bias, atol=1e-5)
    again = model.block(TRAIN, 0, 0, 4000)
    assert torch.equal(again[0], x) and torch.equal(again[1], acts)  # a block is a function of its seed and index
    assert not torch.equal(model.block(TRAIN, 0, 1, 4000)[0], x) and not torch.equal(model.val_block(0, 4000)[0], x)


def test_independent_firing_rates_match_the_probabilities_and_correlation_shows():
    model = build_model(SyntheticConfig(num_features=20, d_in=8, zipf_exponent=1.0, max_prob=0.5, min_prob=0.05,
                                        orthogonalize_steps=0, seed=2))
    n = 20000
    rate = (model.block(TRAIN, 0, 0, n)[1] > 0).double().mean(0)
    p = model.probabilities.double()
    assert ((rate - p).abs() < 5 * (p * (1 - p) / n).sqrt()).all()
    # rank 1, large loadings: features whose loadings share a sign fire together more often than apart
    corr = build_model(SyntheticConfig(num_features=20, d_in=8, max_prob=0.4, min_prob=0.2, correlation_rank=1,
                                       correlation_scale=0.9, orthogonalize_steps=0, seed=2))
    fired = (corr.block(TRAIN, 0, 0, n)[1] > 0).double()
    c = torch.corrcoef(fired.T)
    loading = corr.factor[:, 0]
    sign = torch.sign(loading[:, None] * loading[None, :])
    strong = (loading[:, None] * loading[None, :]).abs() > 0.3
    strong.fill_diagonal_(False)
    assert strong.sum() > 10 and (torch.sign(c[strong]) == sign[strong]).all()
    assert ((rate - p).abs() < 5 * (p * (1 - p) / n).sqrt()).all()


def test_the_model_file_round_trip_and_a_config_that_is_not_the_files(tmp_path):
    cfg = SyntheticConfig(**TINY, file=str(tmp_path / "m.safetensors"))
    built = load_or_build(cfg)
    stamp = (tmp_path / "m.safetensors").stat().st_mtime_ns
    read = load_or_build(cfg)  # read, not rebuilt
    assert (tmp_path / "m.safetensors").stat().st_mtime_ns == stamp and read.sha256() == built.sha256()
    for name in built.tensors:
        assert torch.equal(read.tensors[name], built.tensors[name]), name
    assert read.stats == built.stats and 0 < built.stats["mean_abs_cos"] < built.stats["max_abs_cos"] < 1
    assert torch.equal(read.block(TRAIN, 3, 2, 64)[0], built.block(TRAIN, 3, 2, 64)[0])
    with pytest.raises(SAELightningError, match="holds a synthetic model with d_in=12, the config says 13"):
        load_or_build(SyntheticConfig(**{**TINY, "d_in": 13}, file=cfg.file))
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(SAELightningError, match="not a readable safetensors file"):
        read_model(tmp_path / "junk.safetensors")


def test_blocks_are_disjoint_across_ranks_and_workers_and_resume_by_count():
    def indices(rank, world, start=None, n=4):
        it = iter(SyntheticBlocks(None, 8, 0, rank, world, start))
        return [int(next(it)["tokens"]) for _ in range(n)]
    assert indices(0, 2) == [0, 2, 4, 6] and indices(1, 2) == [1, 3, 5, 7]
    assert indices(1, 2, {"workers": {0: {"next": 2}}}) == [5, 7, 9, 11]
    model = build_model(SyntheticConfig(**TINY))
    item = next(iter(SyntheticBlocks(model, 8, 7, 1, 2)))  # a CPU model: the block itself, generated in the worker
    assert torch.equal(item["tokens"], model.block(TRAIN, 7, 1, 8)[0]) and item["state"] == {"next": 1}


# --- fits ---

def _config(tmp_path, run, **trainer):
    saes = [{"hook_name": "synthetic", "architecture": a, "d_sae": 24, "name": a,
             **({"k": 3} if a in ("topk", "batchtopk", "matryoshka") else {})} for a in ARCHS]
    data = {"synthetic": {**TINY, "file": str(tmp_path / "model.safetensors")}, "batch_size": 64,
            "buffer_tokens": 256, "num_workers": 1, "val_batches": 2, "scale_batches": 2}
    return fit_config(tmp_path, run, saes, data, trainer)


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("synthetic_fit")
    assert main(["fit", "--config", str(_config(tmp, "whole"))]) == 0
    return tmp


def test_every_architecture_trains_on_synthetic_data_and_eval_reproduces_validation(whole, tmp_path):
    run = whole / "whole"
    assert sorted(p.name for p in (run / "saes").iterdir()) == sorted(ARCHS)
    for arch in ARCHS:
        meta = json.loads((run / "saes" / arch / "cfg.json").read_text())["metadata"]
        assert meta["hook_name"] == "synthetic" and meta["model"]["path"] is None
        trained_on = meta["trained_on"]
        assert trained_on["synthetic"] == str(whole / "model.safetensors") and trained_on["val_tokens"] == 128
        assert trained_on["config"] == SyntheticConfig(**TINY).model_dict()
        final = meta["final_metrics"]
        for key in ("mcc", "uniqueness", "classification/f1_score", "classification/precision",
                    "classification/recall", "shrinkage", "dead_latents", "true_l0", "explained_variance"):
            assert math.isfinite(final[f"val/{key}"]), (arch, key)
        assert not any("ce_loss" in k for k in final)  # no model: no spliced CE/KL
    # eval on the exports, over validation's samples, gives the logged figures (the folded scale aside)
    out = tmp_path / "eval.json"
    exports = [str(run / "saes" / a) for a in ARCHS]
    assert main(["eval", "--sae", *exports, "--tokens", "128", "--out", str(out), "--device", "cpu", "--quiet"]) == 0
    report = json.loads(out.read_text())
    assert report["source"] == "synthetic" and report["tokens_evaluated"] == 128
    for arch, entry in zip(ARCHS, report["saes"]):
        final = json.loads((run / "saes" / arch / "cfg.json").read_text())["metadata"]["final_metrics"]
        for key in ("mcc", "classification/f1_score", "explained_variance", "shrinkage", "l0", "true_l0"):
            assert entry["metrics"][key] == pytest.approx(final[f"val/{key}"], rel=1e-4, abs=1e-6), (arch, key)
        assert len(entry["per_latent"]["f1_score"]) == 24
    # `saelightning export --ckpt` rebuilds the module from the checkpoint (the source's hook widths included)
    assert main(["export", "--ckpt", str(run), "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "topk" / "cfg.json").read_text())["metadata"]
    assert again["trained_on"] == json.loads((run / "saes" / "topk" / "cfg.json").read_text())["metadata"]["trained_on"]


def test_a_resumed_synthetic_fit_is_bitwise_the_uninterrupted_one(whole):
    parts = _config(whole, "parts")
    assert main(["fit", "--config", str(parts), "--trainer.max_steps", "7"]) == 0  # mid-buffer, after a resampling
    assert main(["fit", "--config", str(parts), "--ckpt_path", "last"]) == 0
    a = torch.load(whole / "whole" / "last.ckpt", weights_only=True)
    b = torch.load(whole / "parts" / "last.ckpt", weights_only=True)
    assert a["ActivationDataModule"]["source"].startswith("synthetic:")
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key


def test_bad_synthetic_input_exits_2_and_writes_nothing(tmp_path, capsys):
    cfg = yaml.safe_load(_config(tmp_path, "bad").read_text())
    cfg["data"]["synthetic"].update(hierarchy_roots=5, hierarchy_depth=3)  # 5 x 15 = 75 features > 48
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["fit", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "needs 75 features and num_features is 48" in err and err.strip().count("\n") == 0
    cfg = yaml.safe_load(_config(tmp_path, "bad").read_text())
    cfg["model"]["saes"] = [{"hook_name": "blocks.0.hook_resid_post", "d_sae": 24}]
    path.write_text(yaml.safe_dump(cfg))
    assert main(["fit", "--config", str(path)]) == 2
    assert "no hook 'blocks.0.hook_resid_post' (they hold ['synthetic'])" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]  # no run dir, no model file


@pytest.mark.slow
def test_two_process_ddp_synthetic_fit_resumes_bitwise(tmp_path):
    def fit(run, *extra):
        return ddp_fit(_config(tmp_path, run, max_steps=6), tmp_path / run, *extra)

    whole = fit("whole")
    positions = whole["ActivationDataModule"]["positions"]
    assert [p["index"] for p in positions] == [6, 6] and positions[0]["reader"] == positions[1]["reader"]
    assert whole["state_dict"]["tokens_seen"].item() == 6 * 64 * 2
    fit("parts", "--trainer.max_steps", "4")
    b = fit("parts", "--ckpt_path", "last")
    for key in whole["state_dict"]:
        assert torch.equal(whole["state_dict"][key], b["state_dict"][key]), key
