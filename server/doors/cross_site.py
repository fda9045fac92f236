"""What web pages of other origins, and requests under other Host names, may make the HTTP door do.

A browser lets any page send "simple" requests to any address without asking first (GET, HEAD,
and POST with a form's content type: an auto-submitted form, a ``no-cors`` fetch); it only hides
the answer from the page. Such a request can still change state (unload a model) or cost
compute (``/v1/upscale``). And a page whose host name an attacker rebinds to 127.0.0.1 (DNS
rebinding) is same-origin with the server in the browser's eyes. This aiohttp middleware runs
before the token check, on every request:

1. Host (only when no token is set: a token already stops a rebound page): the name must be
   ``localhost``, an IP address (an address is never rebound), the bound host or an
   ``--http-allowed-host`` name; others get 421.
2. CORS preflights (OPTIONS with ``Access-Control-Request-Method``): answered for the origins of
   ``--http-cors-origin`` (none by default), 403 without CORS headers for any other.
3. POST / PUT / DELETE ... from a page of another origin, as the browser says it
   (``Sec-Fetch-Site`` other than same-origin or none; else an ``Origin`` that is not this
   server's, or ``null``), are refused with 403 unless that origin is allowed. Requests with
   neither header come from programs (curl, tritonclient), not from a page.
4. On the JSON routes (repository, infer), a form's content type (text/plain, urlencoded,
   multipart) is refused with 415 whoever sends it: the last line for a browser that sends
   neither header. ``/v1/upscale`` takes a file, raw or (later) as a multipart form, so it
   relies on step 3.
5. Answers to an allowed origin carry ``Access-Control-Allow-Origin`` and the headers it may
   read; no credentials (cookies) are ever allowed: callers send a bearer token.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import re
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web
from yarl import URL

from server.config import CrossSiteConfig, ServerConfig
from server.core.access import AccessObserver, AccessRecord
from server.ops.metrics import is_loopback
from server.wire import HTTP_METHODS

log = logging.getLogger(__name__)

LOOPBACK_HOST = "127.0.0.1"  # the HTTP door's address unless a token or --http-host says more
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})  # change nothing, compute nothing
FORM_CONTENT_TYPES = frozenset(
    {"application/x-www-form-urlencoded", "multipart/form-data", "text/plain"}
)  # what an HTML form can send without a preflight
FILE_PATHS = frozenset({"/v1/upscale"})  # take an uploaded file, possibly as a form
SAME_ORIGIN_FETCHES = frozenset({"same-origin", "none"})  # Sec-Fetch-Site: not another page
DEFAULT_PORTS = {"http": 80, "https": 443}
LOCAL_NAMES = frozenset({"localhost"})
# What an allowed origin's page may send and read (beyond the CORS-safelisted ones).
ALLOW_METHODS = "GET, HEAD, POST, PUT"
ALLOW_HEADERS = (
    "Authorization, Content-Type, X-Request-Id, X-Progress, Inference-Header-Content-Length"
)
EXPOSE_HEADERS = (
    "X-Model, X-Model-Reason, X-Width, X-Height, X-Scale, X-Tiles, X-Frames, X-Source-Bits, "
    "X-Source-Profile, X-Notes, "
    "X-Compute-Seconds, X-Total-Seconds, X-Request-Id, Inference-Header-Content-Length, "
    "Retry-After"
)
PREFLIGHT_MAX_AGE_S = 600  # browsers cache an allowed preflight this long
HOST_PATTERN = re.compile(r"(?P<name>\[[0-9a-f:.]+\]|[a-z0-9_.-]+)(?::(?P<port>[0-9]{1,5}))?")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def canonical_origin(text: str) -> str | None:
    """``scheme://host:port`` of a web origin (lower case, port explicit), or None when
    ``text`` is not one (``null``, a path, another scheme, garbage)."""
    try:
        url = URL(text.strip())
    except ValueError:
        return None
    if (
        url.scheme not in DEFAULT_PORTS
        or not url.host
        or url.path not in ("", "/")
        or url.query_string
        or url.fragment
        or url.user is not None
    ):
        return None
    host = url.host.lower()
    return f"{url.scheme}://{f'[{host}]' if ':' in host else host}:{url.port}"


def split_host(text: str) -> tuple[str, int | None] | None:
    """A Host header's name (IPv6 without brackets, lower case, no trailing dot) and port;
    None when it is not a host name."""
    found = HOST_PATTERN.fullmatch(text.strip().lower())
    if found is None:
        return None
    port = int(found["port"]) if found["port"] else None
    return found["name"].strip("[]").rstrip("."), port


def is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def http_bind_host(config: ServerConfig) -> str:
    """Where the HTTP door listens: ``--http-host``, else ``--host`` when a token guards it,
    else 127.0.0.1 (as the metrics port: without a token, only this machine reaches it)."""
    if config.http_host is not None:
        return config.http_host
    return config.host if config.security.auth_token else LOOPBACK_HOST


def exposure_warning(config: ServerConfig) -> str | None:
    """The warning for an HTTP door without a token that other machines reach; else None."""
    host = http_bind_host(config)
    if config.http_port is None or config.security.auth_token or is_loopback(host):
        return None
    return (
        f"HTTP on {host} without a token: anyone who reaches that address may upscale and load "
        "or unload models (--auth-token-file guards it; --http-host 127.0.0.1 keeps it local)"
    )


def foreign_page(headers: Mapping[str, str], scheme: str, host: str) -> str | None:
    """Which page of another origin sent this request, as the browser tells (``Sec-Fetch-Site``
    first, else ``Origin`` against the Host the request was sent to); None when it came from
    this server's own page or from a program."""
    origin = headers.get("Origin")
    fetch_site = headers.get("Sec-Fetch-Site")
    if fetch_site is not None:
        if fetch_site.strip().lower() in SAME_ORIGIN_FETCHES:
            return None
        return origin or f"a {fetch_site.strip().lower()[:20]} page"
    if origin is None:
        return None
    canonical = canonical_origin(origin)
    own = split_host(host)
    if canonical is None or own is None:
        return origin[:100]  # "null": a sandboxed or file page, never this server's
    url = URL(canonical)
    name, port = own
    same_port = port == url.port or (port is None and url.port == DEFAULT_PORTS[url.scheme])
    return None if (url.host or "").strip("[]") == name and same_port else origin[:100]


