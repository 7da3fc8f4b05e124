"""Transcoders: an SAE that reads one activation and predicts another (d_out), every activation, the skip term,
the input/output scale folding, config checks; training, export and spliced eval on the demo model further down."""

import json

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from saelightning import InterpretableModel, load_nanochat
from saelightning.cli import main
from saelightning.dashboards.stats import StatsConfig, logit_effect
from saelightning.demo import DEMO_MODEL_DIR
from saelightning.errors import SAELightningError
from saelightning.evaluate import encode_decode, evaluate_batch, scores
from saelightning.export import load_sae, save_sae
from saelightning.metrics import SAEMetrics
from saelightning.module import SAEModule, SAESpec
from saelightning.resolve import shards
from saelightning.runtime import Steer
from saelightning.saes import SAEConfig, build_sae
from saelightning.saes.base import TRANSCODER_ARCHITECTURES
from saelightning.tokens import val_batches
from tests.fits import ddp_fit, fit_config
from tests.test_saes import adam_steps

# fp32 results compared across code paths: also run under other CPU kernels; one torch thread (small ops)
pytestmark = [pytest.mark.numerics, pytest.mark.usefixtures("one_thread")]

D_IN, D_OUT, D_SAE, K = 12, 10, 48, 4


def make(arch, skip=False, d_out=D_OUT, **kw):
    kw.setdefault("l1_warmup_steps", 0)
    return build_sae(SAEConfig(architecture=arch, d_in=D_IN, d_sae=D_SAE, d_out=d_out, k=K,
                               skip_connection=skip, **kw))


