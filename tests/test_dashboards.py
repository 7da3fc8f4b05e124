"""Dashboards: the streaming statistics against a direct computation over all activations, the
logit effect against its formula, the static site's escaping, and the `viz` command end to end."""

import html
import json
import math
import re
from dataclasses import replace
from html.parser import HTMLParser

import pytest
import torch

from saelightning.atomic import atomic_dir
from saelightning.cli import main
from saelightning.dashboards import parse_features
from saelightning.dashboards.html import (
    NOTES_FILE,
    embed_json,
    fmt,
    read_notes,
    set_note,
    token_html,
    token_repr,
    write_site,
)
from saelightning.dashboards.records import density_histogram, export_figures, feature_records
from saelightning.dashboards.stats import (
    GroupTopK,
    StatsConfig,
    collect_stats,
    density_summary,
    latents_of,
    logit_effect,
    nearest_latents,
)
from saelightning.errors import SAELightningError
from saelightning.export import load_sae, save_sae
from saelightning.nanochat.model import GPT, GPTConfig
from saelightning.nanochat.shards import TextStream, list_shards
from saelightning.nanochat.tokenizer import load_tokenizer
from saelightning.saes import SAEConfig, build_sae
from saelightning.tokens import val_batches

pytestmark = pytest.mark.numerics  # fp32 results compared across code paths: also run under other CPU kernels

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    return load_tokenizer(tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(1)
    gpt = GPT(GPTConfig(sequence_len=64, vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, n_kv_head=2,
                        n_embd=32, era="original"))
    with torch.no_grad():  # nanochat zero-inits the projections: randomise so context matters
        for p in gpt.parameters():
            p.normal_(0.0, 0.3)
    return gpt.eval()


@pytest.fixture(scope="module")
def sae():
    torch.manual_seed(2)
    s = build_sae(SAEConfig(architecture="relu", d_in=32, d_sae=24))
    with torch.no_grad():
        s.W_enc.normal_(0.0, 0.5)
        s.b_enc.normal_(-1.0, 1.0)  # a spread of densities, some latents rare
    return s.eval()


def _texts(shards_dir):
    _, val = list_shards(shards_dir)
    return TextStream([val], loop=False, shuffle=False)


CONTEXT, ROWS, N_ROWS = 32, 3, 22  # 22 rows of 32 tokens of the val shard, 3 rows a batch


def _batches(tokenizer, shards_dir, n_rows=N_ROWS, rows=ROWS):
    return val_batches(list_shards(shards_dir)[1], tokenizer, CONTEXT, n_rows, rows)


CFG = StatsConfig(top_k=6, n_intervals=4, per_interval=3,
                  n_bins=8, before=3, after=2, n_logits=5, logit_bins=10, n_neighbours=5)


@pytest.fixture(scope="module")
def streamed(model, sae, tokenizer, tiny_shards_dir):
    batches = lambda: _batches(tokenizer, tiny_shards_dir)  # noqa: E731
    stats = collect_stats(model, sae, HOOK, batches, tokenizer.bos_id, None, CFG)
    # the direct computation: every activation of every token, kept at once
    rows = [(idx[b], latents_of(model, sae, HOOK, idx[b:b + 1], torch.arange(24), tokenizer.bos_id)[0])
            for idx in batches() for b in range(len(idx))]
    return stats, rows


def test_val_batches_count_and_shape(tokenizer, tiny_shards_dir):
    batches = list(_batches(tokenizer, tiny_shards_dir, n_rows=4, rows=3))
    assert [tuple(b.shape) for b in batches] == [(3, 32), (1, 32)]
    flat = torch.cat([b.flatten() for b in batches])
    docs = [t for d in list(_texts(tiny_shards_dir))[:20] for t in tokenizer.encode(d)]
    assert flat.tolist() == docs[:128]  # documents packed in order, each starting with BOS
    assert int((flat == tokenizer.bos_id).sum()) >= 1
    # two ranks take alternate batches of the same rows
    ranks = [list(val_batches(list_shards(tiny_shards_dir)[1], tokenizer, 32, 7, 2, r, 2)) for r in (0, 1)]
    assert [len(b) for b in ranks[0]] == [2, 2] and [len(b) for b in ranks[1]] == [2, 1]
    whole = torch.cat(list(_batches(tokenizer, tiny_shards_dir, n_rows=7, rows=2)))
    assert torch.equal(torch.cat([ranks[0][0], ranks[1][0], ranks[0][1], ranks[1][1]]), whole)


def test_density_max_and_mean_match_direct(streamed, tokenizer):
    stats, rows = streamed
    z = torch.cat([acts for _, acts in rows])
    not_bos = torch.cat([idx != tokenizer.bos_id for idx, _ in rows])
    assert stats.n_tokens == int(not_bos.sum())
    assert torch.equal(stats.n_fire, (z[not_bos] > 0).sum(0))
    assert torch.allclose(stats.max_act, z.max(0).values)
    assert torch.allclose(stats.mean_act.float(), z.sum(0) / (z > 0).sum(0).clamp(min=1), atol=1e-5)
    assert torch.allclose(stats.density, (z[not_bos] > 0).double().mean(0))
    assert (z[~not_bos] == 0).all()  # BOS excluded
    assert 0 < float(stats.density.min()) < 0.5 < float(stats.density.max())  # a real spread


def test_top_contexts_match_direct(streamed, tokenizer):
    stats, rows = streamed
    for f in range(24):
        events = sorted(((float(acts[t, f]), r, t) for r, (_, acts) in enumerate(rows)
                         for t in range(len(acts)) if acts[t, f] > 0), reverse=True)[:CFG.top_k]
        kept = stats.top.values[f][stats.top.keys[f] > float("-inf")]
        assert torch.allclose(kept, torch.tensor([v for v, _, _ in events]), atol=1e-6)
        for j, (_, r, t) in enumerate(events):  # the windows: tokens and this latent along them
            idx, acts = rows[r]
            lo, hi = t - CFG.before, t + CFG.after + 1
            want = [int(idx[p]) if 0 <= p < len(idx) else -1 for p in range(lo, hi)]
            assert stats.top.tokens[f, j].tolist() == want
            want_acts = [float(acts[p, f]) if 0 <= p < len(idx) else 0.0 for p in range(lo, hi)]
            assert torch.allclose(stats.top.acts[f, j], torch.tensor(want_acts))


def test_histogram_and_interval_samples_match_direct(streamed):
    stats, rows = streamed
    z = torch.cat([acts for _, acts in rows])
    per = CFG.n_bins // CFG.n_intervals
    for f in range(24):
        edges = stats.bin_edges(f)
        v = z[:, f][z[:, f] > 0]
        direct = [int(((v > edges[j]) & (v <= edges[j + 1])).sum()) for j in range(CFG.n_bins)]
        direct[0] += int((v <= edges[0]).sum())  # nothing, as v > 0 = edges[0]
        assert stats.hist[f].tolist() == direct
        assert sum(direct) == int(stats.n_fire[f])
        for q in range(CFG.n_intervals):
            group = f * CFG.n_intervals + q
            filled = stats.samples.keys[group] > float("-inf")
            in_interval = sum(direct[q * per:(q + 1) * per])
            assert int(filled.sum()) == min(CFG.per_interval, in_interval)
            vals = stats.samples.values[group][filled]
            lo, hi = edges[q * per], edges[(q + 1) * per]
            assert ((vals > lo - 1e-6) & (vals <= hi + 1e-6)).all()
            # each sample is a real event: its marked token carries exactly that activation
            assert torch.allclose(stats.samples.acts[group][filled][:, CFG.before], vals)


def test_group_topk_merge_equals_sort():
    gen = torch.Generator().manual_seed(0)
    heap = GroupTopK(5, 4, window=2)
    groups, keys = [], []
    for _ in range(7):  # streamed in chunks of different sizes
        n = int(torch.randint(0, 30, (1,), generator=gen))
        g, k = torch.randint(0, 5, (n,), generator=gen), torch.rand(n, generator=gen)
        heap.push(g, k, k * 2, torch.stack([g, g], 1), torch.stack([k, k], 1))
        groups.append(g), keys.append(k)
    g, k = torch.cat(groups), torch.cat(keys)
    for group in range(5):
        want = k[g == group].sort(descending=True).values[:4]
        got = heap.keys[group][heap.keys[group] > float("-inf")]
        assert torch.equal(got, want)
        assert torch.equal(heap.values[group][: len(want)], want * 2)
        assert (heap.tokens[group][: len(want)] == group).all()


@pytest.mark.parametrize("hook", [HOOK, "blocks.0.mlp.hook_post"])
def test_logit_effect_is_unembed_of_normed_direction(model, hook):
    d_in = 128 if hook.endswith("mlp.hook_post") else 32
    sae = build_sae(SAEConfig(architecture="topk", d_in=d_in, d_sae=6, k=2))
    top_v, top_i, bot_v, bot_i, heights, centres = logit_effect(model, sae, hook, torch.arange(6), CFG)
    for f in range(6):
        u = sae.W_dec[f].detach()
        if d_in == 128:  # through the MLP's output projection into the residual stream
            u = model.transformer.h[0].mlp.c_proj.weight @ u
        with torch.no_grad():
            logits = model.lm_head.weight @ (u * math.sqrt(32) / u.norm())  # rms-normed direction
        assert torch.allclose(top_v[f], logits.topk(5).values, atol=1e-3)
        assert torch.allclose(bot_v[f], logits.topk(5, largest=False).values, atol=1e-3)
        assert torch.allclose(logits[top_i[f]], logits.topk(5).values, atol=1e-3)
        assert int(heights[f].sum()) == model.config.vocab_size
        assert float(centres[f, 0]) < float(centres[f, -1])


def test_density_summary_lists_most_least_and_dead(tokenizer):
    density = torch.tensor([0.5, 0.0, 0.01, 0.2, 0.0, 0.001])
    text = density_summary(density, n=2)
    assert "**4 of 6 latents alive**" in text and "2 dead" in text
    most = text.split("**Most frequent**")[1].split("**Least")[0]
    assert re.findall(r"^\| (\d+) \|", most, re.M) == ["0", "3"]
    least = text.split("**Least frequent (alive)**")[1]
    assert re.findall(r"^\| (\d+) \|", least, re.M) == ["5", "2"]
    assert "Dead latents: 1, 4" in text
    with_tokens = density_summary(density, tokenizer, n=1, top_token_ids=torch.full((6,), tokenizer.bos_id))
    assert r"`<\|bos\|>`" in with_tokens  # pipes escaped for the table cell


def test_parse_features():
    assert parse_features("0-3,7,2", 10) == [0, 1, 2, 3, 7]
    assert parse_features(None, 10) is None
    for bad in ("3-1", "a", "0-10"):
        with pytest.raises(SAELightningError):
            parse_features(bad, 10)


PLANTED = "</script><script>document.documentElement.setAttribute('data-pwned','1')</script>"


def _records(streamed, model, sae, tokenizer):
    stats, _ = streamed
    top_token = int(stats.top.tokens[0, 0, CFG.before])

    def token_str(i):
        return PLANTED if i == top_token else tokenizer.token_str(i)

    return feature_records(stats, logit_effect(model, sae, HOOK, stats.features, CFG), token_str,
                           nearest_latents(sae.W_dec, stats.features, CFG.n_neighbours))


def test_site_escapes_token_text_and_embeds_json_safely(streamed, model, sae, tokenizer, tmp_path):
    records = _records(streamed, model, sae, tokenizer)
    meta = {"title": "t<b>x</b>", "n_tokens": streamed[0].n_tokens, "hook_name": HOOK}
    index = write_site(tmp_path / "site", meta, records)
    page = (tmp_path / "site" / "features" / "0.html").read_text()
    for text in (index.read_text(), page):
        assert "<script>document" not in text and "</script><script>doc" not in text
        assert "t&lt;b&gt;x&lt;/b&gt;" in text  # Python-side text is html-escaped
        assert not re.search(r"<(link|img|iframe)\b|\bsrc=", text)  # nothing to fetch: all inline
        assert text.count("<script") == 3  # error trap, data, page code
    data = re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S).group(1)
    feature = json.loads(data)["feature"]
    assert feature["top"][0]["tokens"][feature["top"][0]["index"]] == PLANTED  # round-trips exactly
    assert len(feature["top"]) == CFG.top_k
    assert sorted(int(p.stem) for p in (tmp_path / "site" / "features").iterdir()) == list(range(24))


