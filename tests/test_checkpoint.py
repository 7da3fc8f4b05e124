"""Loading and writing nanochat checkpoints: eras, layouts, the one-line errors, dtypes."""

import json

import pytest
import torch

from saelightning.errors import SAELightningError
from saelightning.nanochat.checkpoint import detect_era, load_nanochat, save_nanochat_checkpoint
from tests.fixtures_nanochat import make_nanochat_checkpoint, make_nanochat_model

SMALL = dict(vocab_size=300, n_layer=2)  # tokenizer-less checkpoints for the format tests


def one_line_error(match, fn, *args, **kwargs):
    with pytest.raises(SAELightningError, match=match) as e:
        fn(*args, **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("era", ["original", "current"])
def test_loads_fixture_base_dir_with_tokenizer_frozen(era, request):
    base = request.getfixturevalue(f"nanochat_{era}_dir")
    nc = load_nanochat(base)
    assert nc.meta["era"] == era and nc.meta["step"] == 10 and nc.meta["val_bpb"] == 1.5
    assert nc.meta["path"] == str(base / "base_checkpoints" / "d2")
    assert nc.meta["model_config"]["era"] == era and nc.meta["model_config"]["n_kv_head"] == 2
    assert nc.tokenizer is not None and nc.tokenizer.vocab_size == nc.model.config.vocab_size
    assert not nc.model.training and not any(p.requires_grad for p in nc.model.parameters())
    ids = nc.tokenizer.encode("def model(x): return x")
    with torch.no_grad():
        logits = nc.model(torch.tensor([ids]))
    assert logits.dtype == torch.float32 and logits.shape == (1, len(ids), nc.tokenizer.vocab_size)
    assert logits.abs().max() <= 15.0 and logits.std() > 0.1  # softcapped, not degenerate


def test_weights_round_trip_exactly(tmp_path):
    model = make_nanochat_model("current", seed=3, **SMALL).requires_grad_(False)  # (grad mode picks other kernels)
    make_nanochat_checkpoint(tmp_path, "current", seed=3, **SMALL)
    loaded = load_nanochat(tmp_path).model
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    idx = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))


def test_detect_era_both_ways_and_override(tmp_path):
    cur = make_nanochat_model("current", **SMALL).state_dict()
    orig = make_nanochat_model("original", **SMALL).state_dict()
    assert detect_era(cur) == "current" and detect_era(orig) == "original"
    assert detect_era({"_orig_mod." + k: v for k, v in cur.items()}) == "current"
    make_nanochat_checkpoint(tmp_path, "original", **SMALL)
    assert load_nanochat(tmp_path, era="original").meta["era"] == "original"
    msg = one_line_error("does not fit the 'current' nanochat era", load_nanochat, tmp_path, era="current")
    assert "missing resid_lambdas" in msg
    one_line_error("unknown nanochat era", load_nanochat, tmp_path, era="newest")


def test_intermediate_era_is_refused_naming_what_differs():
    # Jan-Mar 2026: value embeddings with a 32-channel gate, but no smear and no backout
    sd = make_nanochat_model("current", **SMALL).state_dict()
    for k in ("smear_gate.weight", "smear_lambda", "backout_lambda"):
        del sd[k]
    sd["transformer.h.1.attn.ve_gate.weight"] = torch.zeros(2, 32)
    msg = one_line_error("unsupported nanochat layout", detect_era, sd)
    assert "closest era is 'current'" in msg and "missing smear_gate.weight" in msg
    assert "transformer.h.1.attn.ve_gate.weight has shape 2x32, expected *x12" in msg
    one_line_error("unsupported nanochat layout", detect_era, {"encoder.weight": torch.zeros(2, 2)})


def test_orig_mod_prefix_is_stripped_with_removeprefix(tmp_path):
    # lstrip("_orig_mod.") would also eat the "r" of resid_lambdas: removeprefix must be used
    make_nanochat_checkpoint(tmp_path / "a", "current", key_prefix="_orig_mod.", **SMALL)
    make_nanochat_checkpoint(tmp_path / "b", "current", **SMALL)
    raw = torch.load(tmp_path / "a" / "model_000010.pt", weights_only=True)
    assert "_orig_mod.resid_lambdas" in raw
    a, b = load_nanochat(tmp_path / "a").model, load_nanochat(tmp_path / "b").model
    assert torch.equal(a.resid_lambdas, b.resid_lambdas) and torch.equal(a.lm_head.weight, b.lm_head.weight)


@pytest.mark.parametrize("era", ["original", "current"])
def test_bf16_weights_load_on_cpu(tmp_path, era):
    make_nanochat_checkpoint(tmp_path, era, weights_dtype=torch.bfloat16, **SMALL)
    model = load_nanochat(tmp_path).model
    assert model.lm_head.weight.dtype == torch.float32
    # the original era keeps its embedding table in bf16, as nanochat does
    assert model.transformer.wte.weight.dtype == (torch.bfloat16 if era == "original" else torch.float32)
    reference = make_nanochat_model(era, **SMALL)
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(p.bfloat16().to(p.dtype))
    idx = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), reference(idx), atol=1e-5, rtol=1e-5)
    half = load_nanochat(tmp_path, dtype=torch.bfloat16).model
    assert half.lm_head.weight.dtype == torch.bfloat16
    with torch.no_grad():
        out = half(idx)
    assert out.dtype == torch.float32 and (out - model(idx)).abs().max() < 0.5


