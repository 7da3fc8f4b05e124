"""Tokens/s of KV-cache generation with and without tracking one SAE (goal: <= 5% overhead).

    python benchmarks/runtime_overhead.py [--model demo | --depth 20] [--sae DIR] [--device cpu] [--max-tokens 64]

Four runs of the same greedy generation, interleaved in a shuffled order `--repeats` times
(median and best reported):
  model.generate   the model's own generator (reference)
  untracked        InterpretableModel.generate, SAE loaded, nothing tracked
  tracked          the same inside `im.track(top_n)`, including reading the trace at the end
                   (the SAE encodes the kept activations then, in one batch)
  streamed         generate(top_features=n): each step's top features encoded and yielded at once
Without --sae a random TopK SAE (8 x d_model, k=32) at the middle layer's resid_post is used: the
cost of tracking depends on the SAE's shape, not on its weights. --depth D times a random nanochat of
nanochat's own shape for that depth (width 64*D, head_dim 128, vocab 65536) instead of a checkpoint.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time

import torch

from saelightning.nanochat.checkpoint import load_nanochat
from saelightning.resolve import model_path as resolve_model_path
from saelightning.runtime import InterpretableModel


def random_sae(model, device, expansion: int):
    from saelightning.saes import SAEConfig, build_sae

    hook = f"blocks.{model.n_layer // 2}.hook_resid_post"
    config = SAEConfig(architecture="topk", d_in=model.d_model, d_sae=expansion * model.d_model, k=32)
    sae = build_sae(config).to(device)
    sae.metadata = {"hook_name": hook}
    return sae.eval().requires_grad_(False)


def tracked(im, prompts, a) -> None:
    with im.track(top_n=a.top_features) as trace:
        list(im.generate(prompts, a.max_tokens, temperature=0.0))
        trace.records  # noqa: B018 - reading the records is what encodes them: part of the cost


def load_model(a, device):
    """(model, tokenizer or None, label): a checkpoint, or a random model of nanochat's depth-D shape."""
    if a.depth is None:
        nc = load_nanochat(resolve_model_path(a.model), device=device, dtype=torch.float32)
        return nc.model, nc.tokenizer, a.model
    from saelightning.nanochat.model import GPT, GPTConfig

    width = 64 * a.depth
    config = GPTConfig(sequence_len=2048, vocab_size=65536, n_layer=a.depth, n_head=max(1, width // 128),
                       n_kv_head=max(1, width // 128), n_embd=width, era="original")
    model = GPT(config).float()
    torch.nn.init.normal_(model.lm_head.weight, 0.0, 0.02)  # nanochat's init zeroes it: logits would tie
    return model.to(device).eval().requires_grad_(False), None, f"random d{a.depth}"


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process): on a shared CPU the second is the steadier one."""
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - cpu


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--depth", type=int, default=None, help="time a random nanochat-shaped model of this depth")
    p.add_argument("--sae", default=None, help="exported SAE dir (default: a random TopK SAE)")
    p.add_argument("--expansion", type=int, default=8, help="latents per d_model of the random SAE")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=1, help="prompts generated together")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--top-features", type=int, default=5)
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    model, tokenizer, label = load_model(a, device)
    if a.sae:
        from saelightning.export import load_sae

        sae = load_sae(a.sae, device=device)
    else:
        sae = random_sae(model, device, a.expansion)
    bos = tokenizer.bos_id if tokenizer is not None else model.config.vocab_size - 1
    im = InterpretableModel(model, [sae], tokenizer=tokenizer, bos_id=bos)
    g = torch.Generator().manual_seed(0)
    body = torch.randint(0, bos, (a.batch, a.prompt_tokens - 1), generator=g)
    prompts = [[bos] + row for row in body.tolist()]

    runs = {
        "model.generate": lambda: list(model.generate(prompts, a.max_tokens, temperature=0.0)),
        "untracked": lambda: list(im.generate(prompts, a.max_tokens, temperature=0.0)),
        "tracked": lambda: tracked(im, prompts, a),
        "streamed": lambda: list(im.generate(prompts, a.max_tokens, temperature=0.0, top_features=a.top_features)),
    }
    for fn in runs.values():  # warm-up: allocator, rotary tables, kernels
        fn()
    times = {k: [] for k in runs}
    order = list(runs)
    shuffle = random.Random(0).shuffle
    for _ in range(a.repeats):
        shuffle(order)  # a fresh order each round: no run always follows the same one
        for k in order:
            times[k].append(timed(runs[k]))
    n = a.batch * a.max_tokens
    tps = {k: n / statistics.median(w for w, _ in v) for k, v in times.items()}
    cps = {k: n / statistics.median(c for _, c in v) for k, v in times.items()}
    best = {k: n / min(w for w, _ in v) for k, v in times.items()}  # other jobs only ever add time
    cfg = model.config
    print(f"device: {device} ({platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads)")
    print(f"model: {label} (n_layer={cfg.n_layer}, d_model={cfg.n_embd}, vocab={cfg.vocab_size}); "
          f"SAE: {sae.W_dec.shape[0]} latents at {next(iter(im.saes))}")
    print(f"batch {a.batch}, prompt {a.prompt_tokens} tokens, {a.max_tokens} new tokens, median of {a.repeats}")
    print(f"  {'':<16} {'tokens/s':>10} {'tokens/CPU-s':>13} {'best tokens/s':>14}")
    for k in runs:
        print(f"  {k:<16} {tps[k]:10.1f} {cps[k]:13.1f} {best[k]:14.1f}")
    for what, r in (("wall", tps), ("CPU", cps), ("best", best)):
        cost = {k: f"{100 * (1 - r[k] / r['untracked']):.1f}%" for k in ("tracked", "streamed")}
        print(f"overhead vs untracked ({what}): tracked {cost['tracked']}, streamed {cost['streamed']}; "
              f"untracked vs model.generate: {100 * (1 - r['untracked'] / r['model.generate']):.1f}%")
    # paired: the same round's runs share the machine's momentary load, so their ratio is steadier
    paired = {k: statistics.median(1 - u[0] / t[0] for t, u in zip(times[k], times["untracked"]))
              for k in ("tracked", "streamed")}
    print(f"overhead vs untracked (median of per-round wall ratios): tracked {100 * paired['tracked']:.1f}%, "
          f"streamed {100 * paired['streamed']:.1f}%")


if __name__ == "__main__":
    main()
