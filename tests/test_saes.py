"""SAE architectures: config checks, shapes, losses, gradients, decoder norms, sparse decode, scale
folding, and recovery of a planted sparse dictionary from synthetic data."""

import pytest
import torch

from saelightning.errors import SAELightningError
from saelightning.saes import ARCHITECTURES, SAEConfig, build_sae
from saelightning.saes.base import CROSSCODERS
from saelightning.saes.jumprelu import JumpReLUSTE, StepSTE
from saelightning.saes.sparse import dense_decode, sparse_decode, sparse_decode_ragged

# fp32 results compared across code paths: also run under other CPU kernels; one torch thread (small ops)
pytestmark = [pytest.mark.numerics, pytest.mark.usefixtures("one_thread")]

D_IN, D_SAE, K = 16, 64, 4

SAE_ARCHITECTURES = [a for a in ARCHITECTURES if a not in CROSSCODERS]  # crosscoders: tests/test_crosscoder.py


def make(arch, **kw):
    kw.setdefault("l1_warmup_steps", 0)
    return build_sae(SAEConfig(architecture=arch, d_in=D_IN, d_sae=D_SAE, k=K, **kw))


def adam_steps(sae, x, steps, lr=1e-2, dead_mask=None, **forward):
    """`steps` Adam steps of the SAE on x (forward: e.g. a transcoder's target=); the last step's losses."""
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    for step in range(steps):
        sae.set_training_step(step)
        _, _, losses = sae(x, dead_mask=dead_mask, **forward)
        opt.zero_grad()
        losses["loss"].backward()
        sae.before_optimizer_step()
        opt.step()
        sae.after_optimizer_step()
    return losses


@pytest.mark.parametrize("kwargs, fragment", [
    ({"architecture": "sparse"}, "unknown SAE architecture"),
    ({"d_in": 0}, "d_in=0"),
    ({"d_sae": -4}, "d_sae=-4"),
    ({"d_in": 8.0}, "d_in=8.0"),
    ({"k": 64, "d_sae": 64}, "k=64 must be smaller than d_sae=64"),
    ({"k": 0}, "k=0"),
    ({"architecture": "matryoshka", "d_sae": 64, "matryoshka_prefixes": [16, 32]}, "must end at d_sae=64"),
    ({"architecture": "matryoshka", "d_sae": 64, "matryoshka_prefixes": [32, 16, 64]}, "strictly increasing"),
    ({"sparsity_penalty": "l2"}, "sparsity_penalty"),
    ({"threshold_ema": 1.0}, "threshold_ema"),
    ({"dtype": "int8"}, "dtype"),
    ({"l1_warmup_steps": -1}, "l1_warmup_steps"),
    ({"bandwidth": 0.0}, "bandwidth"),
    ({"l1_coefficient": float("nan")}, "l1_coefficient"),
])
def test_config_rejects_bad_values_in_one_line(kwargs, fragment):
    with pytest.raises(SAELightningError) as err:
        SAEConfig(**{"d_in": 16, "d_sae": 64, **kwargs})
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_config_defaults_per_architecture():
    assert SAEConfig(architecture="topk", d_in=64, d_sae=256).k_aux_resolved == 32
    assert SAEConfig(architecture="matryoshka", d_in=8, d_sae=256).prefixes == [16, 32, 64, 128, 256]
    assert SAEConfig(architecture="relu", d_in=8, d_sae=16).unit_norm_decoder is False
    assert SAEConfig(architecture="jumprelu", d_in=8, d_sae=16, sparsity_penalty="tanh").unit_norm_decoder is False
    for arch in ("topk", "batchtopk", "matryoshka", "gated", "jumprelu"):
        assert SAEConfig(architecture=arch, d_in=8, d_sae=16, k=2).unit_norm_decoder is True
    relu = make("relu")
    assert torch.allclose(relu.decoder_norms(), torch.full((D_SAE,), 0.1))
    assert torch.equal(relu.W_enc, relu.W_dec.T)


