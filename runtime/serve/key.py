"""The key `dmf-serve` asks of every client, and where `dmf-serve` and RemoteRecognizer find it.

Every request but Triton's health checks must carry the header ``dmf-serve-key: KEY``. A web page
cannot send that header to another site without a CORS preflight, and Triton grants none, so a page
open in a browser on the server's machine cannot reach the server either.

Where the key comes from, first match wins:
1. given explicitly: `dmf-serve --key`, `RemoteRecognizer(url, key=...)`;
2. the environment variable DMF_SERVE_KEY;
3. the key file, <user config dir>/dmf-deploy/serve.key (~/.config/dmf-deploy/serve.key on Linux):
   `dmf-serve` makes it (mode 0600) at its first start on a loopback address and reuses it after;
   RemoteRecognizer reads it only for a server on this machine (a loopback URL), so the key is never
   sent to another host. Delete the file to have the next start make a new key.
A server bound to any other address needs the key from 1 or 2: it does not start without one.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import secrets
import stat
import tempfile
from pathlib import Path

HEADER = "dmf-serve-key"
ENVIRONMENT_VARIABLE = "DMF_SERVE_KEY"
KEY_FILE_NAME = "serve.key"
# Header-safe characters that Triton's `--http-restricted-api=APIS:HEADER=KEY` takes as they are
# (no ':', '=' or ','), and long enough not to be guessed.
KEY_PATTERN = re.compile(r"[A-Za-z0-9._~+/-]{16,256}")
MAX_KEY_FILE_BYTES = 1024


class ServeKeyError(ValueError):
    """A key, or the key file, that cannot be used (bad characters, too short, readable by others)."""


def check_key(key: str, source: str) -> str:
    """The key, stripped of surrounding whitespace; ServeKeyError naming `source` if it is malformed."""
    key = key.strip()
    if not KEY_PATTERN.fullmatch(key):
        raise ServeKeyError(f"the key from {source} must be 16 to 256 characters of A-Z a-z 0-9 . _ ~ + / -")
    return key


def key_file() -> Path:
    """<user config dir>/dmf-deploy/serve.key."""
    try:
        from platformdirs import user_config_dir
    except ImportError:  # installed without the runtime extra: the XDG default
        root = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "dmf-deploy"
    else:
        root = Path(user_config_dir("dmf-deploy"))
    return root / KEY_FILE_NAME


def read_key_file(path: Path) -> str | None:
    """The key in `path`, None if there is no such file; ServeKeyError for a file that others could
    read or change (not this user's, or group/other permission bits set), or that holds no key."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ServeKeyError(f"cannot read the key file {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
            raise ServeKeyError(f"the key file {path} is not a regular file of this user")
        if info.st_mode & 0o077:
            raise ServeKeyError(
                f"the key file {path} can be read by others (mode {stat.S_IMODE(info.st_mode):04o}); "
                f"delete it, and the next dmf-serve start makes a new one"
            )
        data = handle.read(MAX_KEY_FILE_BYTES + 1)
    try:
        return check_key(data.decode("ascii"), f"the key file {path}")
    except UnicodeDecodeError:
        raise ServeKeyError(f"the key file {path} holds no key") from None


def load_or_create_key_file(path: Path | None = None) -> str:
    """The key in the key file; made first (random, mode 0600, atomically) if there is none.

    Made under a temporary name and linked to its final name, which fails if another `dmf-serve`
    made one first: then that one is read, so concurrent first starts agree on one key.
    """
    path = path or key_file()
    existing = read_key_file(path)
    if existing is not None:
        return existing
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = secrets.token_urlsafe(32)  # 43 characters of A-Z a-z 0-9 - _
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(key.encode("ascii") + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        os.unlink(tmp)
    return read_key_file(path) or key


def is_loopback(host: str) -> bool:
    """True for 'localhost' and loopback addresses (127.0.0.0/8, ::1); False for names and others."""
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def url_host(url: str) -> str:
    """The host of 'host:port', '[::1]:port' or 'http://host:port/...'."""
    address = url.split("://", 1)[-1].split("/", 1)[0]
    if address.startswith("["):
        return address[1:].split("]", 1)[0]
    return address.rsplit(":", 1)[0] if address.count(":") == 1 else address


def client_key(url: str, key: str | None = None) -> str | None:
    """The key a client sends to the server at `url` (host:port); None if it has none to send."""
    if key is not None:
        return check_key(key, "key=")
    if os.environ.get(ENVIRONMENT_VARIABLE):
        return check_key(os.environ[ENVIRONMENT_VARIABLE], ENVIRONMENT_VARIABLE)
    if is_loopback(url_host(url)):
        return read_key_file(key_file())
    return None
