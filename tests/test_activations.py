"""data.activations: the directory format (write, read, refusals), its train / held-out split and reader layout,
and fits of every architecture on it without a model: export, eval, exact resume, a `saelightning cache` dir."""

import json
import re

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import saelightning
from saelightning.activations import HeldOut, read_activations, train_view, write_activations
from saelightning.cache import CacheBlocks, CacheConfig, build_cache
from saelightning.cli import main
from saelightning.errors import SAELightningError
from tests.fits import fit_config

ARCHS = ["topk", "batchtopk", "matryoshka", "relu", "gated", "jumprelu"]
HOOKS = ["resid", "layer.2/mlp"]


def _tensors(n=1200, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"resid": torch.randn(n, 16, generator=g) * 2 + 1,
            "layer.2/mlp": torch.relu(torch.randn(n, 24, generator=g))}


@pytest.fixture(scope="module")
def acts_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("acts") / "acts"
    write_activations(out, _tensors(), val_tokens=200, shard_tokens=300, source={"model": "random", "layer": 2})
    return out


def test_write_then_read_round_trips_and_splits_off_the_held_out_tail(acts_dir):
    manifest = json.loads((acts_dir / "manifest.json").read_text())
    assert manifest["hooks"] == HOOKS and manifest["d_in"] == {"resid": 16, "layer.2/mlp": 24}
    assert [s["tokens"] for s in manifest["shards"]] == [300] * 4 and manifest["val_tokens"] == 200
    x = _tensors()
    assert manifest["mean_squared_norm"]["resid"] == pytest.approx(float(x["resid"][:1000].pow(2).sum(-1).mean()))
    stored = torch.cat([load_file(str(acts_dir / s["file"]))["acts.resid"] for s in manifest["shards"]])
    assert torch.equal(stored, x["resid"])
    info = read_activations(acts_dir, default_val_tokens=64)
    assert (info["train_tokens"], info["val_tokens"]) == (1000, 200)  # the manifest's count wins over the default
    # training reads shards 0-2 whole and the first 100 rows of shard 3; validation the last 200 rows
    assert [s["tokens"] for s in train_view(info)["shards"]] == [300, 300, 300, 100]
    held = list(HeldOut(info, HOOKS, 64))
    assert [len(b["acts"]["resid"]) for b in held] == [64, 64, 64, 8]
    assert torch.equal(torch.cat([b["acts"]["resid"] for b in held]), x["resid"][1000:])
    ranks = [list(HeldOut(info, HOOKS, 64, rank=r, world=2)) for r in (0, 1)]
    # rank 1 of 2 takes blocks 1 and 3 of the held-out part: rows 1064-1127 and 1192-1199
    assert torch.equal(torch.cat([b["acts"]["resid"] for b in ranks[1]]),
                       torch.cat([x["resid"][1064:1128], x["resid"][1192:1200]]))
    assert saelightning.write_activations is write_activations


def test_ranks_and_workers_read_disjoint_training_shards_and_never_the_held_out_tail(acts_dir):
    info = read_activations(acts_dir, 64)
    x = _tensors()["resid"]
    seen = []
    for rank in (0, 1):
        blocks = iter(CacheBlocks(train_view(info), ["resid"], 50, rank=rank, world_size=2, seed=0))
        mine = []
        while True:
            item = next(blocks)
            mine.append(item["tokens"]["resid"])
            if item["state"]["position"]["epoch"] == 1:
                break
        seen.append(torch.cat(mine))  # the block whose position rolled over to epoch 1 ended epoch 0
    # epoch 0: rank 0 reads shards 0 and 2, rank 1 shard 1 and the training part of shard 3
    assert torch.equal(seen[0], torch.cat([x[0:300], x[600:900]]))
    assert torch.equal(seen[1], torch.cat([x[300:600], x[900:1000]]))


def test_a_bad_directory_is_one_line_naming_the_problem(tmp_path):
    with pytest.raises(SAELightningError, match="has no manifest.json; saelightning.write_activations"):
        read_activations(tmp_path, 64)
    out = tmp_path / "a"
    write_activations(out, {"h": torch.randn(100, 8)}, val_tokens=10)
    manifest = json.loads((out / "manifest.json").read_text())
    for change, says in ((dict(d_in={"h": 6}), "has width 8, the manifest (or an earlier shard) says d_in=6"),
                         (dict(hooks=["h", "g"]), "has no tensor acts.g"),
                         (dict(val_tokens=100), "100 are to be held out"),
                         (dict(format=2), '"format": 1'),
                         (dict(shards=[{"file": "nope.safetensors", "tokens": 5}]), "lists nope.safetensors")):
        (out / "manifest.json").write_text(json.dumps({**manifest, **change}))
        with pytest.raises(SAELightningError, match=re.escape(says)) as err:
            read_activations(out, 64)
        assert "\n" not in str(err.value)
    save_file({"acts.h": torch.randn(7, 8)}, str(out / "shard_00000.safetensors"))
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SAELightningError, match=r"has shape \[7, 8\], the manifest says \[100, d_in\]"):
        read_activations(out, 64)
    with pytest.raises(SAELightningError, match="100 rows, the others 50"):
        write_activations(tmp_path / "b", {"a": torch.randn(50, 4), "b": torch.randn(100, 4)})
    with pytest.raises(SAELightningError, match="NaN or inf"):
        write_activations(tmp_path / "b", {"a": torch.full((50, 4), float("nan"))})
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with pytest.raises(SAELightningError, match="not an empty directory"):
        write_activations(tmp_path / "c", {"a": torch.randn(50, 4)})