def planted(n=512, seed=0):
    """x, and y a sparse function of x (a few ReLU units of it) plus a linear part: what an MLP looks like."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D_IN, generator=g)
    units = torch.randn(D_IN, 8, generator=g)
    out = torch.randn(8, D_OUT, generator=g)
    linear = torch.randn(D_IN, D_OUT, generator=g) * 2.0
    return x, (x @ units).relu() @ out + x @ linear


def fit(sae, x, y, steps, lr=1e-2):
    return adam_steps(sae, x, steps, lr=lr, target=y)


@pytest.mark.parametrize("arch", TRANSCODER_ARCHITECTURES)
@pytest.mark.parametrize("skip", [False, True])
def test_transcoder_forward_scores_the_target_and_the_output_is_decode_plus_skip(arch, skip):
    torch.manual_seed(0)
    sae = make(arch, skip)
    assert sae.W_enc.shape == (D_IN, D_SAE) and sae.W_dec.shape == (D_SAE, D_OUT) and sae.b_dec.shape == (D_OUT,)
    assert (sae.W_skip.shape == (D_OUT, D_IN)) if skip else not hasattr(sae, "W_skip")
    x, y = planted(64)
    if skip:
        with torch.no_grad():
            sae.W_skip.copy_(torch.randn(D_OUT, D_IN))
    y_hat, latents, losses = sae(x, target=y)
    assert y_hat.shape == (64, D_OUT)
    dense = latents if torch.is_tensor(latents) else latents.dense()
    want = dense @ sae.W_dec + sae.b_dec + (x @ sae.W_skip.T if skip else 0)
    torch.testing.assert_close(y_hat, want, rtol=1e-5, atol=1e-5)
    err = (y_hat - y).pow(2)
    torch.testing.assert_close(losses["sse"], err.sum(-1).mean(), rtol=1e-5, atol=0)
    torch.testing.assert_close(losses["fvu"], err.sum() / (y - y.mean(0)).pow(2).sum(), rtol=1e-5, atol=0)
    losses["loss"].backward()
    assert sae.W_dec.grad is not None and sae.W_enc.grad.abs().sum() > 0
    if skip:  # the skip term's gradient is exactly ∂loss/∂ŷ xᵀ
        assert sae.W_skip.grad.abs().sum() > 0


def test_skip_gradient_is_the_residual_times_the_input():
    """With sse as the loss (relu, no penalty), ∂/∂W_skip of E||ŷ - y||² = 2/N Σ (ŷ - y) xᵀ."""
    torch.manual_seed(1)
    sae = make("relu", skip=True, l1_coefficient=0.0)
    x, y = planted(32)
    y_hat, _, losses = sae(x, target=y)
    losses["loss"].backward()
    want = 2.0 / x.shape[0] * (y_hat - y).detach().T @ x
    torch.testing.assert_close(sae.W_skip.grad, want, rtol=1e-4, atol=1e-6)


def test_the_skip_term_learns_the_linear_part_an_sae_cannot():
    """On y = sparse(x) + x A, a skip transcoder beats the same transcoder without W_skip by a wide margin."""
    x, y = planted(1024)
    results = {}
    for skip in (False, True):
        torch.manual_seed(0)
        sae = make("topk", skip=skip)
        results[skip] = float(fit(sae, x, y, 300)["fvu"].detach())
    assert results[True] < 0.6 * results[False], results  # measured 0.081 against 0.181


@pytest.mark.parametrize("arch", ["topk", "relu", "jumprelu", "batchtopk"])
def test_fold_input_scale_predicts_raw_outputs_from_raw_inputs(arch):
    """Trained on s_in·x -> s_out·y, the folded transcoder maps raw x to raw y with the same latents."""
    torch.manual_seed(2)
    sae = make(arch, skip=True)
    x, y = planted(64)
    s_in, s_out = 3.0, 0.25
    fit(sae, x * s_in, y * s_out, 20)
    sae.input_scale.fill_(s_in)
    sae.output_scale.fill_(s_out)
    sae.eval()
    folded = sae.fold_input_scale()
    with torch.no_grad():
        f = sae.encode(x * s_in)
        want = sae.output(f, x * s_in) / s_out
        f_raw = folded.encode(x)
        torch.testing.assert_close(f_raw, f, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(folded.output(f_raw, x), want, rtol=1e-4, atol=1e-5)
    assert float(folded.input_scale) == 1.0 and float(folded.output_scale) == 1.0


def test_b_dec_starts_at_the_targets_mean():
    sae = make("topk")
    _, y = planted(64)
    sae.init_from_batch(y)
    torch.testing.assert_close(sae.b_dec.detach(), y.mean(0))
    with pytest.raises(SAELightningError, match="b_dec has width 10"):
        sae.init_from_batch(torch.zeros(4, D_IN))


@pytest.mark.parametrize("kwargs, fragment", [
    ({"architecture": "gated", "d_out": 8}, "architecture 'gated' has no transcoder form"),
    ({"architecture": "topk", "d_out": 0}, "d_out=0"),
    ({"architecture": "topk", "d_out": 8, "apply_b_dec_to_input": True}, "apply_b_dec_to_input must be false"),
    ({"architecture": "topk", "skip_connection": True}, "skip_connection applies to transcoders only"),
])
def test_transcoder_config_rejects_bad_values_in_one_line(kwargs, fragment):
    with pytest.raises(SAELightningError, match=fragment) as err:
        SAEConfig(d_in=8, d_sae=32, k=4, **kwargs)
    assert "\n" not in str(err.value)


def test_forward_needs_a_target_for_a_transcoder_and_refuses_one_for_an_sae():
    x, y = planted(8)
    with pytest.raises(SAELightningError, match="needs target="):
        make("topk")(x)
    with pytest.raises(SAELightningError, match=r"target has shape \(8, 3\)"):
        make("topk")(x, target=y[:, :3])
    sae = build_sae(SAEConfig(architecture="relu", d_in=D_IN, d_sae=D_SAE))
    with pytest.raises(SAELightningError, match="applies to transcoders only"):
        sae(x, target=x)


# --- training, export and spliced eval on the bundled demo model -----------------------------------------------

HOOK_IN, HOOK_OUT = "blocks.1.hook_mlp_in", "blocks.1.hook_mlp_out"
TRANSCODER = {"hook_name": HOOK_IN, "hook_name_out": HOOK_OUT, "d_sae": 256, "k": 8, "skip_connection": True,
              "name": "tc", "lr": 0.004}


def _fit_config(tmp_path, shards_dir, run, saes, **trainer):
    data = {"model": "demo", "data_dir": str(shards_dir), "context_size": 32, "batch_size": 64,
            "model_batch_rows": 4, "buffer_tokens": 256, "num_workers": 1, "val_batches": 2, "scale_batches": 2}
    return fit_config(tmp_path, run, saes, data, trainer)


def test_fit_trains_a_skip_transcoder_beside_an_sae_and_exports_the_saelens_transcoder_layout(tmp_path,
                                                                                              tiny_shards_dir):
    sae = {"hook_name": HOOK_IN, "d_sae": 256, "k": 8, "name": "sae"}
    cfg = _fit_config(tmp_path, tiny_shards_dir, "tc", [TRANSCODER, sae])
    assert main(["fit", "--config", str(cfg)]) == 0
    root = tmp_path / "tc" / "saes"
    cfg_json = json.loads((root / "tc" / "cfg.json").read_text())
    # SAELens 6's transcoder keys: architecture, d_in, d_out, d_sae, apply_b_dec_to_input false, the output hook
    assert cfg_json["architecture"] == "topk_skip_transcoder" and cfg_json["k"] == 8
    assert (cfg_json["d_in"], cfg_json["d_out"], cfg_json["d_sae"]) == (128, 128, 256)
    assert cfg_json["apply_b_dec_to_input"] is False and cfg_json["normalize_activations"] == "none"
    assert cfg_json["metadata"]["hook_name"] == HOOK_IN and cfg_json["metadata"]["hook_name_out"] == HOOK_OUT
    assert cfg_json["hook_name_out"] == HOOK_OUT
    with safe_open(str(root / "tc" / "sae_weights.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shapes == {"W_enc": (128, 256), "b_enc": (256,), "W_dec": (256, 128), "b_dec": (128,),
                      "W_skip": (128, 128)}
    tc = load_sae(root / "tc")
    assert tc.config.is_transcoder and tc.config.skip_connection and tc.metadata["hook_name_out"] == HOOK_OUT
    assert tc.W_skip.abs().max() > 0  # the skip term trained
    # the export predicts the real MLP output from the real MLP input: it learned something in 10 steps
    nc = load_nanochat(DEMO_MODEL_DIR)
    idx = torch.randint(1, 500, (2, 32))
    acts = nc.model.run_with_cache(idx, [HOOK_IN, HOOK_OUT])
    _, y_hat = encode_decode(tc, acts[HOOK_IN].reshape(-1, 128))
    y = acts[HOOK_OUT].reshape(-1, 128)
    assert float(1 - (y_hat - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum()) > 0.3
    # the SAE of the same sweep reconstructs its input and is an ordinary SAE export
    plain = json.loads((root / "sae" / "cfg.json").read_text())
    assert plain["architecture"] == "topk" and "d_out" not in plain and "hook_name_out" not in plain["metadata"]
    # the logged validation of the transcoder: spliced at the MLP output, scores of the prediction
    meta = cfg_json["metadata"]["final_metrics"]
    assert 0.3 < meta["val/explained_variance"] <= 1 and meta["val/ce_loss_score"] > 0


def test_transcoder_resume_from_last_is_bitwise_equal(tmp_path, tiny_shards_dir):
    tc = {**TRANSCODER, "architecture": "batchtopk"}
    whole = _fit_config(tmp_path, tiny_shards_dir, "whole", [tc])
    assert main(["fit", "--config", str(whole)]) == 0
    parts = _fit_config(tmp_path, tiny_shards_dir, "parts", [tc])
    assert main(["fit", "--config", str(parts), "--trainer.max_steps", "7"]) == 0  # after the resampling at 5
    assert main(["fit", "--config", str(parts), "--ckpt_path", "last"]) == 0
    a, b = (torch.load(tmp_path / run / "last.ckpt", weights_only=True)["state_dict"] for run in ("whole", "parts"))
    assert a.keys() == b.keys() and "saes.tc.W_skip" in a and "saes.tc.output_scale" in a
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_fit_from_a_cache_of_both_hooks_equals_the_live_fit(tmp_path, tiny_shards_dir):
    """`saelightning cache` records the input and output hooks from one forward; a transcoder trained from it is
    the live-trained one, bit for bit (an unshuffled cache in the live stream's order, no normalisation)."""
    out = tmp_path / "recording"
    assert main(["cache", "--model", "demo", "--data", str(tiny_shards_dir), "--hooks", HOOK_IN, HOOK_OUT,
                 "--tokens", "1200", "--out", str(out), "--no-shuffle", "--shard-tokens", "250",
                 "--context-size", "32", "--batch-rows", "4", "--seed", "0"]) == 0

    def fit(run, **data):
        path = _fit_config(tmp_path, tiny_shards_dir, run, [TRANSCODER], max_steps=8, val_check_interval=4)
        config = yaml.safe_load(path.read_text())
        config["data"].update(num_workers=0, val_batches=1, normalize=False, seed=0, **data)
        config["export"] = {"enabled": False}
        path.write_text(yaml.safe_dump(config))
        assert main(["fit", "--config", str(path)]) == 0
        return torch.load(tmp_path / run / "last.ckpt", weights_only=True)["state_dict"]

    live, cached = fit("live"), fit("cached", cache_dir=str(out))
    weights = [k for k in live if k.startswith("saes.tc.")]
    assert {"saes.tc.W_skip", "saes.tc.W_dec"} <= set(weights)
    for key in weights:
        assert torch.equal(live[key], cached[key]), key


# --- the export: SAELens 6's transcoder layout ---------------------------------------------------------------

# SAELens 6's registered transcoder classes (sae_lens/__init__.py: register_sae_class) and what their configs and
# weights hold (sae_lens/saes/transcoder.py): TranscoderConfig adds d_out to SAEConfig and refuses
# apply_b_dec_to_input; b_dec and W_dec are in the output space, SkipTranscoder's W_skip is [d_out, d_in] and
# its forward is decode(encode(x)) + x W_skipᵀ; the JumpReLU ones add threshold [d_sae]
SAELENS_TRANSCODERS = {
    "transcoder": {"W_enc", "b_enc", "W_dec", "b_dec"},
    "skip_transcoder": {"W_enc", "b_enc", "W_dec", "b_dec", "W_skip"},
    "jumprelu_transcoder": {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"},
    "jumprelu_skip_transcoder": {"W_enc", "b_enc", "W_dec", "b_dec", "threshold", "W_skip"},
}


@pytest.mark.parametrize("arch, skip, saelens", [
    ("relu", False, "transcoder"), ("relu", True, "skip_transcoder"),
    ("jumprelu", False, "jumprelu_transcoder"), ("jumprelu", True, "jumprelu_skip_transcoder"),
    ("batchtopk", True, "jumprelu_skip_transcoder"), ("matryoshka", False, "jumprelu_transcoder"),
    ("topk", True, "topk_skip_transcoder"),
])
def test_export_is_saelens_transcoder_layout_and_its_formula_gives_our_outputs(tmp_path, arch, skip, saelens):
    """The files hold SAELens's keys, names and shapes, and SAELens's forward written from its definition (on the
    raw files: no saelightning code) predicts the same outputs as our unfolded, scaled transcoder; load_sae too."""
    torch.manual_seed(3)
    sae = make(arch, skip, matryoshka_prefixes=[12, D_SAE] if arch == "matryoshka" else None)
    with torch.no_grad():
        for param in sae.parameters():
            param.add_(0.05 * torch.randn_like(param))
        if arch == "jumprelu":
            sae.threshold.copy_(torch.rand(D_SAE) * 0.3)
        if arch in ("batchtopk", "matryoshka"):
            sae.threshold.fill_(0.2)
        sae.input_scale.fill_(3.7)
        sae.output_scale.fill_(0.6)
    sae.eval()
    hooks = {"hook_name": "blocks.0.hook_mlp_in", "hook_name_out": "blocks.0.hook_mlp_out"}
    save_sae(sae, tmp_path / "tc", metadata=hooks)
    cfg = json.loads((tmp_path / "tc" / "cfg.json").read_text())
    assert cfg["architecture"] == saelens
    assert (cfg["d_in"], cfg["d_sae"], cfg["d_out"]) == (D_IN, D_SAE, D_OUT)
    assert cfg["apply_b_dec_to_input"] is False and cfg["metadata"]["hook_name_out"] == "blocks.0.hook_mlp_out"
    tensors = load_file(str(tmp_path / "tc" / "sae_weights.safetensors"))
    keys = SAELENS_TRANSCODERS.get(saelens, {"W_enc", "b_enc", "W_dec", "b_dec", "W_skip"})
    assert set(tensors) == keys
    shapes = {"W_enc": (D_IN, D_SAE), "b_enc": (D_SAE,), "W_dec": (D_SAE, D_OUT), "b_dec": (D_OUT,),
              "threshold": (D_SAE,), "W_skip": (D_OUT, D_IN)}
    assert {k: tuple(t.shape) for k, t in tensors.items()} == {k: shapes[k] for k in keys}
    x = torch.randn(64, D_IN) * 0.5 + 0.1
    with torch.no_grad():
        f_ours = sae.encode(x * 3.7)
        want = sae.output(f_ours, x * 3.7) / 0.6
    pre = x @ tensors["W_enc"] + tensors["b_enc"]
    if "threshold" in tensors:
        f = pre.relu() * (pre > tensors["threshold"])
    elif saelens.startswith("topk"):
        top = pre.topk(cfg["k"], dim=-1)
        f = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    else:
        f = pre.relu()
    out = f @ tensors["W_dec"] + tensors["b_dec"] + (x @ tensors["W_skip"].T if "W_skip" in tensors else 0)
    assert torch.equal(f != 0, f_ours != 0)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    loaded = load_sae(tmp_path / "tc")
    assert loaded.config.d_out == D_OUT and bool(loaded.config.skip_connection) == ("W_skip" in tensors)
    with torch.no_grad():
        torch.testing.assert_close(loaded.output(loaded.encode(x), x), want, rtol=1e-4, atol=1e-5)


def test_load_sae_reads_a_saelens_written_skip_transcoder(tmp_path):
    """A directory as SAELens 6.0-6.x writes it (hook_name_out at the top level too, no saelightning metadata)."""
    g = torch.Generator().manual_seed(4)
    tensors = {"W_enc": torch.randn(D_IN, D_SAE, generator=g), "b_enc": torch.randn(D_SAE, generator=g),
               "W_dec": torch.randn(D_SAE, D_OUT, generator=g), "b_dec": torch.randn(D_OUT, generator=g),
               "W_skip": torch.randn(D_OUT, D_IN, generator=g)}
    (tmp_path / "s").mkdir()
    save_file(tensors, str(tmp_path / "s" / "sae_weights.safetensors"))
    cfg = {"architecture": "skip_transcoder", "d_in": D_IN, "d_sae": D_SAE, "d_out": D_OUT, "dtype": "float32",
           "device": "cpu", "apply_b_dec_to_input": False, "normalize_activations": "none",
           "hook_name_out": "blocks.3.hook_mlp_out",
           "metadata": {"sae_lens_version": "6.3.0", "hook_name": "blocks.3.hook_mlp_in"}}
    (tmp_path / "s" / "cfg.json").write_text(json.dumps(cfg))
    sae = load_sae(tmp_path / "s")
    assert sae.metadata["hook_name_out"] == "blocks.3.hook_mlp_out"
    x = torch.randn(8, D_IN, generator=g)
    f = (x @ tensors["W_enc"] + tensors["b_enc"]).relu()
    want = f @ tensors["W_dec"] + tensors["b_dec"] + x @ tensors["W_skip"].T
    with torch.no_grad():
        torch.testing.assert_close(sae.output(sae.encode(x), x), want, rtol=1e-5, atol=1e-4)
    del tensors["W_skip"]
    save_file(tensors, str(tmp_path / "s" / "sae_weights.safetensors"))
    with pytest.raises(SAELightningError, match=r"tensors missing \['W_skip'\]"):
        load_sae(tmp_path / "s")


# --- spliced evaluation: the transcoder's prediction in place of the MLP output --------------------------------

def _demo_transcoder(zero=False):
    torch.manual_seed(5)
    sae = build_sae(SAEConfig(architecture="topk", d_in=128, d_sae=256, d_out=128, k=8, skip_connection=True))
    with torch.no_grad():
        if zero:  # predicts 0: the zero-ablation itself
            for param in sae.parameters():
                param.zero_()
        else:
            sae.W_skip.copy_(0.05 * torch.randn(128, 128))
            sae.b_dec.copy_(0.1 * torch.randn(128))
    sae.metadata["hook_name_out"] = HOOK_OUT
    return sae.eval()


def _val_tokens(shards_dir, tokenizer):
    _, val = shards(shards_dir)
    (rows,) = list(val_batches(val, tokenizer, 32, 4, 4))
    return rows


def test_spliced_eval_replaces_the_mlp_output_with_the_prediction_from_the_clean_input(tiny_shards_dir):
    """Every figure of evaluate_batch for a transcoder, recomputed by hand: the clean MLP input encoded, the MLP
    output replaced by the prediction at non-BOS positions, the ablation zeroing that output."""
    nc = load_nanochat(DEMO_MODEL_DIR)
    model, bos = nc.model, nc.tokenizer.bos_id
    tokens = _val_tokens(tiny_shards_dir, nc.tokenizer)
    tc = _demo_transcoder()
    metrics = {HOOK_IN: [SAEMetrics(128, 256)]}
    evaluate_batch(model, {HOOK_IN: tc}, tokens, bos, metrics)
    got = scores(metrics[HOOK_IN][0])
    keep = tokens != bos
    clean = model.run_with_cache(tokens, [HOOK_IN, HOOK_OUT])
    with torch.no_grad():
        y_hat = tc.output(tc.encode(clean[HOOK_IN][keep]), clean[HOOK_IN][keep])

    def replaced(value):
        def hook(y):
            y = y.clone()
            y[keep] = value
            return y
        return hook
    mask = keep[:, :-1] & keep[:, 1:]
    targets = tokens[:, 1:][mask]

    def ce(hooks):
        with torch.no_grad():
            logits = model(tokens, hooks=hooks)[:, :-1][mask]
        return float(torch.nn.functional.cross_entropy(logits.double(), targets))
    ce_clean, ce_tc, ce_zero = ce({}), ce({HOOK_OUT: replaced(y_hat)}), ce({HOOK_OUT: replaced(0.0)})
    assert got["ce_loss_without_sae"] == pytest.approx(ce_clean, rel=1e-5)
    assert got["ce_loss_with_sae"] == pytest.approx(ce_tc, rel=1e-5)
    assert got["ce_loss_with_ablation"] == pytest.approx(ce_zero, rel=1e-5)
    assert got["ce_loss_score"] == pytest.approx((ce_zero - ce_tc) / (ce_zero - ce_clean), rel=1e-4)
    y = clean[HOOK_OUT][keep].double()
    fvu = float((y - y_hat.double()).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
    assert got["fvu"] == pytest.approx(fvu, rel=1e-5) and got["explained_variance"] == pytest.approx(1 - fvu, rel=1e-5)
    assert got["l0"] == pytest.approx(8.0)
    # without the splice (reconstruction metrics only) the same figures of the prediction
    plain = {HOOK_IN: [SAEMetrics(128, 256, spliced=False)]}
    evaluate_batch(model, {HOOK_IN: tc}, tokens, bos, plain, spliced=False)
    assert scores(plain[HOOK_IN][0])["fvu"] == pytest.approx(got["fvu"], rel=1e-6)
    # a transcoder that predicts 0 is the zero-ablation: score 0
    zero = {HOOK_IN: [SAEMetrics(128, 256)]}
    evaluate_batch(model, {HOOK_IN: _demo_transcoder(zero=True)}, tokens, bos, zero)
    assert scores(zero[HOOK_IN][0])["ce_loss_score"] == pytest.approx(0.0, abs=1e-6)
    assert scores(zero[HOOK_IN][0])["kl_div_score"] == pytest.approx(0.0, abs=1e-6)


def test_eval_refuses_a_transcoder_without_its_output_hook_or_of_the_wrong_width(tiny_shards_dir):
    nc = load_nanochat(DEMO_MODEL_DIR)
    tokens = _val_tokens(tiny_shards_dir, nc.tokenizer)
    tc = _demo_transcoder()
    del tc.metadata["hook_name_out"]
    with pytest.raises(SAELightningError, match="has no metadata\\['hook_name_out'\\]"):
        evaluate_batch(nc.model, {HOOK_IN: tc}, tokens, nc.tokenizer.bos_id, {HOOK_IN: [SAEMetrics(128, 256)]})
    tc.metadata["hook_name_out"] = "blocks.1.mlp.hook_post"
    with pytest.raises(SAELightningError, match="d_out=128 cannot write hook point 'blocks.1.mlp.hook_post'"):
        evaluate_batch(nc.model, {HOOK_IN: tc}, tokens, nc.tokenizer.bos_id, {HOOK_IN: [SAEMetrics(128, 256)]})
    tc.metadata["hook_name_out"] = "blocks.0.hook_mlp_out"
    with pytest.raises(SAELightningError, match="comes before its input hook"):
        evaluate_batch(nc.model, {HOOK_IN: tc}, tokens, nc.tokenizer.bos_id, {HOOK_IN: [SAEMetrics(128, 256)]})


def test_a_spec_whose_output_hook_comes_first_or_is_its_input_is_refused():
    with pytest.raises(SAELightningError, match="comes before hook_name"):
        SAEModule([SAESpec(hook_name="blocks.2.hook_mlp_in", hook_name_out="blocks.1.hook_mlp_out")],
                  n_layer=4, d_model=128)
    with pytest.raises(SAELightningError, match="hook_name_out equals hook_name"):
        SAESpec(hook_name=HOOK_OUT, hook_name_out=HOOK_OUT)
    with pytest.raises(SAELightningError, match="skip_connection applies to transcoders only; set hook_name_out"):
        SAESpec(hook_name=HOOK_IN, skip_connection=True)
    with pytest.raises(SAELightningError, match="architecture 'gated' has no transcoder form"):
        SAEModule([SAESpec(hook_name=HOOK_IN, hook_name_out=HOOK_OUT, architecture="gated")], n_layer=4, d_model=128)
    for spec in (SAESpec(hook_name=HOOK_IN, hook_name_out=HOOK_OUT),
                 SAESpec(hook_name="blocks.0.hook_mlp_in", hook_name_out=HOOK_OUT, cross_layer=True)):
        with pytest.raises(SAELightningError, match="a transcoder reads one model: train it in a run without "
                                                    "data.models"):
            SAEModule([spec], n_layer=4, d_model=128, model_names=["base", "chat"])


def test_interpretable_model_steers_a_transcoder_latent_at_its_output_hook():
    """Read at the MLP input, written to the MLP output: the output gets (f' - f) W_dec, the input stays, and the
    transcoder's error stays in the stream."""
    nc = load_nanochat(DEMO_MODEL_DIR)
    tc = _demo_transcoder()
    tc.metadata = {"hook_name": HOOK_IN, "hook_name_out": HOOK_OUT}
    im = InterpretableModel(nc.model, [tc], bos_id=nc.tokenizer.bos_id)
    idx = torch.tensor([nc.tokenizer.encode("def f(x):\n    return x")])
    plain = nc.model.run_with_cache(idx, [HOOK_IN, HOOK_OUT])
    f = tc.encode(plain[HOOK_IN][0])
    latent = int(f[1:].sum(0).argmax())
    with im.steering([Steer(HOOK_IN, latent, "clamp", 2.0)]):
        steered = nc.model.run_with_cache(idx, [HOOK_IN, HOOK_OUT], hooks=im.hooks(idx))
    torch.testing.assert_close(steered[HOOK_IN], plain[HOOK_IN])
    change = (2.0 - f[:, latent:latent + 1]) * (idx[0] != nc.tokenizer.bos_id)[:, None]
    torch.testing.assert_close(steered[HOOK_OUT][0], plain[HOOK_OUT][0] + change @ tc.W_dec[latent:latent + 1],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_two_process_ddp_transcoder_fit_on_cpu_resumes_bitwise(tmp_path, tiny_shards_dir):
    """Under DDP every rank captures both hooks of its own stream; the ranks stay identical and a resume is exact."""
    def fit(run, *extra):
        return ddp_fit(_fit_config(tmp_path, tiny_shards_dir, run, [TRANSCODER], max_steps=6), tmp_path / run, *extra)

    whole = fit("whole")
    assert whole["state_dict"]["tokens_seen"].item() == 6 * 64 * 2
    fit("parts", "--trainer.max_steps", "4")
    parts = fit("parts", "--ckpt_path", "last")
    for key in whole["state_dict"]:
        assert torch.equal(whole["state_dict"][key], parts["state_dict"][key]), key


def test_dashboard_logit_effects_read_a_transcoders_decoder_in_its_output_space():
    """A transcoder predicting the MLP hidden layer (4·d wide) reaches the logits through c_proj; one predicting
    hook_mlp_out writes the residual directly."""
    nc = load_nanochat(DEMO_MODEL_DIR)
    model = nc.model
    cfg = StatsConfig(n_logits=3)
    wide = build_sae(SAEConfig(architecture="topk", d_in=128, d_sae=16, d_out=512, k=2))
    wide.metadata["hook_name_out"] = "blocks.1.mlp.hook_post"
    features = torch.arange(4)
    top = logit_effect(model, wide, HOOK_IN, features, cfg)[0]
    with torch.no_grad():
        want = model.lm_head(model.final_norm(model.transformer.h[1].mlp.c_proj(wide.W_dec[:4])))
    torch.testing.assert_close(top, want[:, :model.config.vocab_size].topk(3, dim=1).values, rtol=1e-5, atol=1e-5)
    narrow = _demo_transcoder()
    top = logit_effect(model, narrow, HOOK_IN, features, cfg)[0]
    with torch.no_grad():
        want = model.lm_head(model.final_norm(narrow.W_dec[:4]))
    torch.testing.assert_close(top, want[:, :model.config.vocab_size].topk(3, dim=1).values, rtol=1e-5, atol=1e-5)
