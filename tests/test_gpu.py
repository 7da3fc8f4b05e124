"""CUDA paths (skipped without a GPU): every architecture's step equals the CPU one, the k-sparse
training step and the whole Lightning training step make no host sync, and a bf16 fit runs end to end
and exports."""

import pytest
import torch

from saelightning.cli import main
from saelightning.saes import SAEConfig, build_sae
from tests.test_train import HOOK, _config

pytestmark = pytest.mark.gpu

ARCHS = {"topk": dict(k=4, k_aux=8), "batchtopk": dict(k=4, k_aux=8),
         "matryoshka": dict(k=4, k_aux=8, matryoshka_prefixes=[16, 64]),
         "relu": {}, "gated": {}, "jumprelu": dict(threshold_init=0.05)}


def _step(sae, x, dead, sparse):
    kwargs = {"sparse": True} if sparse else {}
    if sae.config.architecture in ("topk", "batchtopk", "matryoshka"):
        kwargs["dead_mask"] = dead
    losses = sae(x, **kwargs)[2]
    grads = torch.autograd.grad(losses["loss"], [p for p in sae.parameters() if p.requires_grad])
    return losses, grads


@pytest.fixture
def exact_matmul():
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # TF32 would round the CUDA products differently
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


@pytest.mark.parametrize("arch", list(ARCHS))
def test_sae_step_on_cuda_equals_cpu(arch, exact_matmul):
    torch.manual_seed(0)
    cpu = build_sae(SAEConfig(architecture=arch, d_in=16, d_sae=64, dtype="float64", **ARCHS[arch])).train()
    with torch.no_grad():
        for p in cpu.parameters():
            p.add_(0.05 * torch.randn_like(p))
    gpu = build_sae(SAEConfig(architecture=arch, d_in=16, d_sae=64, dtype="float64", **ARCHS[arch])).train()
    gpu.load_state_dict(cpu.state_dict())
    gpu = gpu.cuda()
    x = torch.randn(64, 16, dtype=torch.float64)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[:10] = True  # the CUDA AuxK path is the sync-free one, the CPU path the index_select one
    cpu_losses, cpu_grads = _step(cpu, x, dead, sparse=False)
    gpu_losses, gpu_grads = _step(gpu, x.cuda(), dead.cuda(), sparse=False)
    for key in cpu_losses:
        assert torch.allclose(gpu_losses[key].cpu(), cpu_losses[key], rtol=1e-6, atol=1e-9), key
    for g_gpu, g_cpu in zip(gpu_grads, cpu_grads):
        assert torch.allclose(g_gpu.cpu(), g_cpu, rtol=1e-6, atol=1e-9)
    if arch in ("batchtopk", "matryoshka"):
        assert torch.allclose(gpu.threshold.cpu(), cpu.threshold)


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka"])
def test_k_sparse_training_step_makes_no_host_sync(arch):
    """Forward, backward, the decoder-gradient projection and the firing counts of a step, as SAEModule
    runs them, with CUDA's sync debug mode raising on any synchronising call."""
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(architecture=arch, d_in=64, d_sae=512, k=8,
                              matryoshka_prefixes=[64, 512] if arch == "matryoshka" else None)).cuda().train()
    x = torch.randn(1024, 64, device="cuda")
    dead = torch.zeros(512, dtype=torch.bool, device="cuda")
    dead[:32] = True
    sae(x, dead_mask=dead, sparse=True)  # warm-up: lazy CUDA initialisation may synchronise once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _, latents, losses = sae(x, dead_mask=dead, sparse=True)
        losses["loss"].backward()
        sae.before_optimizer_step()
        counts = latents.firing_counts()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(counts.sum()) == int((latents.values != 0).sum())


def test_the_whole_lightning_training_step_makes_no_host_sync():
    """SAEModule's optimizer step wraps the whole training step (forward, the non-finite guard, the
    trackers, backward, clipping, SkipAdam, renormalisation); from the third step on it runs under CUDA's
    sync debug mode. Step 4's batch holds a NaN: the skip path is checked too."""
    import lightning.pytorch as pl

    from saelightning.module import SAEModule

    class NoSyncModule(SAEModule):
        def optimizer_step(self, *args, **kwargs):
            if self.global_step < 2:  # the first steps initialise the SAEs and Adam's state (syncs allowed)
                return super().optimizer_step(*args, **kwargs)
            torch.cuda.set_sync_debug_mode("error")
            try:
                super().optimizer_step(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")

    g = torch.Generator().manual_seed(0)
    batches = [{"acts": {HOOK: (torch.randn(512, 16, generator=g) * 3 + 1).cuda()}, "scales": {HOOK: 1.0}, "index": i}
               for i in range(8)]
    batches[4]["acts"][HOOK][7, 3] = float("nan")
    specs = [{"hook_name": HOOK, "d_sae": 256, "k": 8, "name": "topk"},
             {"hook_name": HOOK, "architecture": "batchtopk", "d_sae": 256, "k": 8, "name": "btk"},
             {"hook_name": HOOK, "architecture": "matryoshka", "d_sae": 256, "k": 8, "name": "mat",
              "options": {"matryoshka_prefixes": [64, 256]}}]
    module = NoSyncModule(saes=specs, n_layer=2, d_model=16, warmup_steps=2, dead_window_tokens=1024)
    trainer = pl.Trainer(accelerator="gpu", devices=1, max_steps=len(batches), logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1000)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    assert module.nonfinite_skipped.item() == 1
    assert module.tokens_seen.item() == 7 * 512
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_bf16_fit_on_cuda_trains_and_exports(tmp_path, nanochat_current_dir, tiny_shards_dir):
    from saelightning.export import load_sae

    saes = [{"hook_name": HOOK, "d_sae": 128, "k": 8, "name": "topk"},
            {"hook_name": HOOK, "architecture": "batchtopk", "d_sae": 128, "k": 8, "name": "btk"}]
    cfg = _config(tmp_path, nanochat_current_dir, tiny_shards_dir, saes=saes, accelerator="gpu", devices=1,
                  precision="bf16-mixed")
    assert main(["fit", "--config", str(cfg)]) == 0
    ckpt = torch.load(tmp_path / "run" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 10
    assert all(torch.isfinite(v).all() for k, v in ckpt["state_dict"].items()
               if v.is_floating_point() and "density" not in k)
    for name in ("topk", "btk"):
        sae = load_sae(tmp_path / "run" / "saes" / name)
        assert sae.W_dec.dtype == torch.float32 and torch.isfinite(sae.W_dec).all()
