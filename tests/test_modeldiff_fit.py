"""A crosscoder trained end to end on two nanochat checkpoints of one run (data.models): aligned activations,
export naming every model, the Δ histogram and class counts in TensorBoard, bitwise resume, and the one-line
errors for models a crosscoder cannot read together."""

import json
import re
import shutil

import pytest
import torch
import yaml
from safetensors import safe_open

from saelightning import resolve
from saelightning.cache import read_manifest
from saelightning.cli import main
from saelightning.export import load_sae
from saelightning.modeldiff import relative_norms
from saelightning.nanochat.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer
from saelightning.tokens import val_batches
from tests.fits import ddp_fit, fit_config
from tests.fixtures_data import TINY_VOCAB, tiny_texts
from tests.fixtures_nanochat import FIXTURE_TAG, make_nanochat_checkpoint
from tests.test_browser import CHROMIUM, assert_clean, dump_dom

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def two_stages(tmp_path_factory, nanochat_current_dir):
    """The fixture's base dir with a second stage: chatsft_checkpoints/d2, another model of the same family."""
    base = tmp_path_factory.mktemp("two_stages") / "nanochat"
    shutil.copytree(nanochat_current_dir, base)
    vocab = json.loads(next((base / "base_checkpoints" / FIXTURE_TAG).glob("meta_*.json")).read_text())
    make_nanochat_checkpoint(base / "chatsft_checkpoints" / FIXTURE_TAG, "current", step=20, seed=1,
                             vocab_size=vocab["model_config"]["vocab_size"])
    return base


def _chat_file(tmp_path):
    """Conversations in nanochat's CustomJSON lines, for data.chat."""
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps([{"role": "user", "content": f"what does f{i}() return?"},
                                          {"role": "assistant", "content": f"f{i}() returns x + {i}"}])
                              for i in range(50)))
    return str(path)


def _config(tmp_path, base, shards, run="run", models=None, chat=None, **trainer):
    saes = [{"hook_name": HOOK, "architecture": "crosscoder", "d_sae": 128, "k": 8, "name": "cc"},
            {"hook_name": f"chat/{HOOK}", "d_sae": 64, "k": 4, "name": "chat_sae"}]
    data = {"model": str(base), "data_dir": str(shards), "context_size": 32, "batch_size": 64,
            "model_batch_rows": 4, "buffer_tokens": 256, "num_workers": 1, "val_batches": 2, "scale_batches": 2,
            "models": models or [{"name": "base", "source": "base"}, {"name": "chat", "source": "sft"}],
            **({"chat": chat, "chat_fraction": 0.25} if chat else {})}
    return fit_config(tmp_path, run, saes, data,
                      {"max_steps": 6, "val_check_interval": 3, "log_every_n_steps": 2, **trainer},
                      checkpoint={"every_n_train_steps": 2}, resample={"every_n_steps": 0})