@pytest.mark.parametrize("arch", SAE_ARCHITECTURES)
def test_shapes_dtypes_and_losses(arch):
    sae = make(arch)
    x = torch.randn(32, D_IN)
    x_hat, latents, losses = sae(x, dead_mask=torch.arange(D_SAE) % 3 == 0)
    assert x_hat.shape == (32, D_IN) and latents.shape == (32, D_SAE)
    assert x_hat.dtype == latents.dtype == torch.float32
    assert {"loss", "mse_loss", "fvu"} <= set(losses)
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    assert torch.allclose(losses["mse_loss"], (x - x_hat).pow(2).mean())
    assert (latents >= 0).all()
    values, indices = sae.encode_sparse(x)
    assert values.shape == indices.shape and values.shape[0] == 32
    # encode accepts [batch, tokens, d_in] as the runtime hooks pass it
    assert sae.encode(torch.randn(2, 5, D_IN)).shape == (2, 5, D_SAE)
    with pytest.raises(SAELightningError, match="d_in=16"):
        sae.encode(torch.randn(3, D_IN + 1))


def test_topk_has_exactly_k_active_and_batchtopk_k_times_batch():
    x = torch.randn(32, D_IN) + 1.0
    topk = make("topk")
    assert ((topk.encode(x) > 0).sum(-1) == K).all()
    batch = make("batchtopk").train()
    _, latents, _ = batch(x)
    assert int((latents > 0).sum()) == K * 32
    assert (latents > 0).sum(-1).float().std() > 0  # the count varies per token


@pytest.mark.parametrize("arch", SAE_ARCHITECTURES)
def test_encode_decode_round_trip_matches_forward(arch):
    sae = make(arch).eval()
    x = torch.randn(24, D_IN)
    with torch.no_grad():
        x_hat, latents, _ = sae(x)
        assert torch.allclose(latents, sae.encode(x), atol=1e-6)
        assert torch.allclose(x_hat, sae.decode(sae.encode(x)), atol=1e-5)
        values, indices = sae.encode_sparse(x)
        dense = torch.zeros(24, D_SAE).scatter_add(1, indices, values)
        assert torch.equal(dense, sae.encode(x))


def test_bfloat16_parameters():
    sae = make("topk", dtype="bfloat16")
    assert sae.W_dec.dtype == torch.bfloat16
    assert sae.encode(torch.randn(4, D_IN)).dtype == torch.bfloat16


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka", "gated", "jumprelu"])
def test_decoder_rows_stay_unit_norm(arch):
    sae = make(arch)
    x = torch.randn(64, D_IN) * 3
    sae(x)[2]["loss"].backward()
    sae.before_optimizer_step()
    # the gradient left has no component along its row
    assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() < 1e-5
    sae.zero_grad()
    adam_steps(sae, x, 5, lr=0.05)
    assert torch.allclose(sae.decoder_norms(), torch.ones(D_SAE), atol=1e-5)


def test_relu_decoder_is_not_normalised():
    sae = make("relu")
    adam_steps(sae, torch.randn(64, D_IN) * 3, 5, lr=0.05)
    norms = sae.decoder_norms()
    assert (not torch.allclose(norms, torch.ones(D_SAE), atol=1e-2)
            and not torch.allclose(norms, torch.full((D_SAE,), 0.1)))


@pytest.mark.parametrize("arch", SAE_ARCHITECTURES)
def test_gradients_reach_every_parameter(arch):
    sae = make(arch).train()
    x = torch.randn(128, D_IN) * 2
    sae.init_from_batch(x)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[::4] = True
    sae(x, dead_mask=dead)[2]["loss"].backward()
    for name, param in sae.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_gated_gate_learns_from_l1_and_aux_loss():
    sae = make("gated")
    x = torch.randn(64, D_IN)
    _, _, losses = sae(x)
    # the step 1[π_gate > 0] passes no gradient; these two terms are what train the gate
    for term in ("l1_loss", "aux_loss"):
        sae.zero_grad()
        losses[term].backward(retain_graph=True)
        assert sae.b_gate.grad.abs().sum() > 0 and sae.W_enc.grad.abs().sum() > 0
        assert sae.W_dec.grad is None or (term == "l1_loss" and sae.W_dec.grad.abs().sum() > 0)
        assert sae.b_mag.grad is None or sae.b_mag.grad.abs().sum() == 0


