"""Dashboards: the streaming statistics against a direct computation over all activations, the
logit effect against its formula, the static site's escaping, and the `viz` command end to end."""

import json
import math
import re

import pytest
import torch

from saelightning.atomic import atomic_dir
from saelightning.dashboards import parse_features
from saelightning.dashboards.html import embed_json, write_site
from saelightning.dashboards.records import feature_records
from saelightning.dashboards.stats import (
    GroupTopK,
    StatsConfig,
    collect_stats,
    density_summary,
    latents_of,
    logit_effect,
)
from saelightning.errors import SAELightningError
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
                  n_bins=8, before=3, after=2, n_logits=5, logit_bins=10)


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

    return feature_records(stats, logit_effect(model, sae, HOOK, stats.features, CFG), token_str)


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


@pytest.fixture(scope="module")
def exported_sae(tmp_path_factory):
    from saelightning.export import save_sae

    torch.manual_seed(3)
    s = build_sae(SAEConfig(architecture="topk", d_in=64, d_sae=20, k=4))
    out = tmp_path_factory.mktemp("exported") / "sae"
    return save_sae(s, out, metadata={"hook_name": "blocks.1.hook_resid_post", "context_size": 32})



def test_viz_command_end_to_end(exported_sae, nanochat_current_dir, tiny_shards_dir, tmp_path):
    from saelightning.cli import main

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
