"""An attribution graph as files: the graph JSON that circuit-tracer's and Neuronpedia's graph viewers read, and a
static page of our own (graph.html) in the dashboards' style: one self-contained file, no network, the graph drawn
as inline SVG by its JS from the page's JSON (token text through textContent only; README, Attribution graphs).

Node ids follow circuit-tracer's: a latent "{layer}_{feature}_{pos}", an error "{layer}_-1_{pos}", a token
"E_{token id}_{pos}", a logit "{n_layer + 1}_{token id}_{pos}" (at the last position).
"""

from __future__ import annotations

import html

from saelightning.dashboards.html import _page, fmt, token_html

SCHEMA_VERSION = 1
FEATURE_TYPES = {"feature": "cross layer transcoder", "error": "mlp reconstruction error", "token": "embedding",
                 "logit": "logit"}
# the `saelightning viz --out GRAPHS/dashboards` layout of a CLT (OUT/layer{L}/features/<latent>.html), beside the
# graph's own directory GRAPHS/<name> (which `attribute` replaces whole); {layer}, {feature}, {index} are filled in
DEFAULT_DASHBOARD = "../dashboards/layer{layer}/features/{feature}.html"


def _cantor(x: int, y: int) -> int:
    """circuit-tracer's feature number of a latent: the Cantor pairing of (layer, feature)."""
    return (x + y) * (x + y + 1) // 2 + y


def dashboard_link(pattern: str | None, layer: int, feature: int, d_sae: int, layer_rank: int) -> str | None:
    """A latent's dashboard page: pattern with {layer} (model layer), {feature} (index in its layer) and {index}
    (layer_rank·d_sae + feature, a CLT's latents side by side); None without a pattern."""
    if not pattern:
        return None
    return pattern.format(layer=layer, feature=feature, index=layer_rank * d_sae + feature)


def graph_nodes(graph, pruned, token_str, n_layer: int, dashboard: str | None, d_sae: dict, layer_rank: dict):
    """(nodes, links) as the viewers read them, for the nodes and edges that pruning kept."""
    nodes, ids = [], {}
    keep = pruned.node_mask.tolist()
    T = graph.n_pos
    nf = graph.n_features
    for j in range(graph.adjacency.shape[0]):
        if not keep[j]:
            continue
        common = {"influence": float(pruned.cumulative[j]), "run_idx": 0, "reverse_ctx_idx": 0, "clerp": "",
                  "token_prob": 0.0, "is_target_logit": False, "activation": None}
        if j < nf:
            layer, pos, feat = (int(v) for v in graph.features[j])
            node = {"node_id": f"{layer}_{feat}_{pos}", "feature": _cantor(layer, feat), "layer": str(layer),
                    "ctx_idx": pos, "feature_type": FEATURE_TYPES["feature"], "jsNodeId": f"{layer}_{feat}-0",
                    **common, "activation": float(graph.activations[j]),
                    "dashboard": dashboard_link(dashboard, layer, feat, d_sae[layer], layer_rank[layer])}
        elif j < graph.error_slice.stop:
            layer, pos = divmod(j - nf, T)
            layer = graph.error_layers[layer]
            node = {"node_id": f"{layer}_-1_{pos}", "feature": -1, "layer": str(layer), "ctx_idx": pos,
                    "feature_type": FEATURE_TYPES["error"], "jsNodeId": f"{layer}_-1-{pos}", **common}
        elif j < graph.token_slice.stop:
            pos = j - graph.token_slice.start
            tok = graph.tokens[pos]
            node = {"node_id": f"E_{tok}_{pos}", "feature": pos, "layer": "E", "ctx_idx": pos,
                    "feature_type": FEATURE_TYPES["token"], "jsNodeId": f"E_{tok}-{pos}", **common,
                    "clerp": token_str(tok)}
        else:
            k = j - graph.logit_slice.start
            tok, prob = int(graph.logit_ids[k]), float(graph.logit_probs[k])
            layer = str(n_layer + 1)
            node = {"node_id": f"{layer}_{tok}_{T - 1}", "feature": tok, "layer": layer, "ctx_idx": T - 1,
                    "feature_type": FEATURE_TYPES["logit"], "jsNodeId": f"L_{tok}-{T - 1}", **common,
                    "token_prob": prob, "is_target_logit": k == 0,
                    "clerp": f'Output "{token_str(tok)}" (p={prob:.3f})'}
        node["reverse_ctx_idx"] = T - 1 - node["ctx_idx"]
        ids[j] = node["node_id"]
        nodes.append(node)
    targets, sources = pruned.edge_mask.nonzero(as_tuple=True)
    links = [{"source": ids[s], "target": ids[t], "weight": float(graph.adjacency[t, s])}
             for t, s in zip(targets.tolist(), sources.tolist()) if s in ids and t in ids]
    return nodes, links


