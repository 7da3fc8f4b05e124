"""saelightning vs SAELens on the same synthetic activations: MCC, F1, EV and dead latents at the same token budget.

    python benchmarks/synthetic_vs_saelens.py --saelens-python /tmp/saelens-venv/bin/python
        [--config configs/synthetic_sweep.yaml] [--archs topk batchtopk matryoshka] [--steps N] [--threads 1]
        [--out DIR]

Ours: `saelightning fit --config CONFIG` in a subprocess (every SAE of the config on one synthetic stream; --steps
overrides trainer.max_steps), with OMP_NUM_THREADS=--threads.
SAELens (6.54, its own venv, a subprocess): its SAETrainer with TopKTrainingSAE, BatchTopKTrainingSAE and
MatryoshkaBatchTopKTrainingSAE at the config's d_sae, k and matryoshka prefixes (SAELens's defaults otherwise:
aux coefficient, decoder init, no input normalisation, as its SyntheticSAERunner), fed exactly the samples of
our stream: the synthetic model's file and its TRAIN stream are imported from this tree, block i of 1024 is step
i's batch (our fit's buffer is one block, so its batch is the same samples in a permuted order). Same batch
size, steps, peak lr, warm-up and linear decay to 0, one torch thread.
Scoring: every SAE of both on the same held-out samples (the model's VAL stream), by saelightning.heldout (our
definitions) and by SAELens's own eval_sae_on_synthetic_data (our generator behind its two interfaces).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from saelightning.synthetic import TRAIN, SyntheticVal, read_model  # noqa: E402  (the SAELens venv imports it too)

SAELENS_ARCHS = ("topk", "batchtopk", "matryoshka")
KEYS = ("mcc", "classification/f1_score", "classification/precision", "classification/recall", "uniqueness",
        "explained_variance", "l0", "dead_latents", "shrinkage")


# --- the SAELens side (runs in its venv) ---

class _Dictionary:
    """Our model behind SAELens's FeatureDictionary interface: feature_vectors and acts -> hidden."""

    def __init__(self, model):
        self.model, self.feature_vectors = model, model.features

    def __call__(self, acts: torch.Tensor) -> torch.Tensor:
        return acts @ self.model.features + self.model.bias


class _Generator:
    """Our held-out stream behind SAELens's ActivationGenerator interface: sample(n) gives the next VAL block."""

    def __init__(self, model, block: int):
        self.model, self.block, self.index = model, block, 0

    def sample(self, n: int) -> torch.Tensor:
        _, acts = self.model.val_block(self.index, n)
        self.index += 1
        return acts


def saelens_eval(sae, model, a) -> dict:
    from sae_lens.synthetic import eval_sae_on_synthetic_data

    result = eval_sae_on_synthetic_data(sae, _Dictionary(model), _Generator(model, a.batch), num_samples=a.eval_tokens,
                                        batch_size=a.batch)
    return {"mcc": result.mcc, "classification/f1_score": result.classification.f1_score,
            "classification/precision": result.classification.precision,
            "classification/recall": result.classification.recall, "uniqueness": result.uniqueness,
            "explained_variance": result.explained_variance, "l0": result.sae_l0,
            "dead_latents": result.dead_latents, "shrinkage": result.shrinkage}


def _unflag_folded_norms(folder: Path) -> None:
    """SAELens saves a TopK SAE with its decoder norms folded into the weights (unit-norm W_dec) but its cfg still
    says rescale_acts_by_decoder_norm: with unit rows that rescaling is the identity, so the flag is dropped for
    readers (saelightning's load_sae) that refuse it."""
    from safetensors.torch import load_file

    cfg = json.loads((folder / "cfg.json").read_text())
    if cfg.get("rescale_acts_by_decoder_norm"):
        norms = load_file(str(folder / "sae_weights.safetensors"))["W_dec"].norm(dim=1)
        if not torch.allclose(norms, torch.ones_like(norms), atol=1e-4):
            raise SystemExit(f"{folder}: rescale_acts_by_decoder_norm with decoder norms that are not 1")
        cfg["rescale_acts_by_decoder_norm"] = False
        (folder / "cfg.json").write_text(json.dumps(cfg))


