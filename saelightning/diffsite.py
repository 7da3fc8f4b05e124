"""The static site of `saelightning diff --site DIR`, in the style of the feature dashboards (dashboards/html.py).

index.html lists the latents given pages, sorted by Δ (B-only first), with their class, decoder cosine, density,
largest activation, ν and, with a chat mix, where they fire. latents/<i>.html shows one latent: its figures, its
top activating contexts on the same text in every model side by side (the latent's activation f and, per model m,
the part of its pre-activation read from that model's activation, (x^m − shift^m)·W_enc^m_i), and every model's
logit effect (lm_head(final_norm(d_i^m)), dashboards.stats.logit_effect on that model's decoder block). The pages
are written server-side (every text escaped); their script only marks the page rendered.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from saelightning.atomic import atomic_dir
from saelightning.dashboards.html import _page, fmt, token_html
from saelightning.dashboards.stats import StatsConfig, logit_effect

SCRIPT = "finished();\n"


@dataclass
class Contexts:
    """The top activating positions of the latents that get a page, gathered batch by batch during diff."""

    latents: torch.Tensor  # [S] latent indices
    n_models: int
    top: int = 8

    def __post_init__(self):
        self.values: list[torch.Tensor] = []  # per batch [rows * context, S] f (0 at BOS)
        self.parts: list[torch.Tensor] = []  # per batch [rows * context, M, S] each model's pre-activation part
        self.tokens: list[torch.Tensor] = []  # per batch [rows, context]

    def update(self, cc, batch: torch.Tensor, keep: torch.Tensor, x: torch.Tensor, f: torch.Tensor) -> None:
        sel = self.latents.to(f.device)
        n, d, M = batch.numel(), cc.d_model, cc.n_models
        shift = cc.encoder_shift
        xc = (x - shift) if shift is not None else x
        w = cc.W_enc[:, sel].float()
        parts = torch.stack([xc[:, m * d:(m + 1) * d].float() @ w[m * d:(m + 1) * d] for m in range(M)], 1)
        values = torch.zeros(n, len(sel))
        values[keep.cpu()] = f[:, sel].float().cpu()
        full = torch.zeros(n, M, len(sel))
        full[keep.cpu()] = parts.cpu()
        self.values.append(values)
        self.parts.append(full)
        self.tokens.append(batch.cpu())

    def contexts(self, j: int, token_str, before: int = 12, after: int = 4) -> list[dict]:
        """The top activating positions of the j-th selected latent, each a window of tokens with f and parts."""
        if not self.values:
            return []
        values = torch.cat([v[:, j] for v in self.values])
        parts = torch.cat([p[:, :, j] for p in self.parts])
        tokens = torch.cat(self.tokens)
        context = tokens.shape[1]
        flat = tokens.reshape(-1)
        out = []
        k = min(self.top, int((values > 0).sum()))
        for pos in values.topk(k).indices.tolist() if k else []:
            row_start = pos - pos % context
            lo, hi = max(row_start, pos - before), min(row_start + context, pos + after + 1)
            out.append({"at": pos - lo, "value": float(values[pos]),
                        "tokens": [token_str(int(t)) for t in flat[lo:hi]],
                        "f": values[lo:hi].tolist(), "parts": parts[lo:hi].T.tolist()})
        return out


def _shade(value: float, scale: float, colour: str) -> str:
    alpha = 0.0 if scale <= 0 else max(0.0, min(1.0, value / scale))
    return f"background: rgba({colour}, {alpha:.2f})"


def _context_html(c: dict, names: list[str]) -> str:
    scale = max(c["value"], 1e-12)
    part_scale = max([abs(v) for row in c["parts"] for v in row] + [1e-12])
    head = "<th>token</th><th>f</th>" + "".join(f"<th>from {html.escape(n)}</th>" for n in names)
    rows = []
    for t, tok in enumerate(c["tokens"]):
        mark = " class=\"peak\"" if t == c["at"] else ""
        cells = [f"<td>{token_html(tok)}</td>",
                 f"<td class=\"num\" style=\"{_shade(c['f'][t], scale, '255, 140, 0')}\">{fmt(c['f'][t])}</td>"]
        for m in range(len(names)):
            v = c["parts"][m][t]
            colour = "0, 110, 255" if v >= 0 else "220, 0, 60"
            cells.append(f"<td class=\"num\" style=\"{_shade(abs(v), part_scale, colour)}\">{fmt(v)}</td>")
        rows.append(f"<tr{mark}>{''.join(cells)}</tr>")
    return f"<table class=\"context\"><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _logits_html(name: str, effect: dict) -> str:
    def rows(items, cls):
        return "".join(f"<tr><td>{token_html(t)}</td><td class=\"num {cls}\">{fmt(v)}</td></tr>" for t, v in items)
    return (f"<div><h3>{html.escape(name)}</h3><table class=\"logits\" data-model=\"{html.escape(name)}\"><thead><tr>"
            f"<th>boosted</th><th>logit</th></tr></thead><tbody>{rows(effect['pos'], 'pos')}</tbody></table>"
            f"<table class=\"logits\"><thead><tr><th>suppressed</th><th>logit</th></tr></thead>"
            f"<tbody>{rows(effect['neg'], 'neg')}</tbody></table></div>")


def _meta_html(report: dict) -> str:
    models = ", ".join(f"{m['name']} ({m.get('path')}, step {m.get('step')})" for m in report["models"])
    return (f"<p class=\"meta\">{html.escape(str(report['sae']))} | hook {html.escape(report['hook_name'])} | "
            f"{html.escape(models)} | {report['tokens_evaluated']:,} tokens</p>")


def _figures(lat: dict, names: list[str]) -> list[tuple[str, str]]:
    out = [("Δ (relative decoder norm)", fmt(lat["delta"])), ("decoder cosine", fmt(lat["cosine"])),
           ("class", lat["class"]), ("density", fmt(lat["density"])), ("max activation", fmt(lat["max_activation"])),
           ("ν error (Complete Shrinkage near 1)", fmt(lat["nu_error"])),
           ("ν reconstruction (Latent Decoupling near 1)", fmt(lat["nu_reconstruction"]))]
    out += [(f"β error / reconstruction in {n}", f"{fmt(lat['beta_error'][m])} / {fmt(lat['beta_reconstruction'][m])}")
            for m, n in enumerate(names)]
    if "fires_on" in lat:
        out += [(f"firings on {k}", f"{v:,}") for k, v in lat["fires_on"].items()]
    return out


def latent_page(report: dict, lat: dict, contexts: list[dict], effects: dict[str, dict]) -> str:
    names = [m["name"] for m in report["models"]]
    i = lat["latent"]
    header = (f"<nav><a href=\"../index.html\">all latents</a></nav><header><h1>Latent {i}: "
              f"{html.escape(lat['class'])}</h1>{_meta_html(report)}</header>")
    stats = "".join(f"<tr><th>{html.escape(k)}</th><td class=\"num\">{html.escape(v)}</td></tr>"
                    for k, v in _figures(lat, names))
    ctx = "".join(f"<h3>f = {fmt(c['value'])}</h3>{_context_html(c, names)}" for c in contexts) or \
        "<p class=\"meta\" id=\"no-contexts\">never fired on the tokens read</p>"
    body = (f"<h2>Figures</h2><table id=\"stats\">{stats}</table>\n"
            "<h2>Top activations, the same text in every model</h2><p class=\"meta\">f: the latent's activation "
            "(read from every model at once); from M: the part of its pre-activation read from model M's "
            "activation at that token</p>"
            f"<div id=\"contexts\">{ctx}</div>\n"
            "<h2>Logit effect in each model</h2><p class=\"meta\">lm_head(final_norm(d_i^M)) of that model's "
            "decoder vector, direct path only</p>"
            f"<div class=\"cols\" id=\"logits\">{''.join(_logits_html(n, effects[n]) for n in names)}</div>")
    return _page(f"Latent {i} - diff", header, body, {"latent": i}, SCRIPT, "diff-latent")


def index_page(report: dict, latents: list[dict]) -> str:
    chat = "fires_on" in (latents[0] if latents else {})
    head = ("<th>latent</th><th>Δ</th><th>class</th><th>cosine</th><th>density</th><th>max act</th><th>ν error</th>"
            "<th>ν recon</th>" + ("<th>in conversations</th><th>on markers</th>" if chat else ""))
    rows = []
    for lat in latents:
        cells = [f"<td class=\"num\"><a href=\"latents/{lat['latent']}.html\">{lat['latent']}</a></td>",
                 f"<td class=\"num\">{fmt(lat['delta'])}</td><td>{html.escape(lat['class'])}</td>",
                 f"<td class=\"num\">{fmt(lat['cosine'])}</td><td class=\"num\">{fmt(lat['density'])}</td>",
                 f"<td class=\"num\">{fmt(lat['max_activation'])}</td><td class=\"num\">{fmt(lat['nu_error'])}</td>",
                 f"<td class=\"num\">{fmt(lat['nu_reconstruction'])}</td>"]
        if chat:
            on = lat["fires_on"]
            fired = max(on["text"] + on["user"] + on["assistant"], 1)
            cells.append(f"<td class=\"num\">{fmt((on['user'] + on['assistant']) / fired)}</td>"
                         f"<td class=\"num\">{fmt(on['chat_markers'] / fired)}</td>")
        rows.append(f"<tr data-latent=\"{lat['latent']}\">{''.join(cells)}</tr>")
    counts = ", ".join(f"{html.escape(k)} {v}" for k, v in report["class_counts"].items())
    ev = ", ".join(f"{html.escape(k)} {fmt(v)}" for k, v in report["explained_variance"].items())
    header = f"<header><h1>Model diff: {html.escape(report['a'])} vs {html.escape(report['b'])}</h1>" \
             f"{_meta_html(report)}</header>"
    body = (f"<p id=\"classes\">classes (every latent): {counts}; explained variance: {ev}</p>"
            f"<h2>Latents, by Δ ({len(latents)} with a page)</h2>"
            f"<table id=\"latents\"><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>")
    return _page(f"Model diff {report['a']} vs {report['b']}", header, body, {"n": len(latents)}, SCRIPT,
                 "diff-index")


def pick_latents(delta: torch.Tensor, n: int) -> torch.Tensor:
    """The n latents furthest from Δ = 0.5 (the most model-specific), by Δ descending."""
    chosen = (delta - 0.5).abs().topk(min(n, len(delta))).indices
    return chosen[delta[chosen].argsort(descending=True)]


@torch.inference_mode()
def logit_effects(models: list, names: list[str], cc, hook: str, latents: torch.Tensor, n_logits: int = 10
                  ) -> dict[str, list[dict]]:
    """Per model: each chosen latent's boosted and suppressed tokens through that model's decoder block."""
    cfg, d, out = StatsConfig(n_logits=n_logits), cc.d_model, {}
    for m, (nc, name) in enumerate(zip(models, names)):
        block = SimpleNamespace(W_dec=cc.W_dec[:, m * d:(m + 1) * d], config=cc.config)  # one model's SAE view
        top_v, top_i, bot_v, bot_i, _, _ = logit_effect(nc.model, block, hook, latents, cfg)
        token_str = nc.tokenizer.token_str
        out[name] = [{"pos": [(token_str(int(t)), float(v)) for t, v in zip(top_i[j], top_v[j])],
                      "neg": [(token_str(int(t)), float(v)) for t, v in zip(bot_i[j], bot_v[j])]}
                     for j in range(len(latents))]
    return out


def write_diff_site(out_dir, report: dict, gathered: Contexts, effects: dict[str, list[dict]], token_str) -> Path:
    """index.html and latents/<i>.html, atomically; returns the index path."""
    names = [m["name"] for m in report["models"]]
    chosen = [report["latents"][int(i)] for i in gathered.latents]
    out = Path(out_dir).expanduser().absolute()
    with atomic_dir(out, "diff", {"sae": str(report["sae"])}) as tmp:
        (tmp / "latents").mkdir()
        (tmp / "index.html").write_text(index_page(report, chosen), encoding="utf-8")
        for j, lat in enumerate(chosen):
            page = latent_page(report, lat, gathered.contexts(j, token_str),
                               {n: effects[n][j] for n in names})
            (tmp / "latents" / f"{lat['latent']}.html").write_text(page, encoding="utf-8")
    return out / "index.html"
