"""Activation cache: round trip against the live model, global shuffle, resume, refusals, and fit equality."""

import json

import pytest
import torch
from safetensors.torch import load_file

from saelightning import cache as cache_mod
from saelightning.cache import CacheConfig, build_cache, read_manifest
from saelightning.cli import main
from saelightning.data import ActivationDataModule
from saelightning.errors import SAELightningError
from saelightning.nanochat.checkpoint import load_nanochat
from tests.fits import fit_config
from tests.numerics import assert_close_reordered

pytestmark = pytest.mark.numerics  # fp32 results compared across code paths: also run under other CPU kernels

HOOKS = ["blocks.1.hook_resid_post", "blocks.0.mlp.hook_post"]
CTX, ROWS = 32, 4


def _cfg(model_dir, shards_dir, out, **kw):
    args = dict(model=str(model_dir), hooks=list(HOOKS), tokens=1500, out=str(out), data=str(shards_dir),
                shard_tokens=400, context_size=CTX, batch_rows=ROWS, seed=3)
    return CacheConfig(**{**args, **kw})


def _read_all(out) -> dict[str, torch.Tensor]:
    manifest = read_manifest(out)
    shards = [load_file(str(out / s["file"])) for s in manifest["shards"]]
    return {k: torch.cat([s[k] for s in shards]) for k in shards[0]}


@pytest.fixture(scope="module")
def shuffled(tmp_path_factory, nanochat_current_dir, tiny_shards_dir):
    out = tmp_path_factory.mktemp("cache") / "shuffled"
    return out, build_cache(_cfg(nanochat_current_dir, tiny_shards_dir, out))


