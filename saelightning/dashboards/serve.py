"""`saelightning viz --serve`: the dashboard site over local HTTP, with a live page per latent.

The server is Werkzeug's threaded WSGI server (the one TensorBoard serves with; Werkzeug is already
installed with tensorboard), on a socket this module binds itself to exactly the address given, so a
busy port or a wrong address is one line before any model work, and nothing listens elsewhere. It serves:

  /index.html, /features/<i>.html  the static site as written to --out, plus a link to the live page
                                   (a script added to the HTML as it is sent: the files on disk are
                                   unchanged and still open from file:// with no server)
  /live/<i>                        type text, see each token shaded by latent i's activation; compare
                                   the next-token distribution plain and steered; edit the latent's note
  POST /api/activations            {text, latent} -> {tokens, ids, values}
  POST /api/steer                  {text, latent, mode: add|clamp|scale, value} -> {plain, steered}
  GET/POST /api/notes              {} / {latent, note} -> {"<latent>": "note", ...} (OUT/notes.json)

The numbers come from runtime.InterpretableModel on the model and SAE that `viz` loaded once:
activations through track() (the SAE's encode of the hook's activation), steering through steering()
(x + (f' - f) W_dec, the SAE's error term kept, BOS never steered). The text is tokenized with BOS
first, as every document is; BOS is fed to the model but not returned. One lock serialises the model:
InterpretableModel keeps its trace and steers on itself.

Bad input is a 400 with {"error": "one line"}. POSTs must be application/json, which a page of
another site cannot send here without a CORS preflight this server never grants; on a loopback
address only a loopback Host header is answered (no DNS rebinding).
"""

from __future__ import annotations

import errno
import html
import ipaddress
import json
import socket
import sys
import threading
from pathlib import Path

import torch
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound
from werkzeug.routing import Map, Rule
from werkzeug.security import safe_join
from werkzeug.serving import WSGIRequestHandler, make_server
from werkzeug.utils import redirect, send_from_directory
from werkzeug.wrappers import Request, Response

from saelightning.dashboards.html import NOTES_FILE, _page, read_notes, set_note
from saelightning.errors import SAELightningError, one_line
from saelightning.runtime import STEER_MODES, InterpretableModel, Steer

MAX_BODY = 1 << 20  # bytes of a request body
MAX_NOTE = 20_000  # characters of one note
TOP_TOKENS = 10  # next-token candidates shown, plain and steered

# ---------------------------------------------------------------------------------------------
# the model side


