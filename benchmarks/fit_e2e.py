"""End-to-end `saelightning fit` throughput on a nanochat d20-shaped model: tokens/s and model-FLOPs utilisation.

    python benchmarks/fit_e2e.py --device cuda [--depth 20] [--hook blocks.10.hook_resid_post] [--expansion 32]
        [--k 64] [--batch 4096] [--buffer 65536] [--steps 64] [--warmup 16] [--compile] [--peak-tflops 989]

A random nanochat of depth D's shape (width 64·D, head_dim 128, original era, sequence_len 2048; the bundled
demo tokenizer, so the vocabulary is small: the lm_head is never run) is written as a nanochat checkpoint,
then Trainer + SAEModule + ActivationDataModule (live model stream over the demo shards, bf16 autocast on
CUDA via the data module, precision bf16-mixed) train one TopK SAE at --hook. Timed: --steps steps after
--warmup steps, CUDA synchronised at both ends. Both must be whole shuffle-buffer cycles (multiples of
--buffer / --batch steps): the model runs once per cycle, to refill the buffer, so a window inside one
cycle would time the SAE alone. --compile sets data.compile_model (the model forward under torch.compile).
FLOPs per token: the model forward up to the hook layer, 24·d² per block (attention and MLP matmuls) plus
2·d·T/2·2 for causal attention scores and values (full context T), plus the SAE step counted as in
benchmarks/sae_step.py. MFU = those FLOPs x tokens/s / the GPU's dense bf16 peak.
On CPU use a small --depth (e.g. 2) to check that it runs; the figure that matters is the GPU one.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sae_step import flops_per_token, peak_tflops  # noqa: E402


def write_random_model(depth: int, root: Path) -> tuple[Path, dict]:
    from saelightning.demo import DEMO_MODEL_DIR
    from saelightning.nanochat.checkpoint import save_nanochat_checkpoint
    from saelightning.nanochat.model import GPT, GPTConfig
    from saelightning.nanochat.tokenizer import load_tokenizer

    shutil.copytree(DEMO_MODEL_DIR / "tokenizer", root / "tokenizer")
    vocab = load_tokenizer(root / "tokenizer").vocab_size
    width = 64 * depth
    config = GPTConfig(sequence_len=2048, vocab_size=vocab, n_layer=depth, n_head=max(1, width // 128),
                       n_kv_head=max(1, width // 128), n_embd=width, era="original")
    torch.manual_seed(0)
    model = GPT(config)
    save_nanochat_checkpoint(root / "base_checkpoints" / f"d{depth}", 0, model.state_dict(), asdict(config))
    return root, asdict(config)


def model_flops_per_token(config: dict, layer: int, context: int) -> float:
    d = config["n_embd"]
    return (layer + 1) * (24 * d * d + 2 * d * context)


def main() -> int:
    import lightning.pytorch as pl

    from saelightning.data import ActivationDataModule
    from saelightning.hooks import parse_hook
    from saelightning.module import SAEModule

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--hook", default="blocks.10.hook_resid_post")
    p.add_argument("--expansion", type=int, default=32)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--context", type=int, default=2048, help="data.context_size (tokens per model row)")
    p.add_argument("--model-batch-rows", type=int, default=8)
    p.add_argument("--buffer", type=int, default=65_536, help="data.buffer_tokens (one model refill per cycle)")
    p.add_argument("--compile", action="store_true", help="data.compile_model: the model forward under torch.compile")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--warmup", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak (default: by the GPU's name)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    cuda = a.device.startswith("cuda")
    cycle = a.buffer // a.batch
    if a.buffer % a.batch or a.steps % cycle or a.warmup % cycle:
        p.error(f"--steps and --warmup must be multiples of --buffer / --batch = {a.buffer / a.batch:g} "
                "(whole buffer cycles)")
    with tempfile.TemporaryDirectory() as tmp:
        root, config = write_random_model(a.depth, Path(tmp))
        layer, _ = parse_hook(a.hook, a.depth)
        dm = ActivationDataModule(model=str(root), data_dir="demo", batch_size=a.batch, context_size=a.context,
                                  model_batch_rows=a.model_batch_rows, buffer_tokens=a.buffer, num_workers=a.workers,
                                  val_batches=1, scale_batches=1, compile_model=a.compile)
        d_in, d_sae = dm.d_model, dm.d_model * a.expansion
        module = SAEModule(saes=[{"hook_name": a.hook, "d_sae": d_sae, "k": a.k}], n_layer=dm.n_layer,
                           d_model=dm.d_model, model_info=dm.model_info, warmup_steps=10)
        marks = {}

        class Clock(pl.Callback):
            def on_train_batch_start(self, trainer, m, batch, i):
                if i == a.warmup:
                    if cuda:
                        torch.cuda.synchronize()
                    marks["t0"] = time.perf_counter()

            def on_train_batch_end(self, trainer, m, out, batch, i):
                if cuda:
                    torch.cuda.synchronize()
                marks["t1"] = time.perf_counter()

        trainer = pl.Trainer(accelerator="gpu" if cuda else "cpu", devices=1, max_steps=a.warmup + a.steps,
                             precision="bf16-mixed" if cuda else "32-true", limit_val_batches=0, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             log_every_n_steps=25, callbacks=[Clock()])
        trainer.fit(module, datamodule=dm)
    rate = a.steps * a.batch / (marks["t1"] - marks["t0"])
    model_f = model_flops_per_token(config, layer, a.context)
    sae_f = flops_per_token("topk", d_in, d_sae, a.k, 0)
    peak = peak_tflops(a.device, a.peak_tflops)
    name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"# {name}, torch {torch.__version__}, random d{a.depth} (width {d_in}), {a.hook}, "
          f"TopK d_sae {d_sae} k {a.k}, batch {a.batch}, context {a.context}, {a.steps} timed steps, "
          f"model compiled: {a.compile}")
    print(f"tokens/s {rate:,.0f}; FLOPs/token model {model_f / 1e9:.3f} G + SAE {sae_f / 1e9:.3f} G; "
          f"achieved {(model_f + sae_f) * rate / 1e12:.2f} TFLOP/s"
          + (f"; MFU {(model_f + sae_f) * rate / (peak * 1e12):.1%} of {peak:.0f} TFLOP/s bf16" if peak else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