def test_relu_l1_is_decoder_norm_weighted_and_warmed_up():
    sae = make("relu", l1_coefficient=2.0, l1_warmup_steps=100)
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.5, 3.0, D_SAE)[:, None])
    x = torch.randn(8, D_IN)
    sae.set_training_step(25)
    _, latents, losses = sae(x)
    expected_l1 = (latents * sae.W_dec.norm(dim=1)).sum(-1).mean()
    assert torch.allclose(losses["l1_loss"], expected_l1)
    assert torch.allclose(losses["loss"], losses["sse"] + 2.0 * 0.25 * expected_l1)
    sae.set_training_step(1000)
    assert sae.penalty_scale() == 1.0


def test_jumprelu_straight_through_gradients():
    z = torch.tensor([[0.10, 0.52, 0.47, 1.00]], requires_grad=True)
    theta = torch.tensor([0.5, 0.5, 0.5, 0.5], requires_grad=True)
    eps = 0.1
    StepSTE.apply(z, theta, eps).sum().backward()
    # -(1/ε) K((z - θ)/ε): only z within ε/2 of θ (0.52, 0.47) contribute
    assert torch.allclose(theta.grad, torch.tensor([0.0, -10.0, -10.0, 0.0]))
    assert z.grad is None or z.grad.abs().sum() == 0
    theta.grad = None
    out = JumpReLUSTE.apply(z, theta, eps)
    assert torch.allclose(out, torch.tensor([[0.0, 0.52, 0.0, 1.0]]))
    out.sum().backward()
    assert torch.allclose(theta.grad, torch.tensor([0.0, -5.0, -5.0, 0.0]))
    assert torch.allclose(z.grad, torch.tensor([[0.0, 1.0, 0.0, 1.0]]))


def test_jumprelu_tanh_penalty_and_preact_loss():
    sae = make("jumprelu", sparsity_penalty="tanh", tanh_scale=4.0, l0_coefficient=0.5, preact_coefficient=0.1)
    x = torch.randn(16, D_IN)
    _, latents, losses = sae(x)
    norms = sae.decoder_norms()
    tanh = torch.tanh(4.0 * latents * norms).sum(-1).mean()
    preact = ((sae.threshold - sae.pre_acts(x)).relu() * norms).sum(-1).mean()
    assert torch.allclose(losses["tanh_loss"], tanh)
    assert torch.allclose(losses["loss"], losses["sse"] + 0.5 * tanh + 0.1 * preact, atol=1e-5)


def test_auxk_loss_formula_and_dead_latent_gradient():
    sae = make("topk", k_aux=3)
    x = torch.randn(32, D_IN)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[10:20] = True
    x_hat, _, losses = sae(x, dead_mask=dead)
    pre = sae.pre_acts(x).masked_fill(~dead, float("-inf"))
    values, indices = pre.topk(3, dim=-1)
    e = (x - x_hat).detach()
    e_hat = torch.zeros(32, D_SAE).scatter(1, indices, values.relu()) @ sae.W_dec
    expected = (e - e_hat).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
    assert torch.allclose(losses["auxk_loss"], expected, rtol=1e-5)
    sae.zero_grad()
    losses["auxk_loss"].backward()
    touched = sae.W_dec.grad.abs().sum(1) > 0
    assert touched[10:20].any() and not touched[~dead].any()
    assert float(sae(x)[2]["auxk_loss"]) == 0.0


