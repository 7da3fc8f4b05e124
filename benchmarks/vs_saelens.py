"""saelightning vs SAELens: the same TopK SAE trained on the same activations, speed and quality, one run.

    python benchmarks/vs_saelens.py --saelens-python /tmp/saelens-venv/bin/python [--d-sae 1024] [--k 16]
        [--batch 4096] [--train-steps 56] [--epochs 1] [--eval-tokens 32768] [--threads 1] [--sweep 4] [--device cpu]

Activations: the shuffled cache of benchmarks/cache_throughput.py (demo model, blocks.2.hook_resid_post;
built there if missing), scaled as the trainer scales them. Both trainers get the first --train-steps
batches from memory, the same lr (2e-4/sqrt(d_sae/2^14)), 10 warm-up steps, constant lr, aux coefficient
1/32; SAELens runs in its own venv (a subprocess) and hands back its weights. Both SAEs are then scored by
the same code on the held-out last --eval-tokens tokens: explained variance (pooled, float64), and the
dead fraction (latents that never fire there). Speed: tokens/s over the steps after the warm-up, ours
through Trainer + SAEModule (what `saelightning fit` runs).
Sweep: `saelightning fit` from the live model stream with 1 SAE and with --sweep SAEs in one module
(one model forward serves all) against --sweep separate runs (each pays the forward).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cache_throughput as ct  # noqa: E402  (the cache, batch loading and the fit harness)


def evaluate(W_enc, b_enc, W_dec, b_dec, k: int, x: torch.Tensor) -> dict:
    """Explained variance and dead fraction of a TopK SAE (SAELens's and ours: topk of pre, then ReLU)."""
    pre = (x - b_dec) @ W_enc + b_enc
    values, indices = pre.topk(k, dim=-1)
    values = values.relu()
    x_hat = torch.nn.functional.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum") + b_dec
    x64, err = x.double(), (x - x_hat).double()
    variance = x64.pow(2).sum() - x64.sum(0).pow(2).sum() / len(x64)
    fired = torch.zeros(W_enc.shape[1], dtype=torch.bool)
    fired[indices[values > 0]] = True
    return {"explained_variance": float(1 - err.pow(2).sum() / variance),
            "dead_fraction": float((~fired).float().mean()), "l0": float((values > 0).sum(1).double().mean())}


def ours(a, batches) -> tuple[float, dict]:
    import lightning.pytorch as pl

    from saelightning.module import SAEModule

    hook = a.hook
    spec = {"hook_name": hook, "d_sae": a.d_sae, "k": a.k, "name": "sae", **json.loads(a.options)}
    module = SAEModule(saes=[spec], n_layer=4, d_model=128, warmup_steps=10, **json.loads(a.module_options))
    marks = {}

    class Clock(pl.Callback):
        def on_train_batch_start(self, trainer, m, batch, i):
            if i == a.warmup:
                marks["t0"] = time.perf_counter()

        def on_train_batch_end(self, trainer, m, out, batch, i):
            marks["t1"] = time.perf_counter()

    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=len(batches), limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         log_every_n_steps=25, callbacks=[Clock()])
    trainer.fit(module, train_dataloaders=ct._Memory(batches, hook, 1.0))
    sae = module.saes["sae"]
    rate = (len(batches) - a.warmup) * a.batch / (marks["t1"] - marks["t0"])
    return rate, {n: getattr(sae, n).detach() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}


def saelens_phase(a) -> None:
    """In the SAELens venv: train on the same batches, save the weights, print tokens/s."""
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer
    from safetensors.torch import save_file

    torch.set_num_threads(a.threads)
    batches = ct.load_batches(Path(a.cache_dir), a.hook, a.train_steps, a.batch, a.scale) * a.epochs
    cfg = TopKTrainingSAEConfig(d_in=batches[0].shape[1], d_sae=a.d_sae, k=a.k, normalize_activations="none",
                                rescale_acts_by_decoder_norm=False, aux_loss_coefficient=1 / 32, device="cpu")
    sae = TopKTrainingSAE(cfg)
    marks = {}

    def provider():
        for i, x in enumerate(batches):
            if i == a.warmup:
                marks["t0"] = time.perf_counter()
            yield x

    lr = 2e-4 / (a.d_sae / 2**14) ** 0.5
    trainer_cfg = SAETrainerConfig(total_training_samples=len(batches) * a.batch, train_batch_size_samples=a.batch,
                                   lr=lr, lr_end=lr, lr_warm_up_steps=10, device="cpu")
    SAETrainer(trainer_cfg, sae, provider()).fit()
    rate = (len(batches) - a.warmup) * a.batch / (time.perf_counter() - marks["t0"])
    save_file({n: getattr(sae, n).detach().contiguous() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}, a.out)
    print(json.dumps({"tokens_per_s": rate}))


