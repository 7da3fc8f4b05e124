"""Cross-layer transcoder: the prediction is the sum over source layers, the loss the sum over output layers,
a one-layer CLT is a transcoder, causality of the gradients, the scale folding, and it learns a planted
cross-layer map."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from saelightning import load_nanochat
from saelightning.cli import main
from saelightning.demo import DEMO_MODEL_DIR
from saelightning.errors import SAELightningError
from saelightning.export import load_sae
from saelightning.module import SAEModule, SAESpec
from saelightning.saes import SAEConfig, build_sae
from saelightning.saes.clt import CLT_ARCHITECTURES, CrossLayerTranscoder
from tests.fits import fit_config

pytestmark = [pytest.mark.numerics, pytest.mark.usefixtures("one_thread")]

D, D_SAE, K, L = 8, 32, 3, 3


def make(arch, n_layers=L, **kw):
    kw.setdefault("l1_warmup_steps", 0)
    return CrossLayerTranscoder(SAEConfig(architecture=arch, d_in=D, d_sae=D_SAE, k=K, **kw), n_layers)


def data(n=256, seed=0):
    """x_l per layer, and y_j = a sparse function of every x_l with l <= j (what a CLT can represent)."""
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, D, generator=g) for _ in range(L)]
    maps = [[torch.randn(D, D, generator=g) for _ in range(L)] for _ in range(L)]
    ys = [sum((xs[src] @ maps[src][j]).relu() for src in range(j + 1)) for j in range(L)]
    return xs, ys


@pytest.mark.parametrize("arch", CLT_ARCHITECTURES)
def test_prediction_is_the_sum_over_source_layers_and_the_loss_the_sum_over_outputs(arch):
    torch.manual_seed(0)
    clt = make(arch)
    with torch.no_grad():
        clt.b_dec.copy_(torch.randn(L, D))
    xs, ys = data(64)
    clt.train()
    preds, latents, losses = clt(xs, ys)
    dense = CrossLayerTranscoder.concat_latents(latents).split(D_SAE, dim=-1)
    for j in range(L):
        want = sum(dense[src] @ clt.decoder(src, j) for src in range(j + 1)) + clt.b_dec[j]
        torch.testing.assert_close(preds[j], want, rtol=1e-5, atol=1e-5)
    enc = clt.encoders[0]
    recon = sum(enc.reconstruction_stats(y, p)[enc.reconstruction_loss] for y, p in zip(ys, preds))
    penalty = sum(e.sparsity_penalty(e(x, target=torch.zeros(64, (L - src) * D))[2])
                  for src, (e, x) in enumerate(zip(clt.encoders, xs)))
    torch.testing.assert_close(losses["loss"], recon + penalty, rtol=1e-5, atol=1e-6)
    sse = sum((y - p).pow(2).sum() for y, p in zip(ys, preds))
    var = sum((y - y.mean(0)).pow(2).sum() for y in ys)
    torch.testing.assert_close(losses["fvu"], sse / var, rtol=1e-5, atol=0)


def test_a_latent_reaches_only_later_layers_and_a_layer_reads_only_its_own_input():
    torch.manual_seed(1)
    clt = make("relu", l1_coefficient=0.0)
    xs, ys = data(32)
    xs = [x.requires_grad_() for x in xs]
    preds, _, _ = clt(xs, ys)
    preds[0].sum().backward()  # layer 0's output depends on x_0 and encoder 0 only
    assert xs[0].grad.abs().sum() > 0 and xs[1].grad is None and xs[2].grad is None
    assert clt.encoders[1].W_enc.grad is None and clt.encoders[2].W_enc.grad is None
    with pytest.raises(SAELightningError, match="writes layers 2..2, not 1"):
        clt.decoder(2, 1)
    assert clt.encoders[2].W_dec.shape == (D_SAE, D) and clt.encoders[0].W_dec.shape == (D_SAE, L * D)


def test_a_one_layer_clt_is_a_transcoder():
    torch.manual_seed(2)
    clt = make("topk", n_layers=1)
    tc = build_sae(SAEConfig(architecture="topk", d_in=D, d_sae=D_SAE, k=K, d_out=D))
    tc.load_state_dict(clt.encoders[0].state_dict())
    xs, ys = data(64)
    (pred,), _, losses = clt(xs[:1], ys[:1])
    y_hat, _, want = tc(xs[0], target=ys[0])
    assert torch.equal(pred, y_hat)
    torch.testing.assert_close(losses["loss"], want["loss"])


def test_fold_scales_predicts_raw_outputs_from_raw_inputs():
    torch.manual_seed(3)
    clt = make("jumprelu").eval()
    with torch.no_grad():
        clt.b_dec.copy_(torch.randn(L, D))
        for enc in clt.encoders:
            enc.threshold.fill_(0.05)
    clt.input_scales.copy_(torch.tensor([2.0, 0.5, 3.0]))
    clt.output_scales.copy_(torch.tensor([0.25, 4.0, 1.5]))
    xs, _ = data(32)
    with torch.no_grad():
        scaled = clt.decode(clt.encode([x * s for x, s in zip(xs, clt.input_scales)]))
        folded = clt.fold_scales()
        raw = folded.decode(folded.encode(xs))
    for j in range(L):
        torch.testing.assert_close(raw[j], scaled[j] / clt.output_scales[j], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", CLT_ARCHITECTURES)
def test_layer_transcoder_has_the_clts_latents_and_the_sum_of_its_decoder_rows(arch):
    """The dashboards' view of one CLT layer: the same latents on raw inputs (the input scale folded into W_enc),
    and as decoder row what the latent writes into every layer it reaches, summed, in raw units."""
    torch.manual_seed(4)
    clt = make(arch, l1_coefficient=0.0).eval()
    with torch.no_grad():
        clt.b_dec.copy_(torch.randn(L, D))
        for enc in clt.encoders:
            enc.b_enc.normal_(0, 0.5)
            if hasattr(enc, "threshold"):
                enc.threshold.fill_(0.05)
    clt.input_scales.copy_(torch.tensor([2.0, 0.5, 3.0]))
    clt.output_scales.copy_(torch.tensor([0.25, 4.0, 1.5]))
    xs, _ = data(64)
    for layer in range(L):
        view = clt.layer_transcoder(layer)
        assert view.config.d_out == D and view.W_dec.shape == (D_SAE, D) and not view.W_dec.requires_grad
        f, parts = clt.contributions(layer, xs[layer])
        got = view.encode(xs[layer])
        assert f.count_nonzero() > 0 and torch.equal(got != 0, f != 0)
        torch.testing.assert_close(got, f, rtol=1e-5, atol=1e-5)  # x (s W) against (s x) W: one rounding apart
        rows = sum(clt.decoder(layer, j) / clt.output_scales[j] for j in range(layer, L))
        torch.testing.assert_close(view.W_dec, rows, rtol=1e-6, atol=1e-6)
        # its decoder applied to the latents is the sum of what they write to each layer (the bias that encoder
        # `layer` adds, encoder 0's b_dec or zeros, left out)
        bias = sum(b / clt.output_scales[layer + i] for i, b in enumerate(clt.encoders[layer].b_dec.split(D)))
        torch.testing.assert_close(f @ view.W_dec, sum(parts) - bias, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(clt.layer_transcoder(0).b_dec, sum(clt.b_dec[j] / clt.output_scales[j]
                                                                   for j in range(L)))
    with pytest.raises(SAELightningError, match="layers 0..2, not 3"):
        clt.layer_transcoder(3)


def test_training_lowers_every_layers_fvu():
    torch.manual_seed(4)
    clt = make("topk")
    xs, ys = data(512)
    clt.init_from_batch(ys)
    opt = torch.optim.Adam([p for p in clt.parameters() if p.requires_grad], lr=1e-2)
    first = None
    for step in range(150):
        clt.set_training_step(step)
        _, _, losses = clt(xs, ys)
        first = first or {k: float(v.detach()) for k, v in losses.items()}
        opt.zero_grad()
        losses["loss"].backward()
        clt.before_optimizer_step()
        opt.step()
        clt.after_optimizer_step()
    for j in range(L):
        assert float(losses[f"fvu/layer{j}"]) < 0.5 * first[f"fvu/layer{j}"], (j, first, losses)
    assert all(float(e.W_dec.norm(dim=1).sub(1).abs().max()) < 1e-5 for e in clt.encoders)  # unit concatenated rows


@pytest.mark.parametrize("kwargs, fragment", [
    ({"arch": "gated"}, "architecture 'gated' has no cross-layer transcoder"),
    ({"arch": "topk", "n_layers": 0}, "needs n_layers >= 1"),
])
def test_bad_clt_configs_are_one_line_errors(kwargs, fragment):
    with pytest.raises(SAELightningError, match=fragment) as err:
        make(**kwargs)
    assert "\n" not in str(err.value)


# --- training, export and evaluation on the bundled demo model (4 layers, width 128) ----------------------------

CLT_SPEC = {"hook_name": "blocks.0.hook_mlp_in", "hook_name_out": "blocks.3.hook_mlp_out", "cross_layer": True,
            "architecture": "batchtopk", "d_sae": 128, "k": 8, "name": "clt", "lr": 0.004}


def _fit_config(tmp_path, shards_dir, run, spec=None, **trainer):
    data = {"model": "demo", "data_dir": str(shards_dir), "context_size": 32, "batch_size": 64,
            "model_batch_rows": 4, "buffer_tokens": 256, "num_workers": 1, "val_batches": 1, "scale_batches": 2}
    return fit_config(tmp_path, run, [spec or CLT_SPEC], data,
                      {"max_steps": 8, "val_check_interval": 4, "log_every_n_steps": 2, **trainer},
                      {"warmup_steps": 2}, checkpoint={"every_n_train_steps": 3}, resample={"every_n_steps": 0})


def test_fit_trains_a_clt_over_the_demo_models_four_layers_and_exports_circuit_tracers_layout(tmp_path,
                                                                                              tiny_shards_dir):
    assert main(["fit", "--config", str(_fit_config(tmp_path, tiny_shards_dir, "clt"))]) == 0
    out = tmp_path / "clt" / "saes" / "clt"
    cfg = json.loads((out / "cfg.json").read_text())
    assert (cfg["architecture"], cfg["activation_function"]) == ("cross_layer_transcoder", "jump_relu")
    assert (cfg["n_layers"], cfg["d_model"], cfg["d_transcoder"]) == (4, 128, 128)
    assert cfg["metadata"]["hook_names_out"] == [f"blocks.{i}.hook_mlp_out" for i in range(4)]
    for i in range(4):  # circuit-tracer's files, keys and shapes (CrossLayerTranscoder.to_safetensors)
        enc = load_file(str(out / f"W_enc_{i}.safetensors"))
        dec = load_file(str(out / f"W_dec_{i}.safetensors"))
        assert {k: tuple(v.shape) for k, v in enc.items()} == {
            f"W_enc_{i}": (128, 128), f"b_enc_{i}": (128,), f"b_dec_{i}": (128,), f"threshold_{i}": (128,)}
        assert {k: tuple(v.shape) for k, v in dec.items()} == {f"W_dec_{i}": (128, 4 - i, 128)}
    assert load_file(str(out / "sparsity.safetensors"))["sparsity"].shape == (4 * 128,)
    clt = load_sae(out)
    assert isinstance(clt, CrossLayerTranscoder) and clt.n_layers == 4
    # circuit-tracer's forward on the raw files (features = pre * (pre > threshold), decoded into every later
    # layer) is the loaded CLT's prediction from raw MLP inputs
    nc = load_nanochat(DEMO_MODEL_DIR)
    idx = torch.randint(1, 500, (2, 16))
    ins = [f"blocks.{i}.hook_mlp_in" for i in range(4)]
    acts = nc.model.run_with_cache(idx, ins)
    xs = [acts[h].reshape(-1, 128) for h in ins]
    with torch.no_grad():
        _, preds = clt.predict(xs)
    recon = [load_file(str(out / f"W_enc_{j}.safetensors"))[f"b_dec_{j}"].expand(32, 128).clone() for j in range(4)]
    for i in range(4):
        enc = load_file(str(out / f"W_enc_{i}.safetensors"))
        pre = xs[i] @ enc[f"W_enc_{i}"].T + enc[f"b_enc_{i}"]
        f = pre * (pre > enc[f"threshold_{i}"])
        W = load_file(str(out / f"W_dec_{i}.safetensors"))[f"W_dec_{i}"]
        for o in range(4 - i):
            recon[i + o] += f @ W[:, o]
    for j in range(4):
        torch.testing.assert_close(preds[j], recon[j], rtol=1e-4, atol=1e-4)
    # saelightning eval splices it as the replacement model (every MLP output replaced)
    report = tmp_path / "eval.json"
    assert main(["eval", "--sae", str(out), "--tokens", "256", "--context_size", "32", "--batch_size", "4",
                 "--out", str(report), "--device", "cpu", "--quiet"]) == 0
    metrics = json.loads(report.read_text())["saes"][0]["metrics"]
    assert 0 < metrics["explained_variance"] <= 1 and metrics["fvu"] == pytest.approx(1 - metrics["explained_variance"])
    assert metrics["ce_loss_with_ablation"] > metrics["ce_loss_without_sae"]
    assert math.isfinite(metrics["ce_loss_score"]) and metrics["l0"] > 0


def test_clt_resume_from_last_is_bitwise_equal(tmp_path, tiny_shards_dir):
    spec = {**CLT_SPEC, "architecture": "topk"}
    assert main(["fit", "--config", str(_fit_config(tmp_path, tiny_shards_dir, "whole", spec))]) == 0
    parts = _fit_config(tmp_path, tiny_shards_dir, "parts", spec)
    assert main(["fit", "--config", str(parts), "--trainer.max_steps", "5"]) == 0
    assert main(["fit", "--config", str(parts), "--ckpt_path", "last"]) == 0
    a, b = (torch.load(tmp_path / run / "last.ckpt", weights_only=True)["state_dict"] for run in ("whole", "parts"))
    assert a.keys() == b.keys() and "saes.clt.encoders.3.W_dec" in a
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_clt_specs_that_cannot_work_are_refused_in_one_line(tmp_path, tiny_shards_dir, capsys):
    with pytest.raises(SAELightningError, match="spans blocks.a.hook_mlp_in to blocks.b.hook_mlp_out"):
        SAEModule([SAESpec(**{**CLT_SPEC, "hook_name_out": "blocks.3.hook_resid_post"})], n_layer=4, d_model=128)
    with pytest.raises(SAELightningError, match="needs hook_name blocks.a.hook_mlp_in"):
        SAESpec(hook_name="blocks.0.hook_mlp_in", cross_layer=True)
    cfg = _fit_config(tmp_path, tiny_shards_dir, "resampled")
    assert main(["fit", "--config", str(cfg), "--resample.every_n_steps", "2"]) == 2
    assert "set resample.every_n_steps: 0" in capsys.readouterr().err