class CrossSitePolicy:
    """The middleware of the module docstring, for one HTTP door."""

    def __init__(
        self,
        config: CrossSiteConfig,
        *,
        bind_host: str,
        token: bool,
        observer: AccessObserver | None = None,
    ) -> None:
        self._origins = frozenset(filter(None, map(canonical_origin, config.cors_origins)))
        names = {*LOCAL_NAMES, *(h.lower().rstrip(".") for h in config.allowed_hosts)}
        if bind_host and not is_address(bind_host):
            names.add(bind_host.lower().rstrip("."))
        self._host_names = frozenset(names)
        self._check_host = not token
        self._observer = observer

    def host_allowed(self, host: str | None) -> bool:
        """Whether a request sent to ``host`` (the Host header; None: a program's HTTP/1.0
        request without one, never a browser's) is answered."""
        if not self._check_host or host is None:
            return True
        parts = split_host(host)
        return parts is not None and (parts[0] in self._host_names or is_address(parts[0]))

    def _allowed_origin(self, request: web.Request) -> str | None:
        origin = request.headers.get("Origin")
        if origin is not None and canonical_origin(origin) in self._origins:
            return origin
        return None

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        host = request.headers.get("Host")
        if not self.host_allowed(host):
            return self._refuse(
                request,
                421,
                f"Host {(host or '')[:100]!r} is not a name of this server: without a token it "
                "answers localhost, IP addresses, the host it is bound to and the names of "
                "--http-allowed-host (a guard against DNS rebinding)",
            )
        allowed = self._allowed_origin(request)
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            return self._preflight(request, allowed)
        if request.method not in SAFE_METHODS:
            refusal = self._refusal(request, allowed)
            if refusal is not None:
                return refusal
        response = await handler(request)
        if self._origins and not response.prepared:
            response.headers.add("Vary", "Origin")  # the answer depends on the Origin
            if allowed is not None:
                response.headers["Access-Control-Allow-Origin"] = allowed
                response.headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
        return response

    def _refusal(self, request: web.Request, allowed: str | None) -> web.Response | None:
        """The answer to a state-changing request that may not run, else None."""
        host = request.headers.get("Host", "")
        page = foreign_page(request.headers, request.scheme, host) if allowed is None else None
        if page is not None:
            return self._refuse(
                request,
                403,
                f"cross-origin request refused: a page of {page!r} may not {request.method} "
                f"{request.path}; start the server with --http-cors-origin ORIGIN to allow "
                "that origin's pages",
            )
        content_type = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type in FORM_CONTENT_TYPES and request.path not in FILE_PATHS:
            return self._refuse(
                request,
                415,
                f"Content-Type {content_type} (what an HTML form sends) is refused on "
                f"{request.path}: send application/json, or no Content-Type",
            )
        return None

    def _preflight(self, request: web.Request, allowed: str | None) -> web.Response:
        if allowed is None:
            origin = request.headers.get("Origin", "")[:100]
            listed = ", ".join(sorted(self._origins)) or "none"
            return self._refuse(
                request,
                403,
                f"origin {origin!r} may not call this server from a web page; allowed origins "
                f"(--http-cors-origin): {listed}",
            )
        headers = {
            "Access-Control-Allow-Origin": allowed,
            "Access-Control-Allow-Methods": ALLOW_METHODS,
            "Access-Control-Allow-Headers": ALLOW_HEADERS,
            "Access-Control-Max-Age": str(PREFLIGHT_MAX_AGE_S),
            "Vary": "Origin",
        }
        if request.headers.get("Access-Control-Request-Private-Network") == "true":
            headers["Access-Control-Allow-Private-Network"] = "true"  # Chrome's PNA preflight
        return web.Response(status=204, headers=headers)

    def _refuse(self, request: web.Request, status: int, message: str) -> web.Response:
        """An error answer that never reaches a handler, in the access log and metrics."""
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        verb = request.method if request.method in HTTP_METHODS else "OTHER"
        record = AccessRecord(f"HTTP {verb} {route}", self._observer)
        record.set(protocol="http", status=f"HTTP_{status}")
        record.log()
        return web.json_response({"error": message}, status=status)


