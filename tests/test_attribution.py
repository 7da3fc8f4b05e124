"""Attribution graphs: the local replacement model equals the model on its prompt, every edge is the exact direct
effect of its source, the scores and pruning keep what they claim, the files validate against the documented
fields and render in Chromium, the CLI's bad inputs are one-line errors, and an intervention on the replacement
model agrees with the steered model where both must."""

import copy
import json
import math
import os
from pathlib import Path

import pytest
import torch

from saelightning.attribution import (
    LocalReplacement,
    Transcoders,
    _target_values,
    active_slots,
    attribute,
    influence,
    normalize,
    prune,
)
from saelightning.attribution import scores as graph_scores
from saelightning.circuits import model_intervention, replacement_intervention
from saelightning.cli import main
from saelightning.dashboards.graph import FEATURE_TYPES
from saelightning.dashboards.html import _embedded
from saelightning.demo import DEMO_MODEL_DIR
from saelightning.export import load_sae, save_clt, save_sae
from saelightning.nanochat.checkpoint import load_nanochat
from saelightning.runtime import InterpretableModel, Steer
from saelightning.saes import SAEConfig, build_sae
from saelightning.saes.clt import CrossLayerTranscoder
from saelightning.tokens import val_batches
from tests.fixtures_nanochat import make_nanochat_model
from tests.numerics import reorder_atol
from tests.test_browser import CHROMIUM, assert_clean, dump_dom
from tests.test_neuronpedia import BATCH_FIELDS, check_fields, validate_feature

pytestmark = pytest.mark.numerics

N_LAYER, D, VOCAB, BOS = 3, 64, 512, 511


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_clt(n_layers=N_LAYER, d=D, d_sae=32, seed=0, threshold=0.3):
    torch.manual_seed(seed)
    clt = CrossLayerTranscoder(SAEConfig(architecture="jumprelu", d_in=d, d_sae=d_sae, threshold_init=threshold),
                               n_layers).eval()
    with torch.no_grad():
        for enc in clt.encoders:
            enc.b_enc.normal_(0, 0.3)
        clt.b_dec.normal_(0, 0.1)
    clt.metadata = {"hook_names_in": [f"blocks.{i}.hook_mlp_in" for i in range(n_layers)],
                    "hook_names_out": [f"blocks.{i}.hook_mlp_out" for i in range(n_layers)]}
    return clt.requires_grad_(False)


def tiny_model(era="current"):
    return make_nanochat_model(era, n_layer=N_LAYER).float().requires_grad_(False)


def prompt(n=9, seed=1):
    idx = torch.randint(0, VOCAB - 1, (n,), generator=torch.Generator().manual_seed(seed))
    idx[0] = BOS
    return idx


def forward_atol(model, reference):
    """Two fp32 orders of the whole forward: the longest reduction is the MLP's 4d, through ~8 reductions a layer."""
    return reorder_atol(reference, 4 * model.config.n_embd, 8 * model.config.n_layer + 2)


@pytest.mark.parametrize("era", ["current", "original"])
def test_the_replacement_model_with_error_nodes_reproduces_the_models_logits(era):
    model, clt, idx = tiny_model(era), tiny_clt(), prompt()
    want = model(idx[None])[0]
    rm = LocalReplacement(model, Transcoders(clt, N_LAYER), idx, BOS)
    with torch.no_grad():
        _, frozen = rm.forward(rm.sources)
    atol = forward_atol(model, want)
    torch.testing.assert_close(rm.logits, want, rtol=0, atol=atol)
    torch.testing.assert_close(frozen, want, rtol=0, atol=atol)
    assert rm.sources.latents[0][0].abs().sum() == 0  # no latents at <|bos|>
    assert all(rm.sources.latents[i][1:].count_nonzero() > 0 for i in range(N_LAYER))
    assert float(rm.sources.errors[0].abs().max()) > 0.1  # a random CLT: the errors carry real mass


def _ablate_each_source(rm, graph):
    """Target inputs with each source node zeroed in turn: the frozen model is affine, so the drop is the edge."""
    s, T, feats = rm.sources, rm.T, graph.features
    n_src = graph.token_slice.stop
    src = rm.batched(n_src, grad=False)
    with torch.no_grad():
        for b in range(n_src):
            if b < graph.n_features:
                layer, p, f = (int(v) for v in feats[b])
                src.latents[layer][b, p, rm.slot_of(layer, feats[b:b + 1, 1], feats[b:b + 1, 2])] = 0
            elif b < graph.error_slice.stop:
                layer, p = divmod(b - graph.n_features, T)
                src.errors[layer][b, p] = 0
            else:
                p = b - graph.token_slice.start
                src.embed[b, p] = 0
                for v in src.value_embeds.values():
                    v[b, p] = 0
        full = _target_values(rm, s, feats, graph.logit_ids)
        ablated = _target_values(rm, src, feats, graph.logit_ids)
    return full, ablated