class Live:
    """The model, tokenizer and one SAE, loaded once; every call holds the lock (one forward at a time)."""

    def __init__(self, model, tokenizer, sae, hook: str):
        self.im = InterpretableModel(model, {hook: sae}, tokenizer=tokenizer)
        self.tokenizer, self.hook = tokenizer, hook
        self.d_sae = int(sae.W_dec.shape[0])
        self.seq_len = int(model.config.sequence_len)
        self.device = model.lm_head.weight.device
        self.lock = threading.Lock()

    def ids(self, text) -> torch.Tensor:
        """[1, T]: BOS, then the text's tokens; refused past the model's context."""
        if not isinstance(text, str):
            raise SAELightningError("'text' must be a string")
        ids = self.tokenizer.encode(text)  # BOS first
        if len(ids) > self.seq_len:
            raise SAELightningError(f"the text is {len(ids) - 1} tokens; the model's context is {self.seq_len} "
                                    f"tokens with BOS, so at most {self.seq_len - 1}: shorten it")
        return torch.tensor([ids], device=self.device)

    def latent(self, latent) -> int:
        if isinstance(latent, bool) or not isinstance(latent, int):
            raise SAELightningError(f"'latent' must be an integer, got {latent!r}")
        if not 0 <= latent < self.d_sae:
            raise SAELightningError(f"unknown latent {latent}: the SAE has latents 0..{self.d_sae - 1}")
        return latent

    def activations(self, text, latent) -> dict:
        """The latent's activation at each token of the text (BOS left out)."""
        idx, j = self.ids(text), self.latent(latent)
        with self.lock, self.im.track(top_n=None) as trace:  # None: every active latent of every token
            self.im(idx)
            values, indices = trace.latents(self.hook)  # [1, T, n]; reading it runs the SAE's encode
        value = torch.where(indices[0] == j, values[0], 0.0).sum(-1)  # one slot at most holds latent j
        ids = idx[0, 1:].tolist()
        return {"tokens": [self.tokenizer.token_str(i) for i in ids], "ids": ids, "values": value[1:].tolist()}

    def steer(self, text, latent, mode, value) -> dict:
        """The next-token distribution after the text (top TOP_TOKENS), plain and with the latent steered."""
        idx, j = self.ids(text), self.latent(latent)
        if mode not in STEER_MODES:
            raise SAELightningError(f"'mode' must be one of {', '.join(STEER_MODES)}, got {mode!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SAELightningError(f"'value' must be a number, got {value!r}")
        steer = Steer(self.hook, j, mode, float(value))  # refuses NaN/inf
        with self.lock:
            plain = self.im(idx)[0, -1]
            with self.im.steering([steer]):
                steered = self.im(idx)[0, -1]
        return {"plain": self._top(plain), "steered": self._top(steered)}

    def _top(self, logits: torch.Tensor) -> list[dict]:
        probs = torch.softmax(logits.float(), dim=-1)
        p, ids = probs.topk(min(TOP_TOKENS, probs.numel()))
        return [{"id": i, "token": self.tokenizer.token_str(i), "prob": v} for i, v in zip(ids.tolist(), p.tolist())]


# ---------------------------------------------------------------------------------------------
# notes


class Notes:
    """OUT/notes.json, {"<latent index>": "note text"}, through html.py's read_notes and set_note (written
    atomically; the latent's page and the index re-rendered with it), one save at a time."""

    def __init__(self, out_dir, d_sae: int):
        self.out = Path(out_dir)
        self.d_sae = d_sae
        self.lock = threading.Lock()

    def read(self) -> dict[str, str]:
        return read_notes(self.out)

    def set(self, latent, note) -> dict[str, str]:
        """Save one latent's note (an empty one removes it); returns all notes."""
        if isinstance(latent, bool) or not isinstance(latent, int) or not 0 <= latent < self.d_sae:
            raise SAELightningError(f"unknown latent {latent!r}: the SAE has latents 0..{self.d_sae - 1}")
        if not isinstance(note, str):
            raise SAELightningError("'note' must be a string")
        if len(note) > MAX_NOTE:
            raise SAELightningError(f"the note is {len(note)} characters; at most {MAX_NOTE}")
        with self.lock:
            return set_note(self.out, latent, note)


# ---------------------------------------------------------------------------------------------
# pages

# added before </body> of every static page as it is served: a link to the live page
LINK_JS = """
(function () {
  var m = location.pathname.match(/\\/features\\/(\\d+)\\.html$/);
  var a = document.createElement('a');
  a.id = 'live-link';
  a.href = m ? '/live/' + m[1] : '/live';
  a.textContent = m ? 'live: type text, steer, note' : 'live page: type text, steer, notes';
  var nav = document.querySelector('nav');
  if (nav) { nav.appendChild(a); return; }
  var p = document.createElement('p');
  p.appendChild(a);
  var header = document.querySelector('header');
  if (header) header.appendChild(p); else document.body.insertBefore(p, document.body.firstChild);
})();
"""

LIVE_CSS = """
#text { width: 100%; box-sizing: border-box; font: 13px ui-monospace, monospace; }
#note { width: 100%; box-sizing: border-box; }
#tokens { margin: .5em 0; padding: 4px; border-left: 3px solid #eee; white-space: pre-wrap; min-height: 1.5em; }
.error { color: #b00; } .probs td.num { min-width: 5em; }
"""

LIVE_JS = """
(function () {
  var d = pageData(), latent = d.latent;
  var $ = function (id) { return document.getElementById(id); };
  var text = $('text'), tokens = $('tokens'), error = $('error');
  var sent = 0, drawn = 0, timer = null, steered = false;
  function post(path, body) {
    return fetch(path, { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body) })
      .then(function (r) {
        return r.json().then(function (j) { if (!r.ok) throw new Error(j.error || r.statusText); return j; });
      });
  }
  function scale(values) {  // the shading of the static pages: value / the latent's max over the tokens read
    if (d.max_act > 0) return d.max_act;
    return Math.max.apply(null, values.concat([0]));
  }
  function drawTokens(res, typed) {
    var s = scale(res.values), frag = document.createDocumentFragment();
    res.tokens.forEach(function (t, j) {
      var v = res.values[j], span = tokenSpan(t, '', false, ' : ' + fmt(v));  // as a static context's token
      var alpha = s > 0 ? Math.max(0, Math.min(1, v / s)) : 0;
      if (alpha > 0) span.style.background = 'rgba(255, 120, 0, ' + alpha.toFixed(3) + ')';
      if (!span.title) span.title = shown(t) + ' : ' + fmt(v);  // the value on hover
      span.setAttribute('data-value', String(v));
      frag.appendChild(span);
    });
    tokens.textContent = '';
    tokens.appendChild(frag);
    tokens.setAttribute('data-text', typed);
    var top = Math.max.apply(null, res.values.concat([0]));
    $('summary').textContent = res.tokens.length + ' tokens; max ' + fmt(top) +
      (d.max_act > 0 ? ' (shading: value / ' + fmt(d.max_act) + ', the max over the tokens viz read)' : '');
  }
  function fail(e) { error.textContent = String(e.message || e); }
  function update() {
    var mine = ++sent, typed = text.value;
    post('/api/activations', { text: typed, latent: latent }).then(function (res) {
      if (mine < drawn) return;  // an older answer arriving late
      drawn = mine; error.textContent = ''; drawTokens(res, typed);
    }).catch(fail);
    if (steered) steer();
  }
  function probTable(id, rows) {
    var t = $(id);
    t.textContent = '';
    rows.forEach(function (p) {
      var tr = el('tr'), td = el('td');
      td.appendChild(tokenSpan(p.token, 'chip'));
      tr.appendChild(td);
      var cell = el('td', 'num', (100 * p.prob).toFixed(2) + '%');
      cell.setAttribute('data-prob', String(p.prob));
      tr.appendChild(cell);
      tr.setAttribute('data-id', String(p.id));
      t.appendChild(tr);
    });
  }
  function steer() {
    steered = true;
    var typed = text.value, body = { text: typed, latent: latent, mode: $('mode').value,
                                     value: Number($('value').value) };
    post('/api/steer', body).then(function (res) {
      error.textContent = '';
      probTable('plain', res.plain); probTable('steered', res.steered);
      $('steer-out').setAttribute('data-text', typed);
    }).catch(fail);
  }
  text.addEventListener('input', function () { clearTimeout(timer); timer = setTimeout(update, 120); });
  $('steer').addEventListener('click', steer);
  $('note').value = d.note || '';
  $('save-note').addEventListener('click', function () {
    post('/api/notes', { latent: latent, note: $('note').value }).then(function (notes) {
      $('note-status').textContent = (String(latent) in notes) ? 'saved to notes.json' : 'removed from notes.json';
    }).catch(function (e) { $('note-status').textContent = String(e.message || e); });
  });
  $('go').addEventListener('submit', function (e) {
    e.preventDefault();
    location.href = '/live/' + Number($('latent').value);
  });
  if (text.value) update();
  finished();
})();
"""


def live_page(meta: dict, latent: int, record: dict | None, note: str, d_sae: int) -> str:
    links = ["<a href=\"/index.html\">all latents</a>"]
    if record is not None:
        links.append(f"<a href=\"/features/{latent}.html\">latent {latent}'s page</a>")
    title = meta.get("title", "SAE")
    header = (f"<nav>{' '.join(links)}</nav><header><h1>Latent {latent}: live</h1><p class=\"meta\">"
              f"{html.escape(title)} | d_sae {d_sae} | served by saelightning viz --serve</p></header>")
    body = (
        f"<style>{LIVE_CSS}</style>"
        "<form id=\"go\">latent <input id=\"latent\" type=\"number\" min=\"0\" "
        f"max=\"{d_sae - 1}\" value=\"{latent}\"> <button>open</button></form>\n"
        "<h2>Activations</h2><p class=\"meta\">Type text; each token is shaded by the latent's activation "
        "(hover for the value). BOS is put first, as in every document, and not shown.</p>"
        "<textarea id=\"text\" rows=\"4\" spellcheck=\"false\" autofocus></textarea>"
        "<p class=\"error\" id=\"error\"></p><div id=\"tokens\" class=\"ctx\"></div><p class=\"meta\" id=\"summary\">"
        "</p>\n"
        "<h2>Steering: the next token after the text</h2><p>"
        "<select id=\"mode\"><option value=\"add\">add strength &times; decoder direction</option>"
        "<option value=\"clamp\">clamp the latent to</option><option value=\"scale\">scale the latent by</option>"
        "</select> <input id=\"value\" type=\"number\" step=\"any\" value=\"8\"> <button id=\"steer\">compare"
        "</button></p><p class=\"meta\">x + (f' - f) W_dec at every position but BOS: the SAE's error stays in "
        "the activation, as in the Python API.</p>"
        "<div class=\"cols\" id=\"steer-out\"><div><h3>plain</h3><table class=\"probs\" id=\"plain\"></table></div>"
        "<div><h3>steered</h3><table class=\"probs\" id=\"steered\"></table></div></div>\n"
        "<h2>Note</h2><textarea id=\"note\" rows=\"3\"></textarea><p><button id=\"save-note\">save note</button> "
        "<span class=\"meta\" id=\"note-status\"></span></p>"
    )
    data = {"latent": latent, "d_sae": d_sae, "max_act": (record or {}).get("max_act"), "note": note}
    return _page(f"Latent {latent} live - {title}", header, body, data, LIVE_JS, "live")


def with_live_link(page: str) -> str:
    """A static page as served: the link script added before its last </body>."""
    at = page.rfind("</body>")
    script = f"<script>{LINK_JS}</script>\n"
    return page + script if at < 0 else page[:at] + script + page[at:]


# ---------------------------------------------------------------------------------------------
# the WSGI application


class DashboardApp:
    """The site in out_dir, the live pages and the JSON API (a WSGI application)."""

    url_map = Map([
        Rule("/", endpoint="root"),
        Rule("/live", endpoint="live_first"),
        Rule("/live/", endpoint="live_first"),
        Rule("/live/<int:latent>", endpoint="live"),
        Rule("/api/activations", endpoint="activations", methods=["POST"]),
        Rule("/api/steer", endpoint="steer", methods=["POST"]),
        Rule("/api/notes", endpoint="notes", methods=["GET", "POST"]),
        Rule("/<path:path>", endpoint="static", methods=["GET", "HEAD"]),
    ])

    def __init__(self, out_dir, meta: dict, records: list[dict], live: Live, allowed_hosts: set[str] | None = None):
        """allowed_hosts: the Host header names answered (None: any)."""
        self.out = Path(out_dir).expanduser().absolute()
        self.meta, self.live, self.allowed_hosts = meta, live, allowed_hosts
        self.records = {r["index"]: r for r in records}
        self.notes = Notes(self.out, live.d_sae)

    def __call__(self, environ, start_response):
        request = Request(environ)
        request.max_content_length = MAX_BODY
        api = request.path.startswith("/api/")
        try:
            if self.allowed_hosts is not None and _host_name(request.host) not in self.allowed_hosts:
                raise SAELightningError(f"this server answers Host {sorted(self.allowed_hosts)} only, "
                                        f"not {request.host!r}")
            endpoint, values = self.url_map.bind_to_environ(environ).match()
            response = getattr(self, f"on_{endpoint}")(request, **values)
        except SAELightningError as e:
            response = _json({"error": one_line(e)}, 400) if api else Response(one_line(e), 400)
        except HTTPException as e:
            response = (_json({"error": f"{e.code} {e.name}: {one_line(e.description)}"}, e.code) if api
                        else e.get_response(environ))
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        return response(environ, start_response)

    def _body(self, request: Request) -> dict:
        if request.mimetype != "application/json":
            raise SAELightningError("send the request body as JSON, with Content-Type: application/json")
        try:
            body = json.loads(request.get_data(cache=False).decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise SAELightningError(f"the body is not valid JSON ({one_line(e)})") from None
        if not isinstance(body, dict):
            raise SAELightningError("the body must be a JSON object")
        return body

    # -- pages
    def on_root(self, request):
        return redirect("/index.html")

    def on_live_first(self, request):
        return redirect(f"/live/{min(self.records) if self.records else 0}")

    def on_live(self, request, latent: int):
        if latent >= self.live.d_sae:
            raise NotFound(f"the SAE has latents 0..{self.live.d_sae - 1}")
        note = self.notes.read().get(str(latent), "")
        page = live_page(self.meta, latent, self.records.get(latent), note, self.live.d_sae)
        return Response(page, mimetype="text/html", headers={"Cache-Control": "no-store"})

    def on_static(self, request, path: str):
        if path.startswith("api/"):  # an API endpoint asked with GET: 405 naming its methods, not a missing file
            methods = set(self.url_map.bind_to_environ(request.environ).allowed_methods("/" + path))
            methods -= {"GET", "HEAD", "OPTIONS"}
            raise MethodNotAllowed(sorted(methods)) if methods else NotFound()
        if path.endswith(".html"):
            full = safe_join(str(self.out), path)
            if full is None or not Path(full).is_file():
                raise NotFound()
            page = Path(full).read_text(encoding="utf-8")
            return Response(with_live_link(page), mimetype="text/html", headers={"Cache-Control": "no-cache"})
        return send_from_directory(self.out, path, request.environ, max_age=0)

    # -- API
    def on_activations(self, request):
        body = self._body(request)
        return _json(self.live.activations(body.get("text"), body.get("latent")))

    def on_steer(self, request):
        body = self._body(request)
        return _json(self.live.steer(body.get("text"), body.get("latent"), body.get("mode"), body.get("value")))

    def on_notes(self, request):
        if request.method == "GET":
            return _json(self.notes.read())
        body = self._body(request)
        return _json(self.notes.set(body.get("latent"), body.get("note")))


def _json(obj, status: int = 200) -> Response:
    return Response(json.dumps(obj, ensure_ascii=False, allow_nan=False), status, mimetype="application/json",
                    headers={"Cache-Control": "no-store"})


def _host_name(host: str) -> str:
    """'127.0.0.1:8000' -> '127.0.0.1', '[::1]:8000' -> '::1', 'localhost' -> 'localhost'."""
    if host.startswith("["):
        return host[1:host.find("]")].lower()
    return host.rsplit(":", 1)[0].lower() if host.count(":") == 1 else host.lower()


# ---------------------------------------------------------------------------------------------
# the server


class _QuietHandler(WSGIRequestHandler):
    """No line per request (a live page sends one per pause in typing); errors are still logged."""

    def log_request(self, code="-", size="-") -> None:
        pass


class Server:
    """A socket bound to exactly (host, port) and listening; serve(app) runs Werkzeug's threaded server on it.

    Binding comes first, in the constructor, so a busy port or a wrong address fails at once, before any
    model is loaded; connections that arrive before serve() wait in the listen queue.
    """

    def __init__(self, host: str, port: int):
        if not host:
            raise SAELightningError("--host is empty; give an address to listen on (127.0.0.1: this machine only)")
        if not 0 <= port <= 65535:
            raise SAELightningError(f"--port {port} is not a TCP port; use 0..65535 (0: a free one)")
        try:
            family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        except (socket.gaierror, UnicodeError) as e:
            raise SAELightningError(f"cannot listen on --host {host}: {one_line(e)}; give an address of this "
                                    "machine (127.0.0.1: this machine only)") from None
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart reuses a TIME_WAIT port
            if family == socket.AF_INET6:
                self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # "::" is not also 0.0.0.0
            self.sock.bind(address)
            self.sock.listen(128)
        except OSError as e:
            self.sock.close()
            raise SAELightningError(_bind_error(host, port, e)) from None
        self.host, self.port = self.sock.getsockname()[:2]
        self.loopback = ipaddress.ip_address(self.host.split("%")[0]).is_loopback
        self.given_host = host
        self._server = None
        self._stopped = threading.Event()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def allowed_hosts(self) -> set[str] | None:
        """On a loopback address: the loopback names only (a DNS-rebound name is refused); else any."""
        if not self.loopback:
            return None
        return {"localhost", "127.0.0.1", "::1", self.host.lower(), self.given_host.lower()}

    def serve(self, app) -> bool:
        """Serve app until shutdown() (returns True) or Ctrl-C (returns False); the socket is closed after."""
        if self._stopped.is_set():
            self.close()
            return True
        # werkzeug takes the bound socket by descriptor (it dups it) and leaves its own binding out
        self._server = make_server(self.host, self.port, app, threaded=True, request_handler=_QuietHandler,
                                   fd=self.sock.fileno())
        self.sock.close()
        self._server.serve_forever(poll_interval=0.2)  # returns on shutdown(); Ctrl-C ends it too (werkzeug)
        self._server.server_close()
        return self._stopped.is_set()

    def shutdown(self) -> None:
        """Stop serve() from another thread."""
        self._stopped.set()
        if self._server is not None:
            self._server.shutdown()

    def close(self) -> None:
        if self._server is not None:
            self._server.server_close()
        self.sock.close()


def _bind_error(host: str, port: int, e: OSError) -> str:
    where = f"cannot listen on {host}:{port}"
    if e.errno == errno.EADDRINUSE:
        return f"{where}: the port is in use (another program, or another viz --serve); pass another --port, or " \
               "--port 0 for a free one"
    if e.errno == errno.EADDRNOTAVAIL:
        return f"{where}: {host} is not an address of this machine; pass one of its addresses (127.0.0.1: this " \
               "machine only)"
    if e.errno == errno.EACCES:
        return f"{where}: permission denied (ports below 1024 need privileges); pass --port 1024 or above"
    return f"{where}: {e.strerror or one_line(e)}"


def run(server: Server, out_dir, meta: dict, records: list[dict], live: Live) -> int:
    """Serve the site until Ctrl-C: one line then, exit code 130 (as every command's Ctrl-C)."""
    app = DashboardApp(out_dir, meta, records, live, server.allowed_hosts())
    print(f"saelightning: serving {out_dir} at {server.url} (live pages: {server.url}live/N); Ctrl-C stops",
          file=sys.stderr, flush=True)
    if server.serve(app):
        return 0
    print(f"saelightning: stopped serving (Ctrl-C); the site and {NOTES_FILE} in {out_dir} are kept", file=sys.stderr)
    return 130


__all__ = ["DashboardApp", "Live", "Notes", "Server", "live_page", "run"]
