"""Cross-site protection of the HTTP door (real servers on 127.0.0.1): pages of another origin
in a real headless Chromium can neither change the repository nor make the server compute;
Origin / Sec-Fetch-Site, form content types, the Host allow-list, CORS preflights and the
default bind address over plain HTTP."""

from __future__ import annotations

import base64
import http.client
import http.server
import json
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import cv2
import pytest

from server.config import CrossSiteConfig, MetricsConfig, SecurityConfig, ServerConfig
from server.doors.cross_site import canonical_origin, exposure_warning, foreign_page, http_bind_host
from server.main import build_parser, config_from_args
from tests.background import BackgroundServer
from tests.server.browser import chromium_driver, run_script_page
from tests.server.core.test_repository import named_copy
from tests.server.loopback import loopback_config

ALLOWED_ORIGIN = "https://photos.example"  # in the server's --http-cors-origin list
ALLOWED_HOST = "sr.internal"  # in its --http-allowed-host list
TOKEN = "cross-site-secret-0123456789"
UNLOAD = "/v2/repository/models/{}/unload"
MODELS = {"rdn_x2", "rdn_x4"}

needs_chromium = pytest.mark.skipif(
    chromium_driver() is None,
    reason="no Chromium: install Debian's chromium and chromium-driver (make install does)",
)