def test_every_edge_equals_the_change_when_its_source_is_removed():
    model, clt, idx = tiny_model(), tiny_clt(), prompt()
    graph, rm = attribute(model, clt, idx, bos_id=BOS)
    full, ablated = _ablate_each_source(rm, graph)
    n_targets = graph.n_features + len(graph.logit_ids)
    rows = list(range(graph.n_features)) + list(range(graph.logit_slice.start, graph.logit_slice.stop))
    A = graph.adjacency[rows][:, :graph.token_slice.stop]  # [targets, sources]
    by_removal = (full[None, :] - ablated).T  # [targets, sources]
    assert by_removal.shape == (n_targets, graph.token_slice.stop)
    atol = forward_atol(model, full)
    torch.testing.assert_close(A, by_removal.float(), rtol=0, atol=atol)
    assert float(A.abs().max()) > 100 * atol  # the edges are far above the rounding
    # a feature's edges come only from earlier layers' latents (or its own layer's at earlier positions: none)
    layers = graph.features[:, 0]
    same_or_later = layers[:, None] <= layers[None, :]
    assert A[:graph.n_features, :graph.n_features][same_or_later].abs().max() == 0


def test_edges_plus_biases_sum_to_every_target_input():
    model, clt, idx = tiny_model(), tiny_clt(), prompt()
    graph, _ = attribute(model, clt, idx, bos_id=BOS)
    targets = torch.cat([torch.arange(graph.n_features), torch.arange(graph.logit_slice.start, graph.logit_slice.stop)])
    got = graph.adjacency[targets].sum(1) + graph.bias[targets]
    torch.testing.assert_close(got, graph.target_inputs[targets], rtol=0,
                               atol=forward_atol(model, graph.target_inputs))


def test_backward_batches_hold_only_the_active_latents_never_a_dense_dictionary():
    """The leaves are the active latents' values [B, T, m] (m = the most active at one position), and what the
    forward saves for the backward never has the dictionary's width: no [B, T, d_sae] anywhere."""
    model, idx, d_sae, batch = tiny_model(), prompt(), 4096, 8
    clt = tiny_clt(d_sae=d_sae, threshold=3.0)  # a few of many latents fire
    rm = LocalReplacement(model, Transcoders(clt, N_LAYER), idx, BOS)
    for layer in range(N_LAYER):
        slot_idx, mask = rm.slots[layer]
        assert slot_idx.shape == rm.sources.latents[layer].shape == (len(idx), int(mask.sum(-1).max()))
        assert 0 < slot_idx.shape[1] < 32 and torch.equal(rm.dense_latents(layer) != 0, torch.zeros(
            len(idx), d_sae, dtype=torch.bool).scatter(-1, slot_idx, mask))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        graph, _ = attribute(model, clt, idx, bos_id=BOS, batch_size=batch)
    assert graph.n_features > 20 and saved
    assert all(d_sae not in shape for shape in saved), [s for s in saved if d_sae in s]
    # the largest is lm_head's weight (V x d = 32768), a ninth of the dense leaves' 8 x 9 x 4096
    assert max(math.prod(shape) for shape in saved) < batch * len(idx) * d_sae / 8


def test_scores_are_one_where_the_transcoders_are_exact_and_below_with_errors():
    model, idx = tiny_model(), prompt()
    clt = tiny_clt()
    graph, _ = attribute(model, clt, idx, bos_id=BOS)
    replacement, completeness = graph_scores(graph)
    assert 0 < replacement < 1 and 0 < completeness < 1
    # completeness by its definition: 1 - the influence-weighted share of error inputs
    A, w = normalize(graph.adjacency), graph.logit_weights
    weight = influence(A, w) + w
    share = A[:, graph.error_slice].sum(1)
    assert completeness == pytest.approx(float(1 - (share * weight).sum() / weight.sum()), rel=1e-5)
    # MLPs that output 0 and a CLT that writes 0: every error node is exactly 0
    exact_model = tiny_model()
    for block in exact_model.transformer.h:
        block.mlp.c_proj.weight.zero_()
    silent = tiny_clt()
    for enc in silent.encoders:
        enc.W_dec.zero_()
    silent.b_dec.zero_()
    graph, rm = attribute(exact_model, silent, idx, bos_id=BOS)
    assert all(float(e.abs().max()) == 0 for e in rm.sources.errors.values())
    assert graph_scores(graph) == (1.0, 1.0)