def sweep(a, n: int) -> float:
    """tokens/s of `saelightning fit` on the live demo model stream with n same-shape SAEs in one module."""
    import lightning.pytorch as pl

    from saelightning.data import ActivationDataModule
    from saelightning.module import SAEModule

    dm = ActivationDataModule(model=a.model, data_dir="demo", batch_size=a.batch, buffer_tokens=16384, num_workers=0,
                              val_batches=1)
    specs = [{"hook_name": a.hook, "d_sae": a.d_sae, "k": a.k, "name": f"s{i}"} for i in range(n)]
    module = SAEModule(saes=specs, n_layer=dm.n_layer, d_model=dm.d_model, model_info=dm.model_info, warmup_steps=10)
    marks = {}

    class Clock(pl.Callback):
        def on_train_batch_start(self, trainer, m, batch, i):
            if i == 2:
                marks["t0"] = time.perf_counter()

        def on_train_batch_end(self, trainer, m, out, batch, i):
            marks["t1"] = time.perf_counter()

    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2 + a.sweep_steps, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         log_every_n_steps=25, callbacks=[Clock()])
    trainer.fit(module, datamodule=dm)
    return a.sweep_steps * a.batch / (marks["t1"] - marks["t0"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--hook", default="blocks.2.hook_resid_post")
    p.add_argument("--cache-dir", default="/tmp/saelightning-bench-cache")
    p.add_argument("--tokens", type=int, default=262_144, help="tokens in the cache (built if missing)")
    p.add_argument("--d-sae", type=int, default=1024)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--train-steps", type=int, default=56)
    p.add_argument("--epochs", type=int, default=1, help="passes over the training batches (a larger token budget)")
    p.add_argument("--warmup", type=int, default=3, help="untimed first steps")
    p.add_argument("--eval-tokens", type=int, default=32768)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sweep", type=int, default=4, help="SAEs in the sweep comparison (0: skip it)")
    p.add_argument("--sweep-steps", type=int, default=6)
    p.add_argument("--saelens-python", default="/tmp/saelens-venv/bin/python")
    p.add_argument("--options", default="{}", help="JSON: further SAESpec fields (k_aux, aux_coefficient, ...)")
    p.add_argument("--module-options", default="{}", help="JSON: further SAEModule arguments (eps, grad_clip, ...)")
    p.add_argument("--phase", default="main", choices=["main", "saelens"])
    p.add_argument("--scale", type=float, default=1.0, help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.phase == "saelens":
        return saelens_phase(a)
    torch.set_num_threads(a.threads)
    a.data, a.shard_tokens, a.batch_rows, a.device = "demo", 65_536, 16, "cpu"
    cache_dir, manifest, _ = ct.build(a)
    from saelightning.cache import cache_scales

    scale = cache_scales(manifest, [a.hook])[a.hook]
    everything = torch.cat(ct.load_batches(cache_dir, a.hook, a.tokens // a.batch, a.batch, scale))
    if a.train_steps * a.batch + a.eval_tokens > len(everything):
        raise SystemExit(f"the cache holds {len(everything)} tokens: lower --train-steps or --eval-tokens")
    batches = list(everything[: a.train_steps * a.batch].split(a.batch)) * a.epochs
    held_out = everything[-a.eval_tokens:]
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "saelens.safetensors")
        cmd = [a.saelens_python, __file__, "--phase", "saelens", "--cache-dir", str(cache_dir), "--hook", a.hook,
               "--d-sae", str(a.d_sae), "--k", str(a.k), "--batch", str(a.batch), "--train-steps", str(a.train_steps),
               "--warmup", str(a.warmup), "--epochs", str(a.epochs), "--threads", str(a.threads),
               "--scale", repr(scale), "--out", out]
        done = subprocess.run(cmd, capture_output=True, text=True, env=ct.saelens_env())
        if done.returncode:
            raise SystemExit(done.stderr[-3000:])
        theirs_rate = json.loads(done.stdout.strip().splitlines()[-1])["tokens_per_s"]
        from safetensors.torch import load_file

        theirs = load_file(out)
    ours_rate, our_weights = ours(a, batches)
    rows = {"SAELens 6.54.12 (SAETrainer)": (theirs_rate, evaluate(k=a.k, x=held_out, **theirs)),
            "saelightning (Trainer + SAEModule)": (ours_rate, evaluate(k=a.k, x=held_out, **our_weights))}
    print(f"# torch {torch.__version__}, threads {a.threads}, d_in {held_out.shape[1]}, d_sae {a.d_sae}, k {a.k}, "
          f"batch {a.batch}, {len(batches)} steps = {len(batches) * a.batch:,} tokens ({a.epochs} pass(es) over "
          f"{a.train_steps * a.batch:,}), held out {a.eval_tokens:,}")
    print("| trainer | tokens/s | explained variance (held out) | dead fraction (held out) | L0 |")
    print("|---|---:|---:|---:|---:|")
    for name, (rate, q) in rows.items():
        print(f"| {name} | {rate:,.0f} | {q['explained_variance']:.4f} | {q['dead_fraction']:.4f} | {q['l0']:.2f} |")
    print(f"speed ratio saelightning / SAELens: {ours_rate / theirs_rate:.2f}x")
    if a.sweep:
        one, many = sweep(a, 1), sweep(a, a.sweep)
        print(f"sweep from the live model stream: 1 SAE {one:,.0f} tokens/s; {a.sweep} SAEs in one run {many:,.0f} "
              f"tokens/s; {a.sweep} separate runs ~{one / a.sweep:,.0f} tokens/s each SAE-token "
              f"({many / (one / a.sweep):.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
