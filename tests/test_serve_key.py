"""The dmf-serve key: the key file dmf-serve makes, and which key a RemoteRecognizer sends where.

No server here (tests/test_triton_server.py checks the key against a real one).
"""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from dmf_deploy.runtime.serve.key import (
    ENVIRONMENT_VARIABLE,
    ServeKeyError,
    check_key,
    client_key,
    is_loopback,
    key_file,
    load_or_create_key_file,
    read_key_file,
    url_host,
)


@pytest.fixture
def config_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv(ENVIRONMENT_VARIABLE, raising=False)
    return tmp_path / "config"


def test_the_first_start_makes_a_private_key_file_and_later_ones_reuse_it(config_home: Path) -> None:
    path = key_file()
    assert path == config_home / "dmf-deploy" / "serve.key"
    key = load_or_create_key_file()
    assert check_key(key, "test") == key and len(key) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert load_or_create_key_file() == key  # reused, not replaced
    assert [p.name for p in path.parent.iterdir()] == ["serve.key"]  # no temporary file left


def test_concurrent_first_starts_agree_on_one_key(config_home: Path) -> None:
    keys: list[str] = []
    threads = [threading.Thread(target=lambda: keys.append(load_or_create_key_file())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(keys) == 8 and len(set(keys)) == 1
    assert read_key_file(key_file()) == keys[0]


@pytest.mark.parametrize(
    ("content", "mode", "error"),
    [
        (b"a-good-key-of-20-chars\n", 0o644, "can be read by others"),
        (b"a-good-key-of-20-chars\n", 0o620, "can be read by others"),
        (b"short\n", 0o600, "16 to 256 characters"),
        (b"has:a:colon-and-is-long\n", 0o600, "16 to 256 characters"),
        (b"\xff\xfe" * 20, 0o600, "holds no key"),
        (b"k" * 5000, 0o600, "16 to 256 characters"),
    ],
)
def test_a_key_file_that_others_can_read_or_that_holds_no_key_is_refused(
    config_home: Path, content: bytes, mode: int, error: str
) -> None:
    path = key_file()
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    os.chmod(path, mode)
    with pytest.raises(ServeKeyError, match=error):
        load_or_create_key_file()
    assert path.read_bytes() == content  # never replaced


def test_a_key_file_that_is_a_link_is_refused(config_home: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("a-good-key-of-20-chars\n")
    os.chmod(elsewhere, 0o600)
    key_file().parent.mkdir(parents=True)
    key_file().symlink_to(elsewhere)
    with pytest.raises(ServeKeyError, match="cannot read the key file"):
        read_key_file(key_file())


@pytest.mark.parametrize(
    ("url", "host", "loopback"),
    [
        ("127.0.0.1:8000", "127.0.0.1", True),
        ("localhost:8000", "localhost", True),
        ("127.1.2.3:8000", "127.1.2.3", True),
        ("[::1]:8000", "::1", True),
        ("http://127.0.0.1:8000/v2", "127.0.0.1", True),
        ("10.0.0.5:8000", "10.0.0.5", False),
        ("0.0.0.0:8000", "0.0.0.0", False),
        ("example.com:8000", "example.com", False),
        ("localhost.example.com:8000", "localhost.example.com", False),
    ],
)
def test_the_key_file_is_sent_only_to_this_machine(
    config_home: Path, url: str, host: str, loopback: bool
) -> None:
    key = load_or_create_key_file()
    assert url_host(url) == host and is_loopback(host) == loopback
    assert client_key(url) == (key if loopback else None)
    assert client_key(url, key="an-explicit-key-1234") == "an-explicit-key-1234"  # key= first


def test_the_environment_comes_before_the_key_file(
    config_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    load_or_create_key_file()
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "from-the-environment-1234")
    assert client_key("127.0.0.1:8000") == "from-the-environment-1234"
    assert client_key("10.0.0.5:8000") == "from-the-environment-1234"
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "bad key with spaces in it")
    with pytest.raises(ServeKeyError, match=ENVIRONMENT_VARIABLE):
        client_key("127.0.0.1:8000")