class Pages:
    """Static HTML pages served from 127.0.0.1 on ports of their own: other origins than the
    server's, as a web site elsewhere would be (``add`` a page, ``url`` of it on a site)."""

    def __init__(self, sites: int) -> None:
        self._pages: dict[str, bytes] = {}
        pages = self._pages

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = pages.get(self.path)
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._servers = [
            http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler) for _ in range(sites)
        ]
        self._threads = [
            threading.Thread(target=s.serve_forever, daemon=True) for s in self._servers
        ]
        for thread in self._threads:
            thread.start()

    def origin(self, site: int) -> str:
        return f"http://127.0.0.1:{self._servers[site].server_port}"

    def add(self, path: str, html: str) -> None:
        self._pages[path] = html.encode()

    def close(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()


@pytest.fixture(scope="module")
def pages() -> Iterator[Pages]:
    """Site 0: an origin the server does not allow; site 1: one it allows."""
    served = Pages(2)
    yield served
    served.close()


@pytest.fixture(scope="module")
def model_dir(
    tiny_onnx_factory: Callable[[int], Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    folder = tmp_path_factory.mktemp("cross_site_models")
    named_copy(tiny_onnx_factory(2), folder, "rdn_x2")
    named_copy(tiny_onnx_factory(4), folder, "rdn_x4")
    return folder


@pytest.fixture(scope="module")
def site(model_dir: Path, pages: Pages) -> Iterator[BackgroundServer]:
    """No token (the default server), HTTP on, two CORS origins and one extra Host name."""
    config = loopback_config(
        None,
        model_dir=model_dir,
        http_port=0,
        metrics=MetricsConfig(port=0),
        cross_site=CrossSiteConfig(
            cors_origins=(ALLOWED_ORIGIN, pages.origin(1)), allowed_hosts=(ALLOWED_HOST,)
        ),
    )
    with BackgroundServer(config) as bg:
        yield bg


def http_port(server: BackgroundServer) -> int:
    assert server.running is not None and server.running.http is not None
    return server.running.http.port


def call(
    server: BackgroundServer,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    address: str = "127.0.0.1",
) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection(address, http_port(server), timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        answer = connection.getresponse()
        return answer.status, dict(answer.getheaders()), answer.read()
    finally:
        connection.close()


def png(set5_dir: Path, side: int = 16) -> bytes:
    image = cv2.imread(str(set5_dir / "baby.png"), cv2.IMREAD_COLOR)[:side, :side]
    return cv2.imencode(".png", image)[1].tobytes()


def http_requests(server: BackgroundServer, method: str, code: str) -> float:
    assert server.running is not None and server.running.metrics is not None
    labels = {"protocol": "http", "method": method, "code": code}
    return server.running.metrics.registry.get_sample_value("rdn_requests_total", labels) or 0.0


def loaded(server: BackgroundServer) -> set[str]:
    assert server.running is not None
    return set(server.running.repository.snapshot.models)


def tiles_computed(server: BackgroundServer) -> int:
    assert server.running is not None
    return server.running.batcher.tiles_computed


# ------------------------------------------------------------------ in a real browser

ATTACK = """<!doctype html><html><body>
<iframe name="sink1"></iframe><iframe name="sink2"></iframe>
<form id="unload" method="POST" target="sink1" enctype="text/plain"
      action="SERVER/v2/repository/models/rdn_x4/unload"><input name='{"a":"' value='"}'></form>
<form id="upload" method="POST" target="sink2" enctype="multipart/form-data"
      action="SERVER/v1/upscale"><input type="file" name="image"></form>
<script>
const server = "SERVER";
const png = Uint8Array.from(atob("PNG"), c => c.charCodeAt(0));
const landed = name => new Promise(done => { document.querySelector(`iframe[name=${name}]`)
  .addEventListener("load", done, {once: true}); });
async function attempt(request) {
  try {
    const answer = await request();
    return answer.type === "opaque" ? "opaque" : answer.status;
  } catch (error) { return "failed: " + error; }
}
async function attack() {
  const results = {};  // compute first (while the models are there), then unload
  results.upscale_no_cors = await attempt(() => fetch(server + "/v1/upscale",
    {method: "POST", mode: "no-cors", body: new Blob([png])}));
  results.upscale_simple = await attempt(() => fetch(server + "/v1/upscale",
    {method: "POST", body: new Blob([png])}));
  const files = new DataTransfer();
  files.items.add(new File([png], "bird.png", {type: "image/png"}));
  const upload = document.getElementById("upload");
  upload.elements.image.files = files.files;
  const uploaded = landed("sink2");
  upload.submit();  // a form upload of a real image
  await uploaded;
  const unloaded = landed("sink1");
  document.getElementById("unload").submit();  // an auto-submitted form
  results.unload = await attempt(() => fetch(server + "/v2/repository/models/rdn_x2/unload",
    {method: "POST", mode: "no-cors", body: "{}"}));
  await unloaded;
  document.body.dataset.done = JSON.stringify(results);
}
attack();
</script></body></html>"""

ALLOWED = """<!doctype html><html><body><script>
const png = Uint8Array.from(atob("PNG"), c => c.charCodeAt(0));
fetch("SERVER/v1/upscale?scale=2", {method: "POST", body: new Blob([png]),
      headers: {"Content-Type": "image/png", "X-Request-Id": "cors-page"}})
  .then(async answer => ({status: answer.status, model: answer.headers.get("X-Model"),
                          bytes: (await answer.arrayBuffer()).byteLength}))
  .catch(error => ({error: String(error)}))
  .then(result => { document.body.dataset.done = JSON.stringify(result); });
</script></body></html>"""


def page(template: str, server: BackgroundServer, image: bytes) -> str:
    origin = f"http://127.0.0.1:{http_port(server)}"
    return template.replace("SERVER", origin).replace("PNG", base64.b64encode(image).decode())


@needs_chromium
def test_a_page_of_another_origin_can_neither_unload_nor_compute(
    site: BackgroundServer, pages: Pages, set5_dir: Path
) -> None:
    """An auto-submitted form, a form upload, a no-cors fetch and a simple fetch, from a page
    on another port of 127.0.0.1 (same site, another origin): all refused before any work."""
    pages.add("/attack.html", page(ATTACK, site, png(set5_dir)))
    computed = tiles_computed(site)
    upscale = "HTTP POST /v1/upscale"
    unload = "HTTP POST /v2/repository/models/{model}/unload"
    refused = (http_requests(site, upscale, "HTTP_403"), http_requests(site, unload, "HTTP_403"))
    results = json.loads(run_script_page(f"{pages.origin(0)}/attack.html"))
    assert loaded(site) == MODELS
    assert tiles_computed(site) == computed
    assert results["unload"] == "opaque" and results["upscale_no_cors"] == "opaque"
    assert str(results["upscale_simple"]).startswith("failed")  # no CORS header: unreadable
    # every attempt reached the server and was refused there
    assert http_requests(site, upscale, "HTTP_403") == refused[0] + 3
    assert http_requests(site, unload, "HTTP_403") == refused[1] + 2


@needs_chromium
def test_a_page_of_an_allowed_origin_upscales_after_a_preflight(
    site: BackgroundServer, pages: Pages, set5_dir: Path
) -> None:
    pages.add("/allowed.html", page(ALLOWED, site, png(set5_dir)))
    results = json.loads(run_script_page(f"{pages.origin(1)}/allowed.html"))
    assert (results["status"], results["model"]) == (200, "rdn_x2"), results
    assert results["bytes"] > 100


# -------------------------------------------------------------- Origin, Sec-Fetch-Site


def own_origin(server: BackgroundServer) -> str:
    return f"http://127.0.0.1:{http_port(server)}"


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://evil.example"},
        {"Origin": "null"},  # sandboxed frames, file: pages
        {"Origin": "http://127.0.0.1:1"},  # another port of this machine
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site", "Origin": "http://127.0.0.1:1"},
        {"Sec-Fetch-Site": "cross-site", "Origin": "OWN"},  # the browser's word decides
    ],
)
def test_state_changes_from_another_origin_are_403(
    site: BackgroundServer, set5_dir: Path, headers: dict[str, str]
) -> None:
    headers = {k: v.replace("OWN", own_origin(site)) for k, v in headers.items()}
    computed = tiles_computed(site)
    status, _, body = call(site, "POST", UNLOAD.format("rdn_x4"), b"{}", headers)
    upscale = call(site, "POST", "/v1/upscale", png(set5_dir), headers)
    assert status == 403 and "cross-origin request refused" in json.loads(body)["error"]
    assert "--http-cors-origin" in json.loads(body)["error"]
    assert upscale[0] == 403
    assert loaded(site) == MODELS and tiles_computed(site) == computed


@pytest.mark.parametrize(
    "headers",
    [
        {},  # a program: curl, tritonclient
        {"Origin": "OWN"},
        {"Origin": "OWN", "Sec-Fetch-Site": "same-origin"},  # the server's own page
        {"Sec-Fetch-Site": "none"},
        {"Origin": ALLOWED_ORIGIN, "Sec-Fetch-Site": "cross-site"},  # --http-cors-origin
    ],
)
def test_state_changes_from_this_origin_programs_and_allowed_origins_run(
    site: BackgroundServer, set5_dir: Path, headers: dict[str, str]
) -> None:
    headers = {k: v.replace("OWN", own_origin(site)) for k, v in headers.items()}
    status, answer_headers, body = call(site, "POST", "/v1/upscale", png(set5_dir), headers)
    assert status == 200, body
    assert call(site, "POST", "/v2/repository/index", b"{}", headers)[0] == 200
    allowed = headers.get("Origin") == ALLOWED_ORIGIN
    assert answer_headers.get("Access-Control-Allow-Origin") == (
        ALLOWED_ORIGIN if allowed else None
    )


def test_reads_from_another_origin_are_answered_without_cors_headers(
    site: BackgroundServer,
) -> None:
    """GET changes nothing; the browser hides the answer from a page without CORS headers."""
    status, headers, _ = call(site, "GET", "/v1/models", None, {"Origin": "http://evil.example"})
    assert status == 200 and "Access-Control-Allow-Origin" not in headers
    assert headers["Vary"] == "Origin"


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"],
)
def test_form_content_types_are_415_on_the_json_routes(
    site: BackgroundServer, content_type: str
) -> None:
    headers = {"Content-Type": content_type}
    for path in ("/v2/repository/index", UNLOAD.format("rdn_x4"), "/v2/models/rdn_x2/infer"):
        status, _, body = call(site, "POST", path, b"{}", headers)
        assert status == 415, (path, body)
        assert "what an HTML form sends" in json.loads(body)["error"]
    assert loaded(site) == MODELS
    json_type = call(
        site, "POST", "/v2/repository/index", b"{}", {"Content-Type": "application/json"}
    )
    assert json_type[0] == 200


def test_a_multipart_upload_from_a_program_reaches_the_upscale_route(
    site: BackgroundServer, set5_dir: Path
) -> None:
    """/v1/upscale takes files, also as forms: a program's multipart upload is not refused by
    the cross-site policy (the route itself decides what it accepts)."""
    boundary = "rdnboundary"
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=image; filename=a.png\r\n"
        f"Content-Type: image/png\r\n\r\n".encode()
        + png(set5_dir)
        + f"\r\n--{boundary}--\r\n".encode()
    )
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    status, _, answer = call(site, "POST", "/v1/upscale", body, headers)
    assert status not in (403, 415), answer
    same_origin = {**headers, "Origin": own_origin(site), "Sec-Fetch-Site": "same-origin"}
    assert call(site, "POST", "/v1/upscale", body, same_origin)[0] not in (403, 415)


