"""Network streams that come and go: reconnects are bounded over time, and a lost stream is a failure.

Regression of issue "Hardening" item 10: a source that sent a few frames and closed, again and again,
was reconnected forever (the retry budget reset on every frame), and a lost stream exited with status 0.
The stream is a real MJPG clip served over HTTP by a local server (conftest.py's `http_clip`); OpenCV's
FFmpeg backend reads it, ends at its last frame and reconnects, as it does with a camera's stream.
"""

from __future__ import annotations

import subprocess

from bundles import dmf_run_command, parse_lines  # tests/bundles.py

from dmf_deploy.runtime.app.sources import RECONNECT_WINDOW_S, StreamSource

TIMEOUT_S = 60  # a run that reconnects forever is stopped here and fails


def no_wait(seconds: float) -> None:
    """The backoff without its waiting, so passes come back to back (the budget is what is tested)."""


def test_a_source_that_keeps_closing_uses_up_its_budget(http_clip) -> None:
    _, url, n = http_clip
    source = StreamSource(url, retries=3, sleep=no_wait)
    frames = 0
    try:
        # Every pass ends after n frames and each reconnect succeeds: the budget must still run out.
        while source.read() is not None:
            frames += 1
            assert frames <= 10 * n, "reconnected again and again: the budget reset on frames"
    finally:
        source.close()
    assert source.reconnects == 3 and frames == 4 * n  # the first pass and three reconnects
    assert source.lost is not None and f"more than 3 times within {RECONNECT_WINDOW_S:.0f} s" in source.lost
    assert source.read() is None  # lost for good


def test_dmf_run_exits_non_zero_when_a_flapping_stream_is_lost(bundle, http_clip, tmp_path) -> None:
    _, url, n = http_clip
    gallery = tmp_path / "g.dmfg"
    done = subprocess.run(
        [*dmf_run_command(), "--headless", "--source", url, "--retries", "2", "--bundle", str(bundle)]
        + ["--gallery", str(gallery)],
        input="",
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert done.returncode == 1, done.stderr
    assert "dmf-run: lost the stream http://127.0.0.1" in done.stderr
    preds, events = parse_lines(done.stdout)
    assert len(preds) == 3 * n  # the first pass and two reconnects, then no more
    assert [e["event"] for e in events][-2:] == ["end_of_source", "stopped"]
