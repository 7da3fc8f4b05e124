"""`saelightning viz --serve`: the server listens on the address given only, its API gives the Python API's
numbers (InterpretableModel.track and .steering), notes are saved atomically, the live page shows the same
values in Chromium, and the command stops on Ctrl-C with one line.

The server runs in a thread of the test process (port 0: a free port), on the tiny real fixtures of
tests/test_dashboards.py: a random current-era nanochat checkpoint, its rustbpe tokenizer, parquet shards
and an exported TopK SAE.
"""

import errno
import html
import http.client
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from saelightning import dashboards
from saelightning.cli import main
from saelightning.dashboards import VizArgs, compute_records, load_inputs
from saelightning.dashboards.html import write_site
from saelightning.dashboards.serve import MAX_NOTE, NOTES_FILE, TOP_TOKENS, DashboardApp, Live, Server
from saelightning.runtime import InterpretableModel, Steer
from tests.test_dashboards import exported_sae  # noqa: F401

pytestmark = pytest.mark.numerics  # API values compared with the Python API's fp32 results

HOOK = "blocks.1.hook_resid_post"
TEXT = "def main(x):\n\treturn x + 1  # the answer"
FEATURES = "0-11"
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None)


def _viz_args(exported_sae, nanochat_current_dir, tiny_shards_dir, out, **kw):  # noqa: F811
    return VizArgs(sae=str(exported_sae), out=str(out), model=str(nanochat_current_dir), data=str(tiny_shards_dir),
                   tokens=300, features=FEATURES, **kw)


@pytest.fixture(scope="module")
def served(exported_sae, nanochat_current_dir, tiny_shards_dir, tmp_path_factory):  # noqa: F811
    """The site written as viz writes it, served from a thread on 127.0.0.1 and a free port."""
    out = tmp_path_factory.mktemp("serve") / "site"
    args = _viz_args(exported_sae, nanochat_current_dir, tiny_shards_dir, out)
    loaded = load_inputs(args)
    meta, records, _ = compute_records(args, loaded)  # the model and SAE loaded once, reused below
    write_site(out, meta, records)
    server = Server("127.0.0.1", 0)
    live = Live(loaded.nanochat.model, loaded.nanochat.tokenizer, loaded.sae, loaded.hook)
    app = DashboardApp(out, meta, records, live, server.allowed_hosts())
    thread = threading.Thread(target=server.serve, args=(app,), daemon=True)
    thread.start()
    yield SimpleNamespace(url=server.url, port=server.port, server=server, loaded=loaded, records=records, out=out,
                          live=live)
    server.shutdown()
    thread.join(timeout=30)
    assert not thread.is_alive()


def request(url: str, body=None, headers=None, method=None, raw: bytes | None = None):
    """(status, parsed JSON or text) of one request; a JSON body is sent as application/json."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    hdrs = {"Content-Type": "application/json"} if body is not None else {}
    req = urllib.request.Request(url, data=data, headers={**hdrs, **(headers or {})}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, ctype, payload = r.status, r.headers.get_content_type(), r.read()
    except urllib.error.HTTPError as e:
        status, ctype, payload = e.code, e.headers.get_content_type(), e.read()
    text = payload.decode("utf-8")
    return status, json.loads(text) if ctype == "application/json" else text


def python_api(loaded, text: str):
    """What a user of the Python API gets: InterpretableModel over the same model and SAE, tracked."""
    im = InterpretableModel(loaded.nanochat, [loaded.sae])
    idx = torch.tensor([loaded.nanochat.tokenizer.encode(text)])
    with im.track(top_n=None) as trace:
        logits = im(idx)
    values, indices = trace.latents(HOOK)
    return im, idx, logits, values[0], indices[0]


def latent_values(values: torch.Tensor, indices: torch.Tensor, latent: int) -> list[float]:
    """Latent `latent` at each position but BOS, from a trace's (values, indices) [T, n]."""
    return [float(v[i == latent].sum()) if (i == latent).any() else 0.0 for v, i in zip(values[1:], indices[1:])]


# -- listening