# ------------------------------------------------------------------------- command line


def _origin(text: str) -> str:
    if canonical_origin(text) is None or text.strip().rstrip("/") != text.strip():
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a web origin; give scheme://host[:port] without a path, e.g. "
            "https://photos.example.com ('*' is not accepted: list each origin)"
        )
    return text.strip()


def _host_name(text: str) -> str:
    parts = split_host(text)
    if parts is None or parts[1] is not None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a host name; give the name alone, e.g. sr.internal"
        )
    return parts[0]


def add_http_flags(parser: argparse.ArgumentParser) -> None:
    """rdn-serve's flags of the HTTP door's exposure (besides --http-port)."""
    group = parser.add_argument_group("HTTP door exposure (with --http-port)")
    group.add_argument(
        "--http-host",
        metavar="ADDRESS",
        help=f"address of the HTTP door (default: {LOOPBACK_HOST}, or --host when "
        "--auth-token-file is set)",
    )
    group.add_argument(
        "--http-cors-origin",
        action="append",
        type=_origin,
        metavar="ORIGIN",
        help="let web pages of ORIGIN (scheme://host[:port]) call the HTTP door (CORS); "
        "repeatable; default: none, so pages of other origins can neither change nor compute",
    )
    group.add_argument(
        "--http-allowed-host",
        action="append",
        type=_host_name,
        metavar="NAME",
        help="without a token, answer requests sent to NAME too (besides localhost, IP "
        "addresses and --http-host); repeatable; a guard against DNS rebinding",
    )


def cross_site_config_from_args(args: argparse.Namespace) -> CrossSiteConfig:
    return CrossSiteConfig(
        cors_origins=tuple(args.http_cors_origin or ()),
        allowed_hosts=tuple(args.http_allowed_host or ()),
    )
