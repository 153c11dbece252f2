"""Fixtures shared by several test files (helpers that build bundles live in tests/bundles.py).

Heavy imports (torch, OpenCV, the exporter) happen inside the fixtures, so that collecting a torch-free
test file never loads them. A test file's own fixture of the same name (several define `bundle`)
takes precedence over the one here.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture()
def one_torch_thread() -> Iterator[None]:
    """For files of small tensors: a second thread buys little, and where the cores are shared (CI next
    to other jobs) OpenMP's spin-waiting made such files 10x slower. One thread, restored after.
    torch is imported here, not at the top, so that torch-free test files never load it."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----- dmf-run's end-to-end tests (test_app.py, test_streams.py, test_hostile_stdin.py) -----------------


@pytest.fixture(scope="session")
def bundle(tmp_path_factory) -> Path:
    """The small conv4 trained 200 steps on other glyph classes (bundles.export_small_bundle)."""
    from bundles import export_small_bundle

    return export_small_bundle(tmp_path_factory, seed=0, train_steps=200)


@pytest.fixture(scope="session")
def clip(tmp_path_factory) -> Path:
    """A real video: bundles.CLIP_SEGMENT frames of each of bundles.CLIP_CLASSES, in that order."""
    from bundles import clip_frames, write_video

    return write_video(tmp_path_factory.mktemp("clip") / "clip.mp4", clip_frames())


@pytest.fixture()
def http_clip(clip, tmp_path):
    """The clip re-encoded as MJPG .avi (streamable over plain HTTP) and served from a local server."""
    import threading
    from functools import partial
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    import cv2
    from bundles import read_video

    avi = tmp_path / "web" / "clip.avi"
    avi.parent.mkdir()
    frames = read_video(clip)
    writer = cv2.VideoWriter(str(avi), cv2.VideoWriter_fourcc(*"MJPG"), 15, frames[0].shape[1::-1])
    if not writer.isOpened():
        pytest.skip("this OpenCV build cannot write MJPG")
    for frame in frames:
        writer.write(frame)
    writer.release()

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(avi.parent)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}/clip.avi", len(frames)
    server.shutdown()
    server.server_close()