# ------------------------------------------------------------------------ Host, DNS rebinding


@pytest.mark.parametrize(
    "host, status",
    [
        ("attacker.example", 421),  # a rebound name
        ("attacker.example:PORT", 421),
        ("localhost.attacker.example:PORT", 421),
        ("sr.internal.example:PORT", 421),
        ("localhost:PORT", 200),
        ("127.0.0.1:PORT", 200),
        ("[::1]:PORT", 200),
        ("10.1.2.3:PORT", 200),  # an address is never rebound
        ("SR.INTERNAL:PORT", 200),  # --http-allowed-host
    ],
)
def test_without_a_token_only_known_host_names_are_answered(
    site: BackgroundServer, host: str, status: int
) -> None:
    host = host.replace("PORT", str(http_port(site)))
    for method, path in (("GET", "/v2/health/ready"), ("GET", "/"), ("POST", UNLOAD.format("x"))):
        got, _, body = call(site, method, path, b"{}" if method == "POST" else None, {"Host": host})
        if status == 421:
            assert got == 421 and "DNS rebinding" in json.loads(body)["error"], (path, body)
        else:
            assert got != 421, (path, body)
    assert loaded(site) == MODELS


def test_an_http_1_0_request_without_a_host_header_is_answered(site: BackgroundServer) -> None:
    """Only programs send no Host (browsers always do; HTTP/1.1 requires it)."""
    with socket.create_connection(("127.0.0.1", http_port(site)), timeout=30) as sock:
        sock.sendall(b"GET /v2/health/ready HTTP/1.0\r\n\r\n")
        answer = sock.makefile("rb").readline()
    assert answer.split()[1] == b"200", answer