def test_pruning_keeps_the_influence_fraction_it_claims():
    model, clt, idx = tiny_model(), tiny_clt(), prompt()
    graph, _ = attribute(model, clt, idx, bos_id=BOS)
    for node_t in (0.5, 0.8, 0.95):
        p = prune(graph, node_t, 0.98)
        inf, fixed = p.node_influence, graph.token_slice.start
        rejected = inf[:fixed][~p.by_influence[:fixed]]
        above = inf > rejected.max()  # every node above the most influential feature or error left out
        assert torch.equal(above[:fixed], p.by_influence[:fixed])  # the kept features and errors are a top set
        share = float(inf[above].sum() / inf.sum())
        assert share >= node_t - 1e-6  # they cover the fraction (with the tokens above them)
        weakest = inf[:fixed][p.by_influence[:fixed]].min()
        assert float(inf[inf > weakest].sum() / inf.sum()) < node_t + 1e-6  # and the weakest one kept is needed
        assert not (p.node_mask & ~p.by_influence).any()
        e, by_score = p.edge_scores, p.edges_by_score
        assert float(e[by_score].sum() / e.sum()) >= 0.98 - 1e-6
        assert float((e[by_score].sum() - e[by_score].min()) / e.sum()) < 0.98 + 1e-6
        assert not (p.edge_mask & ~by_score).any()
        assert p.node_mask[graph.token_slice.start:].all()  # tokens and logits always
        # every kept feature has an incoming and an outgoing kept edge; edges only between kept nodes
        nf = graph.n_features
        kept = p.node_mask[:nf]
        assert p.edge_mask[:nf][kept].any(1).all() and p.edge_mask[:, :nf][:, kept].any(0).all()
        assert not p.edge_mask[~p.node_mask].any() and not p.edge_mask[:, ~p.node_mask].any()
        assert p.cumulative.max() == pytest.approx(1.0)
    with pytest.raises(Exception, match="must be between 0 and 1"):
        prune(graph, 1.5)


def test_max_feature_nodes_attributes_the_most_influential_latents():
    model, clt, idx = tiny_model(), tiny_clt(), prompt()
    full, _ = attribute(model, clt, idx, bos_id=BOS)
    part, _ = attribute(model, clt, idx, bos_id=BOS, max_feature_nodes=10, batch_size=5)
    assert part.n_features == 10 and part.meta["n_active_features"] == full.n_features
    inf = influence(normalize(full.adjacency), full.logit_weights)[:full.n_features]
    top = {tuple(f) for f in full.features[inf.argsort(descending=True)[:5]].tolist()}
    chosen = {tuple(f) for f in part.features.tolist()}
    assert len(top & chosen) >= 4  # the first batch is ranked by the logit rows alone: nearly the same set


# ---------------------------------------------------------------------------------------------
# Per-layer transcoders (one per MLP), with and without the skip term


def tiny_transcoders(skip: bool, n_layer=N_LAYER, d=D, d_sae=32, seed=0, threshold=0.3, scales=(2.0, 0.5)):
    """One JumpReLU transcoder per MLP (blocks.i.hook_mlp_in -> blocks.i.hook_mlp_out), trained-space scales
    s_in, s_out not folded (so the raw-unit conversions are exercised), a live W_skip when skip."""
    torch.manual_seed(seed)
    out = []
    for i in range(n_layer):
        tc = build_sae(SAEConfig(architecture="jumprelu", d_in=d, d_out=d, d_sae=d_sae, threshold_init=threshold,
                                 skip_connection=skip)).eval()
        with torch.no_grad():
            tc.b_enc.normal_(0, 0.3)
            tc.b_dec.normal_(0, 0.1)
            if skip:  # its own generator: the same transcoders otherwise, with and without the skip
                tc.W_skip.normal_(0, 0.3 / d ** 0.5, generator=torch.Generator().manual_seed(100 + i))
            tc.input_scale.fill_(scales[0])
            tc.output_scale.fill_(scales[1])
        tc.metadata = {"hook_name": f"blocks.{i}.hook_mlp_in", "hook_name_out": f"blocks.{i}.hook_mlp_out"}
        out.append(tc.requires_grad_(False))
    return out


@pytest.mark.parametrize("skip", [False, True], ids=["plain", "skip"])
@pytest.mark.parametrize("era", ["current", "original"])
def test_per_layer_transcoders_replacement_model_reproduces_the_logits_and_errors_are_their_own_residual(era, skip):
    model, tcs, idx = tiny_model(era), tiny_transcoders(skip), prompt()
    want = model(idx[None])[0]
    rm = LocalReplacement(model, Transcoders(tcs, N_LAYER), idx, BOS)
    assert rm.tc.clt is None and rm.tc.layers == list(range(N_LAYER))
    with torch.no_grad():
        _, frozen = rm.forward(rm.sources)
    atol = forward_atol(model, want)
    torch.testing.assert_close(rm.logits, want, rtol=0, atol=atol)
    torch.testing.assert_close(frozen, want, rtol=0, atol=atol)
    # each error node is the MLP output minus the transcoder's own prediction (SAE.output, skip term included,
    # on the trained scale s_in·x, read back / s_out); at <|bos|> the prediction of no latents (b_dec, the skip)
    hooks = [f"blocks.{i}.hook_mlp_{k}" for i in range(N_LAYER) for k in ("in", "out")]
    acts = model.run_with_cache(idx[None], hooks)
    for i, tc in enumerate(tcs):
        x, y = acts[f"blocks.{i}.hook_mlp_in"][0], acts[f"blocks.{i}.hook_mlp_out"][0]
        f = tc.encode(x * tc.input_scale) * (idx != BOS)[:, None]
        pred = tc.output(f, x * tc.input_scale) / tc.output_scale
        assert rm.sources.latents[i][1:].count_nonzero() > 0 and rm.sources.latents[i][0].abs().sum() == 0
        torch.testing.assert_close(rm.sources.errors[i], y - pred, rtol=0, atol=forward_atol(model, y))
        assert float(rm.sources.errors[i].abs().max()) > 0.05  # random transcoders: the errors carry mass


