"""Sparse (embedding_bag gather of the k active rows) vs dense ([N, d_sae] @ W_dec) TopK decoding.

Times forward + backward (gradients to W_dec and to the k values per row), checks that both give the
same output and gradients, and prints a table. CPU by default; `--device cuda` on a GPU machine.
    .venv/bin/python benchmarks/sparse_decode.py [--batch 1024] [--device cpu]
"""

import argparse
import os
import time

import torch

from saelightning.saes.sparse import dense_decode, sparse_decode

D_INS = (256, 1280)
EXPANSIONS = (8, 16, 32)
KS = (32, 64)


def _step(decode, values, indices, W_dec, grad_out):
    values.grad = W_dec.grad = None
    out = decode(values, indices, W_dec)
    out.backward(grad_out)
    return out


def _time(decode, args, device, min_reps=3, budget_s=4.0):
    _step(decode, *args)  # warm-up (allocations, kernel choice)
    times = []
    while len(times) < min_reps or (sum(times) < budget_s and len(times) < 20):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        _step(decode, *args)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        if sum(times) > 4 * budget_s:
            break
    return sorted(times)[len(times) // 2]


def bench(d_in, d_sae, k, batch, device):
    gen = torch.Generator(device="cpu").manual_seed(0)
    W_dec = torch.randn(d_sae, d_in, generator=gen).to(device).requires_grad_()
    indices = torch.stack([torch.randperm(d_sae, generator=gen)[:k] for _ in range(batch)]).to(device)
    values = torch.rand(batch, k, generator=gen).to(device).requires_grad_()
    grad_out = torch.randn(batch, d_in, generator=gen).to(device)
    args = (values, indices, W_dec, grad_out)
    sparse_out = _step(sparse_decode, *args).detach()
    sparse_grads = (values.grad.clone(), W_dec.grad.clone())
    dense_out = _step(dense_decode, *args).detach()
    diff = max(float((sparse_out - dense_out).abs().max()), float((sparse_grads[0] - values.grad).abs().max()),
               float((sparse_grads[1] - W_dec.grad).abs().max()))
    return _time(sparse_decode, args, device), _time(dense_decode, args, device), diff


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1024, help="tokens per decode")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, batch {args.batch}, "
          f"cpus {os.cpu_count()}, load average {load}")
    print("| d_in | d_sae | k | sparse fwd+bwd (ms) | dense fwd+bwd (ms) | speed-up | max abs diff |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for d_in in D_INS:
        for expansion in EXPANSIONS:
            for k in KS:
                sparse_s, dense_s, diff = bench(d_in, d_in * expansion, k, args.batch, args.device)
                print(f"| {d_in} | {d_in * expansion} | {k} | {sparse_s * 1e3:.1f} | {dense_s * 1e3:.1f} | "
                      f"{dense_s / sparse_s:.1f}x | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
