"""The static dashboard site: index.html (a sortable, filterable table of latents) and
features/<i>.html (one page per latent). Opens from disk: no server, no network, no CDN - the
CSS and JS are inline in every page.

Safety: every page carries its data as JSON in <script type="application/json">, with <, >, &
and the JS line separators written as \\u escapes, so no token text can close that element; the
page's JS puts token text into the DOM only through textContent, never as markup. Text set by
Python (titles, the header line) goes through html.escape.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from saelightning.atomic import atomic_dir

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
.chip { background: #f0f0f0; margin-right: 4px; padding: 0 3px; }
.ctx { margin: 2px 0; padding: 2px 4px; border-left: 3px solid #eee; overflow-x: auto; white-space: nowrap; }
.ctx .val { color: #888; font-size: 12px; display: inline-block; width: 5.5em; }
.hit { outline: 1.5px solid #b30; font-weight: bold; }
.cols { display: flex; gap: 2em; flex-wrap: wrap; }
.pos { color: #06c; } .neg { color: #c30; }
svg text { font-size: 10px; fill: #555; } .bar { fill: #e8843a; } .lbar { fill: #7aa6d8; }
nav a { margin-right: 1em; }
"""

COMMON_JS = """
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
function tokenSpan(text, cls) { return el('span', 'tok ' + (cls || ''), shown(text)); }
function finished() {
  document.body.setAttribute('data-rendered', 'ok');
  document.getElementById('status').textContent = 'rendered';
}
"""