@pytest.mark.parametrize("skip", [False, True], ids=["plain", "skip"])
def test_per_layer_transcoder_edges_equal_the_change_when_their_source_is_removed(skip):
    model, tcs, idx = tiny_model(), tiny_transcoders(skip), prompt()
    graph, rm = attribute(model, tcs, idx, bos_id=BOS)
    full, ablated = _ablate_each_source(rm, graph)
    rows = list(range(graph.n_features)) + list(range(graph.logit_slice.start, graph.logit_slice.stop))
    A = graph.adjacency[rows][:, :graph.token_slice.stop]
    atol = forward_atol(model, full)
    torch.testing.assert_close(A, (full[None, :] - ablated).T.float(), rtol=0, atol=atol)
    assert float(A.abs().max()) > 100 * atol
    targets = torch.cat([torch.arange(graph.n_features), torch.arange(graph.logit_slice.start, graph.logit_slice.stop)])
    torch.testing.assert_close(graph.adjacency[targets].sum(1) + graph.bias[targets], graph.target_inputs[targets],
                               rtol=0, atol=forward_atol(model, graph.target_inputs))
    # a per-layer transcoder's latent reaches only later layers' latents
    layers = graph.features[:, 0]
    assert A[:graph.n_features, :graph.n_features][layers[:, None] <= layers[None, :]].abs().max() == 0
    if skip:  # ... but its layer's MLP input reaches the next layers through W_skip as well: more edges are nonzero
        plain, _ = attribute(model, tiny_transcoders(False), idx, bos_id=BOS)
        assert torch.equal(plain.features, graph.features)
        assert not torch.allclose(plain.adjacency, graph.adjacency, atol=100 * atol)


class _TranscoderMLP(torch.nn.Module):
    """A model's MLP that is exactly what the transcoders write there (no latents at position 0, <|bos|>)."""

    def __init__(self, tc: Transcoders, layer: int):
        super().__init__()
        self.tc, self.layer = tc, layer

    def forward(self, x, hook=None):
        f = self.tc.encode(self.layer, x) * (torch.arange(x.shape[-2]) > 0)[:, None]
        idx, _ = active_slots(f)
        return self.tc.write_at(self.layer, f.gather(-1, idx), idx, x)[self.layer] + self.tc.bias(self.layer)


def test_skip_transcoders_that_are_the_mlps_give_exactly_zero_errors_and_scores_of_one():
    """The skip term is a frozen linear path from the MLP input to its output, not a node: where the transcoders
    (skip included) are the MLPs, every error node is exactly 0, so completeness and replacement are exactly 1
    although W_skip carries part of every MLP's output; the same model read with W_skip dropped puts exactly that
    part, x W_skipᵀ / s_out, into the error nodes."""
    model, tcs, idx = tiny_model(), tiny_transcoders(True), prompt()
    tc = Transcoders(tcs, N_LAYER)
    for i, block in enumerate(model.transformer.h):
        block.mlp = _TranscoderMLP(tc, i)
    graph, rm = attribute(model, tc, idx, bos_id=BOS)
    assert all(float(e.abs().max()) == 0 for e in rm.sources.errors.values())
    assert graph_scores(graph) == (1.0, 1.0)
    n_nodes = graph.n_features + (N_LAYER + 1) * len(idx) + len(graph.logit_ids)
    assert graph.adjacency.shape == (n_nodes, n_nodes)  # features, errors, tokens, logits: no skip node
    no_skip = [copy.deepcopy(t) for t in tcs]
    for t in no_skip:
        t.W_skip.zero_()
    rm2 = LocalReplacement(model, Transcoders(no_skip, N_LAYER), idx, BOS)
    for i, t in enumerate(tcs):
        x = rm.mlp_inputs[i]
        skip = (x * t.input_scale) @ t.W_skip.T / t.output_scale
        assert float(skip.abs().max()) > 0.05
        torch.testing.assert_close(rm2.sources.errors[i], skip, rtol=0, atol=forward_atol(model, skip))
    replacement, completeness = graph_scores(attribute(model, no_skip, idx, bos_id=BOS)[0])
    assert replacement < 1 and completeness < 1