def test_embed_json_escapes_every_breakout():
    text = embed_json({"a": "</script>&<!--\u2028"})
    assert not set(text) & set("<>&\u2028") and json.loads(text) == {"a": "</script>&<!--\u2028"}


def test_atomic_dir_replaces_own_output_only(tmp_path):
    with atomic_dir(tmp_path / "out", "viz") as tmp:
        (tmp / "a").write_text("1")
    with atomic_dir(tmp_path / "out", "viz") as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["b", "saelightning-output.json"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.txt").write_text("keep")
    with pytest.raises(SAELightningError):
        with atomic_dir(tmp_path / "mine", "viz"):
            pass
    with pytest.raises(RuntimeError):  # a failure leaves the earlier output as it was
        with atomic_dir(tmp_path / "out", "viz") as tmp:
            raise RuntimeError("boom")
    assert (tmp_path / "out" / "b").exists() and (tmp_path / "mine" / "thesis.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# what a training run's export records (callbacks.export_module), as the index shows it
EXPORT_METADATA = {"hook_name": "blocks.1.hook_resid_post", "context_size": 32, "training_steps": 30,
                   "training_tokens": 122880, "final_metrics_step": 30, "saelightning_architecture": "topk",
                   "spec": {"k": 4}, "final_metrics": {"val/explained_variance": 0.91234, "metrics/explained_variance":
                                                        0.5, "metrics/l0": 4.0, "val/ce_loss_score": 0.87654,
                                                        "losses/mse_loss": 0.1}}


@pytest.fixture(scope="module")
def exported_sae(tmp_path_factory):
    torch.manual_seed(3)
    s = build_sae(SAEConfig(architecture="topk", d_in=64, d_sae=20, k=4))
    out = tmp_path_factory.mktemp("exported") / "sae"
    return save_sae(s, out, metadata=EXPORT_METADATA)


def test_viz_command_end_to_end(exported_sae, nanochat_current_dir, tiny_shards_dir, tmp_path):
    out = tmp_path / "site"
    argv = ["viz", "--sae", str(exported_sae), "--model", str(nanochat_current_dir), "--data", str(tiny_shards_dir),
            "--tokens", "300", "--out", str(out), "--features", "0-7,12"]
    assert main(argv) == 0
    pages = sorted(int(p.stem) for p in (out / "features").iterdir())
    assert pages == [0, 1, 2, 3, 4, 5, 6, 7, 12]
    index = (out / "index.html").read_text()
    rows = json.loads(re.search(r'id="data">(.*?)</script>', index, re.S).group(1))["rows"]
    assert [r["index"] for r in rows] == pages
    assert "d_sae: 20 | context_size: 32" in index
    assert sum(r["density"] for r in rows) > 0 and all(r["density"] <= 1 for r in rows)
    assert main(argv[:-2] + ["--features", "0-40"]) == 2  # the SAE has 20 latents (d_in 64): one-line error
    assert (out / "features" / "12.html").exists()  # and the earlier output is untouched


# ---------------------------------------------------------------------------------------------
# Nearest and co-firing latents, the SAE-wide density


def test_nearest_latents_equal_a_direct_cosine_computation(sae):
    W = sae.W_dec.detach()  # [d_sae, d_in]
    direct = torch.nn.functional.cosine_similarity(W.unsqueeze(1), W.unsqueeze(0), dim=-1)  # all pairs [24, 24]
    direct.fill_diagonal_(float("-inf"))
    want_cos, want_idx = direct.topk(5, dim=1)
    for block in (24 * 3, 10**6):  # three latents per block (eight blocks), and all at once
        cos, idx = nearest_latents(W, torch.arange(24), 5, block=block)
        assert torch.allclose(cos, want_cos, atol=1e-5)
        assert torch.equal(idx, want_idx)  # distinct cosines here: the same latents in the same order
        assert not (idx == torch.arange(24).unsqueeze(1)).any()  # never itself
    assert len(set(want_cos.flatten().tolist())) > 50 and float(want_cos.max()) > 0.2  # real, spread values
    cos, idx = nearest_latents(W, torch.tensor([7, 2]), 3, block=24)  # a subset: the same rows
    assert torch.equal(idx, want_idx[[7, 2], :3]) and torch.allclose(cos, want_cos[[7, 2], :3], atol=1e-5)


def _direct_cofire(rows, n):
    """From the dense activations of every token: counts[f, j] = tokens where both fire, and each latent's
    top n partners (count desc, then the rarer latent, then the lower index)."""
    z = torch.cat([acts for _, acts in rows])
    A = (z > 0).double()
    counts, n_fire = (A.T @ A).long(), A.sum(0).long()
    tops = []
    for f in range(z.shape[1]):
        partners = sorted((j for j in range(z.shape[1]) if j != f and counts[f, j] > 0),
                          key=lambda j: (-int(counts[f, j]), int(n_fire[j]), j))[:n]
        tops.append([(j, int(counts[f, j])) for j in partners])
    return counts, n_fire, tops


def _cofire_lists(stats):
    return [[(j, c) for j, c in zip(js, cs) if j >= 0]
            for js, cs in zip(stats.cofire_latents.tolist(), stats.cofire_counts.tolist())]


def test_cofire_counts_equal_a_direct_computation(streamed):
    stats, rows = streamed
    counts, n_fire, tops = _direct_cofire(rows, CFG.n_neighbours)
    assert torch.equal(stats.n_fire_all, n_fire) and torch.equal(stats.n_fire, n_fire)
    assert _cofire_lists(stats) == tops
    assert sum(len(t) for t in tops) > 60 and max(c for t in tops for _, c in t) > 50  # real co-firing
    # ties at equal counts exist here, so the order rule is exercised
    assert any(a[1] == b[1] for t in tops for a, b in zip(t, t[1:]))


def test_cofire_in_blocks_with_extra_passes_and_progress(model, sae, tokenizer, tiny_shards_dir, streamed):
    _, rows = streamed
    bars = []

    class Bar:
        def __init__(self, desc):
            self.desc, self.n = desc, 0
            bars.append(self)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n):
            self.n += n

    cfg = replace(CFG, cofire_budget=24 * 5)  # 5 latents x 24 counts at a time: 5 blocks, 3 extra passes
    features = [0, 3, 4, 9, 10, 11, 15, 16, 17, 18, 19, 20, 21, 22, 23, 1, 2, 5, 6, 7, 8, 12, 13, 14][:21]
    stats = collect_stats(model, sae, HOOK, lambda: _batches(tokenizer, tiny_shards_dir), tokenizer.bos_id,
                          features, cfg, progress=Bar)
    assert stats.n_passes == 5
    assert [b.desc for b in bars] == ["pass 1/5: densities, top contexts", "pass 2/5: histograms, samples",
                                      "pass 3/5: co-firing", "pass 4/5: co-firing", "pass 5/5: co-firing"]
    assert [b.n for b in bars] == [N_ROWS * CONTEXT] * 5  # each bar counts every token position once
    _, n_fire, tops = _direct_cofire(rows, CFG.n_neighbours)
    assert _cofire_lists(stats) == [tops[f] for f in features]
    assert torch.equal(stats.n_fire_all, n_fire)  # every latent's density, not only the chosen ones'


def test_records_carry_nearest_and_cofire_figures(streamed, model, sae, tokenizer):
    stats, rows = streamed
    records = _records(streamed, model, sae, tokenizer)
    cos, idx = nearest_latents(sae.W_dec, torch.arange(24), CFG.n_neighbours)
    counts, n_fire, tops = _direct_cofire(rows, CFG.n_neighbours)
    for f, rec in enumerate(records):
        assert [j for j, _ in rec["nearest"]] == idx[f].tolist()
        assert [c for _, c in rec["nearest"]] == pytest.approx(cos[f].tolist(), abs=1e-3)
        assert rec["cofire"] == [[j, c, pytest.approx(c / int(n_fire[f]), rel=1e-3),
                                  pytest.approx(c / int(n_fire[j]), rel=1e-3)] for j, c in tops[f]]


def test_density_histogram_equals_a_direct_count(streamed):
    stats, rows = streamed
    z = torch.cat([acts for _, acts in rows])
    density = (z > 0).double().sum(0) / stats.n_tokens
    hist = density_histogram(stats.n_fire_all, stats.n_tokens)
    lo = math.floor(math.log10(1 / stats.n_tokens))
    assert hist["edges"] == [lo + j / 4 for j in range(-lo * 4 + 1)] and hist["edges"][-1] == 0
    direct = [0] * (-lo * 4)
    for d in density.tolist():
        if d > 0:
            x = math.log10(d)
            j = next(j for j in range(len(direct)) if x < hist["edges"][j + 1] or j == len(direct) - 1)
            direct[j] += 1
    assert hist["heights"] == direct
    assert hist["dead"] == int((density == 0).sum()) and sum(direct) + hist["dead"] == 24
    assert sum(h > 0 for h in direct) >= 3  # the fixture's densities spread over several bins


def test_export_figures_pick_val_first():
    figures = export_figures(EXPORT_METADATA)
    assert figures["training"] == [["training steps", 30, "training_steps"], ["training tokens", 122880,
                                   "training_tokens"], ["final metrics at step", 30, "final_metrics_step"],
                                   ["architecture", "topk", "saelightning_architecture"],
                                   ["k (active latents per token)", 4, "spec.k"]]
    assert figures["metrics"] == [["explained variance", 0.91234, "val/explained_variance"],
                                  ["L0", 4.0, "metrics/l0"], ["CE loss score", 0.87654, "val/ce_loss_score"]]
    assert [k for k, _ in figures["all"]] == sorted(EXPORT_METADATA["final_metrics"])
    assert export_figures({"final_metrics": {"val/mse": float("nan")}})["metrics"] == [["MSE", None, "val/mse"]]
    assert export_figures({}) == {"training": [], "metrics": [], "all": []}


# ---------------------------------------------------------------------------------------------
# The pages, parsed as HTML (no browser)


class Tokens(HTMLParser):
    """Every <span class="tok ..."> of a page: classes, title, runs [(is_glyph, text)] and the id of the
    nearest enclosing element that has one."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tokens, self._stack = [], []  # stack: (tag, id in force, is a ws span, token number or None)
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        cls = (a.get("class") or "").split()
        where = a.get("id") or (self._stack[-1][1] if self._stack else None)
        number = None
        if tag == "span" and "tok" in cls:
            number = len(self.tokens)
            self.tokens.append({"cls": cls, "title": a.get("title"), "parts": [], "in": where})
        self._stack.append((tag, where, "ws" in cls, number))

    def handle_endtag(self, tag):
        while self._stack and self._stack.pop()[0] != tag:
            pass

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        self.handle_endtag(tag)

    def handle_data(self, data):
        open_tokens = [k for k, entry in enumerate(self._stack) if entry[3] is not None]
        if not open_tokens:
            return
        at = open_tokens[-1]
        glyph = any(entry[2] for entry in self._stack[at + 1:])
        parts = self.tokens[self._stack[at][3]]["parts"]
        if parts and parts[-1][0] == glyph:
            parts[-1] = (glyph, parts[-1][1] + data)
        else:
            parts.append((glyph, data))


# the tokens that must look different: (text, as a chip, inside a context) as (is_glyph, text) runs
WHITESPACE = [
    (" ", [(True, "\u00b7")], [(True, "\u00b7")]),
    ("    ", [(True, "\u00b7" * 4)], [(True, "\u00b7" * 4)]),
    ("\t", [(True, "\u2192")], [(True, "\u2192")]),
    ("\n", [(True, "\u21b5")], [(True, "\u21b5")]),
    ("\n\n", [(True, "\u21b5\u21b5")], [(True, "\u21b5\u21b5")]),
    ("", [(True, "\u2205")], [(True, "\u2205")]),
    (" the", [(True, "\u00b7"), (False, "the")], [(False, " the")]),
    ("\u00a0", [(True, "\\u00a0")], [(True, "\\u00a0")]),
    ("x\ty", [(False, "x"), (True, "\u2192"), (False, "y")], [(False, "x"), (True, "\u2192"), (False, "y")]),
]


def test_token_repr_is_the_exact_text():
    assert [token_repr(t) for t, _, _ in WHITESPACE] == [
        '" "', '"    "', '"\\t"', '"\\n"', '"\\n\\n"', '""', '" the"', '"\\u00a0"', '"x\\ty"']
    assert token_repr('a"b\\c</span>') == '"a\\"b\\\\c</span>"'
    assert json.loads(token_repr(" \t\n\u00a0\u200b")) == " \t\n\u00a0\u200b"  # a JSON string literal


def test_whitespace_tokens_render_distinctly_in_html():
    shown = set()
    for text, chip, ctx in WHITESPACE:
        for markup, want in ((token_html(text), chip), (token_html(text, "", standalone=False), ctx)):
            (tok,) = Tokens(markup).tokens
            assert tok["parts"] == want, text
            assert tok["title"] == token_repr(text)
        shown.add(tuple(chip))
    assert len(shown) == len(WHITESPACE)  # no two look the same
    (tok,) = Tokens(token_html("<b>&")).tokens
    assert tok["parts"] == [(False, "<b>&")] and "<b>" not in token_html("<b>&")


def _ws_records(streamed, model, sae, tokenizer):
    """Records in which latent 0's top logits and the tokens of its top contexts are whitespace tokens."""
    stats, _ = streamed
    effects = logit_effect(model, sae, HOOK, stats.features, CFG)
    plant = {}
    # latent 0's boosted then suppressed tokens: every case, in order
    for k, t in enumerate(effects[1][0].tolist() + effects[3][0].tolist()):
        plant[t] = WHITESPACE[k % len(WHITESPACE)][0]
    ctx_ids = [t for t in dict.fromkeys(stats.top.tokens[0].flatten().tolist()) if t >= 0 and t not in plant]
    for k, t in enumerate(ctx_ids):  # the tokens of its top contexts: the whitespace-only cases
        plant[t] = WHITESPACE[k % 5][0]

    def token_str(i):
        return plant.get(i, tokenizer.token_str(i))

    records = feature_records(stats, effects, token_str, nearest_latents(sae.W_dec, stats.features, CFG.n_neighbours))
    return records, plant


def test_feature_page_html_shows_whitespace_tokens_distinctly(streamed, model, sae, tokenizer, tmp_path):
    records, _ = _ws_records(streamed, model, sae, tokenizer)
    write_site(tmp_path / "site", {"title": "ws", "n_tokens": streamed[0].n_tokens}, records)
    page = (tmp_path / "site" / "features" / "0.html").read_text()
    chips = [t for t in Tokens(page).tokens if t["in"] in ("pos", "neg")]
    want = {token_repr(text): parts for text, parts, _ in WHITESPACE}
    logits = records[0]["logits"]["pos"] + records[0]["logits"]["neg"]
    assert [t["title"] for t in chips] == [token_repr(t) for t, _ in logits]
    assert {t for t, _ in logits} == {t for t, _, _ in WHITESPACE}  # every case is on the page
    assert [t["parts"] for t in chips] == [want[t["title"]] for t in chips]
    assert chips[0]["parts"][0][1].strip()  # the top boosted token (" ") is never an empty box


def _svg_bars(page: str, svg_id: str) -> list[int]:
    svg = re.search(rf'<svg id="{svg_id}".*?</svg>', page, re.S).group(0)
    return [int(c) for c in re.findall(r'data-count="(\d+)"', svg)]


def _svg_ticks(page: str, svg_id: str, axis: str) -> list[str]:
    svg = re.search(rf'<svg id="{svg_id}".*?</svg>', page, re.S).group(0)
    return re.findall(rf'<text class="{axis}"[^>]*>([^<]*)</text>', svg)


def _rows(page: str, table_id: str) -> list[list[str]]:
    """The text of each cell of a table's body rows."""
    body = re.search(rf'<table id="{table_id}">.*?<tbody>(.*?)</tbody>', page, re.S).group(1)

    class Cells(HTMLParser):
        def __init__(self):
            super().__init__(convert_charrefs=True)
            self.rows, self.cell = [], None

        def handle_starttag(self, tag, attrs):
            if tag == "tr":
                self.rows.append([])
            elif tag in ("td", "th"):
                self.cell = []
                self.rows[-1].append(self.cell)

        def handle_data(self, data):
            if self.cell is not None:
                self.cell.append(data)

    parser = Cells()
    parser.feed(body)
    return [["".join(c) for c in row] for row in parser.rows]


def test_feature_page_lists_nearest_and_cofire_and_draws_histograms(streamed, model, sae, tokenizer, tmp_path):
    stats, rows = streamed
    records = _records(streamed, model, sae, tokenizer)
    write_site(tmp_path / "site", {"title": "t", "n_tokens": stats.n_tokens}, records[:12])  # latents 0-11 only
    counts, n_fire, tops = _direct_cofire(rows, CFG.n_neighbours)
    cos, idx = nearest_latents(sae.W_dec, torch.arange(24), CFG.n_neighbours)
    for f in (0, 5):
        page = (tmp_path / "site" / "features" / f"{f}.html").read_text()
        near = _rows(page, "nearest")
        assert [int(r[0]) for r in near] == idx[f].tolist()
        assert [r[1] for r in near] == [fmt(c) for _, c in records[f]["nearest"]]
        assert [float(r[1]) for r in near] == pytest.approx(cos[f].tolist(), abs=2e-3)
        co = _rows(page, "cofire")
        assert [(int(r[0]), int(r[1].replace(",", ""))) for r in co] == tops[f]
        assert [float(r[2].rstrip("%")) for r in co] == pytest.approx([100 * c / int(n_fire[f]) for _, c in tops[f]],
                                                                      rel=2e-3)
        for j in [int(r[0]) for r in near + co]:  # a link only to the latents that have a page
            linked = re.search(rf'<tr data-latent="{j}"><td class="num"><a href="{j}.html">{j}</a>', page)
            assert (linked is not None) == (j < 12), j
        # the histograms: one bar per bin carrying its count, and tick labels on both axes
        assert _svg_bars(page, "act-hist-svg") == records[f]["hist"]["heights"]
        assert _svg_bars(page, "logit-hist-svg") == records[f]["logits"]["hist"]["heights"]
        assert sum(_svg_bars(page, "logit-hist-svg")) == model.config.vocab_size
        yt = [float(t.rstrip("k")) for t in _svg_ticks(page, "act-hist-svg", "ytick")]
        assert yt[0] == 0 and yt[-1] >= max(records[f]["hist"]["heights"]) and len(yt) >= 3
        xt = [float(t) for t in _svg_ticks(page, "act-hist-svg", "xtick")]
        assert xt[0] == 0 and xt[-1] <= records[f]["max_act"] * (1 + 1e-3) and len(xt) >= 3
        assert "status:" not in page and ">rendered<" not in page  # no stray status line



def _viz(exported_sae, nanochat_current_dir, tiny_shards_dir, out, *extra):
    return main(["viz", "--sae", str(exported_sae), "--model", str(nanochat_current_dir), "--data",
                 str(tiny_shards_dir), "--tokens", "300", "--out", str(out), "--quiet", *extra])


def _index_rows(out) -> dict[int, dict]:
    index = (out / "index.html").read_text()
    return {r["index"]: r for r in json.loads(re.search(r'id="data">(.*?)</script>', index, re.S).group(1))["rows"]}


def _note_on(page: str) -> str | None:
    found = re.search(r'<p id="note" class="note">(.*?)</p>', page, re.S)
    return None if found is None else html.unescape(found.group(1))


def test_index_shows_the_density_histogram_and_the_export_figures(exported_sae, nanochat_current_dir,
                                                                  tiny_shards_dir, tmp_path):
    out = tmp_path / "site"
    assert _viz(exported_sae, nanochat_current_dir, tiny_shards_dir, out) == 0  # all 20 latents
    index = (out / "index.html").read_text()
    figures = {r[2]: r[1] for r in _rows(index, "figures")}  # key -> value as shown
    assert figures == {"training_steps": "30", "training_tokens": "122,880", "final_metrics_step": "30",
                       "saelightning_architecture": "topk", "spec.k": "4", "val/explained_variance": "0.9123",
                       "metrics/l0": "4", "val/ce_loss_score": "0.8765"}
    assert "losses/mse_loss" in index  # in the list of every final metric
    # the SAE-wide histogram (every latent's count from pass 1) against the densities of the latents' rows
    meta = json.loads((out / "saelightning-output.json").read_text())["meta"]
    rows = _index_rows(out)
    lo = math.floor(math.log10(1 / meta["n_tokens"]))
    direct = [0] * (-4 * lo)
    for r in rows.values():
        if r["density"] > 0:
            direct[min(math.floor((math.log10(r["density"]) - lo) * 4), len(direct) - 1)] += 1
    dead = sum(r["density"] == 0 for r in rows.values())
    assert _svg_bars(index, "density-hist") == direct and sum(direct) + dead == 20 and sum(direct) > 5
    assert _svg_ticks(index, "density-hist", "xtick") == [str(t) for t in range(lo, 1)]
    caption = re.search(r'id="density-caption">(.*?)</p>', index).group(1)
    assert caption.startswith(f"{20 - dead} of 20 latents fired on the {meta['n_tokens']:,} tokens read; {dead} never")


def test_notes_survive_a_rerun_and_show_on_the_pages(exported_sae, nanochat_current_dir, tiny_shards_dir,
                                                      tmp_path, capsys):
    out = tmp_path / "site"
    assert _viz(exported_sae, nanochat_current_dir, tiny_shards_dir, out, "--features", "0-5") == 0
    assert not (out / NOTES_FILE).exists() and _note_on((out / "features" / "3.html").read_text()) is None
    notes = {"3": "fires on <b>def</b> & \"quotes\"\nline two", "12": "a latent without a page"}
    (out / NOTES_FILE).write_text(json.dumps(notes, indent=1))
    written = (out / NOTES_FILE).read_bytes()
    assert _viz(exported_sae, nanochat_current_dir, tiny_shards_dir, out, "--features", "0-5") == 0
    assert (out / NOTES_FILE).read_bytes() == written  # carried over as it was
    assert _note_on((out / "features" / "3.html").read_text()) == notes["3"]  # shown, as text
    assert "<b>def</b>" not in (out / "features" / "3.html").read_text()
    assert all(_note_on((out / "features" / f"{i}.html").read_text()) is None for i in (0, 1, 2, 4, 5))
    assert {i: r["note"] for i, r in _index_rows(out).items()} == {0: "", 1: "", 2: "", 3: notes["3"], 4: "", 5: ""}
    # the server's helper: one note saved, the two pages that show it re-rendered from their own data
    before = {i: (out / "features" / f"{i}.html").read_text() for i in range(6)}
    assert set_note(out, 2, "second") == {"2": "second", "3": notes["3"], "12": notes["12"]}
    assert read_notes(out) == {"2": "second", "3": notes["3"], "12": notes["12"]}
    after = (out / "features" / "2.html").read_text()
    assert _note_on(after) == "second"
    assert after.replace('<h2>Note</h2><p id="note" class="note">second</p>', "") == before[2]  # only the note added
    assert all((out / "features" / f"{i}.html").read_text() == before[i] for i in (0, 1, 3, 4, 5))
    set_note(out, 3, "")  # an empty note removes it
    assert _note_on((out / "features" / "3.html").read_text()) is None
    assert {i: r["note"] for i, r in _index_rows(out).items() if r["note"]} == {2: "second"}
    assert read_notes(out) == {"2": "second", "12": notes["12"]}
    # a notes.json that is not an object of notes is kept as it is (and not shown)
    (out / NOTES_FILE).write_text("{not json")
    assert _viz(exported_sae, nanochat_current_dir, tiny_shards_dir, out, "--features", "0-5") == 0
    assert (out / NOTES_FILE).read_text() == "{not json"
    assert "notes not shown" in capsys.readouterr().err
    assert _note_on((out / "features" / "2.html").read_text()) is None


def test_write_site_carries_notes_json_over(streamed, model, sae, tokenizer, tmp_path):
    records = _records(streamed, model, sae, tokenizer)
    meta = {"title": "t", "n_tokens": streamed[0].n_tokens}
    write_site(tmp_path / "site", meta, records)
    (tmp_path / "site" / NOTES_FILE).write_text('{"4": "four", "7": "seven\\n"}')
    write_site(tmp_path / "site", meta, records)  # the directory is replaced whole: notes.json goes with it
    assert (tmp_path / "site" / NOTES_FILE).read_text() == '{"4": "four", "7": "seven\\n"}'
    assert _note_on((tmp_path / "site" / "features" / "7.html").read_text()) == "seven\n"
    assert {i for i, r in _index_rows(tmp_path / "site").items() if r["note"]} == {4, 7}


# ---------------------------------------------------------------------------------------------
# Conversations in the val rows (--chat, --chat_fraction; by default the SAE's data.chat)


def _page_tokens(page: str) -> list[str]:
    """Every token string of a feature page's top contexts (its embedded JSON)."""
    data = json.loads(re.search(r'id="data">(.*?)</script>', page, re.S).group(1))
    return [tok for ctx in data["feature"]["top"] for tok in ctx["tokens"]]


def test_viz_and_neuronpedia_show_a_chat_mix_in_nanochats_conversation_format(exported_sae, nanochat_current_dir,
                                                                               tiny_shards_dir, tmp_path):
    chat = tmp_path / "chat.jsonl"
    chat.write_text("\n".join(json.dumps([{"role": "user", "content": f"what does f{i}() return?"},
                                          {"role": "assistant", "content": f"f{i}() returns {i}"}])
                              for i in range(40)))
    pages = {}
    for fraction in ("1", "0"):
        out = tmp_path / f"site{fraction}"
        assert _viz(exported_sae, nanochat_current_dir, tiny_shards_dir, out, "--features", "0-9", "--chat",
                    str(chat), "--chat_fraction", fraction) == 0
        pages[fraction] = {int(p.stem): p.read_text() for p in (out / "features").iterdir()}
    markers = {"<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>"}
    fired = {i: page for i, page in pages["1"].items() if _page_tokens(page)}
    assert len(fired) >= 5
    for i, page in fired.items():  # conversations only: each latent's contexts are in them, the markers as text
        shown = markers & set(_page_tokens(page))
        assert shown, i
        assert any(html.escape(m, quote=False) in page for m in shown), i  # rendered server-side, escaped
    assert "chat: " in pages["1"][0] and "chat_fraction 1.0" in pages["1"][0]
    texts = [_page_tokens(page) for page in pages["0"].values()]
    assert any(texts) and not any(markers & set(t) for t in texts)  # --chat_fraction 0: the val shard alone
    # without the flags, the mix the export records (data.chat, data.chat_fraction), as eval and diff read it
    sae = load_sae(exported_sae)
    trained = save_sae(sae, tmp_path / "chat_sae", metadata={**EXPORT_METADATA, "trained_on": {
        "model": str(nanochat_current_dir), "data": str(tiny_shards_dir), "chat": str(chat), "chat_fraction": 1.0}})
    assert main(["viz", "--sae", str(trained), "--tokens", "300", "--out", str(tmp_path / "recorded"), "--quiet",
                 "--features", "0-9"]) == 0
    recorded = {int(p.stem): _page_tokens(p.read_text()) for p in (tmp_path / "recorded" / "features").iterdir()}
    assert recorded == {i: _page_tokens(page) for i, page in pages["1"].items()}
    np_out = tmp_path / "np"
    assert main(["neuronpedia", "--sae", str(exported_sae), "--model", str(nanochat_current_dir), "--data",
                 str(tiny_shards_dir), "--tokens", "300", "--out", str(np_out), "--features", "0-9", "--quiet",
                 "--chat", str(chat), "--chat_fraction", "1"]) == 0
    features = json.loads((np_out / "batch-0.json").read_text())["features"]
    assert all(f["dataset"].endswith(f"chat {chat} (chat_fraction 1.0)") for f in features)
    assert any(markers & set(a["tokens"]) for f in features for a in f["activations"])