def test_with_a_token_the_token_guards_any_host_name(tiny_onnx_x2: Path) -> None:
    config = loopback_config(tiny_onnx_x2, http_port=0, security=SecurityConfig(auth_token=TOKEN))
    with BackgroundServer(config) as bg:
        rebound = {"Host": "attacker.example"}
        refused = call(bg, "POST", "/v2/repository/index", b"{}", rebound)
        allowed = call(
            bg,
            "POST",
            "/v2/repository/index",
            b"{}",
            {**rebound, "Authorization": f"Bearer {TOKEN}"},
        )
    assert refused[0] == 401 and allowed[0] == 200


# --------------------------------------------------------------------------- CORS


def test_preflights_are_answered_for_allowed_origins_only(site: BackgroundServer) -> None:
    ask = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,authorization",
    }
    status, headers, _ = call(
        site, "OPTIONS", "/v1/upscale", None, {**ask, "Origin": ALLOWED_ORIGIN}
    )
    assert status == 204
    assert headers["Access-Control-Allow-Origin"] == ALLOWED_ORIGIN
    assert "POST" in headers["Access-Control-Allow-Methods"]
    allowed_headers = headers["Access-Control-Allow-Headers"].lower()
    assert "content-type" in allowed_headers and "authorization" in allowed_headers
    assert int(headers["Access-Control-Max-Age"]) > 0
    assert "Access-Control-Allow-Credentials" not in headers
    status, headers, body = call(
        site, "OPTIONS", UNLOAD.format("rdn_x4"), None, {**ask, "Origin": "http://evil.example"}
    )
    assert status == 403 and "Access-Control-Allow-Origin" not in headers
    assert ALLOWED_ORIGIN in json.loads(body)["error"]


