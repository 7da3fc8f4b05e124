"""The dashboard site in a real browser: Debian's chromium, headless, pages opened from file://.

Each page's own JS marks <body data-rendered="ok"> when it finished, and an error trap that runs
first writes any JS error to <html data-js-errors>; --dump-dom gives the DOM after load.
"""

import html
import os
import re
import shutil
import subprocess

import pytest

from saelightning.cli import main
from saelightning.dashboards.html import NOTES_FILE, _page, token_html, token_repr, write_site
from tests.test_dashboards import (  # noqa: F401
    CFG,
    HOOK,
    PLANTED,
    WHITESPACE,
    Tokens,
    _records,
    _ws_records,
    exported_sae,
    model,
    sae,
    streamed,
    tokenizer,
)

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Debian's chromium is not installed and could not be: `make browser` installs it "
           "(apt-get, as root); `make test` runs that first")


def dump_dom(url: str, tmp_path) -> str:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--no-first-run", "--disable-extensions",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", "--dump-dom", url]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "<html" in done.stdout, done.stderr[-2000:]
    return done.stdout


def _tag(dom: str, name: str) -> str:
    return re.search(rf"<{name}\b[^>]*>", dom).group(0)


def assert_clean(dom: str) -> None:
    root = _tag(dom, "html")
    assert "data-js-errors" not in root, root
    assert "data-pwned" not in root  # the planted <script> token did not run
    assert 'data-rendered="ok"' in _tag(dom, "body")  # the page's JS ran to its end


@pytest.fixture(scope="module")
def site(streamed, model, sae, tokenizer, tmp_path_factory):  # noqa: F811
    records = _records(streamed, model, sae, tokenizer)
    out = tmp_path_factory.mktemp("browser") / "site"
    write_site(out, {"title": "browser test", "n_tokens": streamed[0].n_tokens, "hook_name": HOOK}, records)
    return out, records


def _row_indices(dom: str) -> list[int]:
    body = dom.split('<table id="latents">')[1].split("<tbody>")[1].split("</tbody>")[0]
    return [int(i) for i in re.findall(r'<a href="features/(\d+)\.html">', body)]


def test_index_renders_sorts_and_filters(site, tmp_path):
    out, records = site
    dom = dump_dom((out / "index.html").as_uri(), tmp_path)
    assert_clean(dom)
    by_density = sorted(records, key=lambda r: (-r["density"], -r["index"]))
    assert _row_indices(dom) == [r["index"] for r in by_density]  # default: densest first
    assert html.escape(PLANTED, quote=False) in dom  # the planted token is shown as text
    dom = dump_dom((out / "index.html").as_uri() + "#sort=max_act&asc=1", tmp_path)
    assert_clean(dom)
    assert _row_indices(dom) == [r["index"] for r in sorted(records, key=lambda r: (r["max_act"], r["index"]))]
    dom = dump_dom((out / "index.html").as_uri() + "#q=pwned", tmp_path)
    assert_clean(dom)
    want = {r["index"] for r in records if PLANTED in r["top_tokens"]}
    assert want and set(_row_indices(dom)) == want


def test_feature_page_renders_contexts_and_no_script_runs(site, tmp_path):
    out, records = site
    dom = dump_dom((out / "features" / "0.html").as_uri(), tmp_path)
    assert_clean(dom)
    rec = records[0]
    n_contexts = len(rec["top"]) + sum(len(b["contexts"]) for b in rec["intervals"])
    assert dom.count('<div class="ctx">') == n_contexts > CFG.top_k
    hits = re.findall(r'<span class="tok hit"[^>]*>(.*?)</span>', dom)
    assert len(hits) == n_contexts
    assert hits[0] == html.escape(PLANTED, quote=False)  # the top context's token, as text
    assert dom.count("<rect") == CFG.n_bins + CFG.logit_bins  # both histograms drawn
    assert 'id="status"' not in dom and "status:" not in dom  # no stray status line


def test_error_trap_reports_js_errors(tmp_path):
    # the check above can fail: a page whose script throws is reported
    (tmp_path / "broken.html").write_text(_page("broken", "", "", {}, "undefinedFunction();", "test"))
    dom = dump_dom((tmp_path / "broken.html").as_uri(), tmp_path)
    assert "undefinedFunction is not defined" in _tag(dom, "html")
    assert 'data-rendered="ok"' not in _tag(dom, "body")


def test_planted_token_would_run_if_not_escaped(tmp_path):
    # control for the checks above: the same text written raw into a page does execute
    (tmp_path / "raw.html").write_text(_page("raw", "", PLANTED, {}, "finished();", "test"))
    dom = dump_dom((tmp_path / "raw.html").as_uri(), tmp_path)
    assert "data-pwned" in _tag(dom, "html")