def test_attribute_takes_one_transcoder_export_per_layer_on_the_command_line(tmp_path, capsys):
    paths = []
    for i, tc in enumerate(tiny_transcoders(True, n_layer=4, d=128, threshold=0.5, scales=(1.0, 1.0))):
        paths.append(tmp_path / f"tc{i}")
        save_sae(tc, paths[-1], dict(tc.metadata, model_name="nanochat"))
    out = tmp_path / "graph"
    # several values after one --sae, and a repeated --sae, are the same list
    code = main(["attribute", "--model", "demo", "--sae", str(paths[0]), str(paths[1]), "--sae", str(paths[2]),
                 "--sae", str(paths[3]), "--prompt", "def f(x):\n    return", "--out", str(out), "--clamp", "2:5=0",
                 "--node-threshold", "0.99", "--edge-threshold", "0.999"])
    assert code == 0
    data = json.loads((out / "graph.json").read_text())
    _validate_graph_file(data, 4)
    assert data["metadata"]["transcoder_list"] == [str(p) for p in paths]
    layers = {int(n["layer"]) for n in data["nodes"] if n["feature_type"] == "cross layer transcoder"}
    assert layers and layers <= {0, 1, 2, 3}
    summary = json.loads((out / "summary.json").read_text())
    assert 0 < summary["replacement_score"] < 1 and summary["interventions"][0]["layer"] == 2
    two = tmp_path / "two"
    capsys.readouterr()
    assert main(["attribute", "--model", "demo", "--sae", str(paths[1]), str(paths[1]), "--prompt", "x",
                 "--out", str(two)]) == 2 and not two.exists()
    err = capsys.readouterr().err
    assert "two transcoders for layer 1; give one per MLP layer" in err and len(err.strip().splitlines()) == 1


def _validate_graph_file(data: dict, n_layer: int) -> None:
    """The fields README's "Attribution graphs" documents, with their types and meanings."""
    meta = data["metadata"]
    for key, kind in (("slug", str), ("scan", str), ("transcoder_list", list), ("prompt_tokens", list),
                      ("prompt", str), ("node_threshold", float), ("schema_version", int),
                      ("replacement_score", float), ("completeness_score", float)):
        assert isinstance(meta[key], kind), key
    assert set(data["qParams"]) == {"pinnedIds", "supernodes", "linkType", "clickedId", "sg_pos"}
    T = len(meta["prompt_tokens"])
    ids = set()
    for n in data["nodes"]:
        assert n["feature_type"] in FEATURE_TYPES.values()
        assert 0 <= n["ctx_idx"] < T and n["reverse_ctx_idx"] == T - 1 - n["ctx_idx"]
        assert isinstance(n["node_id"], str) and isinstance(n["jsNodeId"], str) and isinstance(n["layer"], str)
        assert isinstance(n["feature"], int) and isinstance(n["is_target_logit"], bool) and n["run_idx"] == 0
        assert 0 <= n["influence"] <= 1 + 1e-6
        kind = n["feature_type"]
        if kind == "cross layer transcoder":
            layer, feat, pos = (int(v) for v in n["node_id"].split("_"))
            assert n["layer"] == str(layer) and pos == n["ctx_idx"] and n["jsNodeId"] == f"{layer}_{feat}-0"
            assert n["feature"] == (layer + feat) * (layer + feat + 1) // 2 + feat and n["activation"] > 0
        elif kind == "mlp reconstruction error":
            assert n["node_id"] == f"{n['layer']}_-1_{n['ctx_idx']}" and n["feature"] == -1
        elif kind == "embedding":
            assert n["layer"] == "E" and n["node_id"].startswith("E_") and n["feature"] == n["ctx_idx"]
        else:
            assert n["layer"] == str(n_layer + 1) and n["ctx_idx"] == T - 1 and 0 < n["token_prob"] <= 1
            assert n["node_id"] == f"{n_layer + 1}_{n['feature']}_{T - 1}"
        ids.add(n["node_id"])
    assert len(ids) == len(data["nodes"])
    assert sum(n["is_target_logit"] for n in data["nodes"]) == 1
    for link in data["links"]:
        assert link["source"] in ids and link["target"] in ids and isinstance(link["weight"], float)


@pytest.fixture(scope="module")
def demo_clt_dir(tmp_path_factory):
    """A random CLT over the demo model's 4 layers (width 128), exported as `saelightning fit` does."""
    clt = tiny_clt(n_layers=4, d=128, d_sae=32, threshold=0.5)
    out = tmp_path_factory.mktemp("attr") / "clt"
    save_clt(clt, out, {"model_name": "nanochat"})
    return out


