"""The optimizer step alone: SAEModule's SkipAdam (fused Adam, per-SAE skip flags) against torch's default Adam.

    python benchmarks/optimizer_step.py [--device cpu|cuda] [--d-in 256 1280] [--expansion 8 32] [--threads 1]
        [--steps 5]

Parameters of one SAE (W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_in], b_dec, fp32) with random gradients.
"default Adam" is `torch.optim.Adam(params)` with the implementation torch picks (foreach on CUDA, the
per-tensor loop on CPU), what SAEModule used before SkipAdam. SkipAdam runs with its skip flag set to 0 on the
device, as in training. The step is memory-bound: "GB/s" counts 28 bytes per parameter (reads of the parameter,
its gradient and both moments, writes of the parameter and both moments, fp32), the least any Adam step must move.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from saelightning.optim import SkipAdam


def _params(d_in: int, d_sae: int, device: str) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    shapes = [(d_in, d_sae), (d_sae,), (d_sae, d_in), (d_in,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(device)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(device)
    return params


def time_optimizer(kind: str, d_in: int, d_sae: int, a) -> float:
    params = _params(d_in, d_sae, a.device)
    if kind == "skip":
        opt = SkipAdam([{"params": params, "name": "sae"}], lr=1e-4, eps=6.25e-10)
    else:
        opt = torch.optim.Adam(params, lr=1e-4, eps=6.25e-10)
    flag = torch.zeros((), device=a.device)

    def step():
        if kind == "skip":
            opt.skip["sae"] = flag
        opt.step()

    for _ in range(2):
        step()
    if a.device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    if a.device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / a.steps


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--d-in", type=int, nargs="+", default=[256, 1280])
    p.add_argument("--expansion", type=int, nargs="+", default=[8, 32])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    name = torch.cuda.get_device_name() if a.device.startswith("cuda") else (platform.processor() or platform.machine())
    print(f"# {name}, {a.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, {a.steps} timed steps")
    print("| d_in | d_sae | params | default Adam ms | SkipAdam ms | speed-up | SkipAdam GB/s |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for d_in in a.d_in:
        for e in a.expansion:
            d_sae = d_in * e
            n = 2 * d_in * d_sae + d_sae + d_in
            default = time_optimizer("default", d_in, d_sae, a)
            skip = time_optimizer("skip", d_in, d_sae, a)
            print(f"| {d_in} | {d_sae} | {n / 1e6:.1f}M | {default * 1e3:,.2f} | {skip * 1e3:,.2f} | "
                  f"{default / skip:.1f}x | {28 * n / skip / 1e9:,.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