def test_round_trip_equals_the_live_model(shuffled, nanochat_current_dir):
    out, manifest = shuffled
    nanochat = load_nanochat(str(nanochat_current_dir))
    bos = nanochat.tokenizer.bos_id
    cols = _read_all(out)
    assert manifest["tokens"] == 1500 and cols["token_ids"].shape == (1500,)
    assert [s["tokens"] for s in manifest["shards"]] == [375] * 4  # equal slices of the chunks 400, 400, 400, 300
    assert manifest["d_in"] == {HOOKS[0]: 64, HOOKS[1]: 256} and manifest["positions"] == "row-relative"
    assert (cols["token_ids"] != bos).all()
    # every complete row can be rebuilt from the cache alone: the missing positions are its BOS tokens
    rows = sorted(set(cols["rows"].tolist()))[:-1]  # the last row may be cut by --tokens
    rows = [r for r in rows if r < len(rows) // ROWS * ROWS]  # whole model batches: the same work as the cache did
    tokens = torch.full((len(rows), CTX), bos, dtype=torch.long)
    index = {r: i for i, r in enumerate(rows)}
    sel = torch.tensor([r in index for r in cols["rows"].tolist()])
    r_idx = torch.tensor([index[r] for r in cols["rows"][sel].tolist()])
    tokens[r_idx, cols["positions"][sel].long()] = cols["token_ids"][sel].long()
    # the model batches of the cache's own pass (ROWS rows each): equal work, so equal to the last bit
    live = [nanochat.model.run_with_cache(tokens[i:i + ROWS], HOOKS) for i in range(0, len(rows), ROWS)]
    for hook in HOOKS:
        acts = torch.cat([batch[hook] for batch in live])
        assert torch.equal(cols[f"acts.{hook}"][sel], acts[r_idx, cols["positions"][sel].long()]), hook
        # the manifest's statistic is E||x||² over the stored activations
        msn = cols[f"acts.{hook}"].double().pow(2).sum(-1).mean().item()
        assert manifest["mean_squared_norm"][hook] == pytest.approx(msn, rel=1e-9)
    # documents are numbered in stream order and the first row of the stream starts document 0
    assert cols["docs"].min().item() == 0 and cols["rows"].min().item() == 0


def test_a_compiled_model_pass_writes_the_same_cache(tmp_path, shuffled, nanochat_current_dir, tiny_shards_dir):
    """`saelightning cache --compile`: the same shards (activations up to float rounding, every other column
    exactly) and a manifest with the same fingerprint, so either can finish the other's interrupted run."""
    out, manifest = shuffled
    assert main(["cache", "--model", str(nanochat_current_dir), "--hooks", *HOOKS, "--tokens", "1500",
                 "--out", str(tmp_path / "c"), "--data", str(tiny_shards_dir), "--shard-tokens", "400",
                 "--context-size", str(CTX), "--batch-rows", str(ROWS), "--seed", "3", "--compile"]) == 0
    compiled = read_manifest(tmp_path / "c")
    assert compiled["fingerprint"] == manifest["fingerprint"]
    want, got = _read_all(out), _read_all(tmp_path / "c")
    for key in want:
        if key.startswith("acts."):  # fused kernels sum in another order: within the reordering bound of fp32
            assert_close_reordered(got[key], want[key], reduction_length=4 * 64, depth=2 * 4)
        else:
            assert torch.equal(got[key], want[key]), key


def test_shuffle_spreads_each_document_over_all_shards(shuffled):
    out, manifest = shuffled
    shard_docs = [load_file(str(out / s["file"]))["docs"] for s in manifest["shards"]]
    counts = torch.stack([torch.bincount(d, minlength=200)[:200] for d in shard_docs])  # [shard, doc]
    long_docs = counts.sum(0) >= 40
    assert long_docs.sum() >= 5
    assert (counts[:, long_docs] > 0).all()  # every long document has tokens in every shard
    # and within a shard the stream order is gone: neighbours rarely share a row
    first = load_file(str(out / manifest["shards"][0]["file"]))["rows"]
    assert (first[1:] == first[:-1]).float().mean() < 0.2


def test_bf16_storage_and_a_finished_cache_is_not_rewritten(tmp_path, shuffled, nanochat_current_dir, tiny_shards_dir,
                                                            capsys):
    out = tmp_path / "bf16"
    cfg = _cfg(nanochat_current_dir, tiny_shards_dir, out, dtype="bf16", shuffle=False, tokens=600)
    manifest = build_cache(cfg)
    cols = _read_all(out)
    assert cols[f"acts.{HOOKS[0]}"].dtype == torch.bfloat16 and manifest["dtype"] == "bf16"
    fp32 = _read_all(shuffled[0])  # the same stream (seed 3) in fp32, shuffled: compare by (row, position)
    key = lambda c: c["rows"] * CTX + c["positions"]  # noqa: E731
    order = torch.argsort(key(fp32))
    ref = fp32[f"acts.{HOOKS[0]}"][order][:600]
    assert torch.equal(key(fp32)[order][:600], key(cols))  # unshuffled = stream order
    assert torch.equal(cols[f"acts.{HOOKS[0]}"], ref.to(torch.bfloat16))
    stamp = (out / "shard_00000.safetensors").stat().st_mtime_ns
    assert build_cache(_cfg(nanochat_current_dir, tiny_shards_dir, out, dtype="bf16", shuffle=False,
                            tokens=600)) == manifest
    assert (out / "shard_00000.safetensors").stat().st_mtime_ns == stamp
    assert "nothing to do" in capsys.readouterr().err
    with pytest.raises(SAELightningError, match="other settings"):
        build_cache(_cfg(nanochat_current_dir, tiny_shards_dir, out, dtype="bf16", shuffle=False, tokens=700))


class _Crash(Exception):
    pass


@pytest.mark.parametrize("crash_after",
                         [0, 2, 6])  # before the first chunk, in the model pass (4 chunks), in the shuffle pass
def test_interrupted_run_resumes_to_the_same_cache(tmp_path, shuffled, nanochat_current_dir, tiny_shards_dir,
                                                   monkeypatch, crash_after):
    out = tmp_path / "resumed"
    real, calls = cache_mod._save_tensors, []

    def crashing(tensors, path):
        if len(calls) == crash_after:
            raise _Crash()
        calls.append(path)
        real(tensors, path)

    monkeypatch.setattr(cache_mod, "_save_tensors", crashing)
    with pytest.raises(_Crash):
        build_cache(_cfg(nanochat_current_dir, tiny_shards_dir, out))
    progress = json.loads((out / ".progress.json").read_text())
    assert len(progress["chunks"]) == min(crash_after, 4) and not (out / "manifest.json").exists()
    with pytest.raises(SAELightningError, match="unfinished"):
        read_manifest(out)
    monkeypatch.setattr(cache_mod, "_save_tensors", real)
    manifest = build_cache(_cfg(nanochat_current_dir, tiny_shards_dir, out))
    whole = shuffled[1]
    assert [s["sha256"] for s in manifest["shards"]] == [s["sha256"] for s in whole["shards"]]
    assert manifest["mean_squared_norm"] == whole["mean_squared_norm"]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"] + [f"shard_0000{i}.safetensors" for i in range(4)]


def test_cli_errors_exit_2(tmp_path, nanochat_current_dir, tiny_shards_dir, capsys, monkeypatch):
    base = ["cache", "--model", str(nanochat_current_dir), "--data", str(tiny_shards_dir), "--tokens", "100"]
    assert main(base + ["--hooks", "blocks.9.hook_resid_post", "--out", str(tmp_path / "a")]) == 2
    assert "out of range" in capsys.readouterr().err
    assert main(base + ["--hooks", HOOKS[0], "--out", str(tmp_path / "b"), "--dtype", "fp16"]) == 2
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    assert main(base + ["--hooks", HOOKS[0], "--out", str(tmp_path / "c")]) == 2
    assert "not a saelightning cache" in capsys.readouterr().err
    monkeypatch.setattr(cache_mod.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    assert main(base + ["--hooks", HOOKS[0], "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "GB are free" in err and err.count("\n") == 1 and not (tmp_path / "d").exists()
    monkeypatch.undo()
    assert main(base + ["--hooks", HOOKS[0], "--out", str(tmp_path / "e"), "--shard-tokens", "64"]) == 0
    assert read_manifest(tmp_path / "e")["tokens"] == 100


def _dm(model_dir, shards_dir, **kw):
    args = dict(model=str(model_dir), data_dir=str(shards_dir), context_size=CTX, batch_size=48, model_batch_rows=ROWS,
                buffer_tokens=200, num_workers=0, val_batches=1, scale_batches=2)
    return ActivationDataModule(**{**args, **kw})


def test_manifest_mismatch_is_refused(shuffled, nanochat_current_dir, nanochat_original_dir, tiny_shards_dir):
    out, _ = shuffled
    dm = _dm(nanochat_current_dir, tiny_shards_dir, cache_dir=str(out))
    dm.hooks = ["blocks.0.hook_resid_post"]
    with pytest.raises(SAELightningError, match="has no blocks.0.hook_resid_post"):
        dm.setup("fit")
    manifest = json.loads((out / "manifest.json").read_text())
    dm = _dm(nanochat_current_dir, tiny_shards_dir, cache_dir=str(out))
    dm.cache_manifest["d_in"][HOOKS[0]] = 32
    dm.hooks = [HOOKS[0]]
    with pytest.raises(SAELightningError, match="d_in=32, the SAE's is 64"):
        dm.setup("fit")
    with pytest.raises(SAELightningError, match="point data.model"):  # refused as the data module is built
        _dm(nanochat_original_dir, tiny_shards_dir, cache_dir=str(out))
    with pytest.raises(SAELightningError, match="build one with"):
        _dm(nanochat_current_dir, tiny_shards_dir, cache_dir=str(out / "nothing"))
    assert manifest["model"]["step"] == 10


def _take(iterable, n):
    it = iter(iterable)
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("workers,stop", [(0, 3), (2, 7)])
def test_cache_stream_resumes_bitwise_and_uses_the_manifest_scale(shuffled, nanochat_current_dir, tiny_shards_dir,
                                                                  workers, stop):
    out, manifest = shuffled

    def dm():
        d = _dm(nanochat_current_dir, tiny_shards_dir, cache_dir=str(out), num_workers=workers)
        d.hooks = list(HOOKS)
        d.setup("fit")
        return d

    first = dm()
    full = _take(first.train_dataloader(), 40)  # 40 x 48 tokens: over one epoch of the 1500-token cache
    for hook in HOOKS:
        assert first.scales[hook] == pytest.approx((manifest["d_in"][hook]
                                                    / manifest["mean_squared_norm"][hook]) ** 0.5)
    # one epoch holds every cached activation once (each reader's shards, in buffers of whole blocks)
    seen = torch.cat([b["acts"][HOOKS[0]] for b in full[:25]])
    cached = _read_all(out)[f"acts.{HOOKS[0]}"] * first.scales[HOOKS[0]]  # as the stream scales them
    assert len(torch.unique(torch.cat([seen, cached]), dim=0)) == len(torch.unique(cached, dim=0))
    stopped = dm()
    _take(stopped.train_dataloader(), stop + 1)  # the stream runs ahead of training_step by a batch
    stopped.on_after_batch_transfer(full[stop - 1], 0)
    state = stopped.state_dict()
    assert state["source"].startswith("cache:")
    resumed = dm()
    resumed.load_state_dict(state)
    for want, got in zip(full[stop:], _take(resumed.train_dataloader(), 40 - stop)):
        assert got["index"] == want["index"]
        for hook in HOOKS:
            assert torch.equal(got["acts"][hook], want["acts"][hook])
    live = _dm(nanochat_current_dir, tiny_shards_dir, num_workers=workers)
    live.hooks = list(HOOKS)
    with pytest.raises(SAELightningError, match="data.cache_dir"):
        live.load_state_dict(state)


def test_ranks_read_disjoint_shards(shuffled):
    out, manifest = shuffled
    hook = f"acts.{HOOKS[0]}"
    shards = [load_file(str(out / s["file"]))[hook] for s in manifest["shards"]]
    for rank in (0, 1):
        blocks = iter(cache_mod.CacheBlocks(read_manifest(out), [HOOKS[0]], 100, rank=rank, world_size=2, seed=0))
        epoch0 = []
        while True:
            item = next(blocks)
            assert item["tokens"][HOOKS[0]].shape[0] <= 100
            epoch0.append(item["tokens"][HOOKS[0]])
            if item["state"]["position"]["epoch"] == 1:
                break
        # epoch 0 in file order: rank r reads shards r, r + 2; epoch 1 starts another shard order
        assert torch.equal(torch.cat(epoch0), torch.cat(shards[rank::2]))


def test_fit_from_an_unshuffled_cache_equals_the_live_fit(tmp_path, nanochat_current_dir, tiny_shards_dir):
    out = tmp_path / "recording"
    assert main(["cache", "--model", str(nanochat_current_dir), "--data", str(tiny_shards_dir), "--hooks", HOOKS[0],
                 "--tokens", "1200", "--out", str(out), "--no-shuffle", "--shard-tokens", "250",
                 "--context-size", str(CTX), "--batch-rows", str(ROWS), "--seed", "0"]) == 0

    def fit(run, **data):
        data = {"model": str(nanochat_current_dir), "data_dir": str(tiny_shards_dir), "context_size": CTX,
                "batch_size": 64, "model_batch_rows": ROWS, "buffer_tokens": 256, "num_workers": 0,
                "val_batches": 1, "normalize": False, "seed": 0, **data}
        path = fit_config(tmp_path, run, [{"hook_name": HOOKS[0], "d_sae": 128, "k": 8}], data,
                          {"max_steps": 8, "val_check_interval": 4}, checkpoint={"every_n_train_steps": 100},
                          export={"enabled": False}, histograms={"enabled": False})
        assert main(["fit", "--config", str(path)]) == 0
        return torch.load(tmp_path / run / "last.ckpt", weights_only=True)

    live, cached = fit("live"), fit("cached", cache_dir=str(out))
    assert live["global_step"] == cached["global_step"] == 8
    assert (cached["ActivationDataModule"]["source"].startswith("cache:")
            and live["ActivationDataModule"]["source"] == "live")
    weights = [k for k in live["state_dict"] if k.startswith("saes.")]
    assert len(weights) >= 4
    for key in weights:
        assert torch.equal(live["state_dict"][key], cached["state_dict"][key]), key
