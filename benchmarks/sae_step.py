"""SAE training-step throughput (tokens/s) per architecture and shape; on CUDA also the fraction of bf16 peak FLOP/s.

    python benchmarks/sae_step.py [--device cpu|cuda] [--d-in 256 1280] [--expansion 8 32] [--k 32 64]
        [--batch 4096] [--budget 3] [--threads 2] [--max-d-sae N] [--archs topk relu ...] [--autocast bf16]

One step = what SAEModule does per batch and SAE: forward (with AuxK dead latents when --dead > 0),
backward, decoder-gradient projection, gradient clipping, Adam, decoder renormalisation. Activations
are random (cost depends on shapes only). Each row: one warm-up step, one timed step, then as many
steps as fit in --budget seconds (none when that is fewer than --min-steps: the one timed step is the
figure). k applies to topk-style SAEs only (relu/gated/jumprelu: one row per shape). FLOPs counted per
token: the dense encoder product 2·d_in·d_sae forward and, for dense architectures, 4·d_in·d_sae
backward and 6·d_in·d_sae for the decoder; topk-style SAEs gather, so their encoder backward and
decoder count 4·m·d_in and 6·m·d_in (m = k, plus k_aux when latents are dead).
On CPU the default skips d_sae > 16384 (minutes per step on 2 cores); pass --max-d-sae 0 for all.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from contextlib import nullcontext

import torch

from saelightning.saes import SAEConfig, build_sae
from saelightning.saes.base import TOPK_STYLE

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}  # dense


def train_step(sae, opt, x, dead, cast=None, grad_clip: float = 1.0) -> None:
    """One SAE training step in SAEModule's order: forward (sparse where the SAE has it), backward,
    decoder-gradient projection, the clip in SAELens's units, Adam, decoder renormalisation."""
    sparse = {"sparse": True} if getattr(sae, "sparse_forward", False) else {}
    with cast or nullcontext():
        losses = sae(x, dead_mask=dead, **sparse)[2]
    opt.zero_grad(set_to_none=True)
    losses["loss"].backward()
    sae.before_optimizer_step()
    torch.nn.utils.clip_grad_norm_(sae.parameters(), grad_clip * sae.grad_clip_scale())
    opt.step()
    sae.after_optimizer_step()


def peak_tflops(device: str, given: float | None) -> float | None:
    if given:
        return given
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def flops_per_token(arch: str, d_in: int, d_sae: int, k: int, k_aux: int) -> float:
    if arch in TOPK_STYLE:
        return 2 * d_in * d_sae + 4 * (k + k_aux) * d_in + 6 * (k + k_aux) * d_in
    return 12 * d_in * d_sae


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(a, arch: str, d_in: int, d_sae: int, k: int) -> tuple[float, int, int]:
    """(seconds per step, timed steps, k_aux used) for one SAE shape."""
    cfg = SAEConfig(architecture=arch, d_in=d_in, d_sae=d_sae, k=k, l1_warmup_steps=0)
    sae = build_sae(cfg).to(a.device)
    x = torch.randn(a.batch, d_in, device=a.device)
    sae.init_from_batch(x)
    from saelightning.optim import SkipAdam  # here: the SAELens venv imports this file without lightning

    opt = SkipAdam(sae.parameters(), lr=1e-4, eps=6.25e-10)  # SAEModule's optimizer (fused Adam)
    dead = torch.zeros(d_sae, dtype=torch.bool, device=a.device)
    dead[: int(a.dead * d_sae)] = True
    cast = (torch.autocast(device_type=a.device.split(":")[0], dtype=torch.bfloat16) if a.autocast == "bf16"
            else nullcontext())

    def step():
        train_step(sae, opt, x, dead, cast)

    step()
    _sync(a.device)
    t0 = time.perf_counter()
    step()
    _sync(a.device)
    first = time.perf_counter() - t0
    n = min(a.max_steps, int(a.budget / max(first, 1e-9)))
    if n < a.min_steps:  # a slow shape: the timed step after the warm-up is the figure
        return first, 1, _k_aux(cfg, dead)
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    _sync(a.device)
    return (time.perf_counter() - t0) / n, n, _k_aux(cfg, dead)


def _k_aux(cfg: SAEConfig, dead: torch.Tensor) -> int:
    return min(cfg.k_aux_resolved, int(dead.sum())) if cfg.architecture in TOPK_STYLE else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--archs", nargs="+", default=["topk", "batchtopk", "matryoshka", "relu", "gated", "jumprelu"])
    p.add_argument("--d-in", type=int, nargs="+", default=[256, 1280])
    p.add_argument("--expansion", type=int, nargs="+", default=[8, 32])
    p.add_argument("--k", type=int, nargs="+", default=[32, 64])
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--dead", type=float, default=0.0, help="fraction of latents marked dead (AuxK runs when > 0)")
    p.add_argument("--budget", type=float, default=3.0, help="seconds of timed steps per row")
    p.add_argument("--min-steps", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=50)
    p.add_argument("--max-d-sae", type=int, default=None, help="skip wider SAEs (CPU default 16384; 0: no limit)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--autocast", default="none", choices=["none", "bf16"])
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak of the GPU (default: by its name)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    limit = a.max_d_sae if a.max_d_sae is not None else (16384 if a.device == "cpu" else 0)
    peak = peak_tflops(a.device, a.peak_tflops)
    name = torch.cuda.get_device_name() if a.device.startswith("cuda") else (platform.processor() or platform.machine())
    print(f"# {name}, {a.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, batch {a.batch}, "
          f"dead {a.dead:.0%}, autocast {a.autocast}, peak bf16 {peak or '-'} TFLOP/s")
    print("| arch | d_in | d_sae | k | steps | ms/step | tokens/s | TFLOP/s | of bf16 peak |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for d_in in a.d_in:
        for e in a.expansion:
            d_sae = d_in * e
            if limit and d_sae > limit:
                print(f"| (skipped d_in {d_in} d_sae {d_sae}: over --max-d-sae {limit}) |||||||||")
                continue
            for arch in a.archs:
                for k in (a.k if arch in TOPK_STYLE else a.k[:1]):
                    sec, n, k_aux = time_steps(a, arch, d_in, d_sae, k)
                    tflops = flops_per_token(arch, d_in, d_sae, k, k_aux) * a.batch / sec / 1e12
                    frac = f"{tflops / peak:.1%}" if peak else "-"
                    kk = str(k) if arch in TOPK_STYLE else "-"
                    print(f"| {arch} | {d_in} | {d_sae} | {kk} | {n} | {sec * 1e3:,.1f} | {a.batch / sec:,.0f} | "
                          f"{tflops:.3f} | {frac} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