def graph_json(graph, pruned, token_str, *, slug: str, scan: str, prompt: str, n_layer: int, node_threshold: float,
               edge_threshold: float, scores: tuple[float, float], dashboard: str | None, d_sae: dict,
               layer_rank: dict, transcoder_list: list[str]) -> dict:
    """The viewers' graph file: metadata, qParams, nodes, links (every field in README, Attribution graphs)."""
    nodes, links = graph_nodes(graph, pruned, token_str, n_layer, dashboard, d_sae, layer_rank)
    replacement, completeness = scores
    return {
        "metadata": {"slug": slug, "scan": scan, "transcoder_list": transcoder_list,
                     "prompt_tokens": [token_str(t) for t in graph.tokens], "prompt": prompt,
                     "node_threshold": node_threshold, "schema_version": SCHEMA_VERSION,
                     "edge_threshold": edge_threshold, "replacement_score": replacement,
                     "completeness_score": completeness, "n_active_features": graph.meta.get("n_active_features"),
                     "n_feature_nodes": graph.n_features, "dashboard_pattern": dashboard},
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
        "nodes": nodes,
        "links": links,
    }


GRAPH_JS = """
(function () {
  var d = pageData(), g = d.graph, nodes = g.nodes, links = g.links, NS = 'http://www.w3.org/2000/svg';
  var tokens = g.metadata.prompt_tokens, T = tokens.length, layers = d.n_layer;
  var byId = {}; nodes.forEach(function (n) { byId[n.node_id] = n; });
  function row(n) { return n.layer === 'E' ? 0 : (n.feature_type === 'logit' ? layers + 1 : Number(n.layer) + 1); }
  var cellW = 90, cellH = 70, W = cellW * T + 60, H = cellH * (layers + 2) + 40;
  var slots = {};
  nodes.forEach(function (n) {
    var key = row(n) + ':' + n.ctx_idx; slots[key] = (slots[key] || 0) + 1; n._slot = slots[key] - 1;
  });
  function xy(n) {
    var count = slots[row(n) + ':' + n.ctx_idx], spread = Math.min(cellW - 20, 14 * count);
    var x = 50 + n.ctx_idx * cellW + (count > 1 ? (n._slot / (count - 1) - 0.5) * spread : 0);
    return [x, H - 30 - row(n) * cellH];
  }
  var svg = document.createElementNS(NS, 'svg');
  svg.setAttribute('width', W); svg.setAttribute('height', H); svg.setAttribute('class', 'graph');
  function add(tag, attrs, parent) {
    var e = document.createElementNS(NS, tag);
    Object.keys(attrs).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    (parent || svg).appendChild(e); return e;
  }
  for (var r = 0; r <= layers + 1; r++) {
    var label = r === 0 ? 'emb' : (r === layers + 1 ? 'logit' : 'L' + (r - 1));
    add('text', {x: 4, y: H - 26 - r * cellH, 'class': 'axis'}).textContent = label;
  }
  tokens.forEach(function (t, i) {
    var txt = add('text', {x: 50 + i * cellW, y: H - 8, 'text-anchor': 'middle', 'class': 'axis'});
    txt.textContent = shown(t);
  });
  var maxW = 0; links.forEach(function (l) { maxW = Math.max(maxW, Math.abs(l.weight)); });
  var edgeLayer = add('g', {});
  links.forEach(function (l) {
    var a = xy(byId[l.source]), b = xy(byId[l.target]);
    var e = add('line', {x1: a[0], y1: a[1], x2: b[0], y2: b[1], 'class': l.weight >= 0 ? 'epos' : 'eneg',
                         'stroke-width': (0.3 + 3 * Math.abs(l.weight) / (maxW || 1)).toFixed(2)}, edgeLayer);
    e.dataset.source = l.source; e.dataset.target = l.target;
  });
  var info = document.getElementById('info');
  function select(n) {
    info.textContent = '';
    info.appendChild(el('h2', null, n.node_id + ' (' + n.feature_type + ')'));
    var p = el('p', 'meta', 'layer ' + n.layer + ', position ' + n.ctx_idx + ' ' + tokenRepr(tokens[n.ctx_idx]) +
               ', influence ' + fmt(n.influence) + (n.activation !== null ? ', activation ' + fmt(n.activation) : ''));
    info.appendChild(p);
    if (n.clerp) info.appendChild(el('p', null, n.clerp));
    if (n.dashboard) { var a = el('a', null, 'dashboard page'); a.href = n.dashboard; info.appendChild(a); }
    [['incoming', 'target', 'source'], ['outgoing', 'source', 'target']].forEach(function (w) {
      var list = links.filter(function (l) { return l[w[1]] === n.node_id; });
      list.sort(function (x, y) { return Math.abs(y.weight) - Math.abs(x.weight); });
      info.appendChild(el('h3', null, w[0] + ' edges (' + list.length + ')'));
      var ul = el('ul');
      list.slice(0, 20).forEach(function (l) {
        ul.appendChild(el('li', l.weight >= 0 ? 'pos' : 'neg', fmt(l.weight) + '  ' + l[w[2]]));
      });
      info.appendChild(ul);
    });
    edgeLayer.childNodes.forEach(function (e) {
      var on = e.dataset.source === n.node_id || e.dataset.target === n.node_id;
      e.setAttribute('opacity', on ? '1' : '0.15');
    });
  }
  nodes.forEach(function (n) {
    var p = xy(n), cls = {'embedding': 'ntok', 'logit': 'nlogit', 'mlp reconstruction error': 'nerr'}[n.feature_type];
    var c = add(n.feature_type === 'mlp reconstruction error' ? 'rect' : 'circle',
                n.feature_type === 'mlp reconstruction error' ?
                  {x: p[0] - 5, y: p[1] - 5, width: 10, height: 10, 'class': 'node nerr'} :
                  {cx: p[0], cy: p[1], r: 6, 'class': 'node ' + (cls || 'nfeat')});
    var t = add('title', {}, c); t.textContent = n.node_id + (n.clerp ? ' ' + n.clerp : '');
    c.addEventListener('click', function () { select(n); });
    c.dataset.node = n.node_id;
  });
  document.getElementById('graph').appendChild(svg);
  var tbody = document.querySelector('#nodes tbody');
  nodes.filter(function (n) { return n.feature_type === 'cross layer transcoder'; })
       .sort(function (a, b) { return a.influence - b.influence; })
       .forEach(function (n) {
    var tr = el('tr'), td = el('td');
    if (n.dashboard) { var a = el('a', null, n.node_id); a.href = n.dashboard; td.appendChild(a); }
    else td.textContent = n.node_id;
    tr.appendChild(td);
    tr.appendChild(el('td', 'num', n.layer));
    var tok = el('td'); tok.appendChild(tokenSpan(tokens[n.ctx_idx], 'chip', true)); tr.appendChild(tok);
    tr.appendChild(el('td', 'num', fmt(n.activation)));
    tr.appendChild(el('td', 'num', fmt(n.influence)));
    tbody.appendChild(tr);
  });
  finished();
})();
"""