def test_batchtopk_threshold_is_ema_of_smallest_kept_activation():
    """The first batch sets it; then an EMA whose decay warms up to threshold_ema."""
    sae = make("batchtopk", threshold_ema=0.5).train()
    x1, x2 = torch.randn(32, D_IN) + 1, torch.randn(32, D_IN) + 1
    _, lat1, _ = sae(x1)
    first = lat1[lat1 > 0].min()
    assert torch.allclose(sae.threshold, first)
    _, lat2, _ = sae(x2)
    decay = 2 / 11  # the second update: min(threshold_ema, (1 + 1) / (10 + 1))
    assert torch.allclose(sae.threshold, decay * first + (1 - decay) * lat2[lat2 > 0].min())
    sae.eval()
    pre = sae.pre_acts(x1)
    assert torch.equal(sae.encode(x1), pre.relu() * (pre > sae.threshold))


def test_matryoshka_loss_sums_the_prefix_reconstructions():
    sae = make("matryoshka", matryoshka_prefixes=[8, 32, 64]).train()
    x = torch.randn(32, D_IN)
    _, latents, losses = sae(x)
    total_var = (x - x.mean(0)).pow(2).sum()
    expected = sum((x - (latents[:, :m] @ sae.W_dec[:m] + sae.b_dec)).pow(2).sum() / total_var for m in (8, 32, 64))
    assert torch.allclose(losses["prefix_loss"], expected, rtol=1e-5)