def test_an_allowed_origin_reads_the_answer_and_its_headers(
    site: BackgroundServer, set5_dir: Path
) -> None:
    headers = {"Origin": ALLOWED_ORIGIN, "Sec-Fetch-Site": "cross-site"}
    status, answer, _ = call(site, "POST", "/v1/upscale", png(set5_dir), headers)
    assert status == 200 and answer["Access-Control-Allow-Origin"] == ALLOWED_ORIGIN
    assert "X-Model" in answer["Access-Control-Expose-Headers"]
    assert answer["Vary"] == "Origin"


def test_a_server_without_cors_origins_answers_no_preflight(tiny_onnx_x2: Path) -> None:
    with BackgroundServer(loopback_config(tiny_onnx_x2, http_port=0)) as bg:
        ask = {"Origin": ALLOWED_ORIGIN, "Access-Control-Request-Method": "POST"}
        status, headers, _ = call(bg, "OPTIONS", "/v1/upscale", None, ask)
        plain = call(bg, "GET", "/v1/models", None, {"Origin": ALLOWED_ORIGIN})
    assert status == 403 and "Access-Control-Allow-Origin" not in headers
    assert plain[0] == 200 and "Access-Control-Allow-Origin" not in plain[1]


# ---------------------------------------------------------------------- where it listens


def reachable(address: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(5)
        return sock.connect_ex((address, port)) == 0


def test_the_http_door_binds_loopback_unless_a_token_or_http_host_says_otherwise(
    tiny_onnx_x2: Path,
) -> None:
    """gRPC on 127.0.0.2 (standing in for 0.0.0.0, loopback only): without a token the HTTP
    door stays on 127.0.0.1; with a token it follows --host; --http-host decides first."""
    base = loopback_config(tiny_onnx_x2, host="127.0.0.2", http_port=0)
    token = SecurityConfig(auth_token=TOKEN)
    where = {}
    for label, config in (
        ("default", base),
        ("token", replace(base, security=token)),
        ("http-host", replace(base, http_host="127.0.0.3")),
    ):
        with BackgroundServer(config) as bg:
            port = http_port(bg)
            where[label] = [
                a for a in ("127.0.0.1", "127.0.0.2", "127.0.0.3") if reachable(a, port)
            ]
    assert where == {"default": ["127.0.0.1"], "token": ["127.0.0.2"], "http-host": ["127.0.0.3"]}
    assert http_bind_host(ServerConfig()) == "127.0.0.1"
    assert http_bind_host(ServerConfig(security=token)) == "0.0.0.0"


def test_flags_and_the_exposure_warning() -> None:
    args = build_parser().parse_args(
        ["--http-port", "8080", "--http-cors-origin", "https://a.example:8443",
         "--http-cors-origin", "http://b.example", "--http-allowed-host", "SR.internal",
         "--http-host", "0.0.0.0"]
    )  # fmt: skip
    config = config_from_args(args)
    assert config.cross_site == CrossSiteConfig(
        cors_origins=("https://a.example:8443", "http://b.example"), allowed_hosts=("sr.internal",)
    )
    assert config.http_host == "0.0.0.0"
    warning = exposure_warning(config)
    assert warning is not None and "without a token" in warning
    assert exposure_warning(replace(config, http_host=None)) is None
    for bad in (["--http-cors-origin", "*"], ["--http-cors-origin", "https://a.example/x"],
                ["--http-allowed-host", "a.example:80"]):  # fmt: skip
        with pytest.raises(SystemExit):
            build_parser().parse_args(bad)


def test_origins_compare_by_scheme_host_and_port() -> None:
    assert canonical_origin("HTTP://LocalHost") == "http://localhost:80"
    assert canonical_origin("https://[::1]") == "https://[::1]:443"
    assert canonical_origin("null") is None and canonical_origin("file:///x") is None
    assert foreign_page({"Origin": "http://h.example"}, "http", "h.example") is None
    assert foreign_page({"Origin": "http://h.example:8080"}, "http", "h.example:8080") is None
    assert foreign_page({"Origin": "http://h.example:8081"}, "http", "h.example:8080")
    assert foreign_page({"Origin": "http://h.example:8080"}, "http", "h.example")
    assert foreign_page({}, "http", "h.example") is None
    assert foreign_page({"Sec-Fetch-Site": "same-site"}, "http", "h") == "a same-site page"
