"""Metrics equal a direct computation, and pooled over two gloo processes equal one process on the union."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from saelightning.metrics import (
    L0,
    L1,
    MSE,
    DeadFraction,
    ExplainedVariance,
    FeatureDensity,
    ReconstructionMetrics,
    log10_density,
)

pytestmark = pytest.mark.numerics  # fp32 results compared across code paths: also run under other CPU kernels


def _data(seed=0, n=96, d=6, d_sae=10):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * 3 + 1.5
    x_hat = x + 0.4 * torch.randn(n, d, generator=g)
    latents = torch.relu(torch.randn(n, d_sae, generator=g) - 0.8)
    latents[:, 3] = 0  # one latent never fires
    return x, x_hat, latents


def _direct(x, x_hat, latents):
    x, x_hat = x.double(), x_hat.double()
    sse = (x - x_hat).pow(2).sum(-1).mean()
    var = x.pow(2).sum(-1).mean() - x.mean(0).pow(2).sum()
    return {
        "explained_variance": 1 - sse / var,
        "mse": sse / x.shape[1],
        "cossim": torch.nn.functional.cosine_similarity(x, x_hat, dim=-1).mean(),
        "l2_ratio": (x_hat.norm(dim=-1) / x.norm(dim=-1)).mean(),
        "relative_reconstruction_bias": x_hat.pow(2).sum(-1).mean() / (x * x_hat).sum(-1).mean(),
        "l0": (latents != 0).double().sum(-1).mean(),
        "l1": latents.double().abs().sum(-1).mean(),
        "density": (latents != 0).double().mean(0),
    }


def _compute_all(batches, d, d_sae):
    metrics = {"rec": ReconstructionMetrics(d), "ev": ExplainedVariance(d), "mse": MSE(d), "l0": L0(),
               "l1": L1(), "density": FeatureDensity(d_sae), "dead": DeadFraction(d_sae)}
    for x, x_hat, latents in batches:  # several updates: pooled, not a mean of batch means
        metrics["rec"].update(x, x_hat)
        metrics["ev"].update(x, x_hat)
        metrics["mse"].update(x, x_hat)
        for key in ("l0", "l1", "density", "dead"):
            metrics[key].update(latents)
    out = dict(metrics["rec"].compute())
    out.update(ev=metrics["ev"].compute(), mse_only=metrics["mse"].compute(), l0=metrics["l0"].compute(),
               l1=metrics["l1"].compute(), density=metrics["density"].compute(), dead=metrics["dead"].compute())
    return out


def test_metrics_equal_direct_computation():
    x, x_hat, latents = _data()
    got = _compute_all([(x[:40], x_hat[:40], latents[:40]), (x[40:], x_hat[40:], latents[40:])], 6, 10)
    want = _direct(x, x_hat, latents)
    for key in ("explained_variance", "mse", "cossim", "l2_ratio", "relative_reconstruction_bias", "l0", "l1",
                "density"):
        torch.testing.assert_close(got[key], want[key], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got["ev"], want["explained_variance"])
    torch.testing.assert_close(got["mse_only"], want["mse"])
    assert got["dead"].item() == pytest.approx(0.1)  # latent 3 of 10
    # a perfect reconstruction explains everything; predicting the mean explains nothing
    perfect = ExplainedVariance(6)
    perfect.update(x, x)
    assert perfect.compute().item() == pytest.approx(1.0)
    mean = ExplainedVariance(6)
    mean.update(x, x.mean(0, keepdim=True).expand_as(x))
    assert mean.compute().item() == pytest.approx(0.0, abs=1e-12)


def test_log10_density_is_finite_for_dead_latents():
    out = log10_density(torch.tensor([0.0, 0.1, 1.0]))
    torch.testing.assert_close(out, torch.tensor([-10.0, -1.0, 0.0]))


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    x, x_hat, latents = _data()
    half = slice(0, 50) if rank == 0 else slice(50, None)  # uneven halves: a mean of means would differ
    got = _compute_all([(x[half], x_hat[half], latents[half])], 6, 10)
    torch.save(got, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_equals_one_process_on_union(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    x, x_hat, latents = _data()
    want = _compute_all([(x, x_hat, latents)], 6, 10)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for key, value in want.items():
            torch.testing.assert_close(got[key], value, rtol=1e-12, atol=1e-12)


def test_saebench_density_figures_by_hand():
    from saelightning.metrics import density_metrics

    # SAEBench's own example: densities 0, 0.005, 0.02, 0.2 -> 2 of 4 over 1%, 1 of 4 over 10%, and those
    # latents make 0.22 / 0.225 and 0.2 / 0.225 of all firings
    got = {k: float(v) for k, v in density_metrics(torch.tensor([0.0, 0.005, 0.02, 0.2])).items()}
    assert got == pytest.approx({"freq_over_1_percent": 0.5, "freq_over_10_percent": 0.25,
                                 "normalized_freq_over_1_percent": 0.22 / 0.225,
                                 "normalized_freq_over_10_percent": 0.2 / 0.225})
    nothing = density_metrics(torch.zeros(3))
    assert all(float(v) == 0 for v in nothing.values())


def test_saebench_weight_figures_by_hand():
    from saelightning.metrics import max_cosine_sim, weight_metrics

    # three latents in 2-d: decoder rows e1, e1, e2 -> max cosines to another row 1, 1, 0 (mean 2/3)
    W_dec = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    # encoder columns at 0°, 90°, 45°: pairwise cosines 0, √½, √½ -> max √½, √½, √½
    W_enc = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    got = weight_metrics(W_enc, W_dec)
    half = 0.5 ** 0.5
    # encoder vs decoder of each latent: cos(0°,0°)=1, cos(90°,0°)=0, cos(45°,90°)=√½
    assert got == pytest.approx({"average_max_encoder_cosine_sim": half, "average_max_decoder_cosine_sim": 2 / 3,
                                 "average_encoder_decoder_cosine_sim": (1 + 0 + half) / 3}, abs=1e-6)
    # blockwise equals the whole F x F matrix with its diagonal left out
    vectors = torch.randn(37, 5, generator=torch.Generator().manual_seed(0))
    unit = torch.nn.functional.normalize(vectors, dim=1)
    sims = unit @ unit.T
    sims.fill_diagonal_(float("-inf"))
    torch.testing.assert_close(max_cosine_sim(vectors, block=8), sims.max(dim=1).values)