def _connect(host: str, port: int) -> bool:
    """True if a TCP connection to host:port is accepted; False if it is refused."""
    try:
        with socket.create_connection((host, port), timeout=5):
            return True
    except ConnectionRefusedError:
        return False


def test_server_listens_on_the_loopback_address_given_only(served):
    """Bound to 127.0.0.1 and nothing else. The other address tried is 127.0.0.2: on Linux all of 127/8 is
    this machine's, so a socket bound to the wildcard (0.0.0.0, which also answers on every interface, eth0
    included) accepts there, while one bound to exactly 127.0.0.1 refuses, the same refusal an interface
    address such as eth0's would give. The control below shows the difference on this machine. (The test
    does not connect to an interface address itself: test traffic stays in the loopback range.)"""
    assert served.server.host == "127.0.0.1" and served.port > 0
    assert _connect("127.0.0.1", served.port)
    with socket.socket() as wildcard:  # control: a wildcard listener is reachable at 127.0.0.2
        wildcard.bind(("0.0.0.0", 0))
        wildcard.listen(1)
        try:
            reachable = _connect("127.0.0.2", wildcard.getsockname()[1])
        except OSError as e:  # not Linux: 127.0.0.2 may not be configured
            pytest.skip(f"127.0.0.2 is not a loopback address here ({e}); the check needs Linux's 127/8")
    assert reachable, "a wildcard listener should answer on 127.0.0.2"
    assert not _connect("127.0.0.2", served.port)  # ours does not: it listens on 127.0.0.1 alone