def saelens_phase(a) -> int:
    """Train SAELens's SAE of --arch on our TRAIN blocks; print its rate and its SAELens-scored metrics."""
    from sae_lens import (
        BatchTopKTrainingSAE,
        BatchTopKTrainingSAEConfig,
        MatryoshkaBatchTopKTrainingSAE,
        MatryoshkaBatchTopKTrainingSAEConfig,
        TopKTrainingSAE,
        TopKTrainingSAEConfig,
    )
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    model = read_model(a.model_file)
    common = dict(d_in=model.d_in, d_sae=a.d_sae, k=a.k, device="cpu")
    if a.arch == "topk":
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(**common))
    elif a.arch == "batchtopk":
        sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**common))
    else:
        sae = MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(
            **common, matryoshka_widths=list(a.prefixes), use_matryoshka_aux_loss=True))

    def provider():
        for i in range(a.steps):
            yield model.block(TRAIN, a.data_seed, i, a.batch)[0]

    cfg = SAETrainerConfig(total_training_samples=a.steps * a.batch, train_batch_size_samples=a.batch, lr=a.lr,
                           lr_end=a.lr, lr_warm_up_steps=a.warmup, lr_decay_steps=a.decay, device="cpu")
    start = time.perf_counter()
    SAETrainer(cfg, sae, provider()).fit()
    rate = a.steps * a.batch / (time.perf_counter() - start)
    sae.save_inference_model(a.out)
    _unflag_folded_norms(Path(a.out))
    print(json.dumps({"tokens_per_s": rate, "saelens_scores": saelens_eval(sae, model, a)}))
    return 0


def saelens_eval_phase(a) -> int:
    """SAELens's own scores of saved SAEs (ours, as SAELens loads them): one JSON list, in --ours order."""
    from sae_lens import SAE

    torch.set_num_threads(a.threads)
    model = read_model(a.model_file)
    print(json.dumps([saelens_eval(SAE.load_from_disk(p, device="cpu"), model, a) for p in a.ours]))
    return 0


# --- our side ---

def our_scores(paths: list[Path], model, block: int, tokens: int) -> list[dict]:
    """saelightning's metrics of exported SAEs (any, also SAELens-written) on the model's held-out samples."""
    from saelightning.evaluate import encode_decode
    from saelightning.export import load_sae
    from saelightning.heldout import evaluate_held_out

    saes = [load_sae(p) for p in paths]
    results, _ = evaluate_held_out({"synthetic": saes}, SyntheticVal(model, block, tokens), encode_decode, model)
    return [{k: r["metrics"][k] for k in KEYS} for r in results["synthetic"]]


def _run(cmd: list[str], env: dict | None = None) -> str:
    """Run a phase in a subprocess (this tree on its PYTHONPATH); the last line it prints, or its error's tail."""
    done = subprocess.run(cmd, capture_output=True, text=True, env=env or dict(os.environ, PYTHONPATH=str(ROOT)))
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    lines = done.stdout.strip().splitlines()
    return lines[-1] if lines else ""


def _fit(a, config: dict, out: Path, steps: int) -> float:
    """`saelightning fit` of the config (written to out/config.yaml) into out/ours; its wall seconds (cached)."""
    timing = out / "ours_seconds.json"
    if not timing.is_file():  # a run dir of an earlier call is reused (each part of the benchmark is cached)
        (out / "config.yaml").write_text(yaml.safe_dump(config))
        cmd = [sys.executable, "-m", "saelightning", "fit", "--config", str(out / "config.yaml"),
               "--trainer.max_steps", str(steps), "--trainer.default_root_dir", str(out / "ours"),
               "--trainer.enable_progress_bar", "false"]
        env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), PYTHONPATH=str(ROOT))
        start = time.perf_counter()
        _run(cmd, env)
        timing.write_text(json.dumps(time.perf_counter() - start))
    return json.loads(timing.read_text())


