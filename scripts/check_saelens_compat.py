"""Check that SAELens 6 reads saelightning exports (and saelightning reads SAELens's) with equal latents.

Not part of the test suite, and the project never depends on sae-lens: SAELens lives in its own venv.
    python -m venv /tmp/saelens-venv && /tmp/saelens-venv/bin/pip install torch==2.13.0 &&
        /tmp/saelens-venv/bin/pip install sae-lens
    .venv/bin/python scripts/check_saelens_compat.py --saelens-python /tmp/saelens-venv/bin/python
Phase 1 (this venv) exports one SAE per architecture with non-trivial weights and input scale, plus
raw inputs and saelightning's latents; phase 2 (the SAELens venv, `--phase saelens DIR`) loads each
with SAE.load_from_disk, encodes/decodes the same inputs, prints the max abs differences, and also
writes SAELens-made SAEs of each on-disk architecture; phase 3 (back here) loads those with load_sae.
Transcoders too: ours of each architecture SAELens 6 has a class for (Transcoder, SkipTranscoder,
JumpReLUTranscoder, JumpReLUSkipTranscoder; d_out != d_in, input and output scales folded) are loaded there and
their outputs (decoder + skip) compared on the same inputs, and SAELens-made ones are loaded here.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

D_IN, D_SAE, N = 64, 256, 512
D_OUT = 48  # transcoders write another width
# our transcoder (architecture, skip) -> the SAELens 6 architecture it is exported as
TRANSCODERS = {"relu_tc": ("relu", False), "relu_skip_tc": ("relu", True), "jumprelu_tc": ("jumprelu", False),
               "jumprelu_skip_tc": ("jumprelu", True), "batchtopk_skip_tc": ("batchtopk", True)}
TOL = 1e-4


def _perturbed_sae(architecture: str, d_out: int | None = None, skip: bool = False):
    from saelightning.saes import SAEConfig, build_sae

    sae = build_sae(SAEConfig(architecture=architecture, d_in=D_IN, d_sae=D_SAE, k=16, d_out=d_out,
                              skip_connection=skip))
    with torch.no_grad():  # weights as after training: no symmetry, biases and thresholds nonzero
        for name, param in sae.named_parameters():
            param.add_(0.05 * torch.randn_like(param))
        if architecture == "jumprelu":
            sae.threshold.copy_(torch.rand(D_SAE) * 0.3)
        if architecture in ("batchtopk", "matryoshka"):
            sae.threshold.fill_(0.2)
        sae.input_scale.fill_(3.7)  # as if training activations were multiplied by 3.7
        if d_out is not None:
            sae.output_scale.fill_(0.6)  # and the outputs by 0.6
    return sae.eval()


def phase_export(root: Path) -> None:
    from saelightning.export import save_sae

    raw = torch.randn(N, D_IN) * 0.5 + 0.1
    results = {"raw": raw}
    for arch in ("topk", "batchtopk", "relu", "gated", "jumprelu", "matryoshka"):
        sae = _perturbed_sae(arch)
        save_sae(sae, root / arch, metadata={"hook_name": "blocks.0.hook_resid_post"})
        with torch.no_grad():
            results[f"{arch}.latents"] = sae.encode(raw * sae.input_scale)  # unfolded SAE on scaled input
            results[f"{arch}.recon"] = sae.decode(results[f"{arch}.latents"]) / sae.input_scale
    for name, (arch, skip) in TRANSCODERS.items():
        sae = _perturbed_sae(arch, D_OUT, skip)
        hooks = {"hook_name": "blocks.0.hook_mlp_in", "hook_name_out": "blocks.0.hook_mlp_out"}
        save_sae(sae, root / name, metadata=hooks)
        with torch.no_grad():
            results[f"{name}.latents"] = sae.encode(raw * sae.input_scale)
            results[f"{name}.recon"] = sae.output(results[f"{name}.latents"], raw * sae.input_scale) / sae.output_scale
    save_file({k: v.contiguous() for k, v in results.items()}, str(root / "expected.safetensors"))


def _output(result):
    """A SAELens transcoder's forward output (6.0-6.x returned (output, latents), later ones the output)."""
    return result[0] if isinstance(result, tuple) else result


