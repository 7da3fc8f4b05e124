"""The SAELens-layout export: exact round trips, the cfg.json SAELens reads, scale folding,
atomic replacement, and one-line refusals of bad or damaged directories."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from saelightning import export
from saelightning.errors import SAELightningError
from saelightning.export import load_sae, load_sparsity, save_sae
from saelightning.saes import ARCHITECTURES, SAEConfig, build_sae
from saelightning.saes.base import CROSSCODERS

pytestmark = pytest.mark.numerics  # fp32 results compared across code paths: also run under other CPU kernels

D_IN, D_SAE = 8, 32
SAELENS_NAMES = {
    "topk": ("topk", {"W_enc", "b_enc", "W_dec", "b_dec"}),
    "relu": ("standard", {"W_enc", "b_enc", "W_dec", "b_dec"}),
    "jumprelu": ("jumprelu", {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}),
    "batchtopk": ("jumprelu", {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}),
    "matryoshka": ("jumprelu", {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}),
    "gated": ("gated", {"W_enc", "b_gate", "b_mag", "r_mag", "W_dec", "b_dec"}),
}

SAE_ARCHITECTURES = [a for a in ARCHITECTURES if a not in CROSSCODERS]  # crosscoders: tests/test_crosscoder.py


def trained_like(arch, scale=1.0):
    sae = build_sae(SAEConfig(architecture=arch, d_in=D_IN, d_sae=D_SAE, k=4))
    with torch.no_grad():
        for param in sae.parameters():
            param.add_(0.1 * torch.randn_like(param))
        if arch in ("batchtopk", "matryoshka"):
            sae.threshold.fill_(0.15)
        sae.input_scale.fill_(scale)
    return sae.eval()


@pytest.mark.parametrize("arch", ["topk", "relu", "jumprelu", "gated"])
def test_round_trip_is_exact(tmp_path, arch):
    sae = trained_like(arch)
    save_sae(sae, tmp_path / "sae", metadata={"hook_name": "blocks.1.hook_resid_post", "context_size": 64})
    loaded = load_sae(tmp_path / "sae")
    assert type(loaded) is type(sae) and not loaded.training
    original = dict(sae.named_parameters())
    for name, param in loaded.named_parameters():
        assert torch.equal(param, original[name]), name
    assert loaded.metadata["hook_name"] == "blocks.1.hook_resid_post" and loaded.metadata["context_size"] == 64
    x = torch.randn(16, D_IN)
    assert torch.equal(loaded.encode(x), sae.encode(x))
    # frozen for inference unless asked: no autograd graph, no grads collected by accident
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.encode(x).requires_grad
    assert all(p.requires_grad for p in load_sae(tmp_path / "sae", trainable=True).parameters())


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_batch_topk_exports_as_jumprelu_with_its_threshold(tmp_path, arch):
    sae = trained_like(arch)
    save_sae(sae, tmp_path / "sae")
    loaded = load_sae(tmp_path / "sae")
    assert type(loaded).__name__ == "JumpReLUSAE"
    assert torch.equal(loaded.threshold, torch.full((D_SAE,), 0.15))
    x = torch.randn(64, D_IN)
    assert torch.equal(loaded.encode(x), sae.encode(x))  # sae is in eval mode: the threshold path


@pytest.mark.parametrize("arch", SAE_ARCHITECTURES)
def test_cfg_and_tensors_follow_the_saelens_layout(tmp_path, arch):
    save_sae(trained_like(arch), tmp_path / "sae", metadata={"hook_name": "blocks.0.hook_mlp_out"})
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    saelens_arch, names = SAELENS_NAMES[arch]
    assert cfg["architecture"] == saelens_arch
    assert {k: cfg[k] for k in ("d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input", "normalize_activations",
                                "reshape_activations")} == {
        "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
        "normalize_activations": "none", "reshape_activations": "none"}
    assert cfg["metadata"]["hook_name"] == "blocks.0.hook_mlp_out"
    assert cfg["metadata"]["sae_lens_version"].startswith("6.")
    if arch == "topk":
        assert cfg["k"] == 4 and cfg["rescale_acts_by_decoder_norm"] is False
    else:
        assert "k" not in cfg
    shapes = {"W_enc": (D_IN, D_SAE), "W_dec": (D_SAE, D_IN), "b_dec": (D_IN,)}
    with safe_open(str(tmp_path / "sae" / "sae_weights.safetensors"), framework="pt") as f:
        assert set(f.keys()) == names
        for name in f.keys():
            assert tuple(f.get_tensor(name).shape) == shapes.get(name, (D_SAE,))
            assert f.get_tensor(name).dtype == torch.float32
    assert not (tmp_path / "sae" / "sparsity.safetensors").exists()


@pytest.mark.parametrize("arch", SAE_ARCHITECTURES)
def test_export_folds_the_input_scale(tmp_path, arch):
    sae = trained_like(arch, scale=4.0)
    save_sae(sae, tmp_path / "sae")
    loaded = load_sae(tmp_path / "sae")
    raw = torch.randn(32, D_IN) * 0.25
    with torch.no_grad():
        latents = sae.encode(raw * 4.0)
        assert float(loaded.input_scale) == 1.0
        assert torch.allclose(loaded.encode(raw), latents, atol=1e-5)
        assert torch.allclose(loaded.decode(latents), sae.decode(latents) / 4.0, atol=1e-5)
    assert json.loads((tmp_path / "sae" / "cfg.json").read_text())["metadata"]["input_scale_folded"] == 4.0


def test_sparsity_file(tmp_path):
    density = torch.rand(D_SAE)
    save_sae(trained_like("topk"), tmp_path / "sae", sparsity=torch.log10(density + 1e-10))
    with safe_open(str(tmp_path / "sae" / "sparsity.safetensors"), framework="pt") as f:
        assert list(f.keys()) == ["sparsity"]
    assert torch.allclose(load_sparsity(tmp_path / "sae"), torch.log10(density + 1e-10))
    with pytest.raises(SAELightningError, match="log10"):
        save_sae(trained_like("topk"), tmp_path / "other", sparsity=density + 0.5)
    with pytest.raises(SAELightningError, match="shape"):
        save_sae(trained_like("topk"), tmp_path / "other", sparsity=torch.zeros(D_SAE + 1))
    assert not (tmp_path / "other").exists()


def test_refuses_non_finite_weights_and_keeps_the_previous_export(tmp_path):
    good = trained_like("topk")
    save_sae(good, tmp_path / "sae")
    bad = trained_like("topk")
    with torch.no_grad():
        bad.W_dec[3, 1] = float("nan")
    with pytest.raises(SAELightningError, match="W_dec has NaN"):
        save_sae(bad, tmp_path / "sae")
    assert torch.equal(load_sae(tmp_path / "sae").W_dec, good.W_dec)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]


def test_replaces_an_existing_export_atomically(tmp_path, monkeypatch):
    first, second = trained_like("relu"), trained_like("relu")
    save_sae(first, tmp_path / "sae")
    save_sae(second, tmp_path / "sae")
    assert torch.equal(load_sae(tmp_path / "sae").W_enc, second.W_enc)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export, "save_file", fail)  # a crash while writing the new files
    with pytest.raises(OSError):
        save_sae(first, tmp_path / "sae")
    assert torch.equal(load_sae(tmp_path / "sae").W_enc, second.W_enc)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]  # no temporary directory left


def test_metadata_must_be_json(tmp_path):
    with pytest.raises(SAELightningError, match="JSON"):
        save_sae(trained_like("topk"), tmp_path / "sae", metadata={"bad": object()})
    assert not (tmp_path / "sae").exists()
    metrics = {"explained_variance": torch.tensor(0.75), "kl": float("nan"), "path": tmp_path, "steps": (1, 2)}
    save_sae(trained_like("topk"), tmp_path / "sae", metadata={"final_metrics": metrics})
    saved = json.loads((tmp_path / "sae" / "cfg.json").read_text())["metadata"]["final_metrics"]
    assert saved == {"explained_variance": 0.75, "kl": None, "path": str(tmp_path), "steps": [1, 2]}


def test_loads_a_saelens_written_directory(tmp_path):
    # exactly what SAELens 6.x save_model writes for a gated SAE (cfg.json and tensor names)
    d = tmp_path / "saelens_gated"
    d.mkdir()
    cfg = {"d_in": 4, "d_sae": 8, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
           "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"sae_lens_version": "6.54.12", "sae_lens_training_version": "6.54.12"}, "architecture": "gated"}
    (d / "cfg.json").write_text(json.dumps(cfg))
    gen = torch.Generator().manual_seed(0)
    t = {"W_dec": torch.randn(8, 4, generator=gen), "W_enc": torch.randn(4, 8, generator=gen),
         "b_dec": torch.randn(4, generator=gen), "b_gate": torch.randn(8, generator=gen),
         "b_mag": torch.randn(8, generator=gen), "r_mag": torch.randn(8, generator=gen)}
    save_file(t, str(d / "sae_weights.safetensors"))
    sae = load_sae(d)
    x = torch.randn(5, 4, generator=gen)
    centered = x - t["b_dec"]
    gate = centered @ t["W_enc"] + t["b_gate"]
    mag = centered @ (t["W_enc"] * t["r_mag"].exp()) + t["b_mag"]
    expected = (gate > 0).float() * mag.relu()
    assert torch.allclose(sae.encode(x), expected, atol=1e-6)
    assert torch.allclose(sae.decode(expected), expected @ t["W_dec"] + t["b_dec"], atol=1e-6)


def test_loads_a_pre6_saelens_topk_directory(tmp_path):
    # SAELens 5.x: TopK as architecture "standard" + activation_fn "topk", metadata keys at the top level
    sae = trained_like("topk")
    save_sae(sae, tmp_path / "sae")
    cfg = {"architecture": "standard", "d_in": D_IN, "d_sae": D_SAE, "dtype": "torch.float32", "device": "cpu",
           "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 4}, "apply_b_dec_to_input": True,
           "normalize_activations": False, "hook_point": "blocks.3.hook_resid_pre", "context_size": 128}
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(cfg))
    loaded = load_sae(tmp_path / "sae")
    assert type(loaded).__name__ == "TopKSAE" and loaded.config.k == 4
    assert loaded.metadata == {"hook_name": "blocks.3.hook_resid_pre", "context_size": 128}
    x = torch.randn(8, D_IN)
    assert torch.equal(loaded.encode(x), sae.encode(x))
    cfg["activation_fn_str"] = "tanh-relu"
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SAELightningError, match="activation_fn 'tanh-relu'"):
        load_sae(tmp_path / "sae")


def test_apply_b_dec_to_input_false_is_honoured(tmp_path):
    sae = build_sae(SAEConfig(architecture="relu", d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=False))
    with torch.no_grad():
        sae.b_dec.fill_(5.0)
    save_sae(sae, tmp_path / "sae")
    loaded = load_sae(tmp_path / "sae")
    x = torch.randn(3, D_IN)
    assert torch.allclose(loaded.encode(x), (x @ loaded.W_enc + loaded.b_enc).relu())


# ---- damaged or foreign directories: one line each ----------------------------------------------
def _exported(tmp_path):
    save_sae(trained_like("topk"), tmp_path / "sae")
    return tmp_path / "sae"


def _edit_cfg(path, **changes):
    cfg = json.loads((path / "cfg.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key)
        else:
            cfg[key] = value
    (path / "cfg.json").write_text(json.dumps(cfg))


def _truncate(path):
    file = path / "sae_weights.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _garbage(path):
    (path / "sae_weights.safetensors").write_bytes(b"\x07\x00\x00\x00\x00\x00\x00\x00not json")


BAD = {
    "missing dir": (lambda p: p.rename(p.parent / "elsewhere"), "no SAE directory"),
    "missing cfg": (lambda p: (p / "cfg.json").unlink(), "missing .*cfg.json"),
    "missing weights": (lambda p: (p / "sae_weights.safetensors").unlink(), "missing .*sae_weights"),
    "truncated": (_truncate, "truncated or corrupt"),
    "corrupt": (_garbage, "truncated or corrupt"),
    "invalid json": (lambda p: (p / "cfg.json").write_text("{not json"), "not valid JSON"),
    "shape mismatch": (lambda p: _edit_cfg(p, d_in=D_IN + 1), "shape .* but cfg.json implies"),
    # (SAELens's "transcoder" is read now: a transcoder missing d_out is its own row below)
    "unknown architecture": (lambda p: _edit_cfg(p, architecture="hypercoder"),
                             "unknown SAE architecture 'hypercoder'"),
    "transcoder without d_out": (lambda p: _edit_cfg(p, architecture="transcoder"), "lacks the key\\(s\\) d_out"),
    "missing d_sae": (lambda p: _edit_cfg(p, d_sae=None), "lacks the key\\(s\\) d_sae"),
    "missing k": (lambda p: _edit_cfg(p, k=None), "lacks the key\\(s\\) k"),
    "bad k": (lambda p: _edit_cfg(p, k=D_SAE), "k=32 must be smaller"),
    "normalize": (lambda p: _edit_cfg(p, normalize_activations="expected_average_only_in"), "not supported"),
    "bad dtype": (lambda p: _edit_cfg(p, dtype="int4"), "dtype 'int4'"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_directories_are_refused_in_one_line(tmp_path, case):
    damage, pattern = BAD[case]
    path = _exported(tmp_path)
    damage(path)
    with pytest.raises(SAELightningError, match=pattern) as err:
        load_sae(path)
    assert "\n" not in str(err.value)


def test_missing_and_extra_tensors_are_refused(tmp_path):
    path = _exported(tmp_path)
    tensors = {"W_enc": torch.zeros(D_IN, D_SAE), "W_dec": torch.zeros(D_SAE, D_IN), "b_dec": torch.zeros(D_IN),
               "bias": torch.zeros(D_SAE)}
    save_file(tensors, str(path / "sae_weights.safetensors"))
    with pytest.raises(SAELightningError, match=r"missing \['b_enc'\] / unexpected \['bias'\]"):
        load_sae(path)
