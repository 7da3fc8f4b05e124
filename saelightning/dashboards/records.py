"""Feature statistics turned into plain JSON-ready records (shared by the HTML site and Neuronpedia).

One record per latent: density, activation summary, histogram, logit effect, contexts, nearest
latents by decoder cosine and the latents that fire with it, with token ids already turned into
display text. Contexts are the window around the activating token with padding (beyond a row's edge)
dropped; `index` marks the activating token within it. Also the SAE-wide summaries of the index page:
the histogram of log10 feature density and the training figures of the export's cfg.json metadata.
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


def feature_records(stats: FeatureStats, effects, token_str, nearest=None) -> list[dict]:
    """JSON-ready dicts, one per latent in stats.features. effects = stats.logit_effect(...) output;
    nearest = stats.nearest_latents(...) output (cosines [F, n], latents [F, n]), or None.

    "nearest": [[latent, cosine], ...] by decoder cosine, most similar first. "cofire": [[latent, count,
    count / this latent's firings, count / that latent's firings], ...], most tokens together first."""
    token_str = lru_cache(maxsize=None)(_safe(token_str))
    cfg = stats.config
    top_v, top_i, bot_v, bot_i, logit_h, logit_c = effects
    density = stats.density
    per = cfg.n_bins // cfg.n_intervals
    n_fire_all = stats.n_fire_all.tolist() if stats.n_fire_all is not None else None
    near_cos, near_idx = (nearest[0].tolist(), nearest[1].tolist()) if nearest is not None else (None, None)
    co_idx = stats.cofire_latents.tolist() if stats.cofire_latents is not None else None
    co_n = stats.cofire_counts.tolist() if stats.cofire_counts is not None else None
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
            "nearest": [[j, _num(c)] for j, c in zip(near_idx[i], near_cos[i])] if near_idx is not None else [],
            "cofire": [[j, n, _num(n / max(fired, 1)), _num(n / max(n_fire_all[j], 1))]
                       for j, n in zip(co_idx[i], co_n[i]) if j >= 0] if co_idx is not None else [],
        })
    return records


def density_histogram(n_fire_all, n_tokens: int, per_decade: int = 4) -> dict:
    """The SAE-wide histogram of log10 feature density over the streamed tokens.

    Bins of 1/per_decade decade, [edge_j, edge_j+1), from floor(log10(1 / n_tokens)) (one firing) to 0
    (the last bin holds density 1 too); latents that never fired (log10 density -inf) are counted in
    "dead", not in a bin."""
    counts = [int(c) for c in (n_fire_all.tolist() if hasattr(n_fire_all, "tolist") else n_fire_all)]
    lo = math.floor(math.log10(1 / max(n_tokens, 1)))
    n_bins = max(1, -lo * per_decade)
    heights = [0] * n_bins
    for c in counts:
        if c > 0:
            x = math.log10(c / n_tokens)
            heights[min(max(math.floor((x - lo) * per_decade), 0), n_bins - 1)] += 1
    return {"edges": [lo + j / per_decade for j in range(n_bins + 1)], "heights": heights,
            "dead": sum(c == 0 for c in counts), "n_latents": len(counts), "n_tokens": n_tokens}


# (label, metric name): looked up as val/<name>, then metrics/<name>, sparsity/<name>, <name>
HEADLINE_METRICS = [("explained variance", "explained_variance"), ("L0", "l0"), ("CE loss score", "ce_loss_score"),
                    ("KL divergence score", "kl_div_score"), ("MSE", "mse"), ("cosine similarity", "cossim"),
                    ("L2 ratio", "l2_ratio"), ("CE loss with the SAE", "ce_loss_with_sae"),
                    ("CE loss without the SAE", "ce_loss_without_sae"),
                    ("CE loss with the hook zero-ablated", "ce_loss_with_ablation"),
                    ("dead fraction", "dead_fraction"), ("alive fraction", "frac_alive")]
METRIC_PREFIXES = ("val/", "metrics/", "sparsity/", "")


def _figure(value):
    """A number for JSON (non-finite -> None), or a short string."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return value if math.isfinite(value) else None
    return None if value is None else str(value)


def export_figures(metadata: dict) -> dict:
    """The figures of an export's cfg.json metadata, for the index page.

    "training": [[label, value, key]] (training_steps, training_tokens, the step of the final
    metrics, architecture); "metrics": [[label, value, key]] of HEADLINE_METRICS present in
    final_metrics (val/ figures first: they come from the held-out rows); "all": every final_metrics
    [key, value], sorted by key."""
    metadata = metadata if isinstance(metadata, dict) else {}
    final = metadata.get("final_metrics") if isinstance(metadata.get("final_metrics"), dict) else {}
    training = [[label, _figure(metadata[key]), key] for label, key in (
        ("training steps", "training_steps"), ("training tokens", "training_tokens"),
        ("final metrics at step", "final_metrics_step"), ("architecture", "saelightning_architecture"))
        if metadata.get(key) is not None]
    spec = metadata.get("spec") if isinstance(metadata.get("spec"), dict) else {}
    if spec.get("k") is not None:
        training.append(["k (active latents per token)", _figure(spec["k"]), "spec.k"])
    metrics = []
    for label, name in HEADLINE_METRICS:
        key = next((p + name for p in METRIC_PREFIXES if p + name in final), None)
        if key is not None:
            metrics.append([label, _figure(final[key]), key])
    return {"training": training, "metrics": metrics,
            "all": [[key, _figure(final[key])] for key in sorted(final)]}


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
