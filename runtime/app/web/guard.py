"""Every request passes here first (an ASGI middleware): Host, cross-site, token, body size.

In order, each refusal a JSON error:
1. the Host header must name the console (settings.allowed_host), else 403 `foreign_host`: a page on
   another name that resolves to this box (DNS rebinding) gets nothing;
2. a request that changes state (POST, PUT, PATCH, DELETE) whose Origin is not the console's own, and
   any request a browser marks `Sec-Fetch-Site: cross-site` or `same-site` (except opening the page
   from a link), is refused: 403 `cross_origin`;
3. with a token, every route needs `Authorization: Bearer TOKEN` or the console's cookie, else 401
   `unauthorized`. Opening `/?token=TOKEN` (the printed link) sets the cookie (HttpOnly,
   SameSite=Strict, Secure over TLS) and redirects to `/`, so the token leaves the address bar;
4. a body larger than MAX_UPLOAD_BYTES is refused (413 `upload_too_large`): from Content-Length before
   anything is read, and by counting as it arrives when there is none.
"""

from __future__ import annotations

import hmac
import json
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qs

from dmf_deploy.runtime.app.web.settings import ConsoleSettings, allowed_host
from dmf_deploy.runtime.app.web.uploads import MAX_UPLOAD_BYTES

COOKIE = "dmf_web_token"
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),  # the token is never sent on in a Referer
    (b"x-frame-options", b"DENY"),
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
        b"connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    ),
]


class BodyTooLarge(Exception):
    """Raised from `receive` once a body passes the bound; answered with 413."""


async def send_error(send, status: int, name: str, detail: str, headers: list | None = None) -> None:
    body = json.dumps({"error": name, "detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *SECURITY_HEADERS,
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class Guard:
    def __init__(self, app, settings: ConsoleSettings, port: int) -> None:
        self.app, self.settings, self.port = app, settings, port

    async def __call__(self, scope: dict[str, Any], receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        method = scope["method"]
        host = headers.get("host")
        if not allowed_host(self.settings, self.port, host):
            await send_error(send, 403, "foreign_host", f"this console does not answer to the host {host!r}")
            return
        origin = headers.get("origin")
        own_origin = f"{self.settings.scheme}://{host}".lower()
        if method in STATE_CHANGING and origin is not None and origin.lower() != own_origin:
            await send_error(send, 403, "cross_origin", f"requests from {origin!r} may not change anything")
            return
        navigating = method == "GET" and headers.get("sec-fetch-mode") == "navigate"
        # same-site too: a page on another port of this host is another origin, yet its requests carry
        # the SameSite cookie.
        if headers.get("sec-fetch-site") in ("cross-site", "same-site") and not navigating:
            await send_error(send, 403, "cross_origin", "another site may not use this console")
            return
        token = self.settings.token
        if token is not None:
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            offered = query.get("token", [None])[0]
            if scope["path"] == "/" and method == "GET" and offered is not None:
                await self._log_in(send, offered, token)
                return
            if not _authorized(headers, token):
                await send_error(
                    send,
                    401,
                    "unauthorized",
                    "this console needs its token: open the link dmf-run printed (it ends in ?token=...), "
                    "or send Authorization: Bearer TOKEN",
                    [(b"www-authenticate", b'Bearer realm="dmf-run"')],
                )
                return
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_UPLOAD_BYTES):
            await send_error(send, 413, "upload_too_large", too_large_detail())
            return

        received = 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > MAX_UPLOAD_BYTES:
                    raise BodyTooLarge()
            return message

        async def secured_send(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        await self.app(scope, counted_receive, secured_send)

    async def _log_in(self, send, offered: str, token: str) -> None:
        if not hmac.compare_digest(offered.encode(), token.encode()):
            await send_error(send, 401, "unauthorized", "the token in the link is not this console's")
            return
        cookie = f"{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict"
        if self.settings.certfile:
            cookie += "; Secure"
        await send(
            {
                "type": "http.response.start",
                "status": 303,
                "headers": [
                    (b"location", b"/"),
                    (b"set-cookie", cookie.encode()),
                    (b"content-length", b"0"),
                    *SECURITY_HEADERS,
                ],
            }
        )
        await send({"type": "http.response.body", "body": b""})


def too_large_detail() -> str:
    return f"a request may carry at most {MAX_UPLOAD_BYTES >> 20} MB"


def _headers(scope: dict[str, Any]) -> dict[str, str]:
    """Header names lowercased; of a repeated header, the first (a second Host is not a second chance)."""
    found: dict[str, str] = {}
    for key, value in scope.get("headers", []):
        found.setdefault(key.decode("latin-1").lower(), value.decode("latin-1"))
    return found


def _authorized(headers: dict[str, str], token: str) -> bool:
    scheme, _, value = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode()):
        return True
    cookie = SimpleCookie()
    try:
        cookie.load(headers.get("cookie", ""))
    except Exception:  # a malformed Cookie header is no credential
        return False
    morsel = cookie.get(COOKIE)
    return morsel is not None and hmac.compare_digest(morsel.value.encode(), token.encode())