def _saelens(a, spec: dict, seed: int, model_file: str, out: Path, steps: int, block: int, module: dict,
             data: dict, eval_tokens: int) -> tuple[dict, Path]:
    """SAELens's SAE of spec's architecture with this init seed (cached): its result and its saved directory."""
    d_sae = spec["d_sae"]
    lr = spec.get("lr") or 2e-4 / (d_sae / 2**14) ** 0.5
    sae_dir = out / f"saelens_{spec['architecture']}_s{seed}"
    cached = out / f"{sae_dir.name}.json"
    if not cached.is_file():
        sub = [a.saelens_python, __file__, "--phase", "saelens", "--arch", spec["architecture"], "--model-file",
               model_file, "--out-sae", str(sae_dir), "--d-sae", str(d_sae),
               "--k", str(spec["k"]), "--batch", str(block), "--data-seed", str(data.get("seed", 0)),
               "--warmup", str(module.get("warmup_steps", 1000)), "--decay", str(module.get("decay_steps", 0)),
               "--lr", repr(lr), "--steps", str(steps), "--eval-tokens", str(eval_tokens),
               "--threads", str(a.threads), "--seed", str(seed)]
        if spec.get("matryoshka_prefixes"):
            sub += ["--prefixes", *map(str, spec["matryoshka_prefixes"])]
        cached.write_text(_run(sub))
    return json.loads(cached.read_text()), sae_dir


def _saelens_scores_of_ours(a, paths: list[Path], model_file: str, block: int, eval_tokens: int) -> list[dict]:
    """Our exports scored by SAELens's eval_sae_on_synthetic_data in its venv (never cached: ours may be new)."""
    sub = [a.saelens_python, __file__, "--phase", "saelens-eval", "--model-file", model_file, "--batch", str(block),
           "--eval-tokens", str(eval_tokens), "--threads", str(a.threads), "--ours", *map(str, paths)]
    return json.loads(_run(sub))


def _row(name: str, m: dict, check: dict | None = None) -> str:
    cross = f"{check['mcc']:.4f} / {check['classification/f1_score']:.4f}" if check else ""
    return (f"| {name} | {m['mcc']:.4f} | {m['classification/f1_score']:.4f} | {m['classification/precision']:.4f} | "
            f"{m['classification/recall']:.4f} | {m['uniqueness']:.4f} | {m['explained_variance']:.4f} | "
            f"{m['l0']:.2f} | {int(m['dead_latents'])} | {m['shrinkage']:.4f} | {cross} |")


