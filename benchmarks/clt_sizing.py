"""The memory a cross-layer transcoder needs: weights, optimizer, the shuffle buffer and one step's tensors.

    python benchmarks/clt_sizing.py [--n-layer 20] [--d-model 1280] [--d-sae 10240] [--k 32] [--batch 4096]
        [--buffer-tokens 65536] [--measure]

The parameter count is the real module's (built on the meta device: nothing allocated). fp32 Adam keeps four
copies (weights, gradients, two moments): 16 bytes a parameter. The data module holds 2 x L x d_model activations
per token (every MLP input and output), twice while refilling. A training step's largest transient tensors are
each layer's concatenated output [batch, (L - l) x d_model] summed over layers (L(L+1)/2 x batch x d_model
floats), about three times (the output, its gradient, the per-encoder loss terms). --measure runs one real step
on CPU (use a small shape) and prints the peak resident memory it added, to check the estimate.
"""

from __future__ import annotations

import argparse
import resource

import torch

from saelightning.saes.base import SAEConfig
from saelightning.saes.clt import CrossLayerTranscoder

GiB = 2**30


def sizes(n_layer: int, d_model: int, d_sae: int, k: int, batch: int, buffer_tokens: int) -> dict[str, float]:
    with torch.device("meta"):
        clt = CrossLayerTranscoder(SAEConfig(architecture="topk", d_in=d_model, d_sae=d_sae, k=k), n_layer)
    params = sum(p.numel() for p in clt.parameters())
    decoder = sum(enc.W_dec.numel() for enc in clt.encoders)
    outputs = n_layer * (n_layer + 1) // 2 * batch * d_model
    return {"parameters (M)": params / 1e6, "of which decoders (M)": decoder / 1e6,
            "weights fp32 (GiB)": 4 * params / GiB, "weights+grads+Adam fp32 (GiB)": 16 * params / GiB,
            "activations per token (KiB)": 2 * n_layer * d_model * 4 / 2**10,
            "shuffle buffer at refill (GiB)": 2 * buffer_tokens * 2 * n_layer * d_model * 4 / GiB,
            "step transients, ~3 x outputs (GiB)": 3 * outputs * 4 / GiB,
            "encoder GFLOP per step (fwd)": 2 * batch * d_model * d_sae * n_layer / 1e9}


def measure(n_layer: int, d_model: int, d_sae: int, k: int, batch: int) -> float:
    """Peak resident memory (GiB) one CPU step adds to the process, weights and Adam included."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    clt = CrossLayerTranscoder(SAEConfig(architecture="topk", d_in=d_model, d_sae=d_sae, k=k), n_layer)
    opt = torch.optim.Adam([p for p in clt.parameters() if p.requires_grad])
    xs = [torch.randn(batch, d_model) for _ in range(n_layer)]
    ys = [torch.randn(batch, d_model) for _ in range(n_layer)]
    _, _, losses = clt(xs, ys, sparse=True)
    losses["loss"].backward()
    opt.step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20  # KiB -> GiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-layer", type=int, default=20)
    parser.add_argument("--d-model", type=int, default=1280)
    parser.add_argument("--d-sae", type=int, default=10240)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--buffer-tokens", type=int, default=65536)
    parser.add_argument("--measure", action="store_true")
    args = parser.parse_args()
    figures = sizes(args.n_layer, args.d_model, args.d_sae, args.k, args.batch, args.buffer_tokens)
    print(f"CLT over {args.n_layer} layers, d_model {args.d_model}, {args.d_sae} latents a layer, batch {args.batch}")
    for key, value in figures.items():
        print(f"  {key:<40} {value:10.2f}")
    if args.measure:
        inputs = 2 * args.n_layer * args.batch * args.d_model * 4 / GiB
        estimate = figures["weights+grads+Adam fp32 (GiB)"] + figures["step transients, ~3 x outputs (GiB)"] + inputs
        peak = measure(args.n_layer, args.d_model, args.d_sae, args.k, args.batch)
        print(f"  {'measured peak added by one CPU step (GiB)':<40} {peak:10.2f}   (estimate {estimate:.2f})")


if __name__ == "__main__":
    main()