@pytest.fixture(scope="module")
def cli_graph(demo_clt_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("attr") / "graph"
    code = main(["attribute", "--model", "demo", "--sae", str(demo_clt_dir), "--prompt", "def f(x):\n    return",
                 "--out", str(out), "--clamp", "3:5=0", "--dashboard", "../viz/features/{index}.html",
                 "--node-threshold", "0.99", "--edge-threshold", "0.999"])
    assert code == 0
    return out


def test_the_cli_writes_the_graph_json_the_viewers_read(cli_graph):
    data = json.loads((cli_graph / "graph.json").read_text())
    _validate_graph_file(data, 4)
    summary = json.loads((cli_graph / "summary.json").read_text())
    assert summary["replacement_score"] == data["metadata"]["replacement_score"]
    links = [n["dashboard"] for n in data["nodes"] if n["feature_type"] == "cross layer transcoder"]
    assert links and all(link.startswith("../viz/features/") for link in links)
    first = next(n for n in data["nodes"] if n["feature_type"] == "cross layer transcoder")
    layer, feat, _ = (int(v) for v in first["node_id"].split("_"))
    assert first["dashboard"] == f"../viz/features/{layer * 32 + feat}.html"


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (`make browser`)")
def test_the_graph_page_renders_in_chromium_without_js_errors(cli_graph, tmp_path):
    dom = dump_dom((cli_graph / "graph.html").as_uri(), tmp_path)
    assert_clean(dom)
    assert "<svg" in dom and 'id="interventions"' in dom
    assert dom.count('class="node ') == len(json.loads((cli_graph / "graph.json").read_text())["nodes"])
    assert 'href="../viz/features/' in dom


@pytest.fixture(scope="module")
def graph_with_dashboards(demo_clt_dir, tmp_path_factory):
    """`saelightning viz` of the CLT into GRAPHS/dashboards, then `attribute` into GRAPHS/g with its default links."""
    graphs = tmp_path_factory.mktemp("graphs")
    assert main(["viz", "--sae", str(demo_clt_dir), "--model", "demo", "--data", "demo", "--tokens", "400",
                 "--top_k", "4", "--out", str(graphs / "dashboards"), "--quiet"]) == 0
    assert main(["attribute", "--model", "demo", "--sae", str(demo_clt_dir), "--prompt", "def f(x):\n    return",
                 "--out", str(graphs / "g"), "--node-threshold", "0.99", "--edge-threshold", "0.999"]) == 0
    return graphs


def test_every_latent_link_of_graph_html_opens_that_latents_page_of_the_clt_dashboards(graph_with_dashboards):
    graphs = graph_with_dashboards
    nodes = _embedded(graphs / "g" / "graph.html")["graph"]["nodes"]
    latents = [n for n in nodes if n["feature_type"] == "cross layer transcoder"]
    assert len(latents) > 5
    for n in latents:
        layer, feat, _ = (int(v) for v in n["node_id"].split("_"))
        page = Path(os.path.normpath(graphs / "g" / n["dashboard"]))
        assert page.is_file(), n["dashboard"]
        assert _embedded(page)["feature"]["index"] == feat
        site = json.loads((page.parent.parent / "saelightning-output.json").read_text())["meta"]
        assert site["hook_name"] == f"blocks.{layer}.hook_mlp_in" and site["d_sae"] == 32
    index = (graphs / "dashboards" / "index.html").read_text()
    assert all(f'href="layer{i}/index.html"' in index for i in range(4))


def test_each_clt_layers_dashboard_shows_that_layers_latents_and_its_summed_decoder_rows(graph_with_dashboards,
                                                                                         demo_clt_dir):
    """Layer l's site: max activations equal the CLT's own latents of layer l on the same val rows, and the logit
    effect is lm_head(final_norm(Σ_j W_dec^(l→j))): the decoder rows summed over every layer the latent writes."""
    nc = load_nanochat(DEMO_MODEL_DIR)
    model, clt = nc.model.float(), load_sae(demo_clt_dir)
    for layer in range(4):
        site = graph_with_dashboards / "dashboards" / f"layer{layer}"
        meta = json.loads((site / "saelightning-output.json").read_text())["meta"]
        rows = {r["index"]: r for r in _embedded(site / "index.html")["rows"]}
        assert sorted(rows) == list(range(32))
        idx = next(iter(val_batches(Path(meta["val_shard"]), nc.tokenizer, meta["context_size"], meta["n_rows"],
                                    meta["n_rows"])))
        with torch.no_grad():
            x = model.run_with_cache(idx, [f"blocks.{layer}.hook_mlp_in"])[f"blocks.{layer}.hook_mlp_in"]
            f, _ = clt.contributions(layer, x.flatten(0, 1))
        f = f.masked_fill((idx == nc.tokenizer.bos_id).flatten()[:, None], 0)
        want = f.max(0).values
        got = torch.tensor([rows[i]["max_act"] for i in range(32)])
        assert int((want > 0).sum()) > 10
        torch.testing.assert_close(got, want, rtol=5e-4, atol=0)  # the pages keep 4 significant digits
        top = int(want.argmax())
        record = _embedded(site / "features" / f"{top}.html")["feature"]
        with torch.no_grad():
            u = sum(clt.decoder(layer, j)[top] for j in range(layer, 4))
            logits = model.lm_head(model.final_norm(u))[:model.config.vocab_size]
        assert [t for t, _ in record["logits"]["pos"]][:3] == [nc.tokenizer.token_str(int(i))
                                                             for i in logits.topk(3).indices]
        assert record["logits"]["pos"][0][1] == pytest.approx(float(logits.max()), rel=5e-4)


def test_neuronpedia_of_a_clt_writes_each_layers_batches_as_its_dashboards_show_them(graph_with_dashboards,
                                                                                      demo_clt_dir, tmp_path):
    out = tmp_path / "np"
    argv = ["neuronpedia", "--sae", str(demo_clt_dir), "--model", "demo", "--data", "demo", "--tokens", "400",
            "--top_k", "4", "--out", str(out), "--features-per-batch", "20", "--quiet"]
    assert main(argv) == 0
    for layer in range(4):
        site = graph_with_dashboards / "dashboards" / f"layer{layer}"
        rows = {r["index"]: r for r in _embedded(site / "index.html")["rows"]}
        batches = [json.loads((out / f"layer{layer}" / f"batch-{n}.json").read_text()) for n in range(2)]
        assert not (out / f"layer{layer}" / "batch-2.json").exists()  # 32 latents, 20 a file
        features = []
        for batch in batches:
            check_fields(batch, BATCH_FIELDS, "batch")
            assert (batch["model_id"], batch["layer"], batch["sae_set"]) == ("nanochat-d4", layer, "clt-saelightning")
            features += batch["features"]
        assert [f["feature_index"] for f in features] == list(range(32))
        for f in features:  # the same latents, statistics and logit effects as that layer's dashboard
            validate_feature(f, 10)
            row = rows[f["feature_index"]]
            assert f["frac_nonzero"] == pytest.approx(row["density"], rel=5e-4, abs=1e-12)
            top = [a for a in f["activations"] if a["bin_min"] == -1]
            if top:
                assert top[0]["bin_max"] == pytest.approx(row["max_act"], rel=5e-4)
            page = _embedded(site / "features" / f"{f['feature_index']}.html")["feature"]
            assert f["pos_str"] == [t for t, _ in page["logits"]["pos"]]
    assert (out / "clt" / "cfg.json").read_bytes() == (demo_clt_dir / "cfg.json").read_bytes()
    assert main(argv + ["--model-id", "Bad Name"]) == 2


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (`make browser`)")
def test_the_clt_dashboards_index_and_a_linked_page_render_in_chromium(graph_with_dashboards, tmp_path):
    dom = dump_dom((graph_with_dashboards / "dashboards" / "index.html").as_uri(), tmp_path)
    assert_clean(dom)
    assert dom.count('href="layer') == 4
    node = next(n for n in _embedded(graph_with_dashboards / "g" / "graph.html")["graph"]["nodes"] if n["dashboard"])
    page = Path(os.path.normpath(graph_with_dashboards / "g" / node["dashboard"]))
    assert_clean(dump_dom(page.as_uri(), tmp_path))


def test_viz_of_a_clt_refuses_serve_and_probe_in_one_line(demo_clt_dir, tmp_path, capsys):
    code = main(["viz", "--sae", str(demo_clt_dir), "--model", "demo", "--data", "demo", "--tokens", "100",
                 "--out", str(tmp_path / "v"), "--serve", "--port", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "a cross-layer transcoder gets static pages per layer only" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "v").exists()


@pytest.mark.parametrize("extra, fragment", [
    (["--clamp", "3:5"], "bad --clamp '3:5'; write LAYER:LATENT=VALUE"),
    (["--clamp", "7:5=1"], "--clamp 7:5: the transcoders have layers [0, 1, 2, 3]"),
    (["--node-threshold", "1.5"], "--node-threshold 1.5 must be between 0 and 1"),
    (["--target", "def f"], "--target 'def f' is 2 tokens"),
    (["--dashboard", "x/{latent}.html"], "--dashboard 'x/{latent}.html' may use only"),
    (["--slug", "a/b"], "--slug 'a/b' must be letters"),
])
def test_bad_cli_input_is_one_line_with_exit_2_and_writes_nothing(demo_clt_dir, tmp_path, capsys, extra, fragment):
    out = tmp_path / "out"
    code = main(["attribute", "--model", "demo", "--sae", str(demo_clt_dir), "--prompt", "x = 1", "--out", str(out),
                 *extra])
    err = capsys.readouterr().err
    assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_an_sae_that_is_not_a_transcoder_is_refused(tmp_path, capsys):
    sae = build_sae(SAEConfig(architecture="topk", d_in=128, d_sae=64, k=4))
    save_sae(sae, tmp_path / "sae", {"hook_name": "blocks.1.hook_resid_post"})
    code = main(["attribute", "--model", "demo", "--sae", str(tmp_path / "sae"), "--prompt", "x", "--out",
                 str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "is not a transcoder" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_steering_a_clt_latent_adds_its_decoder_rows_to_every_mlp_output_it_writes():
    model, clt, idx = tiny_model(), tiny_clt(), prompt()
    im = InterpretableModel(model, [clt], bos_id=BOS)
    hooks = [f"blocks.{i}.hook_mlp_{k}" for i in range(N_LAYER) for k in ("in", "out")]
    plain = model.run_with_cache(idx[None], hooks)
    f = clt.encoders[1].encode(plain["blocks.1.hook_mlp_in"][0])
    latent = int(f[1:].sum(0).argmax())
    with im.steering([Steer("blocks.1.hook_mlp_in", latent, "clamp", 0.0)]):
        steered = model.run_with_cache(idx[None], hooks, hooks=im.hooks(idx[None]))
    for i in range(2):  # layers up to the steered one: their inputs are unchanged
        torch.testing.assert_close(steered[f"blocks.{i}.hook_mlp_in"], plain[f"blocks.{i}.hook_mlp_in"])
    want = plain["blocks.1.hook_mlp_out"][0] - (f[:, latent:latent + 1] * (idx != BOS)[:, None]) @ \
        clt.decoder(1, 1)[latent:latent + 1]
    torch.testing.assert_close(steered["blocks.1.hook_mlp_out"][0], want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(steered["blocks.2.hook_mlp_in"], plain["blocks.2.hook_mlp_in"])
    # tracking a CLT layer reports its latents at that input hook
    pf = im.prompt_features(idx.tolist(), top_n=3, truncate=None)
    assert set(pf.latents) == {f"blocks.{i}.hook_mlp_in" for i in range(N_LAYER)}


def test_a_last_layer_latent_changes_the_logit_alike_in_the_replacement_model_and_the_model():
    """A last-layer latent acts on the logits only directly (no attention or MLP after it). With its decoder row
    orthogonal to the final residual, the final norm's denominator does not move to first order, so the frozen
    norm is exact to first order; the frozen softcap ratio c = 15 tanh(z/15)/z stands where the model has the
    slope sech²(z/15). So for a small clamp, model change = replacement change x sech²(z/15) / c."""
    model, clt, idx = tiny_model(), tiny_clt(), prompt()
    rm = LocalReplacement(model, Transcoders(clt, N_LAYER), idx, BOS)
    last = rm.dense_latents(N_LAYER - 1)[-1]
    latent = int(last.argmax())
    x = rm.final_resid[-1] / rm.final_resid[-1].norm()
    row = clt.decoder(N_LAYER - 1, N_LAYER - 1)[latent]
    row -= (row @ x) * x
    graph, rm = attribute(model, clt, idx, bos_id=BOS)
    token = int(graph.logit_ids[0])
    a = float(rm.dense_latents(N_LAYER - 1)[-1, latent])
    assert a > 0
    rep = replacement_intervention(rm, N_LAYER - 1, latent, 0.98 * a, token)
    real = model_intervention(model, [clt], idx, BOS, N_LAYER - 1, latent, 0.98 * a, token)
    ratio = rm.frozen.softcap_ratio[-1, token]
    z = rm.logits[-1, token] / ratio
    slope = 1 - torch.tanh(z / 15) ** 2
    assert abs(rep) > 1e-3
    assert real == pytest.approx(rep * float(slope / ratio), rel=0.02)
    # zeroing it: the same sign in both
    zero_rep = replacement_intervention(rm, N_LAYER - 1, latent, 0.0, token)
    zero_real = model_intervention(model, [clt], idx, BOS, N_LAYER - 1, latent, 0.0, token)
    assert zero_rep * zero_real > 0
    # clamping a latent to its own activation changes nothing
    assert replacement_intervention(rm, N_LAYER - 1, latent, a, token) == pytest.approx(0.0, abs=1e-6)


def test_intervention_on_the_demo_model_keeps_the_error_term():
    """Zeroing a latent that is inactive everywhere is no change at all, in both models."""
    nc = load_nanochat(DEMO_MODEL_DIR)
    model = nc.model.float().requires_grad_(False)
    clt = tiny_clt(n_layers=4, d=128, d_sae=32, threshold=0.5)
    idx = torch.tensor(nc.tokenizer.encode("x = 1"))
    rm = LocalReplacement(model, Transcoders(clt, 4), idx, nc.tokenizer.bos_id)
    inactive = int((rm.dense_latents(2) != 0).sum(0).argmin())
    assert int((rm.dense_latents(2)[:, inactive] != 0).sum()) == 0
    assert replacement_intervention(rm, 2, inactive, 0.0, 5) == 0.0
    assert model_intervention(model, [clt], idx, nc.tokenizer.bos_id, 2, inactive, 0.0, 5) == 0.0
