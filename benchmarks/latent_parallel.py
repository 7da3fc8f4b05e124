"""The latent-parallel SAE step on CPU (gloo): step time, peak memory and bytes communicated per rank against the
latent-parallel degree n (n processes, one latent group).

    python benchmarks/latent_parallel.py [--sizes 1 2 4] [--d-in 256] [--d-sae 65536] [--k 32] [--batch 1024]
        [--steps 3] [--dead 0.25] [--threads 1] [--arch topk] [--whole-init]
    python benchmarks/latent_parallel.py --model   # the step at scale: d_sae 1M/4M/16M on 8 x H100 (no run)

Each process draws its shard of the same SAE (seed 0; n = 1: the ordinary unsharded SAE), then takes one
warm-up step and --steps timed steps of what SAEModule does per batch: forward (sparse, AuxK over the --dead
fraction of latents), backward, the decoder-gradient projection, the clip over all shards, SkipAdam, the decoder
renormalisation. Every rank draws the same batch (a latent group reads the same tokens).

Per rank it reports:
- ms/step: the median of the timed steps (wall clock, after a barrier);
- SAE state: the bytes of this rank's parameters, their gradients and Adam moments, counted from the tensors;
- peak: the process's peak resident set (getrusage ru_maxrss) minus its resident set just before the SAE is built
  (after torch and the process group are up): what the SAE, its optimizer, the step's activations and the
  communication buffers took at their high-water mark, start-up included; "start-up peak" is the same mark
  taken once the SAE is built, before its first step (--whole-init: every rank draws the whole SAE and cuts it).
  Not tracemalloc (it sees Python's allocations, not torch's CPU allocator) and torch has no allocator
  statistics on CPU; RSS counts the pages the tensors touch, which is what a rank needs;
- gathered / reduced: bytes per step counted by CollectiveCounter (saes/latent.py), which wraps
  torch.distributed's all_gather / all_reduce / broadcast as they are called: received from all-gathers, put into
  all-reduces; "formula" is communication_per_step's prediction (the README's), and "=" says they are equal;
- sent: the bytes the process wrote (/proc/self/io wchar) during the timed steps, per step: gloo's TCP sends, the
  measured wire traffic; "ring" is gathered + 2·(n-1)/n · reduced, what ring all-gathers and all-reduces send.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from saelightning.optim import SkipAdam
from saelightning.saes import SAEConfig, build_sae
from saelightning.saes.latent import CollectiveCounter, LatentShard, communication_per_step


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _wchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    return 0


def state_bytes(sae, optimizer) -> int:
    """Bytes of the SAE's parameters and buffers, their gradients and the optimizer's state tensors."""
    tensors = list(sae.parameters()) + list(sae.buffers())
    tensors += [p.grad for p in sae.parameters() if p.grad is not None]
    tensors += [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors)


def _step(sae, x, optimizer, dead) -> None:
    kwargs = {"sparse": True} if sae.sparse_forward else {}
    loss = sae(x, dead_mask=dead, **kwargs)[2]["loss"]
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    sae.before_optimizer_step()
    sae.clip_grad_norm(1.0 * sae.grad_clip_scale())
    optimizer.step()
    sae.after_optimizer_step()


def _build(config: SAEConfig, shard: LatentShard | None, batch: int, dead: float, whole_init: bool = False):
    """The SAE (seed 0; this rank's shard), a batch, SkipAdam, and the dead mask of this rank's latents."""
    torch.manual_seed(0)
    if whole_init and shard is not None:  # the whole SAE drawn, then cut (a module built outside deferred_sae_init)
        sae = build_sae(config)
        sae.shard_latents(shard)
    else:
        sae = build_sae(config, shard)  # only this rank's latents, as the trainer draws them
    x = torch.randn(batch, config.d_in, generator=torch.Generator().manual_seed(1))
    sae.init_from_batch(x)
    optimizer = SkipAdam([{"params": list(sae.parameters()), "lr": 1e-4, "name": "sae"}], eps=6.25e-10)
    mask = torch.arange(config.d_sae) < int(dead * config.d_sae)
    if shard is not None:
        mask = mask[shard.offset:shard.offset + shard.d_local]
    return sae, x, optimizer, mask


def _worker(rank: int, size: int, port: int, args: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args["threads"])
    dist.init_process_group("gloo", rank=rank, world_size=size)
    config = SAEConfig(architecture=args["arch"], d_in=args["d_in"], d_sae=args["d_sae"], k=args["k"],
                       l1_warmup_steps=0)
    shard = LatentShard(None, rank, size, config.d_sae) if size > 1 else None
    tiny = replace(config, d_sae=8 * size, k=2)  # one step of a tiny SAE first: the libraries' kernels load
    _step(*_build(tiny, shard and LatentShard(None, rank, size, tiny.d_sae), args["batch"], args["dead"]))
    baseline = _rss_bytes()
    sae, x, optimizer, dead = _build(config, shard, args["batch"], args["dead"], args["whole_init"])
    startup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    _step(sae, x, optimizer, dead)  # warm-up: allocates the gradients and Adam's moments
    times = []
    with CollectiveCounter() as counter:
        sent = _wchar()  # (the barriers' bytes are in it: a few per step)
        for _ in range(args["steps"]):
            dist.barrier()
            start = time.perf_counter()
            _step(sae, x, optimizer, dead)
            times.append(time.perf_counter() - start)
        sent = _wchar() - sent
    result = {"ms": statistics.median(times) * 1e3, "state": state_bytes(sae, optimizer), "startup": startup,
              "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline,
              "gathered": counter.gathered / args["steps"], "reduced": counter.reduced / args["steps"],
              "broadcast": counter.broadcast / args["steps"], "sent": sent / args["steps"]}
    Path(out, f"{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


# --- the step at scale: a model from published figures (--model) ---

H100_SXM = {"name": "H100 SXM", "bf16_flops": 989e12,  # dense bf16 tensor-core peak
            "fp32_flops": 67e12,  # fp32 without tensor cores (torch's default: TF32 off)
            "hbm_bytes": 80e9, "hbm_bw": 3.35e12,  # HBM3: 80 GB at 3.35 TB/s
            "link_bw": 450e9}  # NVLink 4: 900 GB/s bidirectional per GPU, 450 GB/s each way

MODEL_ASSUMPTIONS = [
    "one latent group of all the GPUs (latent-parallel n = GPUs, data-parallel 1); every GPU sees the batch's tokens",
    "TopK, the trainer's step: AuxK with its default k_aux = d_in / 2 over a dead mask (always passed), fp32 "
    "parameters and Adam moments; the encoder product under trainer.precision: bf16-mixed (autocast: bf16 "
    "tensor cores, bf16 pre-activations; not yet run on a GPU) or 32-true (the 4M config's: fp32 at the fp32 "
    "peak, fp32 pre-activations); MFU against the bf16 peak in both",
    "FLOPs: encoder 2·N·d_in·d_sae/n per GPU (dense); sparse decode 2·N·m·d_in and sparse backward 8·N·m·d_in "
    "(encoder and decoder gradients of the m = k + k_aux gathered latents), over the whole group, spread evenly",
    "HBM traffic: 5 passes over the [N, d_sae/n] pre-activations (the product's write, top-k, AuxK's masked "
    "copy written and read, its top-k); per latent row pair 84·d_in bytes: W_enc 32 (its gradient zeroed 4, Adam "
    "reads p, g, m, v and writes p, m, v: 28), W_dec 52 (zeroed 4, the gradient projection 12, Adam 28, "
    "renormalisation 8)",
    "communication: communication_per_step's bytes (fp32 values, int64 indices), all-reduces as rings "
    "(2·(n-1)/n of the payload), at the link's one-way peak",
    "memory per GPU: weights, gradients and Adam's two moments in fp32 (16 bytes per parameter) and 3 copies of "
    "the [N, d_sae/n] pre-activations (the product, AuxK's masked copy, top-k's workspace)",
    "step time: compute at the peak + HBM traffic at its peak + communication, not overlapped (the top-k "
    "gather sits between the encoder and the decode); a lower bound on a real step, so MFU an upper bound",
]


def scale_model(d_sae: int, d_in: int = 2048, k: int = 64, tokens: int = 4096, gpus: int = 8,
                precision: str = "bf16-mixed", gpu: dict = H100_SXM) -> dict:
    """The latent-parallel TopK step of one SAE on `gpus` GPUs of a node, from MODEL_ASSUMPTIONS."""
    n, N = gpus, tokens
    act, peak = (2, gpu["bf16_flops"]) if precision == "bf16-mixed" else (4, gpu["fp32_flops"])
    config = SAEConfig(architecture="topk", d_in=d_in, d_sae=d_sae, k=k)
    d_local, m = d_sae // n, k + config.k_aux_resolved
    encoder = 2 * N * d_in * d_local  # per GPU
    decode, backward = 2 * N * m * d_in / n, 8 * N * m * d_in / n
    flops = encoder + decode + backward
    params = d_local * (2 * d_in + 1)
    hbm = 5 * N * d_local * act + 84 * d_in * d_local
    gathered, reduced = communication_per_step(config, n, N)
    wire = gathered + 2 * (n - 1) / n * reduced
    memory = {"weights": 4 * params, "adam": 8 * params, "grads": 4 * params, "activations": 3 * N * d_local * act}
    times = {"compute": flops / peak, "hbm": hbm / gpu["hbm_bw"], "comm": wire / gpu["link_bw"]}
    step = sum(times.values())
    return {"d_sae": d_sae, "precision": precision, "hbm": hbm,
            "flops": {"encoder": encoder, "decode": decode, "backward": backward},
            "gathered": gathered, "reduced": reduced, "wire": wire, "memory": memory,
            "fits": sum(memory.values()) <= gpu["hbm_bytes"], "times": times, "step": step,
            "mfu": flops / (step * gpu["bf16_flops"]), "tokens_per_s": N / step}


def print_scale_model(widths=(2**20, 2**22, 2**24), d_in: int = 2048, k: int = 64, tokens: int = 4096,
                      gpus: int = 8) -> None:
    gpu = H100_SXM
    print(f"# model: TopK d_in {d_in}, k {k}, batch {tokens} tokens, latent-parallel over {gpus} x {gpu['name']} "
          f"(bf16 {gpu['bf16_flops'] / 1e12:.0f} TFLOP/s dense, fp32 {gpu['fp32_flops'] / 1e12:.0f}, "
          f"HBM {gpu['hbm_bytes'] / 1e9:.0f} GB at "
          f"{gpu['hbm_bw'] / 1e12:.2f} TB/s, NVLink {2 * gpu['link_bw'] / 1e9:.0f} GB/s bidirectional); per GPU")
    print("| d_sae | precision | encoder TFLOP | decode GFLOP | backward GFLOP | HBM traffic (GB) | gathered (MB) | "
          "reduced (MB) | on the wire (MB) | weights + grads + Adam (GB) | activations (GB) | fits in 80 GB | "
          "compute / HBM / comm (ms) | step (ms) | MFU | tokens/s |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---:|")
    for d_sae, precision in [(d, p) for d in widths for p in ("bf16-mixed", "32-true")]:
        r = scale_model(d_sae, d_in, k, tokens, gpus, precision, gpu)
        mem, t = r["memory"], r["times"]
        state = mem["weights"] + mem["grads"] + mem["adam"]
        fits = "yes" if r["fits"] else f"no ({sum(mem.values()) / 1e9:.0f} GB)"
        print(f"| {d_sae / 2**20:g}M | {precision} | {r['flops']['encoder'] / 1e12:.2f} | "
              f"{r['flops']['decode'] / 1e9:.1f} | "
              f"{r['flops']['backward'] / 1e9:.1f} | {r['hbm'] / 1e9:.1f} | {r['gathered'] / 1e6:.0f} | "
              f"{r['reduced'] / 1e6:.0f} | {r['wire'] / 1e6:.0f} | {state / 1e9:.1f} | "
              f"{mem['activations'] / 1e9:.1f} | {fits} | {t['compute'] * 1e3:.1f} / {t['hbm'] * 1e3:.1f} / "
              f"{t['comm'] * 1e3:.1f} | {r['step'] * 1e3:.1f} | {r['mfu']:.0%} | {r['tokens_per_s']:,.0f} |")
    print("\nAssumptions:")
    for line in MODEL_ASSUMPTIONS:
        print(f"- {line}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(size: int, args: dict) -> list[dict]:
    """One latent group of `size` processes: each rank's result."""
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(size, _free_port(), args, out), nprocs=size, join=True)
        return [json.loads(Path(out, f"{r}.json").read_text()) for r in range(size)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--arch", default="topk", choices=["topk", "batchtopk", "matryoshka", "relu", "jumprelu"])
    p.add_argument("--d-in", type=int, default=256)
    p.add_argument("--d-sae", type=int, default=65536)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--dead", type=float, default=0.25, help="fraction of latents marked dead (AuxK)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--whole-init", action="store_true",
                   help="draw the whole SAE on every rank and cut it (as a module built outside deferred_sae_init)")
    p.add_argument("--model", action="store_true", help="print the model of the step at scale (8 x H100) only")
    a = p.parse_args()
    if a.model:
        print_scale_model()
        return 0
    args = vars(a)
    config = SAEConfig(architecture=a.arch, d_in=a.d_in, d_sae=a.d_sae, k=a.k, l1_warmup_steps=0)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, gloo; "
          f"{a.arch} d_in {a.d_in} d_sae {a.d_sae} k {a.k}, batch {a.batch} tokens, dead {a.dead:.0%}, "
          f"{a.threads} thread(s) per process, median of {a.steps} steps, load average {os.getloadavg()[0]:.1f}, "
          f"{'whole SAE drawn then cut' if a.whole_init else 'each rank draws its shard'}")
    print("| n | ms/step | SAE state / rank (MB) | start-up peak / rank (MB) | peak / rank (MB) | gathered (B) | "
          "reduced (B) | formula (B) | = | sent (B) | ring (B) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    for size in a.sizes:
        results = run(size, args)
        worst = max(results, key=lambda r: r["peak"])
        gathered, reduced = (communication_per_step(config, size, a.batch) if size > 1 else (0, 0))
        counted = {(r["gathered"], r["reduced"]) for r in results}
        equal = "yes" if counted == {(gathered, reduced)} else f"no: {sorted(counted)}"
        ring = gathered + 2 * (size - 1) / size * reduced
        sent = statistics.mean(r["sent"] for r in results)
        startup = max(r["startup"] for r in results)
        print(f"| {size} | {statistics.median(r['ms'] for r in results):,.0f} | {worst['state'] / 2**20:,.1f} | "
              f"{startup / 2**20:,.0f} | {worst['peak'] / 2**20:,.0f} | {results[0]['gathered']:,.0f} | "
              f"{results[0]['reduced']:,.0f} | "
              f"{gathered:,} + {reduced:,} | {equal} | {sent:,.0f} | {ring:,.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
