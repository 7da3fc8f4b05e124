"""Cross-layer transcoder: the prediction is the sum over source layers, the loss the sum over output layers,
a one-layer CLT is a transcoder, causality of the gradients, the scale folding, and it learns a planted
cross-layer map."""

import pytest
import torch

from saelightning.errors import SAELightningError
from saelightning.saes import SAEConfig, build_sae
from saelightning.saes.clt import CLT_ARCHITECTURES, CrossLayerTranscoder

pytestmark = pytest.mark.numerics

D, D_SAE, K, L = 8, 32, 3, 3


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