def test_sparse_decode_equals_dense_product_in_values_and_gradients():
    gen = torch.Generator().manual_seed(3)
    W1 = torch.randn(200, 24, generator=gen, dtype=torch.float64, requires_grad=True)
    W2 = W1.detach().clone().requires_grad_()
    indices = torch.stack([torch.randperm(200, generator=gen)[:7] for _ in range(30)])
    v1 = torch.rand(30, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    v2 = v1.detach().clone().requires_grad_()
    grad_out = torch.randn(30, 24, generator=gen, dtype=torch.float64)
    out1, out2 = sparse_decode(v1, indices, W1), dense_decode(v2, indices, W2)
    assert torch.allclose(out1, out2, atol=1e-12)
    out1.backward(grad_out)
    out2.backward(grad_out)
    assert torch.allclose(v1.grad, v2.grad, atol=1e-12)
    assert torch.allclose(W1.grad, W2.grad, atol=1e-12)
    # gradient of the values is <grad_out[n], W_dec[indices[n, j]]>
    assert torch.allclose(v1.grad[4, 2], grad_out[4] @ W1[indices[4, 2]])


def test_ragged_sparse_decode_equals_dense_product():
    gen = torch.Generator().manual_seed(4)
    latents = torch.rand(20, 50, generator=gen, dtype=torch.float64) * (torch.rand(20, 50, generator=gen) < 0.1)
    latents[3] = 0.0  # a token with no active latent
    W = torch.randn(50, 12, generator=gen, dtype=torch.float64)
    rows, columns = latents.nonzero(as_tuple=True)
    values, offsets = latents[rows, columns], torch.searchsorted(rows, torch.arange(20))
    assert torch.allclose(sparse_decode_ragged(values, columns, offsets, W), latents @ W, atol=1e-12)


@pytest.mark.parametrize("arch", SAE_ARCHITECTURES)
def test_fold_input_scale_gives_same_latents_on_raw_inputs(arch):
    sae = make(arch).eval()
    with torch.no_grad():
        for param in sae.parameters():
            param.add_(0.05 * torch.randn_like(param))
        sae.input_scale.fill_(2.5)
    raw = torch.randn(40, D_IN)
    folded = sae.fold_input_scale()
    assert float(folded.input_scale) == 1.0 and float(sae.input_scale) == 2.5
    with torch.no_grad():
        latents = sae.encode(raw * 2.5)
        assert torch.allclose(folded.encode(raw), latents, atol=1e-5)
        assert torch.allclose(folded.decode(latents), sae.decode(latents) / 2.5, atol=1e-5)


def test_reinit_latents_sets_directions_and_biases():
    for arch in ("topk", "gated", "jumprelu"):
        sae = make(arch, threshold_init=0.3)
        idx = torch.tensor([1, 5])
        dirs = torch.randn(2, D_IN)
        sae.reinit_latents(idx, 0.2 * dirs, dirs)
        assert torch.equal(sae.W_dec[idx], dirs) and torch.equal(sae.W_enc[:, idx], 0.2 * dirs.T)
        bias = sae.b_gate if arch == "gated" else sae.b_enc
        assert (bias[idx] == 0).all()


# ---- planted sparse dictionary ------------------------------------------------------------------
RECOVERY = {  # hyper-parameters that suit the toy data (32 unit atoms in 32 dims, ~3 active per row)
    "topk": dict(k=3),
    "batchtopk": dict(k=3),
    "matryoshka": dict(k=3, matryoshka_prefixes=[64, 128]),
    "relu": dict(l1_coefficient=0.5, l1_warmup_steps=100),
    "gated": dict(l1_coefficient=1.0, l1_warmup_steps=100),
    "jumprelu": dict(l0_coefficient=0.1, l1_warmup_steps=100),
}


def planted_batch(gen, atoms, n, active=3):
    mask = torch.rand(n, atoms.shape[0], generator=gen) < active / atoms.shape[0]
    return (mask * (torch.rand(n, atoms.shape[0], generator=gen) + 0.5)) @ atoms


@pytest.mark.parametrize("arch", SAE_ARCHITECTURES)
def test_recovers_planted_sparse_dictionary(arch):
    gen = torch.Generator().manual_seed(1)
    atoms = torch.randn(32, 32, generator=gen)
    atoms = atoms / atoms.norm(dim=1, keepdim=True)
    sae = build_sae(SAEConfig(architecture=arch, d_in=32, d_sae=128, **RECOVERY[arch]))
    sae.init_from_batch(planted_batch(gen, atoms, 1024))
    opt = torch.optim.Adam(sae.parameters(), lr=5e-3)
    steps_since_fired = torch.zeros(128)
    for step in range(800):
        x = planted_batch(gen, atoms, 256)
        sae.set_training_step(step)
        _, latents, losses = sae(x, dead_mask=steps_since_fired > 200)
        steps_since_fired = torch.where((latents > 0).any(0), 0.0, steps_since_fired + 1)
        opt.zero_grad()
        losses["loss"].backward()
        sae.before_optimizer_step()
        opt.step()
        sae.after_optimizer_step()
    directions = sae.W_dec.detach() / sae.decoder_norms().detach()[:, None]
    best_cosine = (atoms @ directions.T).max(dim=1).values
    assert best_cosine.min() > 0.9, best_cosine.sort().values[:5]
    sae.eval()
    with torch.no_grad():
        _, latents, losses = sae(planted_batch(gen, atoms, 1024))
    assert losses["fvu"] < 0.2 and (latents > 0).sum(-1).float().mean() < 10


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_batchtopk_threshold_gives_about_k_latents_at_inference_after_a_short_run(arch):
    """The exported JumpReLU must keep about k latents per token, also after a run of a few hundred
    steps: the batch minimum falls steeply early in training, and an EMA that still remembers those
    first batches keeps a threshold far above the trained SAE's (inference L0 well under k)."""
    torch.manual_seed(0)
    d_in, k = 32, 8
    directions = torch.randn(256, d_in)

    def batch(n=512):  # sparse combinations of 256 directions, scaled as the trainer scales (E||x||² = d_in)
        codes = torch.rand(n, 256) * (torch.rand(n, 256) < 0.03)
        return codes @ directions * 0.62

    sae = build_sae(SAEConfig(architecture=arch, d_in=d_in, d_sae=128, k=k)).train()
    with torch.no_grad():
        sae.b_dec.copy_(batch().mean(0))
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    for _ in range(250):
        loss = sae(batch())[2]["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        sae.after_optimizer_step()
    with torch.no_grad():
        l0 = (sae.eval().encode(batch(4096)) != 0).sum(-1).float().mean()
    assert abs(float(l0) - k) < 0.05 * k, float(l0)  # a fixed 0.99 EMA gave 7.1 here
