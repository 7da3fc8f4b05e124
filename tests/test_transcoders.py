"""Transcoders: an SAE that reads one activation and predicts another (d_out), every activation, the skip term,
the input/output scale folding, config checks; training, export and spliced eval on the demo model further down."""

import pytest
import torch

from saelightning.errors import SAELightningError
from saelightning.saes import SAEConfig, build_sae
from saelightning.saes.base import TRANSCODER_ARCHITECTURES

pytestmark = pytest.mark.numerics  # fp32 results compared across code paths: also run under other CPU kernels

D_IN, D_OUT, D_SAE, K = 12, 10, 48, 4


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    for step in range(steps):
        sae.set_training_step(step)
        _, _, losses = sae(x, target=y)
        opt.zero_grad()
        losses["loss"].backward()
        sae.before_optimizer_step()
        opt.step()
        sae.after_optimizer_step()
    return losses


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