def test_crosscoder_fit_reads_both_models_exports_them_and_diffs(tmp_path, two_stages, tiny_shards_dir, monkeypatch,
                                                                  capsys):
    from saelightning.nanochat.model import GPT

    calls = []
    original = GPT.run_with_cache

    def counted(self, idx, names, *args, **kwargs):
        calls.append((self.config.n_embd, tuple(names), idx.clone()))
        return original(self, idx, names, *args, **kwargs)

    monkeypatch.setattr(GPT, "run_with_cache", counted)
    chat = _chat_file(tmp_path)
    assert main(["fit", "--config", str(_config(tmp_path, two_stages, tiny_shards_dir, chat=chat))]) == 0
    # the two models ran on the same token batches, one forward each per batch (the chat SAE shares chat's)
    assert len(calls) % 2 == 0 and all(torch.equal(a[2], b[2]) for a, b in zip(calls[::2], calls[1::2]))
    run = tmp_path / "run"
    cc = load_sae(run / "saes" / "cc")
    assert type(cc).__name__ == "CrossCoder" and cc.n_models == 2 and cc.d_model == 64
    meta = json.loads((run / "saes" / "cc" / "cfg.json").read_text())
    assert meta["n_models"] == 2 and meta["d_in"] == 64 and meta["architecture"] == "crosscoder"
    meta = meta["metadata"]
    assert meta["hook_name"] == HOOK
    assert [(m["name"], m["stage"], m["step"]) for m in meta["models"]] == [("base", "base", 10), ("chat", "sft", 20)]
    assert all(m["path"].endswith(f"{FIXTURE_TAG}") for m in meta["models"])
    assert (meta["trained_on"]["chat"], meta["trained_on"]["chat_fraction"]) == (chat, 0.25)
    assert sum(meta["diff"]["class_counts"].values()) == 128 and "chat-only" in meta["diff"]["class_counts"]
    assert len(meta["input_scale_folded"]) == 2  # each model normalised on its own
    assert json.loads((run / "saes" / "chat_sae" / "cfg.json").read_text())["metadata"]["hook_name"] == f"chat/{HOOK}"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "lightning_logs" / "version_0")).Reload()
    assert "cc/diff/relative_decoder_norm" in events.Tags()["histograms"]
    counts = [events.Scalars(f"cc/diff/{c}")[-1].value for c in ("base-only", "chat-only", "shared", "other")]
    assert sum(counts) == 128 and len(events.Scalars("cc/diff/shared")) == 2  # at each validation
    assert events.Scalars("cc/val/explained_variance")
    assert events.Scalars("cc/val/explained_variance/base") and events.Scalars("cc/val/explained_variance/chat")
    # saelightning diff on the export: every latent, its Δ as the weights give it, both models' figures
    report_file = tmp_path / "diff.json"
    assert main(["diff", "--sae", str(run / "saes" / "cc"), "--tokens", "300", "--out", str(report_file),
                 "--site", str(tmp_path / "site"), "--site_latents", "5", "--quiet"]) == 0
    report = json.loads(report_file.read_text())
    # its site: the 5 latents furthest from Δ = 0.5, each with both models' contexts and logit effects
    pages = sorted((tmp_path / "site" / "latents").glob("*.html"))
    far = sorted(range(128), key=lambda i: -abs(report["latents"][i]["delta"] - 0.5))[:5]
    assert sorted(int(p.stem) for p in pages) == sorted(far)
    index = (tmp_path / "site" / "index.html").read_text()
    deltas = [report["latents"][int(i)]["delta"] for i in re.findall(r'href="latents/(\d+)\.html"', index)]
    assert deltas == sorted(deltas, reverse=True) and len(deltas) == 5
    if CHROMIUM is not None:
        fired_page = next(p for p in pages if report["latents"][int(p.stem)]["density"])
        dom = dump_dom(fired_page.as_uri(), tmp_path)
        assert_clean(dom)
        assert dom.count('<table class="context">') >= 1 and 'data-model="chat"' in dom
    assert report["hook_name"] == HOOK and (report["a"], report["b"]) == ("base", "chat")
    assert len(report["latents"]) == 128 and sum(report["class_counts"].values()) == 128
    assert [round(lat["delta"], 5) for lat in report["latents"]] == [round(float(v), 5) for v in relative_norms(cc)]
    assert set(report["explained_variance"]) == {"base", "chat"} and report["tokens_evaluated"] >= 300
    fired = [lat for lat in report["latents"] if lat["density"]]
    assert fired and all(len(lat["beta_error"]) == 2 and lat["nu_error"] is not None for lat in fired)
    # the val text mixes in the held-out conversations as trained; where each latent fires is counted
    on = report["chat"]["tokens_on"]
    assert report["chat"]["chat_fraction"] == 0.25 and on["assistant"] > 0 and on["user"] > 0
    assert sum(on[r] for r in ("text", "user", "assistant")) == report["tokens_evaluated"]
    assert 0 < on["chat_markers"] < on["user"] + on["assistant"]
    for lat in report["latents"]:  # every firing is in one region
        fires = sum(lat["fires_on"][r] for r in ("text", "user", "assistant"))
        assert fires == round(lat["density"] * report["tokens_evaluated"]) and lat["fires_on"]["chat_markers"] <= fires
    by_class = report["chat"]["by_class"]
    assert sum(row["firing"] for row in by_class.values()) == len(fired)
    # eval and diff read the recorded mix: the held-out tenth (5 of 50), at the trained share; a flag overrides it
    tokenizer = load_tokenizer(two_stages / "tokenizer")
    mix = resolve.val_chat(tokenizer, [run / "saes" / "cc"], None, None)
    assert (mix.source, mix.fraction, len(mix.conversations)) == (chat, 0.25, 5)
    assert resolve.val_chat(tokenizer, [run / "saes" / "cc"], None, 0.0) is None
    # saelightning eval on the crosscoder: each model, its own reconstruction spliced into its own forward
    eval_file = tmp_path / "eval.json"
    assert main(["eval", "--sae", str(run / "saes" / "cc"), "--tokens", "300", "--out", str(eval_file),
                 "--quiet"]) == 0
    evaluated = json.loads(eval_file.read_text())
    assert [e["hook_name"] for e in evaluated["saes"]] == [f"base/{HOOK}", f"chat/{HOOK}"]
    assert evaluated["tokens_evaluated"] == 300 + (-300 % 32)
    by_model = {e["model"]["name"]: e["metrics"] for e in evaluated["saes"]}
    for name in ("base", "chat"):  # the same rows as diff's, the same reconstruction
        assert by_model[name]["explained_variance"] == pytest.approx(report["explained_variance"][name], abs=1e-5)
    rows = torch.cat(list(val_batches(resolve.shards(tiny_shards_dir)[1], tokenizer, 32, 10, 8, chat=mix)))
    keep = rows != tokenizer.bos_id
    scored = keep[:, :-1] & keep[:, 1:]
    models = [resolve.load_model(str(two_stages), source=s, dtype=torch.float32).model for s in ("base", "sft")]
    x = torch.cat([m.run_with_cache(rows, [HOOK])[HOOK][keep] for m in models], -1)
    with torch.no_grad():
        x_hat = cc.decode(cc.encode(x))
    for i, (name, m) in enumerate(zip(("base", "chat"), models)):
        own = x_hat[:, i * 64:(i + 1) * 64]

        def spliced(h, own=own):
            out = h.clone()
            out[keep] = own
            return out

        with torch.no_grad():
            ce = [torch.nn.functional.cross_entropy(logits[:, :-1][scored], rows[:, 1:][scored]).item()
                  for logits in (m(rows), m(rows, hooks={HOOK: spliced}))]
        assert by_model[name]["ce_loss_without_sae"] == pytest.approx(ce[0], rel=1e-5)
        assert by_model[name]["ce_loss_with_sae"] == pytest.approx(ce[1], rel=1e-5)
    assert by_model["base"]["ce_loss_without_sae"] != by_model["chat"]["ce_loss_without_sae"]
    assert all(0 < by_model[n]["kl_div_with_sae"] and "kl_div_score" in by_model[n] for n in by_model)
    # an SAE is not a crosscoder: one line
    capsys.readouterr()
    assert main(["diff", "--sae", str(run / "saes" / "chat_sae")]) == 2
    assert "not a crosscoder" in capsys.readouterr().err


