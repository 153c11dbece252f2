"""--webhook: recognition changes POSTed to a real HTTP receiver on 127.0.0.1, from a real dmf-run run
on a video of dmf-demo's symbols; a failing receiver is retried, and a stalled one never holds the loop."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from bundles import dmf_run_command, parse_lines
from web_client import SEGMENT, SYMBOLS, demo_clip, symbol_frame

from dmf_deploy.runtime import Prediction, Recognizer
from dmf_deploy.runtime.app.web import webhook as webhook_module
from dmf_deploy.runtime.app.web.webhook import STABLE_FRAMES, Webhook


class Receiver:
    """An HTTP server on 127.0.0.1 that records every POST body; the first `fail` get HTTP 500."""

    def __init__(self, fail: int = 0) -> None:
        self.bodies: list[dict] = []
        self.statuses: list[int] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status = 500 if len(receiver.bodies) < fail else 200
                receiver.bodies.append(body)
                receiver.statuses.append(status)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def stable_changes(labels: list[str | None]) -> list[tuple[str, str | None, str | None]]:
    """The changes the webhook must report for these per-frame labels (its rule, written out plainly)."""
    changes, reported, run, candidate = [], None, 0, object()
    for label in labels:
        run = run + 1 if label == candidate else 1
        candidate = label
        if run == STABLE_FRAMES and label != reported:
            kind = "unknown" if label is None else ("appeared" if reported is None else "changed")
            changes.append((kind, label, reported))
            reported = label
    return changes


def test_webhook_posts_each_recognition_change_and_retries_a_failure(tmp_path):
    clip = demo_clip(tmp_path)
    gallery = tmp_path / "g.dmfg"
    rec = Recognizer.open("demo", gallery=gallery)
    for symbol in SYMBOLS:
        rec.enroll(symbol, [symbol_frame(symbol, seed) for seed in (1, 2)])
    rec.save()
    receiver = Receiver(fail=1)
    try:
        done = subprocess.run(
            [*dmf_run_command(), "--source", clip, "--headless", "--bundle", "demo", "--gallery", gallery,
             "--webhook", receiver.url],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        receiver.close()
    assert done.returncode == 0, done.stderr
    predictions, _ = parse_lines(done.stdout)
    assert len(predictions) == SEGMENT * len(SYMBOLS)
    expected = stable_changes([p["label"] for p in predictions])
    assert [kind for kind, _, _ in expected][:1] == ["appeared"] and len(expected) >= len(SYMBOLS)
    # The first POST got HTTP 500 and was sent again; every change arrived once after that.
    assert receiver.statuses[0] == 500 and receiver.bodies[0] == receiver.bodies[1]
    got = [(b["change"], b["label"], b["previous"]) for b in receiver.bodies[1:]]
    assert got == expected
    assert all(b["event"] == "recognition" and isinstance(b["frame"], int) for b in receiver.bodies)


def test_a_stalled_receiver_never_holds_the_loop(monkeypatch):
    """A receiver that accepts and never answers: `observe` (what the loop calls) only queues, and a full
    queue drops the oldest change."""
    monkeypatch.setattr(webhook_module, "WEBHOOK_QUEUE", 4)
    silent = socket.create_server(("127.0.0.1", 0))  # accepts connections (backlog), never answers
    hook = Webhook(f"http://127.0.0.1:{silent.getsockname()[1]}/", sleep=lambda s: None)
    try:
        start = time.perf_counter()
        for i in range(40):  # 20 changes: far more than the queue holds
            label = f"c{i // STABLE_FRAMES % 7}"
            hook.observe(Prediction(label, 1.0, {label: 1.0}), i)
        # 40 calls while the receiver stalls (each post would wait 2 s): done in well under one timeout.
        assert time.perf_counter() - start < 0.5
        assert hook.dropped > 0
    finally:
        silent.close()
        hook._queue.queue.clear()
        hook.close()
