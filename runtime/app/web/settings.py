"""The console's address, token, TLS files and webhook, as `dmf-run --web ...` gives them, checked once.

Safe by default: the console binds 127.0.0.1 unless told otherwise, and an address other than a
loopback one needs a token (`--web-token`, or DMF_WEB_TOKEN); without one, a token is generated and
printed with the URL, as Jupyter does. The Host names a request may carry are the console's own
(`allowed_host`): a page on another name that resolves to this box (DNS rebinding) is refused.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import socket
import string
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

DEFAULT_HOST = "127.0.0.1"
TOKEN_ENV = "DMF_WEB_TOKEN"
HOSTS_ENV = "DMF_WEB_HOSTS"  # extra Host names the console answers to (comma-separated), e.g. a LAN name
MIN_TOKEN_CHARS = 8
TOKEN_CHARS = frozenset(string.ascii_letters + string.digits + "-._~+/=")  # safe in a header and a URL
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


class WebSettingsError(ValueError):
    """A --web, --web-token, --web-cert, --web-key or --webhook value that cannot be used; says why."""


@dataclass(frozen=True)
class ConsoleSettings:
    host: str
    port: int
    token: str | None = None
    token_generated: bool = False
    certfile: Path | None = None
    keyfile: Path | None = None
    extra_hosts: tuple[str, ...] = field(default=())

    @property
    def scheme(self) -> str:
        return "https" if self.certfile else "http"

    @property
    def wildcard(self) -> bool:
        return self.host in WILDCARD_HOSTS

    def urls(self, port: int) -> list[str]:
        """Where a browser reaches the console (with the token, so that the link logs in)."""
        names = [socket.gethostname(), "127.0.0.1"] if self.wildcard else [self.host]
        query = f"/?token={self.token}" if self.token else "/"
        return [f"{self.scheme}://{_url_host(name)}:{port}{query}" for name in names]


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_bind(text: str) -> tuple[str, int]:
    """'[HOST:]PORT' -> (host, port); IPv6 hosts in brackets ('[::1]:8080'). Port 0: any free port."""
    text = text.strip()
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = DEFAULT_HOST, text
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise WebSettingsError(f"--web {text!r}: write an IPv6 address in brackets, e.g. [::1]:8080")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise WebSettingsError(f"--web {text!r}: the port must be a number from 0 to 65535")
    if host and not is_loopback(host) and host not in WILDCARD_HOSTS:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise WebSettingsError(
                f"--web {text!r}: give an IP address to bind (0.0.0.0 for every interface), not a name"
            ) from None
    return host or "0.0.0.0", int(port_text)


def resolve_settings(
    bind: str,
    token: str | None = None,
    certfile: Path | None = None,
    keyfile: Path | None = None,
) -> ConsoleSettings:
    """The console's settings from the command line (token: --web-token, else DMF_WEB_TOKEN)."""
    host, port = parse_bind(bind)
    if token is None:
        token = os.environ.get(TOKEN_ENV) or None
    generated = False
    if token is not None:
        if len(token) < MIN_TOKEN_CHARS or not set(token) <= TOKEN_CHARS:
            raise WebSettingsError(
                f"the web token must be at least {MIN_TOKEN_CHARS} characters of letters, digits and "
                "-._~+/= (it travels in a header, a cookie and a URL)"
            )
    elif not is_loopback(host):
        token, generated = secrets.token_urlsafe(24), True
    if (certfile is None) != (keyfile is None):
        raise WebSettingsError("TLS needs both --web-cert and --web-key")
    for path, option in ((certfile, "--web-cert"), (keyfile, "--web-key")):
        if path is not None and not path.is_file():
            raise WebSettingsError(f"{option} {path}: no such file")
    extra = tuple(h.strip().lower() for h in os.environ.get(HOSTS_ENV, "").split(",") if h.strip())
    return ConsoleSettings(host, port, token, generated, certfile, keyfile, extra)


def check_webhook_url(url: str) -> str:
    """A webhook must be an http(s) URL with a host; anything else is refused before the run starts."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebSettingsError(f"--webhook {url!r}: give an http:// or https:// URL")
    return url


def allowed_host(settings: ConsoleSettings, port: int, header: str | None) -> bool:
    """True if a request's Host header names this console: its own address and port.

    Accepted names: the bound address; for a wildcard or loopback bind, localhost and the loopback
    addresses; the machine's host name (and NAME.local); DMF_WEB_HOSTS. For a wildcard bind any IP
    literal is accepted too: DNS rebinding needs a name, and the box's addresses are not all known.
    """
    if not header:
        return False
    name, header_port = _split_host(header)
    if name is None:
        return False
    default = 443 if settings.certfile else 80
    if (header_port if header_port is not None else default) != port:
        return False
    own = {settings.host.lower(), *settings.extra_hosts}
    hostname = socket.gethostname().lower()
    own |= {hostname, f"{hostname}.local"}
    if settings.wildcard or is_loopback(settings.host):
        own |= {"localhost", "127.0.0.1", "::1"}
    if name in own:
        return True
    if settings.wildcard:
        try:
            ipaddress.ip_address(name)
            return True
        except ValueError:
            return False
    return False


def _split_host(header: str) -> tuple[str | None, int | None]:
    """'name:port' -> (name lowercased without a trailing dot, port or None); (None, None) if malformed."""
    header = header.strip().lower()
    if header.startswith("["):
        end = header.find("]")
        if end < 0:
            return None, None
        name, rest = header[1:end], header[end + 1 :]
        if rest and not rest.startswith(":"):
            return None, None
        port_text = rest[1:] if rest else ""
    else:
        name, _, port_text = header.partition(":")
    if port_text and not (port_text.isdigit() and len(port_text) <= 5):
        return None, None
    return name.rstrip("."), int(port_text) if port_text else None


def _url_host(name: str) -> str:
    return f"[{name}]" if ":" in name else name
