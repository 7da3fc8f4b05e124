"""`saelightning attribute`: the attribution graph of a prompt, its files, and interventions on its latents.

    saelightning attribute --model demo --sae checkpoints/demo_clt/saes/clt --prompt $'def f(x):\\n    return' \\
        --out graphs/def_return [--target TOKEN] [--clamp 3:17=0]

writes OUT/<slug>.json (the graph file circuit-tracer's and Neuronpedia's viewers read), OUT/graph.html (our
page) and OUT/summary.json (scores, logit nodes, the most influential latents, interventions).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from saelightning import resolve
from saelightning.atomic import atomic_dir
from saelightning.attribution import (
    DESIRED_LOGIT_PROB,
    MAX_N_LOGITS,
    Sources,
    Transcoders,
    attribute,
    prune,
    scores,
)
from saelightning.command import parse
from saelightning.dashboards.graph import DEFAULT_DASHBOARD, graph_json, graph_page
from saelightning.errors import SAELightningError
from saelightning.export import load_sae
from saelightning.runtime import InterpretableModel, Steer

_CLAMP = re.compile(r"^(\d+):(\d+)=(.+)$")


def parse_clamp(spec: str) -> tuple[int, int, float]:
    """'LAYER:LATENT=VALUE' -> (layer, latent, value)."""
    m = _CLAMP.match(spec.strip())
    try:
        value = float(m.group(3)) if m else float("nan")
    except ValueError:
        value = float("nan")
    if m is None or not torch.isfinite(torch.tensor(value)):
        raise SAELightningError(f"bad --clamp {spec!r}; write LAYER:LATENT=VALUE with a finite VALUE, e.g. 3:17=0 "
                                "(0 zeroes the latent)")
    return int(m.group(1)), int(m.group(2)), value


def replacement_intervention(rm, layer: int, latent: int, value: float, token: int) -> float:
    """The change in the target logit (last position) of the local replacement model when latent `latent` of layer
    `layer` is set to `value` at every position but <|bos|>: attention, norms and every other node (latents and
    errors) frozen, so it is the latent's direct effect through the frozen linear paths (the graph's edges)."""
    s = rm.sources
    if layer not in s.latents:
        raise SAELightningError(f"--clamp layer {layer} has no transcoder; layers with one: {sorted(s.latents)}")
    d_sae = rm.tc.n_features(layer)
    if not 0 <= latent < d_sae:
        raise SAELightningError(f"--clamp latent {latent} is out of range for layer {layer} (d_sae={d_sae})")
    # the latents are constants of the frozen model: a new value changes only what its decoder rows write, which
    # joins each MLP output it reaches beside that output's error node
    delta = torch.where(rm.keep, value - rm.dense_latents(layer)[:, latent], 0.0)
    errors = dict(s.errors)
    for j, row in rm.tc.latent_rows(layer, latent).items():
        errors[j] = s.errors[j] + delta[:, None].to(row.dtype) * row
    with torch.no_grad():
        _, before = rm.forward(s, last_only=True)
        _, after = rm.forward(Sources(s.embed, s.value_embeds, s.latents, errors), last_only=True)
    return float(after[-1, token] - before[-1, token])


def model_intervention(model, saes, idx: torch.Tensor, bos_id: int | None, layer: int, latent: int, value: float,
                       token: int) -> float:
    """The change in the model's own target logit with the latent clamped (InterpretableModel: read at the MLP
    input, its decoder rows' change added to every MLP output it writes, the error kept; nothing frozen)."""
    im = InterpretableModel(model, saes, bos_id=bos_id)
    with torch.no_grad():
        before = im(idx[None])[0, -1, token]
        with im.steering([Steer(f"blocks.{layer}.hook_mlp_in", latent, "clamp", value)]):
            after = im(idx[None])[0, -1, token]
    return float(after - before)


