"""Tokens/s of KV-cache generation with and without tracking one SAE (goal: <= 5% overhead).

    python benchmarks/runtime_overhead.py [--model demo] [--sae DIR] [--device cpu] [--max-tokens 64]

Three runs of the same greedy generation, interleaved `--repeats` times (median reported):
  model.generate   the model's own generator (reference)
  untracked        InterpretableModel.generate, SAE loaded, nothing tracked
  tracked          the same, tracking the SAE and streaming each token's top features
Without --sae a random TopK SAE (8 x d_model, k=32) at the middle layer's resid_post is used: the
cost of tracking depends on the SAE's shape, not on its weights.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from saelightning.evaluate import resolve_model_path
from saelightning.nanochat.checkpoint import load_nanochat
from saelightning.runtime import InterpretableModel


def random_sae(model, device):
    from saelightning.saes import SAEConfig, build_sae

    hook = f"blocks.{model.n_layer // 2}.hook_resid_post"
    sae = build_sae(SAEConfig(architecture="topk", d_in=model.d_model, d_sae=8 * model.d_model, k=32)).to(device)
    sae.metadata = {"hook_name": hook}
    return sae.eval().requires_grad_(False)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--sae", default=None, help="exported SAE dir (default: a random TopK SAE)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=1, help="prompts generated together")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--top-features", type=int, default=5)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    nc = load_nanochat(resolve_model_path(a.model), device=device, dtype=torch.float32)
    model = nc.model
    if a.sae:
        from saelightning.export import load_sae

        sae = load_sae(a.sae, device=device)
    else:
        sae = random_sae(model, device)
    im = InterpretableModel(nc, [sae])
    g = torch.Generator().manual_seed(0)
    body = torch.randint(0, nc.tokenizer.bos_id, (a.batch, a.prompt_tokens - 1), generator=g)
    prompts = [[nc.tokenizer.bos_id] + row for row in body.tolist()]

    runs = {
        "model.generate": lambda: list(model.generate(prompts, a.max_tokens, temperature=0.0)),
        "untracked": lambda: list(im.generate(prompts, a.max_tokens, temperature=0.0)),
        "tracked": lambda: list(im.generate(prompts, a.max_tokens, temperature=0.0, top_features=a.top_features)),
    }
    for fn in runs.values():  # warm-up: allocator, rotary tables, kernels
        fn()
    times = {k: [] for k in runs}
    for _ in range(a.repeats):
        for k, fn in runs.items():
            times[k].append(timed(fn))
    n = a.batch * a.max_tokens
    tps = {k: n / statistics.median(v) for k, v in times.items()}
    cfg = model.config
    print(f"device: {device} ({platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads)")
    print(f"model: {a.model} (n_layer={cfg.n_layer}, d_model={cfg.n_embd}, vocab={cfg.vocab_size}); "
          f"SAE: {sae.W_dec.shape[0]} latents at {next(iter(im.saes))}")
    print(f"batch {a.batch}, prompt {a.prompt_tokens} tokens, {a.max_tokens} new tokens, median of {a.repeats}")
    for k, v in tps.items():
        print(f"  {k:<16} {v:9.1f} tokens/s")
    print(f"tracking overhead vs untracked: {100 * (1 - tps['tracked'] / tps['untracked']):.1f}%")
    print(f"wrapper overhead vs model.generate: {100 * (1 - tps['untracked'] / tps['model.generate']):.1f}%")


if __name__ == "__main__":
    main()