def phase_saelens(root: Path) -> None:
    import sae_lens
    from sae_lens import (
        SAE,
        GatedSAE,
        GatedSAEConfig,
        JumpReLUSAE,
        JumpReLUSAEConfig,
        JumpReLUSkipTranscoder,
        JumpReLUSkipTranscoderConfig,
        JumpReLUTranscoder,
        JumpReLUTranscoderConfig,
        SkipTranscoder,
        SkipTranscoderConfig,
        StandardSAE,
        StandardSAEConfig,
        TopKSAE,
        TopKSAEConfig,
        Transcoder,
        TranscoderConfig,
    )

    expected = load_file(str(root / "expected.safetensors"))
    raw = expected["raw"]
    report = {"sae_lens_version": sae_lens.__version__, "ours_in_saelens": {}, "saelens_in_ours": {}}
    for arch in ("topk", "batchtopk", "relu", "gated", "jumprelu", "matryoshka", *TRANSCODERS):
        sae = SAE.load_from_disk(root / arch)
        with torch.no_grad():
            latents = sae.encode(raw)
            recon = _output(sae(raw)) if arch in TRANSCODERS else sae.decode(latents)  # its forward adds W_skip
        report["ours_in_saelens"][arch] = {
            "saelens_class": type(sae).__name__,
            "latents_max_abs_diff": float((latents - expected[f"{arch}.latents"]).abs().max()),
            "same_active_set": bool(((latents != 0) == (expected[f"{arch}.latents"] != 0)).all()),
            "recon_max_abs_diff": float((recon - expected[f"{arch}.recon"]).abs().max()),
            "l0": float((latents != 0).float().sum(-1).mean()),
        }
    made = {"standard": StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE)),
            "topk": TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=16)),
            "jumprelu": JumpReLUSAE(JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE)),
            "gated": GatedSAE(GatedSAEConfig(d_in=D_IN, d_sae=D_SAE)),
            **{name: cls(config(d_in=D_IN, d_sae=D_SAE, d_out=D_OUT, apply_b_dec_to_input=False))
               for name, cls, config in (("transcoder", Transcoder, TranscoderConfig),
                                         ("skip_transcoder", SkipTranscoder, SkipTranscoderConfig),
                                         ("jumprelu_transcoder", JumpReLUTranscoder, JumpReLUTranscoderConfig),
                                         ("jumprelu_skip_transcoder", JumpReLUSkipTranscoder,
                                          JumpReLUSkipTranscoderConfig))}}
    out = {}
    for arch, sae in made.items():
        with torch.no_grad():
            for param in sae.parameters():
                param.add_(0.1 * torch.randn_like(param))
            if arch.startswith("jumprelu"):
                sae.threshold.copy_(torch.rand(D_SAE) * 0.3)
            sae.save_model(root / f"saelens_{arch}")
            out[f"{arch}.latents"] = sae.encode(raw)
            out[f"{arch}.recon"] = _output(sae(raw)) if "transcoder" in arch else sae.decode(out[f"{arch}.latents"])
    save_file({k: v.contiguous() for k, v in out.items()}, str(root / "saelens.safetensors"))
    (root / "report.json").write_text(json.dumps(report, indent=2))


def phase_import(root: Path) -> dict:
    from saelightning.export import load_sae

    raw = load_file(str(root / "expected.safetensors"))["raw"]
    made = load_file(str(root / "saelens.safetensors"))
    result = {}
    for arch in ("standard", "topk", "jumprelu", "gated", "transcoder", "skip_transcoder", "jumprelu_transcoder",
                 "jumprelu_skip_transcoder"):
        sae = load_sae(root / f"saelens_{arch}")
        with torch.no_grad():
            latents = sae.encode(raw)
            recon = sae.output(latents, raw)
        result[arch] = {"saelightning_class": type(sae).__name__,
                        "latents_max_abs_diff": float((latents - made[f"{arch}.latents"]).abs().max()),
                        "recon_max_abs_diff": float((recon - made[f"{arch}.recon"]).abs().max())}
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--saelens-python", default="/tmp/saelens-venv/bin/python")
    parser.add_argument("--phase", default="all", choices=["all", "saelens"])
    parser.add_argument("dir", nargs="?")
    args = parser.parse_args()
    if args.phase == "saelens":
        phase_saelens(Path(args.dir))
        return 0
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        phase_export(root)
        subprocess.run([args.saelens_python, __file__, "--phase", "saelens", str(root)], check=True)
        report = json.loads((root / "report.json").read_text())
        report["saelens_in_ours"] = phase_import(root)
    print(json.dumps(report, indent=2))
    diffs = [v[key] for part in ("ours_in_saelens", "saelens_in_ours") for v in report[part].values()
             for key in ("latents_max_abs_diff", "recon_max_abs_diff")]
    ok = max(diffs) < TOL and all(v["same_active_set"] for v in report["ours_in_saelens"].values())
    print("OK: SAELens and saelightning agree" if ok else "MISMATCH",
          f"(max abs diff {max(diffs):.2e}, tolerance {TOL})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