def _config(tmp_path, run, acts, **trainer):
    saes = [{"hook_name": HOOKS[i % 2], "architecture": a, "d_sae": 32, "name": a,
             **({"k": 4} if a in ("topk", "batchtopk", "matryoshka") else {})} for i, a in enumerate(ARCHS)]
    data = {"activations": str(acts), "batch_size": 64, "buffer_tokens": 256, "num_workers": 1, "val_batches": 2,
            "scale_batches": 2}
    return fit_config(tmp_path, run, saes, data, trainer)


def test_every_architecture_trains_on_activations_resumes_bitwise_and_eval_reproduces_validation(acts_dir, tmp_path,
                                                                                                 capsys):
    assert main(["fit", "--config", str(_config(tmp_path, "whole", acts_dir))]) == 0
    parts = _config(tmp_path, "parts", acts_dir)
    assert main(["fit", "--config", str(parts), "--trainer.max_steps", "7"]) == 0
    assert main(["fit", "--config", str(parts), "--ckpt_path", "last"]) == 0
    a = torch.load(tmp_path / "whole" / "last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "parts" / "last.ckpt", weights_only=True)
    assert a["ActivationDataModule"]["source"].startswith("activations:")
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    exports = [tmp_path / "whole" / "saes" / arch for arch in ARCHS]
    meta = json.loads((exports[1] / "cfg.json").read_text())["metadata"]
    assert meta["hook_name"] == "layer.2/mlp" and meta["trained_on"]["activations"] == str(acts_dir)
    assert meta["trained_on"]["source"] == {"model": "random", "layer": 2} and meta["trained_on"]["val_tokens"] == 128
    out = tmp_path / "eval.json"
    assert main(["eval", "--sae", *map(str, exports), "--tokens", "128", "--out", str(out), "--quiet"]) == 0
    report = json.loads(out.read_text())
    assert report["source"] == "activations" and report["tokens_evaluated"] == 128
    for path, entry in zip(exports, report["saes"]):
        final = json.loads((path / "cfg.json").read_text())["metadata"]["final_metrics"]
        for key in ("explained_variance", "mse", "l0", "cossim"):
            assert entry["metrics"][key] == pytest.approx(final[f"val/{key}"], rel=1e-4, abs=1e-6), (path.name, key)
        assert "ce_loss_score" not in entry["metrics"] and "mcc" not in entry["metrics"]
    # an export whose activations have moved: one line naming the recorded path and the flag
    moved = tmp_path / "moved"
    moved.mkdir()
    cfg = json.loads((exports[0] / "cfg.json").read_text())
    cfg["metadata"]["trained_on"]["activations"] = str(tmp_path / "gone")
    (moved / "cfg.json").write_text(json.dumps(cfg))
    (moved / "sae_weights.safetensors").write_bytes((exports[0] / "sae_weights.safetensors").read_bytes())
    assert main(["eval", "--sae", str(moved), "--quiet"]) == 2
    assert "which are not there now; pass --data DIR" in capsys.readouterr().err
    assert main(["eval", "--sae", str(moved), "--data", str(acts_dir), "--tokens", "128", "--quiet"]) == 0


def test_bad_activations_input_exits_2_and_writes_nothing(acts_dir, tmp_path, capsys):
    cfg = yaml.safe_load(_config(tmp_path, "bad", acts_dir).read_text())
    cfg["model"]["saes"] = [{"hook_name": "blocks.1.hook_resid_post", "d_sae": 32, "k": 4}]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["fit", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "no hook 'blocks.1.hook_resid_post' (they hold ['layer.2/mlp', 'resid'])" in err and err.count("\n") == 1
    cfg["data"]["activations"] = str(tmp_path / "missing")
    path.write_text(yaml.safe_dump(cfg))
    assert main(["fit", "--config", str(path)]) == 2
    assert "has no manifest.json" in capsys.readouterr().err
    cfg["data"]["activations"], cfg["data"]["synthetic"] = str(acts_dir), {"num_features": 8, "d_in": 4}
    path.write_text(yaml.safe_dump(cfg))
    assert main(["fit", "--config", str(path)]) == 2
    assert "data.activations and data.synthetic are both given" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_a_saelightning_cache_trains_without_its_model(tmp_path, nanochat_current_dir, tiny_shards_dir):
    """A `saelightning cache` directory is an activation directory: data.activations trains on it model-free,
    validating on its last shard's tail (data.val_batches x data.batch_size held out)."""
    hook = "blocks.1.hook_resid_post"
    build_cache(CacheConfig(model=str(nanochat_current_dir), hooks=[hook], tokens=900, out=str(tmp_path / "cache"),
                            data=str(tiny_shards_dir), shard_tokens=300, context_size=32, batch_rows=4))
    cfg = yaml.safe_load(_config(tmp_path, "cached", tmp_path / "cache", max_steps=5).read_text())
    cfg["model"]["saes"] = [{"hook_name": hook, "d_sae": 64, "k": 4, "name": "sae"}]
    path = tmp_path / "cached.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["fit", "--config", str(path)]) == 0
    meta = json.loads((tmp_path / "cached" / "saes" / "sae" / "cfg.json").read_text())["metadata"]
    assert meta["trained_on"]["held_out"] == 128 and meta["final_metrics"]["val/explained_variance"] > -1
