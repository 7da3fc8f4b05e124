"""The static dashboard site: index.html (the SAE's figures, its density histogram and a sortable,
filterable table of latents) and features/<i>.html (one page per latent). Opens from disk: no server,
no network, no CDN - the CSS, JS and SVG are inline in every page.

What Python writes as HTML: the headers, statistics, histograms (inline SVG with axes and counts),
logit tables, nearest and co-firing latents, the notes and the index's figures. What the page's JS
draws from the page's JSON: the index table (it sorts and filters) and the token contexts (the bulk
of a page: as JSON they are several times smaller than as markup).

Safety: every page carries its data as JSON in <script type="application/json">, with <, >, &
and the JS line separators written as \\u escapes, so no token text can close that element; the
page's JS puts token text into the DOM only through textContent, never as markup. Text set by
Python (titles, tokens, notes, the header line) goes through html.escape.

Tokens are drawn the same way by Python (token_html) and by the JS (tokenSpan), from one table
(TOKEN_SPEC): whitespace shows as a glyph in a <span class="ws"> (space ·, tab →, newline ↵, CR ␍,
an empty token ∅, any other invisible character as \\uXXXX), and every token's title attribute is its
exact text as a JSON-style string literal ("\\t", " ", "\\u00a0"). A token on its own (a chip) shows
every space; inside a context, a token with other text keeps its spaces as spaces (" the" reads as
text) and a token of whitespace only shows glyphs, so " ", "    ", "\\t" and "\\n" differ everywhere.

Notes: OUT/notes.json, {"<latent>": "text"}, is shown on the latent's page and marked on the index as
it was when the pages were written; write_site carries it into the rewritten OUT. set_note (or
write_notes + render_feature_page + render_index_page) changes one note and re-renders the two pages
that show it, from the data embedded in the pages themselves.
"""

from __future__ import annotations

import html
import json
import math
import re
import sys
from collections.abc import Container, Mapping
from functools import lru_cache
from pathlib import Path

from saelightning.atomic import OUTPUT_MANIFEST, atomic_dir, write_text
from saelightning.errors import SAELightningError

NOTES_FILE = "notes.json"  # OUT/notes.json: {"<latent index>": "note text"}

# How tokens are drawn (shared by token_html and the pages' JS)
GLYPHS = {" ": "\u00b7", "\t": "\u2192", "\n": "\u21b5", "\r": "\u240d"}
EMPTY_GLYPH = "\u2205"  # a token whose text is empty
ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t", "\r": "\\r"}  # in the title's literal
# other characters that show nothing: C0/C1 controls, unusual spaces, zero-width marks, the BOM (as \uXXXX)
INVISIBLE = (r"\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f-\u00a0\u00ad\u1680\u180e\u2000-\u200f"
             r"\u2028-\u202f\u205f-\u206f\u3000\ufeff")
_INVISIBLE = re.compile(f"[{INVISIBLE}]")
TOKEN_SPEC = {"glyphs": GLYPHS, "empty": EMPTY_GLYPH, "escapes": ESCAPES, "invisible": INVISIBLE}

# Runs first: records any JS error on <html data-js-errors="..."> (read by the browser test).
ERROR_TRAP = """
window.__jsErrors = [];
function __recordError(message) {
  window.__jsErrors.push(String(message));
  document.documentElement.setAttribute('data-js-errors', window.__jsErrors.join(' | '));
}
window.onerror = function (msg, src, line, col) { __recordError(msg + ' @' + line + ':' + col); return false; };
window.addEventListener('unhandledrejection', function (e) { __recordError('unhandled rejection: ' + e.reason); });
"""

CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em auto; max-width: 1100px; color: #222; padding: 0 1em; }
h1 { font-size: 1.4em; margin: 0 0 .2em; } h2 { font-size: 1.1em; margin: 1.4em 0 .4em; }
.meta { color: #666; margin: 0 0 1em; }
table { border-collapse: collapse; } td, th { padding: 2px 8px; border-bottom: 1px solid #eee; text-align: left; }
th[data-key] { cursor: pointer; user-select: none; background: #f6f6f6; }
th[aria-sort=ascending]::after { content: " \\25B2"; } th[aria-sort=descending]::after { content: " \\25BC"; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.controls { margin: .5em 0 1em; } .controls input[type=search] { width: 24em; padding: 3px; }
.tok { white-space: pre; font-family: ui-monospace, monospace; font-size: 13px; border-radius: 2px; }
.tok .ws { color: #9a9a9a; }
.chip { background: #f0f0f0; margin-right: 4px; padding: 0 3px; }
.ctx { margin: 2px 0; padding: 2px 4px; border-left: 3px solid #eee; overflow-x: auto; white-space: nowrap; }
.ctx .val { color: #888; font-size: 12px; display: inline-block; width: 5.5em; }
.hit { outline: 1.5px solid #b30; font-weight: bold; }
.cols { display: flex; gap: 2em; flex-wrap: wrap; }
.pos { color: #06c; } .neg { color: #c30; }
svg.hist text { font-size: 10px; fill: #555; } svg.hist .axis, svg.hist .tick { stroke: #999; stroke-width: 1; }
.bar { fill: #e8843a; } .lbar { fill: #7aa6d8; } .dbar { fill: #8bb174; } /* on the <g> of the bars */
.unlinked { color: #999; } .note { white-space: pre-wrap; background: #fffbe6; border-left: 3px solid #e6c200;
  padding: 4px 8px; margin: .5em 0 1em; } .note-mark { color: #b08800; }
nav a { margin-right: 1em; }
"""

_JS_TOKENS = r"""
var INVISIBLE = new RegExp('[' + TOKEN_SPEC.invisible + ']');
function own(o, k) { return Object.prototype.hasOwnProperty.call(o, k); }
function hex4(ch) { return ('000' + ch.charCodeAt(0).toString(16)).slice(-4); }
function tokenRepr(text) {
  var out = '"';
  for (var i = 0; i < text.length; i++) {
    var ch = text[i];
    if (own(TOKEN_SPEC.escapes, ch)) out += TOKEN_SPEC.escapes[ch];
    else if (INVISIBLE.test(ch)) out += '\\u' + hex4(ch);
    else out += ch;
  }
  return out + '"';
}
function tokenParts(text, standalone) {
  if (text === '') return [[true, TOKEN_SPEC.empty]];
  var allWs = true, parts = [], i, ch;
  for (i = 0; i < text.length; i++) {
    ch = text[i];
    if (!own(TOKEN_SPEC.glyphs, ch) && !INVISIBLE.test(ch)) { allWs = false; break; }
  }
  function push(glyph, s) {
    var last = parts[parts.length - 1];
    if (last && last[0] === glyph) last[1] += s; else parts.push([glyph, s]);
  }
  for (i = 0; i < text.length; i++) {
    ch = text[i];
    if (own(TOKEN_SPEC.glyphs, ch) && (standalone || allWs || ch !== ' ')) push(true, TOKEN_SPEC.glyphs[ch]);
    else if (INVISIBLE.test(ch)) push(true, '\\u' + hex4(ch));
    else push(false, ch);
  }
  return parts;
}
"""

COMMON_JS = ("var TOKEN_SPEC = __TOKEN_SPEC__;\n" + _JS_TOKENS + """
function el(tag, cls, text) {
  var e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}
function pageData() { return JSON.parse(document.getElementById('data').textContent); }
function fmt(x) {
  if (x === null || x === undefined) return '-';
  if (x === 0) return '0';
  var a = Math.abs(x);
  return (a >= 1e4 || a < 1e-3) ? x.toExponential(2) : String(Number(x.toPrecision(3)));
}
function shown(tok) { return tok.replace(/\\n/g, '\\u21b5').replace(/\\t/g, '\\u21e5').replace(/\\r/g, '\\u240d'); }
// a token as <span class="tok CLS" title="its exact text">, whitespace as glyphs (see html.py);
// standalone (default: for a chip) shows every space, else spaces inside text stay spaces
function tokenSpan(text, cls, standalone, titleSuffix) {
  if (standalone === undefined) standalone = /(^| )chip( |$)/.test(cls || '');
  var span = el('span', 'tok' + (cls ? ' ' + cls : ''));
  span.title = tokenRepr(text) + (titleSuffix || '');
  tokenParts(text, standalone).forEach(function (p) {
    span.appendChild(p[0] ? el('span', 'ws', p[1]) : document.createTextNode(p[1]));
  });
  return span;
}
function finished() { document.body.setAttribute('data-rendered', 'ok'); }
""")

INDEX_JS = """
(function () {
  var d = pageData(), rows = d.rows, tbody = document.querySelector('#latents tbody');
  var sort = { key: 'density', desc: true };
  var filter = document.getElementById('filter'), hideDead = document.getElementById('hide-dead');
  function value(r, key) {
    if (key === 'top_tokens') return r.top_tokens.join(' ');
    if (key === 'note') return r.note ? 1 : 0;
    return r[key];
  }
  function matches(r, q) {
    if (!q) return true;
    if (String(r.index) === q) return true;
    if (r.note && r.note.toLowerCase().indexOf(q) >= 0) return true;
    return r.top_tokens.some(function (t) { return t.toLowerCase().indexOf(q) >= 0; });
  }
  function render() {
    var q = filter.value.trim().toLowerCase();
    var list = rows.filter(function (r) { return !(hideDead.checked && r.density === 0) && matches(r, q); });
    list.sort(function (a, b) {
      var x = value(a, sort.key), y = value(b, sort.key), c = x < y ? -1 : x > y ? 1 : a.index - b.index;
      return sort.desc ? -c : c;
    });
    var frag = document.createDocumentFragment();
    list.forEach(function (r) {
      var tr = el('tr'), td = el('td', 'num'), a = el('a', null, r.index);
      a.href = 'features/' + r.index + '.html';
      td.appendChild(a); tr.appendChild(td);
      tr.appendChild(el('td', 'num', fmt(r.density)));
      tr.appendChild(el('td', 'num', fmt(r.max_act)));
      tr.appendChild(el('td', 'num', fmt(r.mean_act)));
      var toks = el('td', 'toks');
      r.top_tokens.forEach(function (t) { toks.appendChild(tokenSpan(t, 'chip', true)); });
      tr.appendChild(toks);
      var note = el('td', 'note-cell');
      if (r.note) { var m = el('span', 'note-mark', '\\u270e'); m.title = r.note; note.appendChild(m); }
      tr.appendChild(note);
      frag.appendChild(tr);
    });
    tbody.textContent = '';
    tbody.appendChild(frag);
    document.getElementById('count').textContent = list.length + ' of ' + rows.length + ' latents shown';
    document.querySelectorAll('th[data-key]').forEach(function (th) {
      if (th.dataset.key === sort.key) th.setAttribute('aria-sort', sort.desc ? 'descending' : 'ascending');
      else th.removeAttribute('aria-sort');
    });
  }
  document.querySelectorAll('th[data-key]').forEach(function (th) {
    th.addEventListener('click', function () {
      if (sort.key === th.dataset.key) sort.desc = !sort.desc;
      else { sort.key = th.dataset.key; sort.desc = th.dataset.key !== 'index' && th.dataset.key !== 'top_tokens'; }
      render();
    });
  });
  // a view can be linked: index.html#q=text&sort=max_act&asc=1
  var hash = new URLSearchParams(location.hash.slice(1));
  if (hash.get('q')) filter.value = hash.get('q');
  if (hash.get('sort') && rows.length && hash.get('sort') in rows[0]) {
    sort.key = hash.get('sort'); sort.desc = !hash.get('asc');
  }
  if (hash.get('hide_dead')) hideDead.checked = true;
  filter.addEventListener('input', render);
  hideDead.addEventListener('change', render);
  render();
  finished();
})();
"""

FEATURE_JS = """
(function () {
  var f = pageData().feature;
  function context(target, c) {
    var row = el('div', 'ctx');
    row.appendChild(el('span', 'val', fmt(c.value)));
    c.tokens.forEach(function (t, j) {
      var v = c.values[j], span = tokenSpan(t, j === c.index ? 'hit' : '', false, ' : ' + fmt(v));
      var alpha = f.max_act > 0 ? Math.max(0, Math.min(1, v / f.max_act)) : 0;
      if (alpha > 0) span.style.background = 'rgba(255, 120, 0, ' + alpha.toFixed(3) + ')';
      row.appendChild(span);
    });
    target.appendChild(row);
  }
  var top = document.getElementById('top');
  if (!f.top.length) top.appendChild(el('p', 'meta', 'This latent never fired on the tokens read.'));
  f.top.forEach(function (c) { context(top, c); });
  var iv = document.getElementById('intervals');
  f.intervals.slice().reverse().forEach(function (b) {
    iv.appendChild(el('h3', null,
                      'Interval ' + fmt(b.min) + ' to ' + fmt(b.max) + ' (' + fmt(100 * b.contains) + '% of firings)'));
    b.contexts.forEach(function (c) { context(iv, c); });
  });
  finished();
})();
"""


def embed_json(obj) -> str:
    """JSON that is safe inside a <script> element: no '<', '>', '&' or line separators appear
    raw (JSON has them only inside strings, where the \\u escapes mean the same)."""
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    for raw, escaped in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e"),
                         ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(raw, escaped)
    return text


COMMON_JS = COMMON_JS.replace("__TOKEN_SPEC__", embed_json(TOKEN_SPEC))


# ---------------------------------------------------------------------------------------------
# Pieces of HTML


def fmt(x, digits: int = 3) -> str:
    """A number as the pages show it: `digits` significant digits, exponent past 1e4 or below 1e-3;
    integers in full with thousands separators."""
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    if isinstance(x, int):
        return f"{x:,}"
    x = float(x)
    if not math.isfinite(x):
        return str(x)
    if x == 0:
        return "0"
    if abs(x) >= 1e4 or abs(x) < 1e-3:
        return f"{x:.{digits - 1}e}"
    return f"{float(f'{x:.{digits}g}'):.12g}"


def _count(n: int) -> str:
    """An axis count: 950, 12k, 1.5M."""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= 10 * div or (abs(n) >= div and n % div == 0):
            return f"{n / div:.3g}{suffix}"
    return f"{n:g}" if isinstance(n, float) else str(n)


def token_repr(text: str) -> str:
    """A token's exact text as a JSON-style literal: "\\t", " ", "\\u00a0" (the title of its span)."""
    return '"' + "".join(ESCAPES.get(ch) or (f"\\u{ord(ch):04x}" if _INVISIBLE.match(ch) else ch)
                         for ch in text) + '"'


def token_parts(text: str, standalone: bool = True) -> list[tuple[bool, str]]:
    """(is_glyph, text) runs of a token as drawn (see the module docstring)."""
    if text == "":
        return [(True, EMPTY_GLYPH)]
    all_ws = all(ch in GLYPHS or _INVISIBLE.match(ch) for ch in text)
    parts: list[list] = []
    for ch in text:
        if ch in GLYPHS and (standalone or all_ws or ch != " "):
            glyph, shown = True, GLYPHS[ch]
        elif _INVISIBLE.match(ch):
            glyph, shown = True, f"\\u{ord(ch):04x}"
        else:
            glyph, shown = False, ch
        if parts and parts[-1][0] == glyph:
            parts[-1][1] += shown
        else:
            parts.append([glyph, shown])
    return [(g, s) for g, s in parts]


@lru_cache(maxsize=65536)
def token_html(text: str, cls: str = "chip", standalone: bool = True) -> str:
    """<span class="tok CLS" title="exact text">...</span>, whitespace drawn as glyphs."""
    inner = "".join(f"<span class=\"ws\">{html.escape(s)}</span>" if glyph else html.escape(s)
                    for glyph, s in token_parts(text, standalone))
    return f"<span class=\"tok{' ' + cls if cls else ''}\" title=\"{html.escape(token_repr(text))}\">{inner}</span>"


def nice_ticks(lo: float, hi: float, n: int = 5, integer: bool = False) -> list[float]:
    """Round tick values (steps of 1, 2, 2.5 or 5 x 10^k) inside [lo, hi], about n of them."""
    if not hi > lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10.0 ** math.floor(math.log10(raw))
    steps = (1, 2, 5, 10) if integer else (1, 2, 2.5, 5, 10)
    step = next(m * mag for m in steps if m * mag >= raw * (1 - 1e-9))
    if integer:
        step = max(1.0, round(step))
    first, last = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
    return [round(k * step, 12) for k in range(first, last + 1)]


def svg_histogram(heights: list[int], edges: list[float], cls: str, xlabel: str, ylabel: str,
                  svg_id: str, width: int = 460, height: int = 176) -> str:
    """An inline SVG bar chart of counts over bins [edges[j], edges[j+1]], with both axes' tick labels;
    each bar carries data-count and a <title> with its range and count."""
    ml, mr, mt, mb = 52, 14, 8, 38
    pw, ph = width - ml - mr, height - mt - mb
    lo, hi = float(edges[0]), float(edges[-1])
    span = hi - lo if hi > lo else 1.0
    top = max(heights, default=0)
    yticks = nice_ticks(0, max(top, 1), 4, integer=True)
    ymax = max(yticks[-1], top, 1)
    if yticks[-1] < top:  # one more step, so the axis reaches the tallest bar
        yticks.append(yticks[-1] + (yticks[1] - yticks[0] if len(yticks) > 1 else 1))
        ymax = yticks[-1]

    def x(v):
        return ml + (float(v) - lo) / span * pw

    def y(c):
        return mt + ph - c / ymax * ph

    out = [f"<svg id=\"{svg_id}\" class=\"hist\" width=\"{width}\" height=\"{height}\" "
           f"viewBox=\"0 0 {width} {height}\" role=\"img\" aria-label=\"{html.escape(xlabel)} histogram\">"
           f"<g class=\"bars {cls}\">"]
    for j, c in enumerate(heights):
        x0, x1, top_y = x(edges[j]), x(edges[j + 1]), y(c)
        out.append(f"<rect x=\"{_n(x0)}\" y=\"{_n(top_y)}\" width=\"{_n(max(x1 - x0 - 1, 0.5))}\" "
                   f"height=\"{_n(mt + ph - top_y)}\" data-count=\"{c}\"><title>{fmt(edges[j])} to "
                   f"{fmt(edges[j + 1])}: {c:,}</title></rect>")
    out.append("</g>")
    base = mt + ph
    out.append(f"<line class=\"axis\" x1=\"{ml}\" y1=\"{base}\" x2=\"{ml + pw}\" y2=\"{base}\"/>")
    out.append(f"<line class=\"axis\" x1=\"{ml}\" y1=\"{mt}\" x2=\"{ml}\" y2=\"{base}\"/>")
    for t in yticks:
        ty = y(t)
        out.append(f"<line class=\"tick\" x1=\"{ml - 4}\" y1=\"{ty:.1f}\" x2=\"{ml}\" y2=\"{ty:.1f}\"/>"
                   f"<text class=\"ytick\" x=\"{ml - 6}\" y=\"{ty + 3:.1f}\" text-anchor=\"end\">"
                   f"{_count(int(t))}</text>")
    for t in (nice_ticks(lo, hi, 5) if hi > lo else [lo]):
        tx = x(t) if hi > lo else ml + pw / 2
        out.append(f"<line class=\"tick\" x1=\"{tx:.1f}\" y1=\"{base}\" x2=\"{tx:.1f}\" y2=\"{base + 4}\"/>"
                   f"<text class=\"xtick\" x=\"{tx:.1f}\" y=\"{base + 14}\" text-anchor=\"middle\">{fmt(t)}</text>")
    out.append(f"<text x=\"{ml + pw / 2:.1f}\" y=\"{height - 4}\" text-anchor=\"middle\">{html.escape(xlabel)}</text>")
    out.append(f"<text transform=\"rotate(-90)\" x=\"{-(mt + ph / 2):.1f}\" y=\"11\" text-anchor=\"middle\">"
               f"{html.escape(ylabel)}</text></svg>")
    return "".join(out)


def _n(v: float) -> str:
    """An SVG coordinate: one decimal, no trailing zeros."""
    return f"{v:.1f}".rstrip("0").rstrip(".")


def _page(title: str, header: str, body: str, data, script: str, page: str) -> str:
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
        f"<meta name=\"viewport\" content=\"width=device-width\"><title>{html.escape(title)}</title>\n"
        f"<script>{ERROR_TRAP}</script>\n<style>{CSS}</style></head>\n"
        f"<body data-page=\"{page}\">\n{header}\n{body}\n"
        "<noscript><p class=\"meta\">The table and the token contexts are drawn by this page's JavaScript "
        "(inline; no network is needed), which is off.</p></noscript>\n"
        f"<script type=\"application/json\" id=\"data\">{embed_json(data)}</script>\n"
        f"<script>{COMMON_JS}{script}</script>\n</body></html>\n"
    )


def _meta_line(meta: dict) -> str:
    parts = [f"{k}: {meta[k]}" for k in ("hook_name", "model", "sae", "n_tokens", "d_sae", "context_size")
             if meta.get(k) is not None]
    if meta.get("chat"):  # the val rows mixed in conversations
        parts.append(f"chat: {meta['chat']} at chat_fraction {meta['chat_fraction']}")
    return f"<p class=\"meta\">{html.escape(' | '.join(str(p) for p in parts))}</p>"


def _table(rows: list[str], head: str, table_id: str) -> str:
    return f"<table id=\"{table_id}\"><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _figures_html(figures: dict | None) -> str:
    """The export's training figures (records.export_figures) as tables."""
    figures = figures or {}
    rows = [f"<tr data-key=\"{html.escape(key)}\"><th>{html.escape(label)}</th>"
            f"<td class=\"num\">{html.escape(fmt(value, 4))}</td><td class=\"meta\">{html.escape(key)}</td></tr>"
            for label, value, key in figures.get("training", []) + figures.get("metrics", [])]
    if not rows:
        return "<h2>Training figures</h2><p class=\"meta\" id=\"figures\">cfg.json's metadata has no training " \
               "figures (training_steps, final_metrics).</p>"
    every = "".join(f"<tr><td>{html.escape(k)}</td><td class=\"num\">{html.escape(fmt(v, 4))}</td></tr>"
                    for k, v in figures.get("all", []))
    more = (f"<details><summary>all final_metrics ({len(figures['all'])})</summary><table id=\"all-metrics\">"
            f"{every}</table></details>") if every else ""
    return ("<h2>Training figures</h2><p class=\"meta\">from the export's cfg.json metadata; val/ figures come "
            "from the held-out rows of the training run</p>"
            f"<table id=\"figures\"><tbody>{''.join(rows)}</tbody></table>{more}")


def _density_html(hist: dict | None) -> str:
    if not hist:
        return ""
    alive = hist["n_latents"] - hist["dead"]
    svg = svg_histogram(hist["heights"], hist["edges"], "dbar", "log10 feature density", "latents", "density-hist")
    return ("<h2>Feature density (every latent of the SAE)</h2>" + svg +
            f"<p class=\"meta\" id=\"density-caption\">{alive:,} of {hist['n_latents']:,} latents fired on the "
            f"{hist['n_tokens']:,} tokens read; {hist['dead']:,} never fired (log10 density -inf, not drawn).</p>")


def index_rows(records: list[dict]) -> list[dict]:
    return [{k: r[k] for k in ("index", "density", "max_act", "mean_act", "top_tokens")} for r in records]


def index_page(meta: dict, rows: list[dict], notes: Mapping[str, str] | None = None) -> str:
    """rows: index_rows(records); their "note" is set from notes."""
    notes = notes or {}
    rows = [{**r, "note": notes.get(str(r["index"]), "")} for r in rows]
    header = f"<header><h1>{html.escape(meta.get('title', 'SAE latents'))}</h1>{_meta_line(meta)}</header>"
    n_notes = sum(bool(r["note"]) for r in rows)
    body = (
        f"<div class=\"cols\"><div>{_figures_html(meta.get('figures'))}</div>"
        f"<div>{_density_html(meta.get('density_hist'))}</div></div>\n"
        "<h2>Latents</h2><div class=\"controls\"><input id=\"filter\" type=\"search\" "
        "placeholder=\"filter: latent index, token text or note\"> "
        "<label><input type=\"checkbox\" id=\"hide-dead\"> hide latents that never fired</label> "
        f"<span id=\"count\" class=\"meta\"></span><span class=\"meta\" id=\"notes-count\">; {n_notes} with a "
        f"note (&#x270e;, from {NOTES_FILE})</span></div>\n"
        "<table id=\"latents\"><thead><tr><th data-key=\"index\">latent</th><th data-key=\"density\">density</th>"
        "<th data-key=\"max_act\">max act</th><th data-key=\"mean_act\">mean act</th>"
        "<th data-key=\"top_tokens\">top tokens</th><th data-key=\"note\">note</th></tr></thead><tbody></tbody>"
        "</table>"
    )
    return _page(meta.get("title", "SAE latents"), header, body, {"rows": rows}, INDEX_JS, "index")


def layers_page(meta: dict, sites: list[dict]) -> str:
    """A cross-layer transcoder's index: one row per layer, linking that layer's own site (layer{L}/index.html)."""
    header = f"<header><h1>{html.escape(meta['title'])}</h1>{_meta_line(meta)}</header>"
    rows = []
    for site in sites:
        hist = site.get("density_hist") or {}
        alive = hist.get("n_latents", 0) - hist.get("dead", 0)
        rows.append(f"<tr><td><a href=\"layer{site['layer']}/index.html\">layer {site['layer']}</a></td>"
                    f"<td>{html.escape(site['hook_name'])}</td><td class=\"num\">{site['d_sae']:,}</td>"
                    f"<td class=\"num\">{alive:,}</td><td class=\"num\">{site['n_tokens']:,}</td></tr>")
    body = ("<p class=\"meta\">A cross-layer transcoder: each layer's latents read that layer's MLP input and "
            "write every later MLP output; each has its own site (activations on its input hook, logit effects of "
            "the sum of its decoder rows over the layers it writes).</p>"
            + _table(rows, "<th>layer</th><th>reads</th><th>latents</th><th>fired</th><th>tokens</th>", "layers")
            + _figures_html(meta.get("figures")))
    return _page(meta["title"], header, body, {}, "finished();", "layers")


def _latent_link(j: int, rendered: Container[int]) -> str:
    if j in rendered:
        return f"<a href=\"{j}.html\">{j}</a>"
    return f"<span class=\"unlinked\" title=\"no page: not among the latents written (--features)\">{j}</span>"


def _chips(tokens) -> str:
    return "".join(token_html(t) for t in tokens or [])


def feature_page(meta: dict, record: dict, prev: int | None, next_: int | None,
                 rendered: Container[int] = (), labels: Mapping[str, list] | None = None, note: str = "") -> str:
    """One latent's page. rendered: the latents that have a page (others are listed unlinked); labels:
    {"<latent>": top tokens} of the latents it lists; note: its note from notes.json."""
    labels = labels or {}
    i = record["index"]
    links = ["<a href=\"../index.html\">all latents</a>"]
    links += [f"<a href=\"{p}.html\">{label}</a>"
              for p, label in ((prev, "&larr; latent %s" % prev), (next_, "latent %s &rarr;" % next_)) if p is not None]
    header = (f"<nav>{' '.join(links)}</nav><header><h1>Latent {i}</h1>{_meta_line(meta)}</header>")
    note_html = (f"<h2>Note</h2><p id=\"note\" class=\"note\">{html.escape(note)}</p>" if note else "")
    n_tokens = meta.get("n_tokens")
    stats = [("density", fmt(record["density"])), ("log10 density", fmt(record.get("log10_density"))),
             ("fires on", f"{record['n_fire']:,} of {fmt(n_tokens)} tokens"),
             ("max activation", fmt(record["max_act"])), ("mean activation (when firing)", fmt(record["mean_act"]))]
    if record.get("concept"):  # from a `saelightning probe` report (viz --probe)
        c = record["concept"]
        stats.append(("best-matching concept", f"{c['concept']}: F1 {fmt(c['f1'])} (precision {fmt(c['precision'])}, "
                                               f"recall {fmt(c['recall'])})"))
    stats_html = "".join(f"<tr><th>{html.escape(k)}</th><td class=\"num\">{html.escape(v)}</td></tr>" for k, v in stats)
    hist = record["hist"]
    if record["n_fire"] > 0:
        act_hist = svg_histogram(hist["heights"], hist["edges"], "bar", "activation", "tokens", "act-hist-svg")
        act_hist += f"<p class=\"meta\">{len(hist['heights'])} bins over (0, max]; {record['n_fire']:,} firings</p>"
    else:
        act_hist = "<p class=\"meta\">never fired on the tokens read</p>"
    lh = record["logits"]["hist"]
    centres = lh["centres"]
    w = (centres[-1] - centres[0]) / (len(centres) - 1) if len(centres) > 1 else 1.0
    logit_edges = [centres[0] - w / 2 + j * w for j in range(len(centres))] + [centres[-1] + w / 2]
    vocab = sum(lh["heights"])
    logit_hist = svg_histogram(lh["heights"], logit_edges, "lbar", "logit effect", "tokens of the vocabulary",
                               "logit-hist-svg")

    def logit_rows(items, cls):
        return [f"<tr><td>{token_html(t)}</td><td class=\"num {cls}\">{fmt(v)}</td></tr>" for t, v in items]

    near = [f"<tr data-latent=\"{j}\"><td class=\"num\">{_latent_link(j, rendered)}</td>"
            f"<td class=\"num\">{fmt(c)}</td><td>{_chips(labels.get(str(j)))}</td></tr>"
            for j, c in record.get("nearest", [])]
    co = [f"<tr data-latent=\"{j}\"><td class=\"num\">{_latent_link(j, rendered)}</td><td class=\"num\">{n:,}</td>"
          f"<td class=\"num\">{fmt(100 * a)}%</td><td class=\"num\">{fmt(100 * b)}%</td>"
          f"<td>{_chips(labels.get(str(j)))}</td></tr>" for j, n, a, b in record.get("cofire", [])]
    body = (
        f"{note_html}<div class=\"cols\"><div><h2>Statistics</h2><table id=\"stats\">{stats_html}</table></div>"
        f"<div><h2>Activation histogram (firing positions)</h2><div id=\"act-hist\">{act_hist}</div></div></div>\n"
        "<div class=\"cols\"><div><h2>Logit effect: boosted</h2>"
        f"{_table(logit_rows(record['logits']['pos'], 'pos'), '<th>token</th><th>logit</th>', 'pos')}</div>"
        "<div><h2>Logit effect: suppressed</h2>"
        f"{_table(logit_rows(record['logits']['neg'], 'neg'), '<th>token</th><th>logit</th>', 'neg')}</div>"
        f"<div><h2>Logit effect over the vocabulary</h2><div id=\"logit-hist\">{logit_hist}</div>"
        f"<p class=\"meta\">lm_head(final_norm(decoder direction)), direct path only; {vocab:,} tokens</p>"
        "</div></div>\n"
        "<div class=\"cols\"><div><h2>Nearest latents (decoder cosine)</h2>"
        + (_table(near, "<th>latent</th><th>cosine</th><th>top tokens</th>", "nearest") if near else
           "<p class=\"meta\" id=\"nearest\">not computed</p>") +
        "<p class=\"meta\">cosine similarity of the decoder rows (W_dec), over every latent of the SAE</p></div>"
        "<div><h2>Co-firing latents</h2>"
        + (_table(co, "<th>latent</th><th>tokens together</th><th>of this one's firings</th>"
                      "<th>of that one's firings</th><th>top tokens</th>", "cofire") if co else
           "<p class=\"meta\" id=\"cofire\">no other latent fired with it on the tokens read</p>") +
        "<p class=\"meta\">the latents active (&gt; 0) on the most of the same tokens, over the tokens read; "
        "the percentages are those tokens over this latent's firings (how often it comes with the other) and "
        "over the other latent's own</p></div></div>\n"
        "<h2>Top activations</h2><div id=\"top\"></div>\n"
        "<h2>Samples by activation interval</h2><div id=\"intervals\"></div>"
    )
    data = {"feature": record, "n_tokens": n_tokens, "labels": dict(labels)}
    return _page(f"Latent {i} - {meta.get('title', 'SAE')}", header, body, data, FEATURE_JS, "feature")


# ---------------------------------------------------------------------------------------------
# Notes


def _parse_notes(text: str, where) -> dict[str, str]:
    try:
        notes = json.loads(text)
    except ValueError as e:
        raise SAELightningError(f"{where} is not JSON ({e}); fix or remove it") from None
    if not isinstance(notes, dict) or not all(isinstance(v, str) for v in notes.values()):
        raise SAELightningError(f"{where} must be a JSON object {{\"<latent>\": \"note text\"}}; fix or remove it")
    return notes


def read_notes(out_dir) -> dict[str, str]:
    """OUT/notes.json as {"<latent>": "note text"}; {} when there is none. Raises SAELightningError (one
    line) when it is not such an object."""
    path = Path(out_dir).expanduser() / NOTES_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return {}
    except (OSError, UnicodeDecodeError) as e:
        raise SAELightningError(f"{path} cannot be read ({e}); fix or remove it") from None
    return _parse_notes(text, path)


def write_notes(out_dir, notes: Mapping) -> dict[str, str]:
    """Write OUT/notes.json atomically: keys as latent indices ("12"), in index order; empty notes dropped.
    Returns what was written."""
    clean = {}
    for key, text in notes.items():
        if not isinstance(text, str):
            raise SAELightningError(f"the note of latent {key!r} must be a string, got {type(text).__name__}")
        if not str(key).isdigit():
            raise SAELightningError(f"a note's key must be a latent index, got {key!r}")
        if text.strip():
            clean[str(int(key))] = text
    clean = dict(sorted(clean.items(), key=lambda kv: int(kv[0])))
    write_text(Path(out_dir).expanduser() / NOTES_FILE, json.dumps(clean, ensure_ascii=False, indent=1) + "\n")
    return clean


def _embedded(page: Path) -> dict:
    try:
        text = page.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SAELightningError(f"{page} does not exist: that latent has no page in this site") from None
    found = re.search(r'<script type="application/json" id="data">(.*?)</script>', text, re.S)
    if found is None:
        raise SAELightningError(f"{page} is not a page `saelightning viz` wrote (no embedded data)")
    return json.loads(found.group(1))


def _site(out_dir) -> tuple[Path, dict, list[int]]:
    """(OUT, its meta, the latents with a page) of a site viz wrote."""
    out = Path(out_dir).expanduser().absolute()
    try:
        manifest = json.loads((out / OUTPUT_MANIFEST).read_text())
    except (OSError, ValueError):
        raise SAELightningError(f"{out} is not a site `saelightning viz` wrote (no {OUTPUT_MANIFEST})") from None
    pages = sorted(int(p.name[:-5]) for p in (out / "features").iterdir()
                   if p.name.endswith(".html") and p.name[:-5].isdigit())
    return out, manifest.get("meta", {}), pages


def render_feature_page(out_dir, latent: int, notes: Mapping[str, str] | None = None) -> Path:
    """Rewrite OUT/features/<latent>.html (atomically) with its note from notes (default: read from
    OUT/notes.json), from the data embedded in the page itself. Returns the page's path."""
    out, meta, pages = _site(out_dir)
    page = out / "features" / f"{int(latent)}.html"
    data = _embedded(page)
    notes = read_notes(out) if notes is None else notes
    at = pages.index(int(latent))
    prev = pages[at - 1] if at > 0 else None
    next_ = pages[at + 1] if at + 1 < len(pages) else None
    write_text(page, feature_page(meta, data["feature"], prev, next_, set(pages), data.get("labels"),
                                  notes.get(str(int(latent)), "")))
    return page


def render_index_page(out_dir, notes: Mapping[str, str] | None = None) -> Path:
    """Rewrite OUT/index.html (atomically) with the note markers of notes (default: OUT/notes.json)."""
    out, meta, _ = _site(out_dir)
    rows = _embedded(out / "index.html")["rows"]
    write_text(out / "index.html", index_page(meta, rows, read_notes(out) if notes is None else notes))
    return out / "index.html"


def set_note(out_dir, latent: int, text: str) -> dict[str, str]:
    """Save one latent's note in OUT/notes.json (empty text removes it), then re-render its page (when it
    has one) and the index. Returns all notes. Not locked: one writer at a time (the server's lock)."""
    notes = read_notes(out_dir)
    notes[str(int(latent))] = text
    notes = write_notes(out_dir, notes)
    if (Path(out_dir).expanduser() / "features" / f"{int(latent)}.html").is_file():
        render_feature_page(out_dir, latent, notes)
    render_index_page(out_dir, notes)
    return notes


def _notes_of(out: Path) -> dict[str, str]:
    """The notes of the site about to be rewritten; a bad notes.json is kept (carried over) but not shown."""
    try:
        return read_notes(out)
    except SAELightningError as e:
        print(f"saelightning: notes not shown: {e}", file=sys.stderr)
        return {}


# ---------------------------------------------------------------------------------------------
# The site


def write_site(out_dir, meta: dict, records: list[dict], notes_from=None) -> Path:
    """Write index.html and features/<i>.html atomically into out_dir; returns the index path.

    An earlier site's notes.json (that of notes_from, default out_dir) is shown on the new pages and carried
    into the new directory (copied last, as it is then: a note saved while the pages were written is kept,
    shown after its next edit)."""
    out = Path(out_dir).expanduser().absolute()
    old = out if notes_from is None else Path(notes_from).expanduser().absolute()
    notes = _notes_of(old)
    rendered = {r["index"] for r in records}
    top_tokens = {r["index"]: r["top_tokens"][:3] for r in records}
    with atomic_dir(out, "viz", {"meta": meta}) as tmp:
        (tmp / "features").mkdir()
        (tmp / "index.html").write_text(index_page(meta, index_rows(records), notes), encoding="utf-8")
        indices = [r["index"] for r in records]
        for j, rec in enumerate(records):
            prev = indices[j - 1] if j > 0 else None
            next_ = indices[j + 1] if j + 1 < len(indices) else None
            listed = [n[0] for n in rec.get("nearest", [])] + [c[0] for c in rec.get("cofire", [])]
            labels = {str(n): top_tokens[n] for n in listed if n in top_tokens}
            (tmp / "features" / f"{rec['index']}.html").write_text(
                feature_page(meta, rec, prev, next_, rendered, labels, notes.get(str(rec["index"]), "")),
                encoding="utf-8")
        try:
            (tmp / NOTES_FILE).write_bytes((old / NOTES_FILE).read_bytes())
        except (FileNotFoundError, NotADirectoryError):
            pass
    return out / "index.html"