@pytest.mark.slow  # three fits, ~25 s on the shared 2-core CPU
def test_crosscoder_resume_is_bitwise_equal(tmp_path, two_stages, tiny_shards_dir):
    chat = _chat_file(tmp_path)  # the mixed stream's position (conversations taken, chat share) resumes too
    whole = _config(tmp_path, two_stages, tiny_shards_dir, run="whole", chat=chat)
    assert main(["fit", "--config", str(whole)]) == 0
    parts = _config(tmp_path, two_stages, tiny_shards_dir, run="parts", chat=chat)
    assert main(["fit", "--config", str(parts), "--trainer.max_steps", "4"]) == 0  # mid-buffer: 4 batches a fill
    # another chat mix is another stream: refused, in one line
    assert main(["fit", "--config", str(parts), "--ckpt_path", "last", "--data.chat_fraction", "0.5"]) == 2
    assert main(["fit", "--config", str(parts), "--ckpt_path", "last"]) == 0
    a = torch.load(tmp_path / "whole" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "parts" / "last.ckpt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_models_a_crosscoder_cannot_read_together_get_one_line(tmp_path, two_stages, tiny_shards_dir, capsys):
    wide = tmp_path / "wide"
    shutil.copytree(two_stages, wide)
    shutil.rmtree(wide / "chatsft_checkpoints")
    make_nanochat_checkpoint(wide / "chatsft_checkpoints" / FIXTURE_TAG, "current", step=20, n_embd=128, n_head=4,
                             vocab_size=json.loads(next((wide / "base_checkpoints" / FIXTURE_TAG).glob("meta_*.json"))
                                                   .read_text())["model_config"]["vocab_size"])
    # another run: its own tokenizer (the same vocabulary size, other merges)
    other = tmp_path / "other"
    save_tokenizer(train_tokenizer([t[::-1] for t in tiny_texts()], TINY_VOCAB), other / "tokenizer")
    make_nanochat_checkpoint(other / "base_checkpoints" / FIXTURE_TAG, "current", vocab_size=TINY_VOCAB)
    cases = {
        "width (n_embd) 128 but 'base' has 64": _config(tmp_path, wide, tiny_shards_dir, run="a"),
        "has another tokenizer than 'base'": _config(tmp_path, two_stages, tiny_shards_dir, run="b", models=[
            {"name": "base"}, {"name": "chat", "path": str(other)}]),
        "distinct names": _config(tmp_path, two_stages, tiny_shards_dir, run="c",
                                  models=[{"name": "base"}, {"name": "base", "source": "sft"}]),
    }
    for fragment, cfg in cases.items():
        capsys.readouterr()
        assert main(["fit", "--config", str(cfg)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and fragment in err[0], err
        assert not (tmp_path / cfg.stem).exists()  # nothing written


# --- `saelightning cache --models`: every model's activations on the same rows, for a crosscoder ---------------

MODELS_FLAG = "[{name: base, source: base}, {name: chat, source: sft}]"


def _cache_models(tmp_path, base, shards, chat, out="recording"):
    out = tmp_path / out
    assert main(["cache", "--model", str(base), "--models", MODELS_FLAG, "--chat", chat, "--chat-fraction", "0.25",
                 "--data", str(shards), "--hooks", HOOK, "--tokens", "800", "--out", str(out), "--no-shuffle",
                 "--shard-tokens", "250", "--context-size", "32", "--batch-rows", "4", "--seed", "0", "--quiet"]) == 0
    return out


def _cached_config(tmp_path, base, shards, run, chat, **data):
    """_config's crosscoder and chat SAE, unnormalised (a cache's scale is its whole stream's), one reader; 5 steps
    of 64 tokens from a buffer of 256: into the second fill."""
    path = _config(tmp_path, base, shards, run=run, chat=chat, max_steps=5, val_check_interval=5)
    config = yaml.safe_load(path.read_text())
    config["data"].update(num_workers=0, val_batches=1, normalize=False, seed=0, **data)
    config["export"] = {"enabled": False}
    path.write_text(yaml.safe_dump(config))
    return path


def test_crosscoder_fit_from_a_cache_of_every_model_equals_the_live_fit(tmp_path, two_stages, tiny_shards_dir):
    """An unshuffled cache of both models (the chat mix included) is the live stream recorded: a crosscoder and an
    SAE on one model's key trained from it are the live-trained ones, bit for bit."""
    chat = _chat_file(tmp_path)
    out = _cache_models(tmp_path, two_stages, tiny_shards_dir, chat)
    manifest = read_manifest(out)
    assert manifest["hooks"] == [f"base/{HOOK}", f"chat/{HOOK}"] and set(manifest["d_in"].values()) == {64}
    assert [(m["name"], m["stage"], m["step"]) for m in manifest["models"]] == [("base", "base", 10),
                                                                                ("chat", "sft", 20)]
    assert (manifest["chat"]["chat"], manifest["chat"]["chat_fraction"], manifest["chat"]["conversations"]) == \
        (chat, 0.25, 45)  # the train split: all but every tenth of the 50
    with safe_open(str(out / manifest["shards"][0]["file"]), framework="pt") as f:
        base, other = f.get_tensor(f"acts.base/{HOOK}"), f.get_tensor(f"acts.chat/{HOOK}")
    assert base.shape == other.shape == (250, 64) and not torch.equal(base, other)  # two models, one row order

    def fit(run, **data):
        assert main(["fit", "--config", str(_cached_config(tmp_path, two_stages, tiny_shards_dir, run, chat,
                                                           **data))]) == 0
        return torch.load(tmp_path / run / "last.ckpt", weights_only=True)

    live, cached = fit("live"), fit("cached", cache_dir=str(out))
    assert live["global_step"] == cached["global_step"] == 5
    assert cached["ActivationDataModule"]["source"].startswith("cache:")
    weights = [k for k in live["state_dict"] if k.startswith("saes.")]
    assert {"saes.cc.W_dec", "saes.chat_sae.W_dec"} <= set(weights)
    for key in weights:
        assert torch.equal(live["state_dict"][key], cached["state_dict"][key]), key


def test_a_cache_of_other_models_or_another_chat_mix_is_refused_in_one_line(tmp_path, two_stages, tiny_shards_dir,
                                                                             capsys):
    chat = _chat_file(tmp_path)
    out = _cache_models(tmp_path, two_stages, tiny_shards_dir, chat)
    manifest = json.loads((out / "manifest.json").read_text())
    alien = tmp_path / "alien"  # the same cache, as if tokenized by another run's tokenizer
    shutil.copytree(out, alien)
    (alien / "manifest.json").write_text(json.dumps({**manifest, "tokenizer": "0" * 16}))
    cases = {
        "mixed chat": dict(cache_dir=str(out), chat_fraction=0.5),
        "was made from base": dict(cache_dir=str(out), models=[{"name": "base"}, {"name": "chat", "source": "base"}]),
        "another tokenizer": dict(cache_dir=str(alien)),
    }
    for i, (fragment, data) in enumerate(cases.items()):
        capsys.readouterr()
        assert main(["fit", "--config", str(_cached_config(tmp_path, two_stages, tiny_shards_dir, f"r{i}", chat,
                                                           **data))]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and fragment in err[0], err
        assert not (tmp_path / f"r{i}").exists()  # nothing written
    # a cache of one model is not a cache of both, and the other way round
    single = tmp_path / "single"
    assert main(["cache", "--model", str(two_stages), "--data", str(tiny_shards_dir), "--hooks", HOOK, "--tokens",
                 "100", "--out", str(single), "--context-size", "32", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["fit", "--config", str(_cached_config(tmp_path, two_stages, tiny_shards_dir, "r3", None,
                                                       cache_dir=str(single)))]) == 2
    assert "holds one model's activations" in capsys.readouterr().err
    assert main(["cache", "--model", str(two_stages), "--models", "[{name: base}, {name: chat, source: sft}]",
                 "--data", str(tiny_shards_dir), "--hooks", f"chat/{HOOK}", "--tokens", "100",
                 "--out", str(tmp_path / "keyed")]) == 2
    assert "give the plain hook" in capsys.readouterr().err and not (tmp_path / "keyed").exists()


@pytest.mark.slow  # three two-process fits of two models, ~1-2 min on the shared 2-core CPU
def test_two_process_ddp_crosscoder_fit_with_a_chat_mix_resumes_bitwise(tmp_path, two_stages, tiny_shards_dir):
    """Under DDP each rank runs both models on its own stream (its own stride of the conversations); both ranks'
    positions, chat counts included, are in the checkpoint, and a resume from it is exact."""
    chat = _chat_file(tmp_path)
    def fit(run, *extra):
        cfg = _config(tmp_path, two_stages, tiny_shards_dir, run=run, chat=chat)
        return ddp_fit(cfg, tmp_path / run, *extra, timeout=400)

    whole = fit("whole")
    positions = whole["ActivationDataModule"]["positions"]
    assert [p["index"] for p in positions] == [6, 6]
    mixed = [next(iter(p["reader"]["workers"].values()))["mixed"] for p in positions]
    assert mixed[0] != mixed[1] and all(m[0] > 0 for m in mixed)  # each rank took conversations of its own
    assert whole["state_dict"]["tokens_seen"].item() == 6 * 64 * 2
    fit("parts", "--trainer.max_steps", "4")  # mid-buffer: 4 batches a fill
    parts = fit("parts", "--ckpt_path", "last")
    assert parts["global_step"] == 6
    for key in whole["state_dict"]:
        assert torch.equal(whole["state_dict"][key], parts["state_dict"][key]), key
