"""Helpers for the web console's tests: a demo-symbol video, dmf-run --web in a subprocess, and a plain
HTTP client (http.client, so that a test can send any Host, Origin or body it likes)."""

from __future__ import annotations

import http.client
import json
import os
import re
import select
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from bundles import dmf_run_command, on_card, write_video

from dmf_deploy.symbols import STROKE_FONT, render_symbol

SYMBOLS = ("R", "7", "4", "9")  # dmf-demo's symbols (the stroke font): never Omniglot images
SEGMENT = 8  # frames per symbol in the clip
START_TIMEOUT_S = 60


def symbol_frame(symbol: str, seed: int) -> np.ndarray:
    """dmf-demo's close-up of the symbol (112 px) on a card three times its size (336 px)."""
    return on_card(render_symbol(STROKE_FONT[symbol], np.random.default_rng([seed, ord(symbol)])))


def symbol_png(symbol: str, seed: int) -> bytes:
    return cv2.imencode(".png", symbol_frame(symbol, seed))[1].tobytes()


def demo_clip(folder: Path) -> Path:
    """A real video: SEGMENT frames of each of SYMBOLS, each frame drawn anew (as dmf-demo's video)."""
    frames = [symbol_frame(s, 1000 + i) for s in SYMBOLS for i in range(SEGMENT)]
    return write_video(folder / "symbols.mp4", frames)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)


@dataclass
class Console:
    """A running `dmf-run --web`: its process, address and token."""

    process: subprocess.Popen
    port: int
    token: str | None
    stderr: list[str] = field(default_factory=list)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        token: str | None | bool = True,
        timeout: float = 30,
    ) -> Reply:
        sent = {"Host": self.host}
        if token is True and self.token:
            sent["Authorization"] = f"Bearer {self.token}"
        elif isinstance(token, str):
            sent["Authorization"] = f"Bearer {token}"
        sent.update(headers or {})
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            for key, value in sent.items():
                conn.putheader(key, value)
            if body is not None and "Content-Length" not in sent:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            response = conn.getresponse()
            return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
        finally:
            conn.close()

    def get(self, path: str, **kw) -> Reply:
        return self.request("GET", path, **kw)

    def send_json(self, method: str, path: str, value, **kw) -> Reply:
        headers = {"Content-Type": "application/json", **kw.pop("headers", {})}
        return self.request(method, path, json.dumps(value).encode(), headers=headers, **kw)

    def upload(self, path: str, files: list[tuple[str, bytes]], **kw) -> Reply:
        body, content_type = multipart(files)
        headers = {"Content-Type": content_type, **kw.pop("headers", {})}
        return self.request("POST", path, body, headers=headers, **kw)

    def classes(self) -> list[dict]:
        reply = self.get("/api/classes?limit=500")
        assert reply.status == 200, reply.body
        return reply.json()

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=30)
        finally:
            if self.process.poll() is None:
                self.process.kill()


def multipart(files: list[tuple[str, bytes]], field_name: str = "image") -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for filename, data in files:
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field_name}"; filename="{filename}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n".encode()
            + data
            + b"\r\n"
        )
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def start_console(args: list, token: str | None, env: dict | None = None) -> Console:
    """Start dmf-run with the given arguments plus --web 127.0.0.1:0; wait for its address line."""
    environ = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    environ.update(env or {})
    command = [*dmf_run_command(), *map(str, args), "--web", "127.0.0.1:0"]
    if token:
        command += ["--web-token", token]
    process = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=environ
    )
    lines: list[str] = []
    deadline = time.monotonic() + START_TIMEOUT_S
    buffer = b""
    assert process.stderr is not None
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stderr], [], [], 0.2)
        if ready:
            chunk = os.read(process.stderr.fileno(), 4096)
            if not chunk:
                break
            buffer += chunk
            lines = buffer.decode(errors="replace").splitlines()
            found = re.search(r"web console on http://127\.0\.0\.1:(\d+)", buffer.decode(errors="replace"))
            if found and b"\n" in buffer[buffer.find(b"web console") :]:
                return Console(process, int(found.group(1)), token, lines)
        elif process.poll() is not None:
            break
    process.kill()
    raise AssertionError(f"dmf-run --web did not start: {buffer.decode(errors='replace')}")


def mjpeg_parts(console: Console, count: int, timeout: float = 20) -> list[bytes]:
    """The first `count` JPEGs of /stream.mjpg."""
    conn = http.client.HTTPConnection("127.0.0.1", console.port, timeout=timeout)
    headers = {"Host": console.host}
    if console.token:
        headers["Authorization"] = f"Bearer {console.token}"
    conn.request("GET", "/stream.mjpg", headers=headers)
    response = conn.getresponse()
    assert response.status == 200
    assert response.getheader("Content-Type") == "multipart/x-mixed-replace; boundary=frame"
    jpegs = []
    try:
        while len(jpegs) < count:
            assert response.readline() == b"--frame\r\n"
            part_headers = {}
            while (line := response.readline()) != b"\r\n":
                key, _, value = line.decode().partition(":")
                part_headers[key.strip().lower()] = value.strip()
            assert part_headers["content-type"] == "image/jpeg"
            jpegs.append(response.read(int(part_headers["content-length"])))
            assert response.read(2) == b"\r\n"
    finally:
        conn.close()
    return jpegs


class EventStream:
    """GET /api/events, read line by line."""

    def __init__(self, console: Console, timeout: float = 20) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", console.port, timeout=timeout)
        headers = {"Host": console.host}
        if console.token:
            headers["Authorization"] = f"Bearer {console.token}"
        self.conn.request("GET", "/api/events", headers=headers)
        self.response = self.conn.getresponse()
        assert self.response.status == 200
        assert self.response.getheader("Content-Type").startswith("text/event-stream")

    def next(self) -> dict:
        while True:
            line = self.response.readline()
            assert line, "the event stream ended"
            if line.startswith(b"data: "):
                return json.loads(line[6:])

    def until(self, predicate, limit: int = 2000) -> dict:
        for _ in range(limit):
            record = self.next()
            if predicate(record):
                return record
        raise AssertionError("the awaited event did not come")

    def close(self) -> None:
        self.conn.close()
