"""SAE training throughput from an activation cache, against the SAE step alone and SAELens's trainer.

    python benchmarks/cache_throughput.py [--model demo] [--hook blocks.2.hook_resid_post] [--tokens 262144]
        [--d-sae 1024] [--k 16] [--batch 4096] [--steps 40] [--threads 2]
        [--saelens-python /tmp/saelens-venv/bin/python]

Builds (or reuses) a shuffled fp32 cache of --tokens activations with `saelightning cache` (timed: the
model pass, the one-off cost), then times, on the same activations and the same TopK SAE shape:
  cache stream alone the data module's train stream from the cache (reads, worker, shuffle buffer), no SAE
  sae step, memory   our SAE in a plain loop over in-memory batches (forward, backward, Adam): the floor
  fit, memory        the same Trainer + SAEModule fed in-memory batches (Lightning and the module's
                     bookkeeping without any data path)
  fit from cache     `saelightning fit` machinery (Trainer + SAEModule + ActivationDataModule with
                     data.cache_dir): disk reads, DataLoader worker, shuffle buffer, metrics, logging
  SAELens            sae_lens.SAETrainer (TopKTrainingSAE, normalize none, rescale_acts_by_decoder_norm
                     off) fed the same scaled activations from memory, in its own venv (a subprocess:
                     the project never depends on sae-lens)
Each figure is tokens/s over --steps steps after --warmup steps (median of --repeats; CUDA synchronised
at both ends with --device cuda).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from sae_step import train_step  # noqa: E402


def saelens_env() -> dict:
    """The environment of a SAELens-venv subprocess: that venv has torch but not this package, so it
    imports saelightning.saes (torch only) from this tree."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def load_batches(cache_dir: Path, hook: str, n: int, batch: int, scale: float,
                 device: str = "cpu") -> list[torch.Tensor]:
    """The first n batches of the cache (shard order), scaled as the trainer scales them, fp32."""
    from safetensors.torch import load_file

    manifest = json.loads((cache_dir / "manifest.json").read_text())
    rows, total = [], 0
    for shard in manifest["shards"]:
        rows.append(load_file(str(cache_dir / shard["file"]))[f"acts.{hook}"].float() * scale)
        total += len(rows[-1])
        if total >= n * batch:
            break
    acts = torch.cat(rows)
    if len(acts) < n * batch:
        raise SystemExit(f"the cache holds {len(acts)} tokens, the runs need {n * batch}; raise --tokens")
    return list(acts[: n * batch].to(device).split(batch))


def build(a) -> tuple[Path, dict, float]:
    from saelightning.cache import CacheConfig, build_cache

    out = Path(a.cache_dir)
    t0 = time.perf_counter()
    fresh = not (out / "manifest.json").exists()
    manifest = build_cache(CacheConfig(model=a.model, hooks=[a.hook], tokens=a.tokens, out=str(out), data=a.data,
                                       shard_tokens=a.shard_tokens, batch_rows=a.batch_rows, seed=0, device=a.device))
    rate = a.tokens / (time.perf_counter() - t0) if fresh else float("nan")
    return out, manifest, rate


def sae_loop(a, batches: list[torch.Tensor], d_in: int) -> float:
    """Our SAE's training step alone (the module's order: forward, backward, clip, Adam, renormalise)."""
    from saelightning.module import SAESpec, build_from_spec
    from saelightning.optim import SkipAdam, default_lr

    sae = build_from_spec(SAESpec(hook_name=a.hook, d_sae=a.d_sae, k=a.k), d_in).to(a.device)
    sae.init_from_batch(batches[0])
    opt = SkipAdam(sae.parameters(), lr=default_lr(a.d_sae), eps=6.25e-10)
    dead = torch.zeros(a.d_sae, dtype=torch.bool, device=a.device)
    for i, x in enumerate(batches):
        if i == a.warmup:
            _sync(a.device)
            t0 = time.perf_counter()
        train_step(sae, opt, x, dead)  # as SAEModule runs it
    _sync(a.device)
    return a.steps * a.batch / (time.perf_counter() - t0)


def _datamodule(a, cache_dir: Path):
    from saelightning.data import ActivationDataModule

    return ActivationDataModule(model=a.model, data_dir=a.data, batch_size=a.batch, buffer_tokens=a.buffer,
                                num_workers=a.workers, cache_dir=str(cache_dir), val_batches=1)


def read_only(a, cache_dir: Path) -> float:
    """The data module's train stream from the cache alone (disk, worker, shuffle buffer), no SAE."""
    dm = _datamodule(a, cache_dir)
    dm.hooks = [a.hook]
    dm.setup("fit")
    dm.device = torch.device(a.device)  # setup() takes the trainer's device; there is none here
    stream = iter(dm.train_dataloader())
    for i in range(a.warmup + a.steps):
        if i == a.warmup:
            _sync(a.device)
            t0 = time.perf_counter()
        next(stream)
    _sync(a.device)
    return a.steps * a.batch / (time.perf_counter() - t0)


class _Memory:
    """In-memory SAE batches in the data module's batch layout (the fit without any data path)."""

    def __init__(self, batches, hook, scale):
        self.batches, self.hook, self.scale = batches, hook, scale

    def __iter__(self):
        for i, x in enumerate(self.batches):
            yield {"acts": {self.hook: x}, "scales": {self.hook: self.scale}, "index": i}