def test_latest_step_is_the_highest_number_and_step_can_be_chosen(tmp_path):
    for step, seed in ((99, 1), (100, 2), (5, 3)):
        make_nanochat_checkpoint(tmp_path, "current", step=step, seed=seed, **SMALL)
    (tmp_path / "optim_000100_rank0.pt").write_bytes(b"ignored")
    assert load_nanochat(tmp_path).meta["step"] == 100
    assert load_nanochat(tmp_path, step=5).meta["step"] == 5
    assert load_nanochat(tmp_path / "model_000099.pt").meta["step"] == 99
    one_line_error(r"no model_000007.pt .*available steps: \[5, 99, 100\]", load_nanochat, tmp_path, step=7)


def test_base_dir_picks_deepest_tag_and_source(tmp_path):
    make_nanochat_checkpoint(tmp_path / "base_checkpoints" / "d2", "current", **SMALL)
    make_nanochat_checkpoint(tmp_path / "base_checkpoints" / "d10", "original", **SMALL)  # d10 > d2
    make_nanochat_checkpoint(tmp_path / "chatsft_checkpoints" / "d2", "current", step=7, **SMALL)
    assert load_nanochat(tmp_path).meta["era"] == "original"
    assert load_nanochat(tmp_path, model_tag="d2").meta["era"] == "current"
    assert load_nanochat(tmp_path, source="sft").meta["step"] == 7
    assert load_nanochat(tmp_path).tokenizer is None  # no tokenizer/ anywhere above
    one_line_error("unknown checkpoint source", load_nanochat, tmp_path, source="pretrain")
    one_line_error("no model_\\*.pt files in", load_nanochat, tmp_path, model_tag="d99")


def test_bad_inputs_are_one_line_errors(tmp_path):
    one_line_error("does not exist", load_nanochat, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    one_line_error("no model_\\*.pt in .* and no base_checkpoints/", load_nanochat, tmp_path / "empty")

    ck = make_nanochat_checkpoint(tmp_path / "ck", "current", **SMALL)
    meta = ck / "meta_000010.json"
    good_meta = meta.read_text()
    meta.write_text(json.dumps({"step": 10}))
    one_line_error("has no model_config dict", load_nanochat, ck)
    meta.write_text("{not json")
    one_line_error("cannot read .* as JSON", load_nanochat, ck)
    meta.write_text(json.dumps({"model_config": {"n_layer": 2}}))
    one_line_error("lacks sequence_len, vocab_size", load_nanochat, ck)
    meta.unlink()
    one_line_error("meta_000010.json is missing", load_nanochat, ck)
    meta.write_text(good_meta.replace('"n_head": 4', '"n_head": 2'))  # wrong head split: c_k has other shape
    one_line_error("weights do not fit model_config", load_nanochat, ck)
    meta.write_text(good_meta)

    model_file = ck / "model_000010.pt"
    data = model_file.read_bytes()
    model_file.write_bytes(data[: len(data) // 2])
    one_line_error("corrupt or truncated", load_nanochat, ck)
    torch.save({"weights": [1, 2]}, model_file)
    one_line_error("not a state dict of tensors", load_nanochat, ck)
    (tmp_path / "x.pt").write_bytes(b"")
    one_line_error("not a nanochat model_XXXXXX.pt file", load_nanochat, tmp_path / "x.pt")


def test_tokenizer_with_other_vocab_is_refused(tmp_path, tiny_tokenizer_dir):
    import shutil

    shutil.copytree(tiny_tokenizer_dir, tmp_path / "tokenizer")
    make_nanochat_checkpoint(tmp_path / "base_checkpoints" / "d2", "current", **SMALL)
    one_line_error("has 512 tokens but the model's vocab_size is 300", load_nanochat, tmp_path)


def test_save_writes_nanochat_format(tmp_path):
    model = make_nanochat_model("original", **SMALL)
    config = {**model.config.__dict__}
    path = save_nanochat_checkpoint(tmp_path / "d2", 42, model.state_dict(), config, extra_meta={"val_bpb": 0.9})
    assert path == tmp_path / "d2" / "model_000042.pt"
    assert sorted(p.name for p in (tmp_path / "d2").iterdir()) == ["meta_000042.json", "model_000042.pt"]
    meta = json.loads((tmp_path / "d2" / "meta_000042.json").read_text())
    # exactly nanochat's GPTConfig kwargs of the era: no "era", and the original had no window_pattern
    assert meta == {"step": 42, "val_bpb": 0.9, "model_config": {
        "sequence_len": 128, "vocab_size": 300, "n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 64}}
    sd = torch.load(path, weights_only=True)
    assert sd.keys() == model.state_dict().keys() and sd["transformer.wte.weight"].dtype == torch.bfloat16


def test_original_era_checkpoint_with_a_padded_vocabulary_crops_the_logits(tmp_path):
    """Dec 2025 original-era checkpoints store wte/lm_head padded to a multiple of 64 (vocab 300 -> 320)."""
    from dataclasses import asdict

    from saelightning.nanochat.model import GPT, GPTConfig
    from tests.fixtures_nanochat import FIXTURE_CONFIG, randomize_

    config = GPTConfig(**{**FIXTURE_CONFIG, "sequence_len": 64, "vocab_size": 300}, era="original")
    padded = randomize_(GPT(config, pad_vocab_size_to=64), seed=5).eval()
    sd = padded.state_dict()
    assert sd["transformer.wte.weight"].shape[0] == sd["lm_head.weight"].shape[0] == 320
    save_nanochat_checkpoint(tmp_path, 7, sd, asdict(config))
    loaded = load_nanochat(tmp_path).model
    # the same model without the padding rows: the padded rows must neither show up nor change anything
    plain = GPT(config).eval()
    plain.load_state_dict({k: v[:300] if k in ("transformer.wte.weight", "lm_head.weight") else v
                           for k, v in sd.items()})
    idx = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        logits = loaded(idx)
        assert logits.shape == (2, 24, 300)
        assert torch.equal(logits, plain(idx))