def test_viz_output_of_a_real_checkpoint_renders(exported_sae, nanochat_current_dir, tiny_shards_dir, tmp_path):  # noqa: F811
    out = tmp_path / "site"
    assert main(["viz", "--sae", str(exported_sae), "--model", str(nanochat_current_dir), "--data",
                 str(tiny_shards_dir), "--tokens", "300", "--out", str(out), "--features", "0-5"]) == 0
    dom = dump_dom((out / "index.html").as_uri(), tmp_path)
    assert_clean(dom)
    assert sorted(_row_indices(dom)) == list(range(6))
    fired = next(i for i in range(6) if '"top":[]' not in (out / "features" / f"{i}.html").read_text())
    dom = dump_dom((out / "features" / f"{fired}.html").as_uri(), tmp_path)
    assert_clean(dom)
    assert dom.count('<div class="ctx">') >= 1 and dom.count('class="tok hit"') == dom.count('<div class="ctx">')


def test_whitespace_tokens_are_distinct_in_the_dom(streamed, model, sae, tokenizer, tmp_path):  # noqa: F811
    records, plant = _ws_records(streamed, model, sae, tokenizer)
    write_site(tmp_path / "site", {"title": "ws", "n_tokens": streamed[0].n_tokens}, records)
    dom = dump_dom((tmp_path / "site" / "features" / "0.html").as_uri(), tmp_path)
    assert_clean(dom)
    chip = {token_repr(t): parts for t, parts, _ in WHITESPACE}
    ctx = {token_repr(t): parts for t, _, parts in WHITESPACE}
    tokens = Tokens(dom).tokens
    chips = [t for t in tokens if t["in"] in ("pos", "neg")]
    assert [t["title"] for t in chips] == [token_repr(t) for t, _ in records[0]["logits"]["pos"] +
                                           records[0]["logits"]["neg"]]
    assert [t["parts"] for t in chips] == [chip[t["title"]] for t in chips]
    # the contexts, drawn by the page's JS: title = exact text + " : " + activation
    drawn = [t for t in tokens if t["in"] in ("top", "intervals")]
    assert len(drawn) > 50
    seen = set()
    for t in drawn:
        text, _, value = t["title"].rpartition(" : ")
        float(value)
        if text in ctx:
            assert t["parts"] == ctx[text], text
            seen.add(text)
    assert seen == {token_repr(t) for t, _, _ in WHITESPACE[:5]}  # " ", "    ", "\t", "\n", "\n\n" all drawn
    shown = {text: tuple(t["parts"]) for t in drawn for text in [t["title"].rpartition(" : ")[0]] if text in seen}
    assert len(set(shown.values())) == len(seen)  # and no two alike


def test_js_and_python_draw_tokens_alike(tmp_path):
    texts = [t for t, _, _ in WHITESPACE] + ["<b>x</b>", 'q"\\', "\u200bz", "caf\u00e9 \U0001f600"]
    py = "".join(token_html(t) + token_html(t, "", standalone=False) for t in texts)
    script = """
    var d = pageData(), js = document.getElementById('js');
    d.texts.forEach(function (t) { js.appendChild(tokenSpan(t, 'chip')); js.appendChild(tokenSpan(t, '', false)); });
    finished();
    """
    page = _page("tokens", "", f'<div id="py">{py}</div><div id="js"></div>', {"texts": texts}, script, "test")
    (tmp_path / "tokens.html").write_text(page)
    dom = dump_dom((tmp_path / "tokens.html").as_uri(), tmp_path)
    assert_clean(dom)
    tokens = Tokens(dom).tokens
    by = {where: [(t["cls"], t["title"], t["parts"]) for t in tokens if t["in"] == where] for where in ("py", "js")}
    assert len(by["py"]) == 2 * len(texts) and by["js"] == by["py"]


def test_index_marks_notes_and_draws_the_density_histogram(exported_sae, nanochat_current_dir,  # noqa: F811
                                                           tiny_shards_dir, tmp_path):
    out = tmp_path / "site"
    argv = ["viz", "--sae", str(exported_sae), "--model", str(nanochat_current_dir), "--data", str(tiny_shards_dir),
            "--tokens", "300", "--out", str(out), "--features", "0-5", "--quiet"]
    assert main(argv) == 0
    (out / NOTES_FILE).write_text('{"4": "a note with <script>x</script>"}')
    assert main(argv) == 0
    dom = dump_dom((out / "index.html").as_uri(), tmp_path)
    assert_clean(dom)
    marks = re.findall(r'<span class="note-mark" title="([^"]*)">', dom)
    assert [html.unescape(m) for m in marks] == ["a note with <script>x</script>"]
    row = re.search(r'<tr><td class="num"><a href="features/4\.html">4</a>.*?</tr>', dom).group(0)
    assert "note-mark" in row
    assert dom.count('<svg id="density-hist"') == 1 and re.search(r'<text class="xtick"[^>]*>0</text>', dom)
    dom = dump_dom((out / "features" / "4.html").as_uri(), tmp_path)
    assert_clean(dom)
    assert re.search(r'<p id="note" class="note">a note with &lt;script&gt;x&lt;/script&gt;</p>', dom)
