"""The web app's guard, one ASGI middleware in front of every route (static files included).

- Host: bound to this machine (no token), only requests addressed to localhost / 127.0.0.1 / [::1] are served.
  A web page elsewhere cannot reach the app by pointing its own DNS name at 127.0.0.1 (DNS rebinding).
- Token (required whenever the app listens beyond this machine): every request carries it, as the cookie the
  app sets on first visit with `?token=…`, or as `Authorization: Bearer …`.
- CSRF: every POST carries the app's CSRF token (form field `csrf`, or header `X-CSRF-Token`). Pages embed it;
  another site cannot read it, so it cannot make the browser post. A POST from a foreign Origin is refused too.
- Headers: a Content-Security-Policy that allows only the app's own scripts, styles and connections (no inline
  script runs even if some text were mis-escaped), and no framing, sniffing or referrers to other sites.
"""

from __future__ import annotations

import hmac
import json
import secrets
from typing import Optional
from urllib.parse import parse_qs, quote, urlencode, urlsplit

TOKEN_COOKIE = "melbo_token"
CSRF_FIELD = "csrf"
CSRF_HEADER = "x-csrf-token"
MAX_BODY = 256 * 1024  # bytes of a POST body: prompts and chat histories are bounded far below this
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),  # no-referrer would make the browser send `Origin: null` on our own forms
    (b"cache-control", b"no-store"),
]


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def same(given: Optional[str], expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


class Guard:
    """ASGI middleware: host check, token, CSRF on POST, security headers (see the module docstring)."""

    def __init__(self, app, csrf: str, token: Optional[str] = None):
        self.app, self.csrf, self.token = app, csrf, token

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket":  # the app has none, and none may slip past the checks below
            await receive()
            return await send({"type": "websocket.close", "code": 1008})
        if scope["type"] != "http":  # lifespan
            return await self.app(scope, receive, send)
        send = _with_headers(send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = _hostname(headers.get("host", ""))
        if self.token is None and host not in LOCAL_HOSTS:
            return await _refuse(send, 403, f"this server answers only to localhost, not {host or 'no host'}: "
                                            "open http://127.0.0.1:PORT/")
        if self.token is not None:
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            if same((query.get("token") or [None])[0], self.token):
                return await _set_token_cookie(send, scope, query, self.token)
            if not (same(_cookie(headers, TOKEN_COOKIE), self.token)
                    or same(headers.get("authorization", "").removeprefix("Bearer ").strip() or None, self.token)):
                return await _refuse(send, 401, "this server needs its token: open the URL `melbo serve` printed "
                                                "(…/?token=…)")
        if scope["method"] not in ("GET", "HEAD", "POST"):
            return await _refuse(send, 405, f"method {scope['method']} is not used here")
        if scope["method"] == "POST":
            origin = headers.get("origin")
            if origin and origin != "null" and _hostname(urlsplit(origin).netloc) != host:
                return await _refuse(send, 403, "cross-site POST refused")
            body = await _read_body(receive)
            if body is None:
                return await _refuse(send, 413, f"request body over {MAX_BODY // 1024} KB: send less text")
            form_token = None
            if headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
                form_token = (parse_qs(body.decode("utf-8", "replace")).get(CSRF_FIELD) or [None])[0]
            if not (same(headers.get(CSRF_HEADER), self.csrf) or same(form_token, self.csrf)):
                return await _refuse(send, 403, "missing or wrong CSRF token: reload the page and try again")
            receive = _replay(body, receive)
        return await self.app(scope, receive, send)


def _hostname(netloc: str) -> str:
    netloc = netloc.strip().lower()
    if netloc.startswith("["):  # [::1]:8765
        return netloc[1:].split("]")[0]
    return netloc.rsplit(":", 1)[0] if netloc.count(":") == 1 else netloc


def _cookie(headers: dict, name: str) -> Optional[str]:
    for part in headers.get("cookie", "").split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None


def _with_headers(send):
    async def sending(message):
        if message["type"] == "http.response.start":
            present = {k.lower() for k, _ in message.get("headers", [])}
            message = {**message, "headers": list(message.get("headers", []))
                       + [(k, v) for k, v in HEADERS if k not in present]}
        await send(message)

    return sending


async def _refuse(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _set_token_cookie(send, scope, query: dict, token: str) -> None:
    """The token arrived in the URL: keep it in an HttpOnly cookie and redirect to the URL without it."""
    rest = urlencode({k: v for k, v in query.items() if k != "token"}, doseq=True)
    location = _same_site_path(scope) + (f"?{rest}" if rest else "")
    cookie = f"{TOKEN_COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/"
    await send({"type": "http.response.start", "status": 303,
                "headers": [(b"location", location.encode()), (b"set-cookie", cookie.encode()),
                            (b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b""})


def _same_site_path(scope) -> str:
    """The request's path as a Location that stays on this site, else "/".

    `//evil.com/` (or `/\\evil.com`, which browsers read the same) is another site to a browser: an open redirect.
    The raw, still percent-encoded path is used, so a decoded tab or newline (which browsers drop from URLs,
    turning `/%09/evil.com` into `//evil.com`) never reaches the header."""
    raw = scope.get("raw_path")
    path = raw.decode("latin-1") if isinstance(raw, bytes) else quote(scope.get("path", "/"))
    printable = all(33 <= ord(c) <= 126 for c in path)
    if not printable or not path.startswith("/") or path[1:2] in ("/", "\\"):
        return "/"
    return path


async def _read_body(receive) -> Optional[bytes]:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks)
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > MAX_BODY:
            return None
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive):
    """A receive that gives the already-read body once, then passes on to the server (disconnects)."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
