"""torch.profiler tables of one TopK SAE training step: the bare SAE step and the fit step (Trainer + SAEModule).

    python benchmarks/profile_step.py [--d-in 128] [--d-sae 1024] [--k 16] [--batch 4096] [--steps 6] [--threads 1]
        [--dead 0.25] [--device cuda]

Random activations (the costs depend on shapes, not values); prints the top ops by self CPU time, and on
CUDA by self CUDA time (the kernels), with the CUDA steps' total beside the host's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sae_step import train_step as sae_step  # noqa: E402


def profile_sae(a, batches):
    from saelightning.optim import SkipAdam
    from saelightning.saes import SAEConfig, build_sae

    sae = build_sae(SAEConfig(architecture="topk", d_in=a.d_in, d_sae=a.d_sae, k=a.k)).to(a.device)
    sae.init_from_batch(batches[0])
    opt = SkipAdam(sae.parameters(), lr=1e-3, eps=6.25e-10)
    dead = torch.zeros(a.d_sae, dtype=torch.bool, device=a.device)
    dead[: int(a.dead * a.d_sae)] = True  # AuxK runs when some latents are dead
    sae_step(sae, opt, batches[0], dead)
    _sync(a.device)
    with profile(activities=_activities(a.device)) as prof:
        for x in batches:
            sae_step(sae, opt, x, dead)
        _sync(a.device)
    return prof


def _activities(device: str) -> list:
    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class _Batches:
    """An iterable of batch dicts (a plain list would read as several dataloaders)."""

    def __init__(self, items):
        self.items = items

    def __iter__(self):
        return iter(self.items)

    def __len__(self):
        return len(self.items)


def profile_fit(a, batches):
    import lightning.pytorch as pl

    from saelightning.module import SAEModule

    hook = "blocks.0.hook_resid_post"
    data = _Batches([{"acts": {hook: x}, "scales": {hook: 1.0}, "index": i} for i, x in enumerate(batches * 2)])
    module = SAEModule(saes=[{"hook_name": hook, "d_sae": a.d_sae, "k": a.k}], n_layer=1, d_model=a.d_in,
                       warmup_steps=1)

    class Prof(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == len(batches):
                _sync(a.device)
                self.prof = profile(activities=_activities(a.device))
                self.prof.__enter__()

    cb = Prof()
    trainer = pl.Trainer(accelerator="gpu" if a.device.startswith("cuda") else "cpu", devices=1, max_steps=len(data),
                         limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, log_every_n_steps=25, callbacks=[cb])
    trainer.fit(module, train_dataloaders=data)
    _sync(a.device)
    cb.prof.__exit__(None, None, None)
    return cb.prof


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d-in", type=int, default=128)
    p.add_argument("--d-sae", type=int, default=1024)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rows", type=int, default=18)
    p.add_argument("--dead", type=float, default=0.0, help="fraction of latents marked dead in the sae profile (AuxK)")
    p.add_argument("--what", default="both", choices=["sae", "fit", "both"])
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    batches = [torch.randn(a.batch, a.d_in).to(a.device) for _ in range(a.steps)]
    for what, fn in (("sae", profile_sae), ("fit", profile_fit)):
        if a.what in (what, "both"):
            prof = fn(a, batches)
            print(f"## {what} step: d_in {a.d_in}, d_sae {a.d_sae}, k {a.k}, batch {a.batch}, {a.steps} steps")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.rows))
            if a.device.startswith("cuda"):
                print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=a.rows))


if __name__ == "__main__":
    main()