def _spread(values: list[float]) -> str:
    return f"{sum(values) / len(values):.4f} ({min(values):.4f}-{max(values):.4f})"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "synthetic_sweep.yaml"))
    p.add_argument("--archs", nargs="+", default=list(SAELENS_ARCHS), help="architectures SAELens also trains")
    p.add_argument("--seeds", type=int, default=1, help="inits per compared architecture, on both sides (ours: "
                   "copies of the SAE in the same fit, initialised one after the other; SAELens: seeds 0, 1, ...)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the config's max_steps)")
    p.add_argument("--eval-tokens", type=int, default=None, help="held-out samples (default: the config's validation)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--saelens-python", default="/tmp/saelens-venv/bin/python")
    p.add_argument("--out", default=None, help="run dir (default: a temporary one); an earlier run's parts are reused")
    p.add_argument("--phase", default="main", choices=["main", "saelens", "saelens-eval"])
    p.add_argument("--ours", nargs="*", default=None, help=argparse.SUPPRESS)
    for hidden in ("--arch", "--model-file", "--out-sae"):
        p.add_argument(hidden, default=None, help=argparse.SUPPRESS)
    for hidden in ("--d-sae", "--k", "--batch", "--data-seed", "--warmup", "--decay"):
        p.add_argument(hidden, type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--lr", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--prefixes", type=int, nargs="*", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.phase == "saelens":
        a.out = a.out_sae
        return saelens_phase(a)
    if a.phase == "saelens-eval":
        return saelens_eval_phase(a)

    config = yaml.safe_load(Path(a.config).read_text())
    steps = a.steps or config["trainer"]["max_steps"]
    data, module = config["data"], config["model"]
    block = data["batch_size"]
    if data.get("buffer_tokens") != block:
        raise SystemExit("the config's data.buffer_tokens must equal data.batch_size (one block per batch), so that "
                         "both trainers see the same samples at every step")
    eval_tokens = a.eval_tokens or data["val_batches"] * block
    out = Path(a.out or tempfile.mkdtemp(prefix="synthetic-vs-saelens-"))
    out.mkdir(parents=True, exist_ok=True)
    originals = list(module["saes"])
    specs = list(originals)
    replicas = {s["name"]: [s["name"]] for s in specs}
    for spec in list(specs):  # the compared architectures again, other inits, on the same stream
        if spec["architecture"] in a.archs:
            for i in range(1, a.seeds):
                specs.append({**spec, "name": f"{spec['name']}_s{i}"})
                replicas[spec["name"]].append(f"{spec['name']}_s{i}")
    config["model"]["saes"] = specs
    seconds = _fit(a, config, out, steps)
    exports = {s["name"]: out / "ours" / "saes" / s["name"] for s in specs}
    model_file = json.loads((exports[specs[0]["name"]] / "cfg.json").read_text())["metadata"]["trained_on"][
        "synthetic"]
    model = read_model(model_file)
    ours = dict(zip(exports, our_scores(list(exports.values()), model, block, eval_tokens)))
    print(f"# torch {torch.__version__}, {a.threads} thread(s); {steps} steps x {block} = {steps * block:,} samples; "
          f"held out {eval_tokens:,}; synthetic model {model_file} ({model.num_features} features, d {model.d_in}); "
          f"saelightning fit of {len(specs)} SAEs on one stream: {seconds:.0f} s")
    print("| trainer | MCC | F1 | precision | recall | uniqueness | EV | L0 | dead | shrinkage "
          "| MCC / F1 by SAELens's eval |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    compared = [m for spec in originals if spec["architecture"] in a.archs for m in replicas[spec["name"]]]
    by_saelens = _saelens_scores_of_ours(a, [exports[m] for m in compared], model_file, block, eval_tokens)
    by_saelens = dict(zip(compared, by_saelens))
    summary, results = [], {"ours": ours, "ours_by_saelens_eval": by_saelens, "saelens": {}}
    for spec in originals:
        name = spec["name"]
        if spec["architecture"] not in a.archs:
            print(_row(f"saelightning {spec['architecture']}", ours[name]))
            continue
        theirs = []
        for seed, mine in enumerate(replicas[name]):
            result, sae_dir = _saelens(a, spec, seed, model_file, out, steps, block, module, data, eval_tokens)
            (scored,) = our_scores([sae_dir], model, block, eval_tokens)
            theirs.append(scored)
            results["saelens"][sae_dir.name] = {"ours_metrics": scored, **result}
            tag = f" (init {seed})" if a.seeds > 1 else ""
            print(_row(f"saelightning {spec['architecture']}{tag}", ours[mine], by_saelens[mine]))
            print(_row(f"SAELens {spec['architecture']}{tag}", scored, result["saelens_scores"]))
            print(f"SAELens {spec['architecture']} seed {seed}: {steps * block / result['tokens_per_s']:.0f} s",
                  file=sys.stderr)
        for key in ("mcc", "classification/f1_score"):
            summary.append((spec["architecture"], key, _spread([ours[m][key] for m in replicas[name]]),
                            _spread([t[key] for t in theirs])))
    if a.seeds > 1:
        print(f"\nover {a.seeds} inits, mean (min-max):")
        print("| architecture | metric | saelightning | SAELens |")
        print("|---|---|---:|---:|")
        for arch, key, mine, theirs in summary:
            print(f"| {arch} | {key} | {mine} | {theirs} |")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
