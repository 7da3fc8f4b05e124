"""The model forward that makes the activations: eager against torch.compile (data.compile_model / cache --compile).

    python benchmarks/model_forward.py [--device cpu|cuda] [--models demo d4 d20] [--context 512] [--rows 8]
        [--steps 10] [--threads N] [--peak-tflops 989]

Each model runs `run_with_cache` up to the middle layer's hook (blocks.{n_layer // 2}.hook_resid_post,
the forward truncated there as in training) on --rows x --context random tokens, under bf16 autocast on
CUDA as the data module runs it. "demo" is the bundled model; "dN" a random nanochat of depth N
(width 64·N, original era, the demo tokenizer's vocabulary: the lm_head is never run). Columns: tokens/s
eager and compiled (after one compiling call, whose time is reported), the largest difference between
the two, and for the compiled forward the model FLOP/s (24·d² per block and token plus the causal
attention, as benchmarks/fit_e2e.py counts them) and, on CUDA, its fraction of the bf16 peak.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fit_e2e import model_flops_per_token, write_random_model  # noqa: E402
from sae_step import peak_tflops  # noqa: E402


def _load(name: str, tmp: Path, device: str):
    from saelightning.demo import DEMO_MODEL_DIR
    from saelightning.nanochat.checkpoint import load_nanochat

    path = DEMO_MODEL_DIR if name == "demo" else write_random_model(int(name[1:]), tmp / name)[0]
    model = load_nanochat(path).model.to(device).eval()
    return model


def _time(run, tokens, hook, steps: int, cuda: bool) -> tuple[float, torch.Tensor]:
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)
    with torch.no_grad(), autocast:
        out = run(tokens, [hook])[hook]
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            run(tokens, [hook])
        if cuda:
            torch.cuda.synchronize()
    return (time.perf_counter() - t0) / max(steps, 1), out.float()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", nargs="+", default=["demo", "d4"])
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--peak-tflops", type=float, default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    cuda = a.device.startswith("cuda")
    peak = peak_tflops(a.device, a.peak_tflops)
    name = torch.cuda.get_device_name() if cuda else (platform.processor() or platform.machine())
    print(f"# {name}, {a.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{a.rows} x {a.context} tokens per forward, bf16 autocast: {cuda}")
    print("| model | hook | eager tok/s | compiled tok/s | speed-up | compile s | max diff | compiled TFLOP/s "
          "| of bf16 peak |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for model_name in a.models:
            model = _load(model_name, Path(tmp), a.device)
            layer = model.config.n_layer // 2
            hook = f"blocks.{layer}.hook_resid_post"
            g = torch.Generator().manual_seed(0)
            tokens = torch.randint(0, model.config.vocab_size, (a.rows, a.context), generator=g).to(a.device)
            eager, want = _time(model.run_with_cache, tokens, hook, a.steps, cuda)
            compiled_fn = model.capturer(compiled=True)
            t0 = time.perf_counter()
            _time(compiled_fn, tokens, hook, 0, cuda)  # the compiling call
            compile_s = time.perf_counter() - t0
            compiled, got = _time(compiled_fn, tokens, hook, a.steps, cuda)
            n = a.rows * a.context
            flops = model_flops_per_token({"n_embd": model.config.n_embd}, layer, a.context) * n / compiled
            frac = f"{flops / 1e12 / peak:.1%}" if peak else "-"
            print(f"| {model_name} (d_model {model.config.n_embd}) | {hook} | {n / eager:,.0f} | {n / compiled:,.0f} | "
                  f"{eager / compiled:.2f}x | {compile_s:.1f} | {(got - want).abs().max().item():.1e} | "
                  f"{flops / 1e12:.3f} | {frac} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
