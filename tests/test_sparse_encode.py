"""The sparse encoder backward (gather_encode, TopK; gather_encode_ragged, BatchTopK and Matryoshka) equals dense
autograd; SparseLatents (padded and ragged) count firing as the dense latents do."""

import functools

import pytest
import torch

from saelightning.saes import SAEConfig, build_sae
from saelightning.saes.sparse import SparseLatents, gather_encode, sparse_decode
from saelightning.saes.topk import TopKSAE

pytestmark = pytest.mark.numerics  # fp32 results compared across code paths: also run under other CPU kernels


def _auxk_reference(sae, pre, x, x_hat, dead_mask):
    """aux_coefficient x AuxK by dense autograd: the top k_aux dead pre-activations reconstruct the residual."""
    k_aux = min(sae.config.k_aux_resolved, int(dead_mask.sum()))
    aux_values, aux_indices = pre.masked_fill(~dead_mask, float("-inf")).topk(k_aux, dim=-1)
    e = (x - x_hat).detach()
    e_hat = sparse_decode(aux_values.relu(), aux_indices, sae.W_dec)
    return sae.config.aux_coefficient * (e_hat - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum()


def _reference_loss(sae, x, dead_mask):
    """The TopK loss by plain dense autograd (the definition the sparse path must reproduce)."""
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    values, indices = pre.topk(sae.config.k, dim=-1)
    x_hat = sparse_decode(values.relu(), indices, sae.W_dec) + sae.b_dec
    fvu = (x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    return fvu + _auxk_reference(sae, pre, x, x_hat, dead_mask)


def _sae_with_dead_latents(monkeypatch, seed, n_dead, sync_free, **config):
    """A float64 SAE (d_in 16, d_sae 64, k 4, k_aux 8) with random biases, 32 inputs, n_dead latents marked dead,
    and AuxK forced onto its CUDA (sync_free) or CPU path."""
    torch.manual_seed(seed)
    sae = build_sae(SAEConfig(d_in=16, d_sae=64, k=4, k_aux=8, dtype="float64", **config)).train()
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    x = torch.randn(32, 16, dtype=torch.float64)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[torch.randperm(64)[:n_dead]] = True
    monkeypatch.setattr(TopKSAE, "_aux_indices", functools.partialmethod(TopKSAE._aux_indices, sync_free=sync_free))
    return sae, x, dead


def _assert_same_loss_and_gradients(sae, loss, expected):
    grads = torch.autograd.grad(loss, list(sae.parameters()))
    expected_grads = torch.autograd.grad(expected, list(sae.parameters()))
    assert torch.allclose(loss.double(), expected, rtol=1e-6)  # the SAE reports losses in float32
    for g, e in zip(grads, expected_grads):
        assert torch.allclose(g, e, rtol=1e-5, atol=1e-9)  # float32 loss arithmetic in both


@pytest.mark.parametrize("sync_free", [False, True])
@pytest.mark.parametrize("n_dead", [3, 40])  # fewer dead latents than k_aux, and more
def test_topk_forward_loss_and_gradients_equal_dense_autograd(monkeypatch, sync_free, n_dead):
    sae, x, dead = _sae_with_dead_latents(monkeypatch, 0, n_dead, sync_free, architecture="topk")
    loss = sae(x, dead_mask=dead)[2]["loss"]
    _assert_same_loss_and_gradients(sae, loss, _reference_loss(sae, x, dead))


@pytest.mark.parametrize("sync_free", [False, True])
def test_auxk_loss_is_zero_without_dead_latents(monkeypatch, sync_free):
    sae = build_sae(SAEConfig(architecture="topk", d_in=8, d_sae=32, k=4))
    monkeypatch.setattr(TopKSAE, "_aux_indices", functools.partialmethod(TopKSAE._aux_indices, sync_free=sync_free))
    losses = sae(torch.randn(10, 8), dead_mask=torch.zeros(32, dtype=torch.bool))[2]
    assert float(losses["auxk_loss"]) == 0.0


@pytest.mark.parametrize("shifted", [True, False])
def test_gather_encode_gradients_to_the_encoder_and_b_dec(shifted):
    """W_enc, b_enc and b_dec (through x_c = x - b_dec) get dense autograd's gradients; b_dec's is
    -W_enc @ (per-column sums of g), not a per-token gradient of x_c."""
    torch.manual_seed(1)
    x = torch.randn(6, 5, dtype=torch.float64)
    W, b = (torch.randn(5, 12, dtype=torch.float64, requires_grad=True),
            torch.randn(12, dtype=torch.float64, requires_grad=True))
    b_dec = torch.randn(5, dtype=torch.float64, requires_grad=True)
    indices = torch.randint(0, 12, (6, 3))
    x_c = x - b_dec if shifted else x
    with torch.no_grad():
        pre = x_c @ W + b
    params = [W, b, b_dec] if shifted else [W, b]
    got = torch.autograd.grad(gather_encode(pre, x_c, W, b, indices, b_dec if shifted else None).pow(2).sum(), params)
    want = torch.autograd.grad((x_c @ W + b).gather(1, indices).pow(2).sum(), params)
    for g, e in zip(got, want, strict=True):
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


def _batch_topk_reference(sae, x, dead_mask):
    """BatchTopK / Matryoshka loss by dense autograd: dense latents keeping the k·N largest of the batch."""
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    keep = torch.zeros(pre.numel(), dtype=torch.bool)
    keep[pre.relu().flatten().topk(sae.config.k * x.shape[0]).indices] = True
    latents = pre.relu() * keep.view_as(pre)
    total = (x - x.mean(0)).pow(2).sum()
    sizes = sae.config.prefixes if sae.config.architecture == "matryoshka" else [sae.config.d_sae]
    main = sum((latents[:, :m] @ sae.W_dec[:m] + sae.b_dec - x).pow(2).sum() / total for m in sizes)
    x_hat = latents @ sae.W_dec + sae.b_dec
    return main + _auxk_reference(sae, pre, x, x_hat, dead_mask), latents


@pytest.mark.parametrize("sync_free", [False, True])
@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_batchtopk_forward_loss_gradients_and_threshold_equal_dense_autograd(monkeypatch, arch, sync_free):
    sae, x, dead = _sae_with_dead_latents(monkeypatch, 4, 5, sync_free, architecture=arch,
                                          matryoshka_prefixes=[16, 64] if arch == "matryoshka" else None)
    _, latents, losses = sae(x, dead_mask=dead, sparse=True)
    expected, dense = _batch_topk_reference(sae, x, dead)
    assert isinstance(latents, SparseLatents) and latents.shape == (32, 64) and latents.rows is not None
    assert torch.equal(latents.dense() != 0, dense != 0)  # the same k·N entries
    assert torch.allclose(latents.dense(), dense, rtol=1e-12)  # (addmm and matmul + add round differently)
    assert int((dense != 0).sum()) == 4 * 32
    assert torch.isclose(sae.threshold.double(), dense[dense > 0].min())  # the first batch sets the threshold
    _assert_same_loss_and_gradients(sae, losses["loss"], expected)


def test_batchtopk_eval_forward_uses_the_threshold_and_matches_encode():
    torch.manual_seed(5)
    sae = build_sae(SAEConfig(architecture="batchtopk", d_in=8, d_sae=32, k=3)).train()
    x = torch.randn(40, 8)
    sae(x)  # sets the threshold
    sae.eval()
    x_hat, dense, _ = sae(x)
    _, latents, _ = sae(x, sparse=True)
    assert torch.equal(dense, sae.encode(x)) and torch.equal(latents.dense(), dense)
    assert torch.allclose(x_hat, sae.decode(dense), atol=1e-6)


def test_metrics_from_ragged_latents_equal_the_dense_ones():
    from saelightning.metrics import L0, L1, FeatureDensity

    torch.manual_seed(6)
    dense = torch.randn(30, 40).relu() * (torch.rand(30, 40) < 0.2)
    dense[7] = 0.0  # a token with nothing active
    rows, columns = dense.nonzero(as_tuple=True)
    latents = SparseLatents(dense[rows, columns], columns, 40, rows, 30)
    assert latents.shape == (30, 40) and torch.equal(latents.dense(), dense)
    assert torch.equal(latents.firing_counts(), (dense != 0).sum(0).double())
    for metric in (L0, L1, lambda: FeatureDensity(40)):
        sparse, reference = metric(), metric()
        sparse.update(latents)
        reference.update(dense)
        assert torch.allclose(sparse.compute(), reference.compute(), rtol=1e-12)


@pytest.mark.parametrize("case", ["typical", "sample_misses", "ties_at_zero"])
def test_batch_topk_selection_equals_a_full_topk(case):
    from saelightning.saes.sparse import _top_flat_indices, batch_topk_ragged

    gen = torch.Generator().manual_seed(7)
    pre = torch.randn(256, 96, generator=gen) * (1 + 3 * torch.rand(256, 1, generator=gen))  # token norms vary
    if case == "sample_misses":  # the sampled rows (every 16th) are far above the rest: too few pass their cut
        pre[::16] += 100.0
    if case == "ties_at_zero":
        pre = pre.relu()
    n_keep = 8 * 256
    want = pre.flatten().topk(n_keep).indices.sort().values
    got = _top_flat_indices(pre, n_keep)
    if case == "ties_at_zero":  # more than n_keep zeros: any of them may be kept; the kept values must agree
        assert torch.equal(pre.flatten()[got].sort().values, pre.flatten()[want].sort().values)
    else:
        assert torch.equal(got, want)
    rows, columns, offsets = batch_topk_ragged(pre, 8)
    assert torch.equal(rows * 96 + columns, got)
    assert torch.equal(offsets, torch.searchsorted(rows, torch.arange(256)))