def test_busy_port_and_bad_host_are_one_line_before_any_work(exported_sae, nanochat_current_dir, tiny_shards_dir,  # noqa: F811
                                                              tmp_path, capsys, monkeypatch):
    def load_inputs(args):
        raise AssertionError("the model was loaded before the port was checked")

    monkeypatch.setattr(dashboards, "load_inputs", load_inputs)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        argv = ["viz", "--sae", str(exported_sae), "--model", str(nanochat_current_dir), "--data", str(tiny_shards_dir),
                "--tokens", "300", "--out", str(tmp_path / "site"), "--serve", "--port", str(port)]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and f"cannot listen on 127.0.0.1:{port}: the port is in use" in err, err
        assert not (tmp_path / "site").exists()  # refused before loading (load_inputs above would raise)
    for host, says in (("192.0.2.254", "is not an address of this machine"), ("no-such-host.invalid", "cannot listen")):
        assert main(argv[:-2] + ["--port", "0", "--host", host]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and says in err, err
    assert main(argv[:-2] + ["--port", "70000"]) == 2
    assert "is not a TCP port" in capsys.readouterr().err
    # neuronpedia shares the statistics options, not the server's
    assert main(["neuronpedia"] + argv[1:-2]) == 2
    assert "--serve" in capsys.readouterr().err


def test_help_documents_the_serve_options(capsys):
    assert main(["viz", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--serve", "--host HOST", "--port PORT"):
        assert option in text
    assert "127.0.0.1 answers this machine only" in text and "0: a free one" in text


# -- the API against the Python API


def test_activations_equal_the_python_api(served):
    _, idx, _, values, indices = python_api(served.loaded, TEXT)
    sae, model = served.loaded.sae, served.loaded.nanochat.model
    with torch.no_grad():  # and the SAE's encode of the hook's activation, without InterpretableModel
        direct = sae.encode(model.run_with_cache(idx, [HOOK])[HOOK][0])
    fired = 0
    for latent in range(sae.W_dec.shape[0]):
        status, got = request(served.url + "api/activations", {"text": TEXT, "latent": latent})
        assert status == 200, got
        assert got["ids"] == idx[0, 1:].tolist()  # BOS fed to the model, not returned
        assert got["tokens"] == [served.loaded.nanochat.tokenizer.token_str(i) for i in got["ids"]]
        want = latent_values(values, indices, latent)
        assert got["values"] == want  # exactly: the same computation, fp32 -> JSON -> float round-trips
        # the dense encode sums in the same order here (same shapes, same kernel): equal too
        assert got["values"] == direct[1:, latent].tolist()
        fired += any(v > 0 for v in want)
    assert fired >= 5  # a real check: many latents fire on the text


@pytest.mark.parametrize("mode,value", [("add", 8.0), ("clamp", 3.0), ("scale", 0.0)])
def test_steer_equals_the_steering_context(served, mode, value):
    im, idx, logits, values, indices = python_api(served.loaded, TEXT)
    latent = max(range(20), key=lambda j: sum(latent_values(values, indices, j)))  # the one firing most
    with im.steering([Steer(HOOK, latent, mode, value)]):
        steered = im(idx)
    status, got = request(served.url + "api/steer", {"text": TEXT, "latent": latent, "mode": mode, "value": value})
    assert status == 200, got
    for key, out in (("plain", logits), ("steered", steered)):
        probs = torch.softmax(out[0, -1], -1)
        p, ids = probs.topk(TOP_TOKENS)
        assert [t["id"] for t in got[key]] == ids.tolist()
        assert [t["prob"] for t in got[key]] == p.tolist()  # exactly
        assert [t["token"] for t in got[key]] == [served.loaded.nanochat.tokenizer.token_str(i) for i in ids.tolist()]
    assert got["plain"] != got["steered"]  # the steer changed the distribution


def test_bad_input_is_a_400_with_one_line(served):
    long_text = " x" * (served.live.seq_len + 5)
    cases = [
        ("api/activations", {"text": TEXT, "latent": 20}, "unknown latent 20: the SAE has latents 0..19"),
        ("api/activations", {"text": TEXT, "latent": -1}, "unknown latent -1"),
        ("api/activations", {"text": TEXT, "latent": "3"}, "'latent' must be an integer"),
        ("api/activations", {"text": TEXT, "latent": True}, "'latent' must be an integer"),
        ("api/activations", {"text": 5, "latent": 3}, "'text' must be a string"),
        ("api/activations", {"text": long_text, "latent": 3}, "the model's context is 256 tokens with BOS"),
        ("api/steer", {"text": TEXT, "latent": 3, "mode": "replace", "value": 1}, "'mode' must be one of add"),
        ("api/steer", {"text": TEXT, "latent": 3, "mode": "add", "value": "big"}, "'value' must be a number"),
        ("api/steer", {"text": TEXT, "latent": 3, "mode": "add", "value": float("inf")}, "must be a finite number"),
        ("api/steer", {"text": long_text, "latent": 3, "mode": "add", "value": 1}, "shorten it"),
        ("api/notes", {"latent": 99, "note": "x"}, "unknown latent 99"),
        ("api/notes", {"latent": 1, "note": "x" * (MAX_NOTE + 1)}, f"at most {MAX_NOTE}"),
        ("api/notes", [1, 2], "the body must be a JSON object"),
    ]
    for path, body, says in cases:
        status, got = request(served.url + path, body)
        assert status == 400 and says in got["error"] and "\n" not in got["error"], (path, body, got)
    # not JSON, or not sent as JSON (a page of another site could send text/plain without a preflight)
    status, got = request(served.url + "api/activations", raw=b"{", headers={"Content-Type": "application/json"})
    assert status == 400 and "not valid JSON" in got["error"]
    status, got = request(served.url + "api/notes", raw=b'{"latent": 1, "note": "x"}',
                          headers={"Content-Type": "text/plain"})
    assert status == 400 and "Content-Type: application/json" in got["error"]
    assert not (served.out / NOTES_FILE).exists() or "1" not in json.loads((served.out / NOTES_FILE).read_text())
    status, got = request(served.url + "api/activations")  # GET on a POST endpoint
    assert status == 405 and "Method Not Allowed" in got["error"]
    # a body over 1 MiB is refused from its Content-Length, unread (none is sent here: nothing is left unread
    # when the server closes, so the answer cannot be lost to a reset)
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=60)
    conn.putrequest("POST", "/api/activations")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(2 << 20))
    conn.endheaders()
    answer = conn.getresponse()
    assert answer.status == 413 and "Too Large" in json.loads(answer.read())["error"]
    conn.close()
    # a DNS-rebound name (a page at evil.example resolving to 127.0.0.1) is not answered
    status, text = request(served.url + "index.html", headers={"Host": f"evil.example:{served.port}"})
    assert status == 400 and "answers Host" in text
    assert request(served.url + "index.html", headers={"Host": f"localhost:{served.port}"})[0] == 200


# -- pages


def test_served_pages_link_the_live_page_and_the_files_stay_static(served):
    for path in ("index.html", "features/0.html"):
        status, page = request(served.url + path)
        assert status == 200 and "live-link" in page
        assert "live-link" not in (served.out / path).read_text()  # on disk: the static site, for file://
    status, page = request(served.url + "live/3")
    assert status == 200 and 'data-page="live"' in page and 'id="text"' in page
    assert request(served.url + "live/20")[0] == 404
    assert request(served.url + "features/99.html")[0] == 404
    assert request(served.url + "features/..%2f..%2fsaelightning-output.json")[0] == 404
    status, manifest = request(served.url + "saelightning-output.json")
    assert status == 200 and manifest["kind"] == "viz"


# -- notes


def test_notes_are_saved_atomically_and_round_trip(served, monkeypatch):
    path = served.out / NOTES_FILE
    note = 'fires on "def" and on <script> tags\nsecond line: ünïcode ✓'
    status, notes = request(served.url + "api/notes", {"latent": 3, "note": note})
    assert status == 200 and notes["3"] == note
    assert json.loads(path.read_text(encoding="utf-8"))["3"] == note
    assert request(served.url + "api/notes")[1]["3"] == note
    # the static pages are re-rendered with it (html.set_note), so the served site shows it at once
    shown = re.search(r'<p id="note" class="note">(.*?)</p>', request(served.url + "features/3.html")[1], re.S)
    assert shown and html.unescape(shown.group(1)) == note
    rows = json.loads(re.search(r'id="data">(.*?)</script>', request(served.url + "index.html")[1], re.S).group(1))
    assert next(r for r in rows["rows"] if r["index"] == 3)["note"] == note
    status, page = request(served.url + "live/3")  # the live page starts with the note
    data = json.loads(re.search(r'id="data">(.*?)</script>', page, re.S).group(1))
    assert data["note"] == note
    # written whole: a temporary file renamed over notes.json (a new inode), nothing left beside it
    inode = path.stat().st_ino
    request(served.url + "api/notes", {"latent": 5, "note": "five"})
    assert path.stat().st_ino != inode
    assert sorted(p.name for p in served.out.iterdir() if p.name.startswith(".")) == []
    # a write that fails (a full disk) leaves the old notes.json whole
    before = path.read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    status, got = request(served.url + "api/notes", {"latent": 7, "note": "lost"})
    monkeypatch.undo()
    assert status == 400 and "cannot write" in got["error"] and "notes.json" in got["error"]
    assert path.read_bytes() == before and not [p for p in served.out.iterdir() if p.name.startswith(".")]
    # concurrent saves of different latents all land (read-modify-write under one lock)
    threads = [threading.Thread(target=request, args=(served.url + "api/notes", {"latent": j, "note": f"n{j}"}))
               for j in range(8, 16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    saved = json.loads(path.read_text())
    assert {str(j): f"n{j}" for j in range(8, 16)}.items() <= saved.items() and saved["3"] == note
    assert list(saved) == sorted(saved, key=int)  # in latent order
    # an empty note removes the latent's entry
    assert "5" not in request(served.url + "api/notes", {"latent": 5, "note": "  "})[1]
    assert "5" not in json.loads(path.read_text())


# -- the CLI: notes carried over a rewrite, Ctrl-C


def test_viz_serve_command_keeps_notes_and_stops_on_ctrl_c(exported_sae, nanochat_current_dir, tiny_shards_dir,  # noqa: F811
                                                            tmp_path):
    out = tmp_path / "site"
    argv = ["viz", "--sae", str(exported_sae), "--model", str(nanochat_current_dir), "--data", str(tiny_shards_dir),
            "--tokens", "300", "--out", str(out), "--features", "0-3"]
    assert main(argv) == 0
    (out / NOTES_FILE).write_text('{"2": "kept across a rewrite"}')
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen([sys.executable, "-m", "saelightning", *argv, "--serve", "--port", "0"],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True)
    reader.start()
    try:
        seen, url = [], None
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                break
            seen.append(line)
            m = re.search(r"serving .* at (http://127\.0\.0\.1:\d+/)", line)
            url = m.group(1) if m else None
        assert url, "".join(seen)
        assert json.loads((out / NOTES_FILE).read_text()) == {"2": "kept across a rewrite"}  # site rewritten, kept
        status, got = request(url + "api/activations", {"text": TEXT, "latent": 1})
        assert status == 200 and len(got["values"]) == len(got["tokens"]) > 5
        assert request(url + "api/notes")[1] == {"2": "kept across a rewrite"}
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    reader.join(timeout=10)
    rest = []
    while not lines.empty():
        rest.append(lines.get())
    assert [line.strip() for line in rest] == [
        f"saelightning: stopped serving (Ctrl-C); the site and {NOTES_FILE} in {out} are kept"], rest
    assert not _connect("127.0.0.1", int(url.rsplit(":", 1)[1].strip("/")))


# -- the live page in a browser

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # the dev extra installs it
    sync_playwright = None


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed and could not be: `make browser` "
                    "installs it (apt-get, as root); `make test` runs that first")
@pytest.mark.skipif(sync_playwright is None, reason="playwright is not installed: pip install -e '.[dev]' (its "
                    "Python package drives the system chromium; no browser is downloaded)")
def test_live_page_in_chromium_shades_tokens_by_the_python_api_values(served):
    _, idx, _, values, indices = python_api(served.loaded, TEXT)
    by_index = {r["index"]: r for r in served.records}
    latent = max(by_index, key=lambda j: sum(latent_values(values, indices, j)))
    want = latent_values(values, indices, latent)
    scale = by_index[latent]["max_act"]
    assert scale > 0 and sum(v > 0 for v in want) >= 2
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.goto(served.url + "index.html")  # the served index links the live page
            page.wait_for_selector("#live-link")
            page.goto(served.url + f"live/{latent}")
            page.wait_for_selector("body[data-rendered=ok]")
            page.type("#text", TEXT)  # key by key, as a person types (Tab and Enter included)
            page.wait_for_function("t => document.getElementById('tokens').dataset.text === t", arg=TEXT,
                                   timeout=30_000)
            spans = page.eval_on_selector_all(
                "#tokens .tok", "els => els.map(e => [e.dataset.value, e.style.backgroundColor, e.title])")
            assert len(spans) == len(want) == idx.shape[1] - 1
            for (shown_value, colour, title), v in zip(spans, want):
                assert float(shown_value) == v  # the value the page holds is the Python API's, exactly
                m = re.fullmatch(r"rgba\(255, 120, 0, ([\d.]+)\)", colour)
                if v > 0:  # shaded as the static contexts: alpha = value / the latent's max (3 decimals)
                    assert m and abs(float(m.group(1)) - min(1.0, v / scale)) <= 0.005, (colour, v, scale)
                else:
                    assert not m
                hover = float(title.rsplit(" : ", 1)[1])  # the value on hover, to 3 significant digits
                assert abs(hover - v) <= 5e-3 * abs(v), (title, v)
            # steer from the page: the tables show the API's numbers
            page.select_option("#mode", "clamp")
            page.fill("#value", "5")
            page.click("#steer")
            page.wait_for_function("t => document.getElementById('steer-out').dataset.text === t", arg=TEXT,
                                   timeout=30_000)
            shown_probs = page.eval_on_selector_all("#steered tr", "rs => rs.map(r => [Number(r.dataset.id), "
                                                    "Number(r.querySelector('[data-prob]').dataset.prob)])")
            _, api = request(served.url + "api/steer", {"text": TEXT, "latent": latent, "mode": "clamp", "value": 5})
            assert shown_probs == [[t["id"], t["prob"]] for t in api["steered"]]
            # a note from the page lands in notes.json
            page.fill("#note", "typed in the browser")
            page.click("#save-note")
            page.wait_for_function("() => document.getElementById('note-status').textContent.startsWith('saved')")
            assert json.loads((served.out / NOTES_FILE).read_text())[str(latent)] == "typed in the browser"
            assert page.get_attribute("html", "data-js-errors") is None  # no JS error on the page
        finally:
            browser.close()
