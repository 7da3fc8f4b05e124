"""Crosscoders: the sparse BatchTopK path equals dense autograd, the per-model scales fold, the L1 variant's
penalty, and planted shared / model-exclusive features are recovered and classified by Δ; Latent Scaling flags
planted Complete Shrinkage and Latent Decoupling."""

import functools
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from saelightning.errors import SAELightningError
from saelightning.evaluate import encode_decode
from saelightning.export import load_dictionary_learning, load_sae, save_sae
from saelightning.modeldiff import CLASS_NAMES, DiffThresholds, LatentScaling, classify, decoder_cosines, relative_norms
from saelightning.saes import OneModel, SAEConfig, build_sae
from saelightning.saes.base import SAEOptions
from saelightning.saes.topk import TopKSAE

# fp32 results compared across code paths: also run under other CPU kernels; one torch thread (small ops)
pytestmark = [pytest.mark.numerics, pytest.mark.usefixtures("one_thread")]


def _cc(arch="crosscoder", M=2, d=8, d_sae=32, **kw):
    return build_sae(SAEConfig(architecture=arch, d_in=M * d, d_sae=d_sae, n_models=M, **kw))


@pytest.mark.parametrize("kwargs, fragment", [
    ({"n_models": 1, "d_in": 16}, "n_models >= 2"),
    ({"n_models": 3, "d_in": 16}, "n_models >= 2 models of one width"),
    ({"architecture": "topk", "n_models": 2}, "applies to crosscoders only"),
])
def test_config_errors_are_one_line(kwargs, fragment):
    with pytest.raises(SAELightningError, match=fragment) as err:
        SAEConfig(**{"architecture": "crosscoder", "d_in": 16, "d_sae": 32, "n_models": 2, **kwargs})
    assert "\n" not in str(err.value)
    with pytest.raises(SAELightningError, match="k do\\(es\\) not apply to architecture 'crosscoder_l1'"):
        SAEOptions(k=4).check_options_apply("crosscoder_l1")