GRAPH_STYLE = """<style>
svg.graph { border: 1px solid #eee; } svg.graph .axis { font-size: 11px; fill: #666; }
.node { cursor: pointer; stroke: #333; stroke-width: .5; } .nfeat { fill: #e8843a; } .nerr { fill: #aaa; }
.ntok { fill: #7aa6d8; } .nlogit { fill: #8bb174; }
.epos { stroke: #3b7dd8; } .eneg { stroke: #d8553b; } #graph { overflow-x: auto; }
</style>"""


def _scores_html(meta: dict, logits: list[dict], interventions: list[dict]) -> str:
    rows = [f"<tr><th>{html.escape(k)}</th><td class=\"num\">{fmt(meta[v])}</td></tr>"
            for k, v in (("replacement score", "replacement_score"), ("completeness score", "completeness_score"),
                         ("active latents", "n_active_features"), ("latent nodes attributed", "n_feature_nodes"),
                         ("node threshold", "node_threshold"), ("edge threshold", "edge_threshold"))]
    out = f"<table id=\"scores\"><tbody>{''.join(rows)}</tbody></table>"
    logit_rows = [f"<tr><td>{token_html(lg['token'])}</td><td class=\"num\">{fmt(lg['prob'])}</td></tr>"
                  for lg in logits]
    out += ("<h2>Logit nodes</h2><table id=\"logits\"><thead><tr><th>token</th><th>probability</th></tr></thead>"
            f"<tbody>{''.join(logit_rows)}</tbody></table>")
    if interventions:
        rows = [f"<tr><td>{html.escape(iv['spec'])}</td><td class=\"num\">{fmt(iv['replacement_delta'])}</td>"
                f"<td class=\"num\">{fmt(iv['model_delta'])}</td></tr>" for iv in interventions]
        out += ("<h2>Interventions: change in the target logit</h2><table id=\"interventions\"><thead><tr>"
                "<th>latent</th><th>replacement model</th><th>model, latent steered</th></tr></thead>"
                f"<tbody>{''.join(rows)}</tbody></table>")
    return out


def graph_page(graph_file: dict, n_layer: int, logits: list[dict], interventions: list[dict]) -> str:
    """graph.html: the scores, the logit nodes, any interventions, the pruned graph (click a node for its edges)
    and its latents by influence, each linked to its dashboard page."""
    meta = graph_file["metadata"]
    header = (f"<h1>Attribution graph: {html.escape(meta['slug'])}</h1>"
              f"<p class=\"meta\">{html.escape(meta['scan'])} | prompt: "
              f"{''.join(token_html(t, 'chip') for t in meta['prompt_tokens'])}</p>")
    body = (GRAPH_STYLE + _scores_html(meta, logits, interventions)
            + "<h2>Graph</h2><p class=\"meta\">Rows: embeddings, then layers, then logits; columns: positions. "
              "Circles: latents (orange), tokens (blue), logits (green); squares: error nodes. Blue edges excite, "
              "red inhibit. Click a node for its edges.</p><div id=\"graph\"></div><div id=\"info\"></div>"
            + "<h2>Latent nodes</h2><table id=\"nodes\"><thead><tr><th>node</th><th>layer</th><th>token</th>"
              "<th>activation</th><th>cumulative influence</th></tr></thead><tbody></tbody></table>")
    return _page(f"graph {meta['slug']}", header, body, {"graph": graph_file, "n_layer": n_layer}, GRAPH_JS,
                 "graph")
