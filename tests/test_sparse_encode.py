"""The TopK SAE's sparse encoder backward (gather_encode) equals dense autograd; SparseLatents counts firing."""

import functools

import pytest
import torch

from saelightning.saes import SAEConfig, build_sae
from saelightning.saes.sparse import SparseLatents, gather_encode, sparse_decode
from saelightning.saes.topk import TopKSAE


def _reference_loss(sae, x, dead_mask):
    """The TopK loss by plain dense autograd (the definition the sparse path must reproduce)."""
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    values, indices = pre.topk(sae.config.k, dim=-1)
    x_hat = sparse_decode(values.relu(), indices, sae.W_dec) + sae.b_dec
    fvu = (x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    k_aux = min(sae.config.k_aux_resolved, int(dead_mask.sum()))
    aux_values, aux_indices = pre.masked_fill(~dead_mask, float("-inf")).topk(k_aux, dim=-1)
    e = (x - x_hat).detach()
    e_hat = sparse_decode(aux_values.relu(), aux_indices, sae.W_dec)
    return fvu + sae.config.aux_coefficient * (e_hat - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum()


@pytest.mark.parametrize("sync_free", [False, True])
@pytest.mark.parametrize("n_dead", [3, 40])  # fewer dead latents than k_aux, and more
def test_topk_forward_loss_and_gradients_equal_dense_autograd(monkeypatch, sync_free, n_dead):
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(architecture="topk", d_in=16, d_sae=64, k=4, k_aux=8, dtype="float64"))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    x = torch.randn(32, 16, dtype=torch.float64)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[torch.randperm(64)[:n_dead]] = True
    monkeypatch.setattr(TopKSAE, "_aux_indices", functools.partialmethod(TopKSAE._aux_indices, sync_free=sync_free))
    loss = sae(x, dead_mask=dead)[2]["loss"]
    grads = torch.autograd.grad(loss, list(sae.parameters()))
    expected = _reference_loss(sae, x, dead)
    expected_grads = torch.autograd.grad(expected, list(sae.parameters()))
    assert torch.allclose(loss.double(), expected, rtol=1e-6)  # the SAE reports losses in float32
    for g, e in zip(grads, expected_grads):
        assert torch.allclose(g, e, rtol=1e-5, atol=1e-9)  # float32 loss arithmetic in both


@pytest.mark.parametrize("sync_free", [False, True])
def test_auxk_loss_is_zero_without_dead_latents(monkeypatch, sync_free):
    sae = build_sae(SAEConfig(architecture="topk", d_in=8, d_sae=32, k=4))
    monkeypatch.setattr(TopKSAE, "_aux_indices", functools.partialmethod(TopKSAE._aux_indices, sync_free=sync_free))
    losses = sae(torch.randn(10, 8), dead_mask=torch.zeros(32, dtype=torch.bool))[2]
    assert float(losses["auxk_loss"]) == 0.0


def test_gather_encode_gradient_to_the_input():
    torch.manual_seed(1)
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    W, b = torch.randn(5, 12, dtype=torch.float64, requires_grad=True), torch.randn(12, dtype=torch.float64, requires_grad=True)
    indices = torch.randint(0, 12, (6, 3))
    with torch.no_grad():
        pre = x @ W + b
    got = torch.autograd.grad(gather_encode(pre, x, W, b, indices).pow(2).sum(), [x, W, b])
    want = torch.autograd.grad((x @ W + b).gather(1, indices).pow(2).sum(), [x, W, b])
    for g, e in zip(got, want):
        assert torch.allclose(g, e, rtol=1e-10)


def test_sparse_forward_returns_the_dense_latents_sparsely():
    torch.manual_seed(2)
    sae = build_sae(SAEConfig(architecture="topk", d_in=8, d_sae=32, k=3))
    x = torch.randn(20, 8)
    x_hat, dense, _ = sae(x)
    x_hat2, latents, _ = sae(x, sparse=True)
    assert isinstance(latents, SparseLatents) and latents.shape == (20, 32)
    assert torch.equal(latents.dense(), dense) and torch.equal(x_hat, x_hat2)
    assert torch.equal(latents.firing_counts(), (dense != 0).sum(0).double())


def test_metrics_from_sparse_latents_equal_the_dense_ones():
    from saelightning.metrics import L0, L1, FeatureDensity

    torch.manual_seed(3)
    values = torch.randn(50, 4).relu()  # some zeros: a ReLU'd top-k entry does not fire
    latents = SparseLatents(values, torch.stack([torch.randperm(40)[:4] for _ in range(50)]), 40)
    for metric in (L0, L1, lambda: FeatureDensity(40)):
        sparse, dense = metric(), metric()
        sparse.update(latents)
        dense.update(latents.dense())
        assert torch.allclose(sparse.compute(), dense.compute(), rtol=1e-12)