def _dense_reference(cc, x, dead):
    """The BatchTopK crosscoder loss by dense autograd: the k·N largest f_i c_i of the batch, AuxK on the dead."""
    pre = x @ cc.W_enc + cc.b_enc
    c = cc.code_norms().detach()
    keep = torch.zeros(pre.numel(), dtype=torch.bool)
    keep[(pre.relu() * c).flatten().topk(cc.config.k * x.shape[0]).indices] = True
    f = pre.relu() * keep.view_as(pre)
    x_hat = f @ cc.W_dec + cc.b_dec
    fvu = (x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    k_aux = min(cc.config.k_aux_resolved, int(dead.sum()))
    aux_v, aux_i = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=-1)
    e = (x - x_hat).detach()
    e_hat = torch.zeros_like(pre).scatter(1, aux_i, aux_v.relu()) @ cc.W_dec
    aux = (e_hat - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
    return fvu + cc.config.aux_coefficient * aux, f


@pytest.mark.parametrize("sync_free", [False, True])
def test_batchtopk_crosscoder_forward_and_backward_equal_dense_autograd(monkeypatch, sync_free):
    torch.manual_seed(0)
    monkeypatch.setattr(TopKSAE, "_aux_indices", functools.partialmethod(TopKSAE._aux_indices, sync_free=sync_free))
    cc = _cc(k=3, k_aux=6, dtype="float64").train()
    with torch.no_grad():  # decoder norms that differ per model and latent: the ranking is not the pre-activations'
        cc.W_dec.mul_(torch.rand(32, 16, dtype=torch.float64) + 0.2)
        cc.b_enc.normal_(0, 0.1)
        cc.b_dec.normal_(0, 0.1)
    x = torch.randn(24, 2, 8, dtype=torch.float64)  # [N, M, d]
    dead = torch.zeros(32, dtype=torch.bool)
    dead[torch.randperm(32)[:5]] = True
    _, latents, losses = cc(x, dead_mask=dead, sparse=True)
    expected, dense = _dense_reference(cc, x.reshape(24, 16), dead)
    assert torch.equal(latents.dense() != 0, dense != 0) and int((dense != 0).sum()) == 3 * 24
    assert torch.allclose(latents.dense(), dense, rtol=1e-12)
    kept = (dense * cc.code_norms())[dense > 0]
    assert torch.isclose(cc.threshold.double(), kept.min())  # θ is in the units of the ranking, f_i c_i
    grads = torch.autograd.grad(losses["loss"], list(cc.parameters()))
    want = torch.autograd.grad(expected, list(cc.parameters()))
    assert torch.allclose(losses["loss"].double(), expected, rtol=1e-6)
    for g, w in zip(grads, want):
        assert torch.allclose(g, w, rtol=1e-5, atol=1e-9)


def test_eval_uses_the_threshold_on_the_code_normalised_latents():
    torch.manual_seed(1)
    cc = _cc(k=4).train()
    x = torch.randn(64, 16)
    cc(x)
    cc.eval()
    pre = x @ cc.W_enc + cc.b_enc
    want = pre.relu() * (pre.relu() * cc.code_norms() > cc.threshold)
    x_hat, f, _ = cc(x)
    _, sparse, _ = cc(x, sparse=True)
    assert torch.equal(f, cc.encode(x)) and torch.allclose(f, want) and torch.equal(sparse.dense(), f)
    assert torch.allclose(x_hat, f @ cc.W_dec + cc.b_dec, atol=1e-6)
    assert torch.equal(cc.encode(x.view(64, 2, 8)), f)  # [N, M, d] reads as [N, M·d]


@pytest.mark.parametrize("arch", ["crosscoder", "crosscoder_l1"])
def test_per_model_scales_fold_into_the_weights(arch):
    torch.manual_seed(2)
    cc = _cc(arch, k=4, apply_b_dec_to_input=True).eval()
    with torch.no_grad():
        cc.b_dec.normal_()
        cc.threshold.fill_(0.05) if arch == "crosscoder" else None
        cc.input_scale.copy_(torch.tensor([0.5, 3.0]))
    raw = torch.randn(20, 16)
    scaled = raw * cc.input_scales()
    folded = cc.fold_input_scale()
    assert torch.allclose(folded.encode(raw), cc.encode(scaled), atol=1e-5)
    x_hat = cc.decode(cc.encode(scaled)) / cc.input_scales()
    assert torch.allclose(folded.decode(folded.encode(raw)), x_hat, atol=1e-5)
    # Δ reads the normalised decoder: the same before and after folding
    assert torch.allclose(folded.model_decoder_norms(), cc.model_decoder_norms(), rtol=1e-6)
    assert torch.equal(folded.folded_scale, torch.tensor([0.5, 3.0])) and torch.equal(folded.input_scale, torch.ones(2))


def test_l1_penalty_weights_each_latent_by_its_summed_decoder_norms():
    torch.manual_seed(3)
    cc = _cc("crosscoder_l1", l1_warmup_steps=0, l1_coefficient=2.0).train()
    x = torch.randn(10, 16)
    _, f, losses = cc(x)
    norms = cc.W_dec.view(32, 2, 8).norm(dim=-1).sum(-1)
    assert torch.allclose(losses["l1_loss"], (f * norms).sum(-1).mean())
    assert torch.allclose(losses["loss"], losses["sse"] + 2.0 * losses["l1_loss"])
    losses["l1_loss"].backward()
    assert cc.W_dec.grad is not None and cc.W_dec.grad.abs().sum() > 0  # the penalty shrinks the decoder


def test_classes_and_thresholds():
    delta = torch.tensor([0.0, 0.1, 0.11, 0.41, 0.5, 0.59, 0.61, 0.9, 1.0])
    assert [CLASS_NAMES[i] for i in classify(delta)] == ["A-only", "A-only", "other", "shared", "shared", "shared",
                                                         "other", "B-only", "B-only"]
    assert classify(delta, DiffThresholds(exclusive=0.2, shared_halfwidth=0.05))[2].item() == 0
    with pytest.raises(SAELightningError, match="overlaps"):
        DiffThresholds(exclusive=0.45, shared_halfwidth=0.1)


def _planted(n, d=12, per_kind=6, seed=0, same_direction=False):
    """Activations of two models from planted features: per_kind shared (a direction in each model), A-only and
    B-only ones; each fires with probability 0.08 at a magnitude in [1, 2]. Returns x [n, 2·d], the true feature
    activations [n, 3·per_kind] and the directions [3·per_kind, 2, d] (zero in the model a feature is absent from)."""
    g = torch.Generator().manual_seed(seed)
    F = 3 * per_kind
    dirs = torch.randn(F, 2, d, generator=g)
    if same_direction:
        dirs[:per_kind, 1] = dirs[:per_kind, 0]
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    dirs[per_kind:2 * per_kind, 1] = 0  # A-only
    dirs[2 * per_kind:, 0] = 0  # B-only
    fires = torch.rand(n, F, generator=g) < 0.08
    acts = fires * (1 + torch.rand(n, F, generator=g))
    x = (acts @ dirs.reshape(F, 2 * d))
    return x, acts, dirs


def test_planted_shared_and_exclusive_features_are_recovered_and_classified_by_delta():
    torch.manual_seed(0)
    x, acts, dirs = _planted(4096, d=24)
    cc = _cc(d=24, d_sae=36, k=2, threshold_ema=0.9).train()
    opt = torch.optim.Adam(cc.parameters(), lr=3e-3)
    for step in range(600):
        batch = x[torch.randint(0, len(x), (512,))]
        _, _, losses = cc(batch)
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
    assert losses["fvu"] < 0.01
    # each planted feature's best latent (by the correlation of its activations with the feature's, at inference)
    # detects it, and its Δ puts it in the feature's class
    f = cc.eval().encode(x).detach()
    corr = ((acts - acts.mean(0)) / acts.std(0)).T @ ((f - f.mean(0)) / (f.std(0) + 1e-9)) / len(x)
    best = corr.argmax(1)
    assert bool((corr.max(1).values > 0.7).all()), corr.max(1).values
    classes = [CLASS_NAMES[i] for i in classify(relative_norms(cc))[best]]
    assert classes == ["shared"] * 6 + ["A-only"] * 6 + ["B-only"] * 6
    # a shared feature's latent has each model's own direction in that model's part of its decoder
    blocks = cc.W_dec.detach().view(36, 2, 24)[best[:6]]
    own = torch.nn.functional.cosine_similarity(blocks, dirs[:6], dim=-1)
    assert bool((own > 0.8).all()) and own.median() > 0.98, own  # one of 12 at 0.81: it takes a little of another
    assert decoder_cosines(cc)[best[:6]].abs().max() < 0.5  # random directions in 24 dims: nearly orthogonal


def test_identical_models_give_no_exclusive_latents():
    torch.manual_seed(1)
    x, _, _ = _planted(4096, d=24)
    same = torch.cat([x[:, :24], x[:, :24]], 1)  # model B is model A
    cc = _cc(d=24, d_sae=36, k=2).train()
    opt = torch.optim.Adam(cc.parameters(), lr=3e-3)
    for _ in range(300):
        _, _, losses = cc(same[torch.randint(0, len(same), (512,))])
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
    counts = torch.bincount(classify(relative_norms(cc)), minlength=4)
    assert counts[0] == 0 and counts[1] == 0, counts


def test_latent_scaling_flags_planted_complete_shrinkage_and_decoupling():
    """A crosscoder built from the planted dictionary, with three B-only latents by Δ: latent 12 truly B-only, latent
    0 a shared feature whose A decoder was shrunk to zero (Complete Shrinkage: in A it is left in the error), and
    latent 1 a shared feature that A reconstructs through another latent, 18 (Latent Decoupling)."""
    x, acts, dirs = _planted(20000, same_direction=True, seed=3)
    cc = _cc(d=12, d_sae=19, k=2).eval()
    with torch.no_grad():
        dec = torch.zeros(19, 2, 12)
        dec[:18] = dirs
        dec[0, 0] = 0  # shrunk in A
        dec[1, 0] = 0
        dec[18, 0] = dirs[1, 0]  # A's copy of feature 1, a latent of its own
        cc.W_dec.copy_(dec.reshape(19, 24))
        cc.b_dec.zero_()
    f = torch.cat([acts, acts[:, 1:2]], 1)
    ls = LatentScaling(cc)
    for chunk in range(0, len(x), 5000):  # batches pool exactly
        ff = f[chunk:chunk + 5000]
        ls.update(x[chunk:chunk + 5000], ff, cc.decode(ff))
    out = ls.compute()
    delta = relative_norms(cc)
    assert delta[0] == 1 and delta[1] == 1 and delta[12] == 1
    assert abs(out["nu_error"][0] - 1) < 0.05 and abs(out["nu_reconstruction"][0]) < 0.05  # shrinkage
    assert abs(out["nu_reconstruction"][1] - 1) < 0.05 and abs(out["nu_error"][1]) < 0.05  # decoupling
    assert abs(out["nu_error"][12]) < 0.05 and abs(out["nu_reconstruction"][12]) < 0.05  # really B-only
    assert abs(out["beta_reconstruction"][1, 12] - 1) < 0.05  # B reconstructs its own latent


@pytest.mark.parametrize("arch", ["crosscoder", "crosscoder_l1"])
def test_export_round_trip_on_raw_activations(tmp_path, arch):
    torch.manual_seed(4)
    cc = _cc(arch, k=4).train()
    with torch.no_grad():
        cc.input_scale.copy_(torch.tensor([0.5, 2.0]))
        cc.b_dec.normal_()
    cc(torch.randn(64, 16) * cc.input_scales())  # a threshold for the BatchTopK one
    cc.eval()
    save_sae(cc, tmp_path / "cc", metadata={"hook_name": "blocks.0.hook_resid_post"})
    loaded = load_sae(tmp_path / "cc")
    raw = torch.randn(32, 16)
    f, x_hat = encode_decode(cc, raw)
    assert torch.allclose(loaded.encode(raw), f, atol=1e-5)
    assert torch.allclose(loaded.decode(loaded.encode(raw)), x_hat, atol=1e-5)
    assert torch.allclose(relative_norms(loaded), relative_norms(cc), atol=1e-6)  # Δ in the normalised units
    with safe_open(str(tmp_path / "cc" / "sae_weights.safetensors"), "pt") as file:
        shapes = {k: tuple(file.get_tensor(k).shape) for k in file.keys()}
    want = {"encoder.weight": (2, 8, 32), "encoder.bias": (32,), "decoder.weight": (2, 32, 8), "decoder.bias": (2, 8),
            "folded_scale": (2,)}
    assert shapes == ({**want, "threshold": ()} if arch == "crosscoder" else want)


def test_dictionary_learning_layout_loads_and_computes_their_latents(tmp_path):
    """A crosscoder in science-of-finetuning's hub layout (config.json + model.safetensors): their encoder
    f = ReLU(Σ_m x^m W^m + b), kept where f·Σ_m‖d^m‖ > threshold, x̂^m = f D^m + b^m."""
    g = torch.Generator().manual_seed(0)
    M, d, F = 2, 8, 24
    tensors = {"encoder.weight": torch.randn(M, d, F, generator=g), "encoder.bias": torch.randn(F, generator=g) * 0.1,
               "decoder.weight": torch.randn(M, F, d, generator=g) * 0.3,
               "decoder.bias": torch.randn(M, d, generator=g),
               "k": torch.tensor(4, dtype=torch.int32), "threshold": torch.tensor(1.5)}
    (tmp_path / "hub").mkdir()
    save_file(tensors, str(tmp_path / "hub" / "model.safetensors"))
    (tmp_path / "hub" / "config.json").write_text(json.dumps({"activation_dim": d, "dict_size": F,
                                                             "num_encoder_layers": M, "k": 4}))
    cc = load_sae(tmp_path / "hub")
    x = torch.randn(16, M, d, generator=g)
    f = (torch.einsum("bmd,mdf->bf", x, tensors["encoder.weight"]) + tensors["encoder.bias"]).relu()
    f = f * (f * tensors["decoder.weight"].norm(dim=2).sum(0) > 1.5)
    x_hat = torch.einsum("bf,mfd->bmd", f, tensors["decoder.weight"]) + tensors["decoder.bias"]
    assert torch.allclose(cc.encode(x), f, atol=1e-5)
    assert torch.allclose(cc.per_model(cc.decode(cc.encode(x))), x_hat, atol=1e-5)
    assert (f > 0).any() and (f == 0).any()
    torch.save({**tensors, "threshold": torch.tensor(-1.0)}, tmp_path / "unset.pt")
    with pytest.raises(SAELightningError, match="threshold"):
        load_dictionary_learning(tmp_path / "unset.pt")


def test_one_model_view_tracks_and_steers_a_latent_through_that_models_decoder(nanochat_current_dir):
    from saelightning.nanochat.checkpoint import load_nanochat
    from saelightning.runtime import InterpretableModel, Steer, dense_latents

    nc = load_nanochat(nanochat_current_dir, device="cpu", dtype=torch.float32)
    hook, d = "blocks.1.hook_resid_post", nc.model.d_model
    torch.manual_seed(3)
    cc = _cc("crosscoder_l1", d=d, d_sae=48).eval()
    cc.metadata = {"models": [{"name": "base"}, {"name": "chat"}]}
    with torch.no_grad():
        cc.b_enc.normal_(0, 0.1)
        cc.input_scale.copy_(torch.tensor([1.0, 0.5]))
    view = OneModel(cc, "chat")
    assert torch.equal(view.W_dec, cc.W_dec[:, d:]) and torch.equal(view.b_dec, cc.b_dec[d:])
    im = InterpretableModel(nc, {hook: view})
    idx = torch.tensor([[nc.tokenizer.bos_id, 5, 9, 17, 3, 11]])
    keep = (idx != nc.tokenizer.bos_id).reshape(-1, 1)
    with torch.no_grad():
        x = nc.model.run_with_cache(idx, [hook])[hook].reshape(-1, d)
        clean = nc.model(idx)
        # tracking: the latents as this model's activation alone drives them (the base block reads zero)
        with im.track(top_n=None) as trace:
            im(idx)
        values, indices = trace.latents(hook)
        want = cc.encode(torch.cat([torch.zeros_like(x), x * 0.5], -1))
        got = dense_latents(values, indices, 48).reshape(want.shape)
        assert torch.allclose(got, want, atol=1e-6)
        # steering latent 7 by +3: x + 3 d_7^chat / s_chat at every non-BOS position, the error term kept
        added = x + keep * 3.0 * cc.W_dec[7, d:] / 0.5

        def by_hand(h):
            return added.view_as(h)

        expected = nc.model(idx, hooks={hook: by_hand})
        with im.steering([Steer(hook, 7, "add", 3.0)]):
            steered = im(idx)
        assert torch.allclose(steered, expected, atol=1e-5) and not torch.allclose(steered, clean, atol=1e-3)
        with im.steering([Steer(hook, 7, "add", 0.0)]):  # a zero steer changes nothing: the error is kept
            assert torch.allclose(im(idx), clean, atol=1e-5)
    with pytest.raises(SAELightningError, match="no model named 'rl'; its models are"):
        OneModel(cc, "rl")
    with pytest.raises(SAELightningError, match="out of range"):
        OneModel(cc, 2)
