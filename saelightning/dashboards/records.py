"""Feature statistics turned into plain JSON-ready records (shared by the HTML site and Neuronpedia).

One record per latent: density, activation summary, histogram, logit effect and contexts, with
token ids already turned into display text. Contexts are the window around the activating token
with padding (beyond a row's edge) dropped; `index` marks the activating token within it.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from saelightning.dashboards.stats import FeatureStats


def _num(x: float) -> float:
    """Four significant digits: enough to read, small in JSON."""
    x = float(x)
    return 0.0 if x == 0 or not math.isfinite(x) else float(f"{x:.4g}")


def _context(tokens: torch.Tensor, acts: torch.Tensor, before: int, token_str) -> dict:
    keep = tokens >= 0
    first = int(keep.int().argmax())  # pads only lie at the start and the end of a window
    ids = tokens[keep].tolist()
    return {"tokens": [token_str(i) for i in ids], "values": [_num(a) for a in acts[keep].tolist()],
            "index": before - first, "value": _num(acts[before])}


def _contexts(heap, group: int, before: int, token_str, order=None) -> list[dict]:
    filled = [j for j in range(heap.keys.shape[1]) if heap.keys[group, j] > float("-inf")]
    if order == "value":  # samples are kept by random priority: show them by activation instead
        filled.sort(key=lambda j: -float(heap.values[group, j]))
    return [_context(heap.tokens[group, j], heap.acts[group, j], before, token_str) for j in filled]


def feature_records(stats: FeatureStats, effects, token_str) -> list[dict]:
    """JSON-ready dicts, one per latent in stats.features. effects = stats.logit_effect(...) output."""
    token_str = lru_cache(maxsize=None)(token_str)
    cfg = stats.config
    top_v, top_i, bot_v, bot_i, logit_h, logit_c = effects
    density = stats.density
    per = cfg.n_bins // cfg.n_intervals
    records = []
    for i, latent in enumerate(stats.features.tolist()):
        mx, fired = float(stats.max_act[i]), int(stats.n_fire[i])
        edges = [_num(e) for e in stats.bin_edges(i).tolist()]
        heights = stats.hist[i].tolist()
        top = _contexts(stats.top, i, cfg.before, token_str)
        intervals = []
        for q in range(cfg.n_intervals):
            count = sum(heights[q * per:(q + 1) * per])
            if count == 0:
                continue
            intervals.append({"min": edges[q * per], "max": edges[(q + 1) * per],
                              "contains": count / max(fired, 1),
                              "contexts": _contexts(stats.samples, i * cfg.n_intervals + q, cfg.before,
                                                    token_str, order="value")})
        d = float(density[i])
        records.append({
            "index": latent, "density": d, "log10_density": math.log10(d) if d > 0 else None,
            "n_fire": fired, "max_act": _num(mx), "mean_act": _num(stats.mean_act[i]),
            "top_tokens": _top_tokens(top),
            "hist": {"heights": heights, "edges": edges},
            "logits": {
                "pos": [[token_str(t), _num(v)] for t, v in zip(top_i[i].tolist(), top_v[i].tolist())],
                "neg": [[token_str(t), _num(v)] for t, v in zip(bot_i[i].tolist(), bot_v[i].tolist())],
                "hist": {"heights": logit_h[i].tolist(), "centres": [_num(c) for c in logit_c[i].tolist()]},
            },
            "top": top, "intervals": intervals,
        })
    return records


def _top_tokens(contexts: list[dict], n: int = 5) -> list[str]:
    """Distinct activating tokens of the top contexts, most frequent first (ties: strongest first)."""
    counts: dict[str, int] = {}
    for c in contexts:
        tok = c["tokens"][c["index"]]
        counts[tok] = counts.get(tok, 0) + 1
    return sorted(counts, key=lambda t: -counts[t])[:n]  # sorted is stable: earlier = stronger