@dataclass
class AttributeArgs:
    """Build the attribution graph of a prompt through a CLT or per-layer transcoders (README, Attribution graphs).

    Args:
        prompt: the prompt text (encoded with <|bos|> first); the graph explains the prediction after it.
        sae: a CLT export directory, or one transcoder export per MLP layer (several values, or --sae repeated).
        out: output directory (replaced only if an earlier `saelightning attribute` wrote it).
        model: nanochat checkpoint or base dir, or "demo" (default: the one the --sae cfg.json records).
        target: the token whose logit to explain (text of exactly one token); default: the most likely tokens up
            to desired_logit_prob of the probability, at most max_n_logits.
        node_threshold: keep the nodes covering this fraction of the influence on the logits.
        edge_threshold: keep the edges covering this fraction of the edge influence.
        max_feature_nodes: attribute at most this many latents, the most influential first (default: all).
        max_n_logits: logit nodes at most (without --target).
        desired_logit_prob: logit nodes cover this probability (without --target).
        clamp: LAYER:LATENT=VALUE: set a latent (at every position but <|bos|>) and report the target logit's
            change in the replacement model and in the model with the latent steered (0 zeroes it).
        dashboard: link of a latent node to its dashboard page, relative to OUT/graph.html, with {layer},
            {feature} (index in its layer) and {index} (a CLT's latents side by side: rank of its layer x d_sae +
            feature); "" for no links.
        slug: the graph's name (its JSON file is OUT/<slug>.json).
        batch_size: target nodes per backward pass.
        device: cpu or cuda (default: cuda when there is a GPU).
    """

    prompt: str
    sae: list[str]
    out: str
    model: str | None = None
    target: str | None = None
    node_threshold: float = 0.8
    edge_threshold: float = 0.98
    max_feature_nodes: int | None = None
    max_n_logits: int = MAX_N_LOGITS
    desired_logit_prob: float = DESIRED_LOGIT_PROB
    clamp: list[str] = field(default_factory=list)
    dashboard: str = DEFAULT_DASHBOARD
    slug: str = "graph"
    batch_size: int = 64
    device: str | None = None

    def __post_init__(self):
        if not self.prompt:
            raise SAELightningError("--prompt is empty; give the text whose next-token prediction to explain")
        if not self.sae:
            raise SAELightningError("--sae is required: a CLT export, or one transcoder export per MLP layer")
        for name in ("node_threshold", "edge_threshold", "desired_logit_prob"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise SAELightningError(f"--{name.replace('_', '-')} {v} must be between 0 and 1")
        if self.max_feature_nodes is not None and self.max_feature_nodes < 1:
            raise SAELightningError(f"--max-feature-nodes {self.max_feature_nodes} must be >= 1 (or left out: all)")
        if self.max_n_logits < 1 or self.batch_size < 1:
            raise SAELightningError("--max-n-logits and --batch-size must be >= 1")
        if not re.fullmatch(r"[A-Za-z0-9._-]+", self.slug):
            raise SAELightningError(f"--slug {self.slug!r} must be letters, digits, '.', '_' or '-' (a file name)")
        try:
            self.dashboard.format(layer=0, feature=0, index=0)
        except (KeyError, IndexError, ValueError):
            raise SAELightningError(f"--dashboard {self.dashboard!r} may use only {{layer}}, {{feature}} and "
                                    "{index}") from None
        self.clamps = [parse_clamp(c) for c in self.clamp]


def _target_id(tokenizer, text: str | None) -> int | None:
    if text is None:
        return None
    ids = tokenizer.encode(text, prepend_bos=False)
    if len(ids) != 1:
        raise SAELightningError(f"--target {text!r} is {len(ids)} tokens; give the text of exactly one token "
                                "(e.g. ' x' with its leading space)")
    return ids[0]


def run_attribute(a: AttributeArgs) -> dict:
    device = resolve.device(a.device)
    model_name, load, _ = resolve.sources(a.sae, a.model, None)
    nc = resolve.load_model(model_name, device=device, dtype=torch.float32, **load)
    saes = [load_sae(p, device=device) for p in a.sae]
    tc = Transcoders(saes, nc.model.config.n_layer)
    tok = nc.tokenizer
    idx = torch.tensor(tok.encode(a.prompt), dtype=torch.long, device=device)
    target = _target_id(tok, a.target)
    for layer, latent, _ in a.clamps:  # checked before minutes of attribution
        if layer not in tc.layers or not 0 <= latent < tc.n_features(layer):
            raise SAELightningError(f"--clamp {layer}:{latent}: the transcoders have layers {tc.layers} of "
                                    f"{tc.n_features(tc.layers[0])} latents each")
    graph, rm = attribute(nc.model, tc, idx, target, tok.bos_id, a.max_n_logits, a.desired_logit_prob,
                          a.max_feature_nodes, a.batch_size)
    pruned = prune(graph, a.node_threshold, a.edge_threshold)
    replacement, completeness = scores(graph)
    ranks = {layer: r for r, layer in enumerate(tc.layers)}
    d_sae = {layer: tc.n_features(layer) for layer in tc.layers}
    n_layer = nc.model.config.n_layer
    data = graph_json(graph, pruned, tok.token_str, slug=a.slug, scan=f"nanochat-{load.get('step', 'latest')}",
                      prompt=a.prompt, n_layer=n_layer, node_threshold=a.node_threshold,
                      edge_threshold=a.edge_threshold, scores=(replacement, completeness),
                      dashboard=a.dashboard or None, d_sae=d_sae, layer_rank=ranks,
                      transcoder_list=[str(p) for p in a.sae])
    logits = [{"token": tok.token_str(int(t)), "id": int(t), "prob": float(p)}
              for t, p in zip(graph.logit_ids, graph.logit_probs)]
    top = int(graph.logit_ids[0])
    interventions = [{"spec": f"{layer}:{latent}={value:g}", "layer": layer, "latent": latent, "value": value,
                      "token": tok.token_str(top),
                      "replacement_delta": replacement_intervention(rm, layer, latent, value, top),
                      "model_delta": model_intervention(nc.model, saes, idx, tok.bos_id, layer, latent, value, top)}
                     for layer, latent, value in a.clamps]
    nf = graph.n_features
    kept = [j for j in range(nf) if pruned.node_mask[j]]
    kept.sort(key=lambda j: -float(pruned.node_influence[j]))
    summary = {"prompt": a.prompt, "prompt_tokens": [tok.token_str(t) for t in graph.tokens], "logits": logits,
               "replacement_score": replacement, "completeness_score": completeness,
               "n_active_features": graph.meta["n_active_features"], "n_feature_nodes": nf,
               "n_nodes_kept": int(pruned.node_mask.sum()), "n_edges_kept": int(pruned.edge_mask.sum()),
               "top_latents": [{"layer": int(graph.features[j, 0]), "position": int(graph.features[j, 1]),
                                "latent": int(graph.features[j, 2]), "activation": float(graph.activations[j]),
                                "influence": float(pruned.node_influence[j])} for j in kept[:20]],
               "interventions": interventions}
    with atomic_dir(a.out, "attribute", {"slug": a.slug}) as tmp:
        (tmp / f"{a.slug}.json").write_text(json.dumps(data, indent=1, allow_nan=False), encoding="utf-8")
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
        (tmp / "graph.html").write_text(graph_page(data, n_layer, logits, interventions), encoding="utf-8")
    return summary


def cli_main(argv: Sequence[str]) -> int:
    a = parse(AttributeArgs, argv, "saelightning attribute")
    if a is None:
        return 0
    s = run_attribute(a)
    print("logit nodes: " + ", ".join(f"{lg['token']!r} p={lg['prob']:.3f}" for lg in s["logits"]))
    print(f"replacement score {s['replacement_score']:.3f}, completeness score {s['completeness_score']:.3f}; "
          f"{s['n_nodes_kept']} nodes and {s['n_edges_kept']} edges kept of {s['n_feature_nodes']} latents")
    for iv in s["interventions"]:
        print(f"clamp {iv['spec']}: target {iv['token']!r} logit change {iv['replacement_delta']:+.4f} in the "
              f"replacement model, {iv['model_delta']:+.4f} in the model")
    print(f"wrote {a.out}", file=sys.stderr)
    return 0
