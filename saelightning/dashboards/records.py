"""Feature statistics turned into plain JSON-ready records (shared by the HTML site and Neuronpedia).

One record per latent: density, activation summary, histogram, logit effect and contexts, with
token ids already turned into display text. Contexts are the window around the activating token
with padding (beyond a row's edge) dropped; `index` marks the activating token within it.
"""

from __future__ import annotations

import math
from functools import lru_cache

from saelightning.dashboards.stats import FeatureStats


def _num(x: float) -> float:
    """Four significant digits: enough to read, small in JSON."""
    x = float(x)
    return 0.0 if x == 0 or not math.isfinite(x) else float(f"{x:.4g}")


def _contexts(heap, group: int, before: int, token_str, by_value: bool = False) -> list[dict]:
    """The filled entries of one heap group as contexts (lists made once per group: fast in Python)."""
    keys, values = heap.keys[group].tolist(), heap.values[group].tolist()
    tokens, acts = heap.tokens[group].tolist(), heap.acts[group].tolist()
    filled = [j for j, k in enumerate(keys) if k > float("-inf")]
    if by_value:  # samples are kept by random priority: show them by activation instead
        filled.sort(key=lambda j: -values[j])
    out = []
    for j in filled:
        keep = [p for p, t in enumerate(tokens[j]) if t >= 0]  # pads lie only at the two ends
        out.append({"tokens": [token_str(tokens[j][p]) for p in keep], "values": [_num(acts[j][p]) for p in keep],
                    "index": before - keep[0], "value": _num(values[j])})
    return out


def feature_records(stats: FeatureStats, effects, token_str) -> list[dict]:
    """JSON-ready dicts, one per latent in stats.features. effects = stats.logit_effect(...) output."""
    token_str = lru_cache(maxsize=None)(_safe(token_str))
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
                                                    token_str, by_value=True)})
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


def _safe(token_str):
    """An id the tokenizer does not know (a model vocab padded past it) shows as <id N>."""
    def show(i: int) -> str:
        try:
            return token_str(i)
        except (KeyError, ValueError, IndexError):
            return f"<id {i}>"
    return show


def _top_tokens(contexts: list[dict], n: int = 5) -> list[str]:
    """Distinct activating tokens of the top contexts, most frequent first (ties: strongest first)."""
    counts: dict[str, int] = {}
    for c in contexts:
        tok = c["tokens"][c["index"]]
        counts[tok] = counts.get(tok, 0) + 1
    return sorted(counts, key=lambda t: -counts[t])[:n]  # sorted is stable: earlier = stronger