def fit_from_cache(a, cache_dir: Path, memory: _Memory | None = None) -> float:
    """The fit's step rate from the cache, or (memory given) from in-memory batches."""
    import lightning.pytorch as pl

    from saelightning.module import SAEModule

    class Clock(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if batch_idx == a.warmup:
                _sync(a.device)
                self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            _sync(a.device)
            self.t1 = time.perf_counter()

    dm = _datamodule(a, cache_dir)
    module = SAEModule(saes=[{"hook_name": a.hook, "d_sae": a.d_sae, "k": a.k}], n_layer=dm.n_layer,
                       d_model=dm.d_model, model_info=dm.model_info, warmup_steps=10)
    clock = Clock()
    accelerator = "gpu" if a.device.startswith("cuda") else "cpu"
    trainer = pl.Trainer(accelerator=accelerator, devices=1, max_steps=a.warmup + a.steps, limit_val_batches=0,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, log_every_n_steps=25, callbacks=[clock])
    if memory is None:
        trainer.fit(module, datamodule=dm)
    else:
        trainer.fit(module, train_dataloaders=memory)
    return a.steps * a.batch / (clock.t1 - clock.t0)


def saelens_phase(a) -> None:
    """Runs in the SAELens venv: its trainer on the same activations, from memory."""
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.set_num_threads(a.threads)
    batches = load_batches(Path(a.cache_dir), a.hook, a.warmup + a.steps, a.batch, a.scale, a.device)
    cfg = TopKTrainingSAEConfig(d_in=batches[0].shape[1], d_sae=a.d_sae, k=a.k, normalize_activations="none",
                                rescale_acts_by_decoder_norm=False, aux_loss_coefficient=1 / 32, device=a.device)
    sae = TopKTrainingSAE(cfg)
    marks = {}

    def provider():
        for i, x in enumerate(batches):
            if i == a.warmup:
                _sync(a.device)
                marks["t0"] = time.perf_counter()
            yield x

    lr = 2e-4 / (a.d_sae / 2**14) ** 0.5
    trainer_cfg = SAETrainerConfig(total_training_samples=len(batches) * a.batch, train_batch_size_samples=a.batch,
                                   lr=lr, lr_end=lr, lr_warm_up_steps=10, device=a.device)
    SAETrainer(trainer_cfg, sae, provider()).fit()
    _sync(a.device)
    print(json.dumps({"saelens_tokens_per_s": a.steps * a.batch / (time.perf_counter() - marks["t0"])}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--data", default="demo")
    p.add_argument("--hook", default="blocks.2.hook_resid_post")
    p.add_argument("--tokens", type=int, default=262_144, help="tokens to cache")
    p.add_argument("--cache-dir", default="/tmp/saelightning-bench-cache")
    p.add_argument("--shard-tokens", type=int, default=65_536)
    p.add_argument("--batch-rows", type=int, default=16)
    p.add_argument("--d-sae", type=int, default=1024)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--buffer", type=int, default=65_536, help="data.buffer_tokens of the fit")
    p.add_argument("--workers", type=int, default=1, help="data.num_workers of the fit")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu or cuda (the cache build, the SAE runs and SAELens)")
    p.add_argument("--saelens-python", default=None, help="python of a venv with sae-lens (skipped if not given)")
    p.add_argument("--phase", default="main", choices=["main", "saelens"])
    p.add_argument("--scale", type=float, default=1.0, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.phase == "saelens":
        return saelens_phase(a)
    torch.set_num_threads(a.threads)
    cache_dir, manifest, build_rate = build(a)
    from saelightning.cache import cache_scales

    scale = cache_scales(manifest, [a.hook])[a.hook]
    d_in = manifest["d_in"][a.hook]
    batches = load_batches(cache_dir, a.hook, a.warmup + a.steps, a.batch, scale, a.device)
    print(f"# {platform.processor() or platform.machine()}, {a.device}, torch {torch.__version__}, "
          f"threads {a.threads}, d_in {d_in}, d_sae {a.d_sae}, k {a.k}, batch {a.batch}, {a.steps} timed steps")
    if build_rate == build_rate:
        print(f"cache build (model pass + shuffle): {build_rate:,.0f} tokens/s")
    rows = {"cache stream alone": [], "sae step, memory": [], "fit, memory": [], "fit from cache": [],
            "SAELens, memory": []}
    for _ in range(a.repeats):  # interleaved, so a busy spell of the shared machine hits all three
        rows["cache stream alone"].append(read_only(a, cache_dir))
        rows["sae step, memory"].append(sae_loop(a, batches, d_in))
        rows["fit, memory"].append(fit_from_cache(a, cache_dir, _Memory(batches, a.hook, scale)))
        rows["fit from cache"].append(fit_from_cache(a, cache_dir))
        if a.saelens_python:
            cmd = [a.saelens_python, __file__, "--phase", "saelens", "--cache-dir", str(cache_dir), "--hook", a.hook,
                   "--d-sae", str(a.d_sae), "--k", str(a.k), "--batch", str(a.batch), "--steps", str(a.steps),
                   "--warmup", str(a.warmup), "--threads", str(a.threads), "--scale", repr(scale), "--device", a.device]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True, env=saelens_env())
            rows["SAELens, memory"].append(json.loads(done.stdout.strip().splitlines()[-1])["saelens_tokens_per_s"])
    print("| run | tokens/s (median) | all runs |")
    print("|---|---:|---|")
    for name, values in rows.items():
        if values:
            print(f"| {name} | {statistics.median(values):,.0f} | {', '.join(f'{v:,.0f}' for v in values)} |")


if __name__ == "__main__":
    sys.exit(main())