INDEX_JS = """
(function () {
  var d = pageData(), rows = d.rows, tbody = document.querySelector('#latents tbody');
  var sort = { key: 'density', desc: true };
  var filter = document.getElementById('filter'), hideDead = document.getElementById('hide-dead');
  function value(r, key) { return key === 'top_tokens' ? r.top_tokens.join(' ') : r[key]; }
  function matches(r, q) {
    if (!q) return true;
    if (String(r.index) === q) return true;
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
      r.top_tokens.forEach(function (t) { toks.appendChild(tokenSpan(t, 'chip')); });
      tr.appendChild(toks);
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
  var d = pageData(), f = d.feature, SVG = 'http://www.w3.org/2000/svg';
  function svg(tag, attrs) {
    var e = document.createElementNS(SVG, tag);
    for (var k in attrs) e.setAttribute(k, attrs[k]);
    return e;
  }
  function histogram(target, heights, lo, hi, cls) {
    var W = 420, H = 110, n = heights.length, top = Math.max.apply(null, heights.concat([1]));
    var s = svg('svg', { width: W, height: H + 16, role: 'img' });
    heights.forEach(function (h, j) {
      var bh = h / top * H;
      var r = svg('rect', { x: j * W / n, y: H - bh, width: Math.max(W / n - 1, 1), height: bh, 'class': cls });
      var t = svg('title', {}); t.textContent = String(h); r.appendChild(t);
      s.appendChild(r);
    });
    var a = svg('text', { x: 0, y: H + 12 }); a.textContent = fmt(lo); s.appendChild(a);
    var b = svg('text', { x: W, y: H + 12, 'text-anchor': 'end' }); b.textContent = fmt(hi); s.appendChild(b);
    document.getElementById(target).appendChild(s);
  }
  function context(target, c) {
    var row = el('div', 'ctx');
    row.appendChild(el('span', 'val', fmt(c.value)));
    c.tokens.forEach(function (t, j) {
      var v = c.values[j], span = tokenSpan(t, j === c.index ? 'hit' : '');
      var alpha = f.max_act > 0 ? Math.max(0, Math.min(1, v / f.max_act)) : 0;
      if (alpha > 0) span.style.background = 'rgba(255, 120, 0, ' + alpha.toFixed(3) + ')';
      span.title = shown(t) + ' : ' + fmt(v);
      row.appendChild(span);
    });
    target.appendChild(row);
  }
  function logitTable(target, items, cls) {
    var t = document.getElementById(target);
    items.forEach(function (p) {
      var tr = el('tr'), td = el('td');
      td.appendChild(tokenSpan(p[0], 'chip'));
      tr.appendChild(td); tr.appendChild(el('td', 'num ' + cls, fmt(p[1])));
      t.appendChild(tr);
    });
  }
  var stats = [['density', fmt(f.density)], ['log10 density', fmt(f.log10_density)],
               ['fires on', f.n_fire + ' of ' + d.n_tokens + ' tokens'],
               ['max activation', fmt(f.max_act)], ['mean activation (when firing)', fmt(f.mean_act)]];
  var st = document.getElementById('stats');
  stats.forEach(function (p) {
    var tr = el('tr'); tr.appendChild(el('th', null, p[0])); tr.appendChild(el('td', 'num', p[1])); st.appendChild(tr);
  });
  var edges = f.hist.edges;
  histogram('act-hist', f.hist.heights, edges[0], edges[edges.length - 1], 'bar');
  var lc = f.logits.hist.centres;
  histogram('logit-hist', f.logits.hist.heights, lc[0], lc[lc.length - 1], 'lbar');
  logitTable('pos', f.logits.pos, 'pos');
  logitTable('neg', f.logits.neg, 'neg');
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


def _page(title: str, header: str, body: str, data, script: str, page: str) -> str:
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
        f"<meta name=\"viewport\" content=\"width=device-width\"><title>{html.escape(title)}</title>\n"
        f"<script>{ERROR_TRAP}</script>\n<style>{CSS}</style></head>\n"
        f"<body data-page=\"{page}\">\n{header}\n{body}\n"
        "<p class=\"meta\">status: <span id=\"status\">JavaScript has not run "
        "(it is inline; no network is needed)</span></p>\n"
        f"<script type=\"application/json\" id=\"data\">{embed_json(data)}</script>\n"
        f"<script>{COMMON_JS}{script}</script>\n</body></html>\n"
    )


def _meta_line(meta: dict) -> str:
    parts = [f"{k}: {meta[k]}" for k in ("hook_name", "model", "sae", "n_tokens", "d_sae", "context_size")
             if meta.get(k) is not None]
    return f"<p class=\"meta\">{html.escape(' | '.join(str(p) for p in parts))}</p>"


def index_page(meta: dict, records: list[dict]) -> str:
    rows = [{k: r[k] for k in ("index", "density", "max_act", "mean_act", "top_tokens")} for r in records]
    header = f"<header><h1>{html.escape(meta.get('title', 'SAE latents'))}</h1>{_meta_line(meta)}</header>"
    body = (
        "<div class=\"controls\"><input id=\"filter\" type=\"search\" "
        "placeholder=\"filter: latent index or token text\"> "
        "<label><input type=\"checkbox\" id=\"hide-dead\"> hide latents that never fired</label> "
        "<span id=\"count\" class=\"meta\"></span></div>\n"
        "<table id=\"latents\"><thead><tr><th data-key=\"index\">latent</th><th data-key=\"density\">density</th>"
        "<th data-key=\"max_act\">max act</th><th data-key=\"mean_act\">mean act</th>"
        "<th data-key=\"top_tokens\">top tokens</th></tr></thead><tbody></tbody></table>"
    )
    return _page(meta.get("title", "SAE latents"), header, body, {"rows": rows}, INDEX_JS, "index")


def feature_page(meta: dict, record: dict, prev: int | None, next_: int | None) -> str:
    i = record["index"]
    links = ["<a href=\"../index.html\">all latents</a>"]
    links += [f"<a href=\"{p}.html\">{label}</a>"
              for p, label in ((prev, "&larr; latent %s" % prev), (next_, "latent %s &rarr;" % next_)) if p is not None]
    header = (f"<nav>{' '.join(links)}</nav><header><h1>Latent {i}</h1>{_meta_line(meta)}</header>")
    body = (
        "<div class=\"cols\"><div><h2>Statistics</h2><table id=\"stats\"></table></div>"
        "<div><h2>Activation histogram (firing positions)</h2><div id=\"act-hist\"></div></div></div>\n"
        "<div class=\"cols\"><div><h2>Logit effect: boosted</h2><table id=\"pos\"></table></div>"
        "<div><h2>Logit effect: suppressed</h2><table id=\"neg\"></table></div>"
        "<div><h2>Logit effect over the vocabulary</h2><div id=\"logit-hist\"></div>"
        "<p class=\"meta\">lm_head(final_norm(decoder direction)), direct path only</p></div></div>\n"
        "<h2>Top activations</h2><div id=\"top\"></div>\n"
        "<h2>Samples by activation interval</h2><div id=\"intervals\"></div>"
    )
    data = {"feature": record, "n_tokens": meta.get("n_tokens")}
    return _page(f"Latent {i} - {meta.get('title', 'SAE')}", header, body, data, FEATURE_JS, "feature")


def write_site(out_dir, meta: dict, records: list[dict]) -> Path:
    """Write index.html and features/<i>.html atomically into out_dir; returns the index path."""
    with atomic_dir(out_dir, "viz", {"meta": meta}) as tmp:
        (tmp / "features").mkdir()
        (tmp / "index.html").write_text(index_page(meta, records), encoding="utf-8")
        indices = [r["index"] for r in records]
        for j, rec in enumerate(records):
            prev = indices[j - 1] if j > 0 else None
            next_ = indices[j + 1] if j + 1 < len(indices) else None
            (tmp / "features" / f"{rec['index']}.html").write_text(
                feature_page(meta, rec, prev, next_), encoding="utf-8")
    return Path(out_dir).expanduser().absolute() / "index.html"
