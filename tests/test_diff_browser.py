"""The `saelightning diff --site` pages in Chromium: they load with no JS error, a planted <script> token is shown as
text and never runs, the index is sorted by Δ and a latent page shows every model side by side."""

import html
import re

import pytest
import torch

from saelightning.diffsite import Contexts, index_page, latent_page, pick_latents
from tests.test_browser import CHROMIUM, assert_clean, dump_dom
from tests.test_dashboards import PLANTED

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed: `make browser`")


def _report():
    lat = [{"latent": i, "delta": d, "cosine": 0.5, "class": c, "density": 0.01, "max_activation": 2.0,
            "beta_reconstruction": [0.1, 1.0], "beta_error": [0.0, 1.0], "nu_reconstruction": 0.1, "nu_error": 0.0,
            "fires_on": {"text": 1, "user": 2, "assistant": 3, "chat_markers": 1}}
           for i, (d, c) in enumerate([(0.5, "shared"), (0.97, "chat-only"), (0.03, "base-only"), (0.7, "other")])]
    return {"sae": "dir/<b>cc</b>", "hook_name": "blocks.1.hook_resid_post", "a": "base", "b": "chat",
            "models": [{"name": "base", "path": "<i>p</i>", "step": 1}, {"name": "chat", "path": "q", "step": 2}],
            "tokens_evaluated": 100, "class_counts": {"base-only": 1, "chat-only": 1, "shared": 1, "other": 1},
            "explained_variance": {"base": 0.9, "chat": 0.8}, "latents": lat}


def test_pick_latents_takes_the_most_model_specific_by_delta():
    assert pick_latents(torch.tensor([0.5, 0.97, 0.03, 0.7]), 3).tolist() == [1, 3, 2]


def test_diff_site_pages_render_in_chromium_with_text_escaped(tmp_path):
    report = _report()
    chosen = [report["latents"][i] for i in pick_latents(torch.tensor([r["delta"] for r in report["latents"]]), 4)]
    (tmp_path / "index.html").write_text(index_page(report, chosen))
    dom = dump_dom((tmp_path / "index.html").as_uri(), tmp_path)
    assert_clean(dom)
    body = dom.split('<table id="latents">')[1]
    assert [int(i) for i in re.findall(r'<a href="latents/(\d+)\.html">', body)] == [1, 3, 0, 2]  # by Δ
    assert "&lt;b&gt;cc&lt;/b&gt;" in dom and "<b>cc</b>" not in dom
    context = {"at": 1, "value": 2.0, "tokens": ["a", PLANTED, "c"], "f": [0.0, 2.0, 1.0],
               "parts": [[0.1, 1.5, -0.2], [0.0, -0.3, 0.9]]}
    effects = {"base": {"pos": [(PLANTED, 1.0)], "neg": [("x", -1.0)]}, "chat": {"pos": [("y", 2.0)], "neg": []}}
    (tmp_path / "1.html").write_text(latent_page(report, report["latents"][1], [context], effects))
    dom = dump_dom((tmp_path / "1.html").as_uri(), tmp_path)
    assert_clean(dom)
    table = dom.split('<table class="context">')[1].split("</table>")[0]
    assert re.findall(r"<th>(.*?)</th>", table) == ["token", "f", "from base", "from chat"]  # side by side
    assert table.count("<tr") == 4 and html.escape(PLANTED, quote=False) in table
    assert dom.count('class="logits"') == 4 and 'data-model="chat"' in dom
    assert "chat-only" in dom and "firings on assistant" in dom


def test_contexts_keep_each_latents_top_positions_with_every_models_part():
    class CC:  # two models of width 2, no encoder shift
        d_model, n_models, encoder_shift = 2, 2, None
        W_enc = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 2.0], [0.0, 0.0]])  # latent 0 reads model 0, 1 model 1

    gathered = Contexts(torch.tensor([1, 0]), 2, top=2)
    batch = torch.tensor([[0, 5, 6, 7]])  # BOS (0) first
    keep = batch.reshape(-1) != 0
    x = torch.tensor([[1.0, 0, 3, 0], [2, 0, 1, 0], [0.5, 0, 4, 0]])
    f = torch.tensor([[1.0, 6.0], [2.0, 2.0], [0.5, 8.0]])
    gathered.update(CC, batch, keep, x, f)
    top = gathered.contexts(0, str, before=1, after=0)  # latent 1
    assert [c["value"] for c in top] == [8.0, 6.0]
    assert top[0]["tokens"] == ["6", "7"] and top[0]["parts"] == [[0.0, 0.0], [2.0, 8.0]]
    assert gathered.contexts(1, str, before=3, after=0)[0]["parts"][0] == [0.0, 1.0, 2.0]
