"""Enrolment frame by frame (`Recognizer.enrollment`): what `enroll NAME K` runs on, in bounded memory.

Regression of issue "Hardening" item 6: `enroll NAME K` held K full-resolution frames until the K-th
came (K = 200 on a 1080p video took 1.6 GB). Now each frame's features are computed as it arrives and
only their sum and a thumbnail-sized copy of the first frame are kept. Real 720p video, the demo bundle.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from bundles import Recorder, cross, ring, session_for, write_video  # tests/bundles.py

from dmf_deploy.packaged import demo_bundle_installed
from dmf_deploy.preprocess import InvalidFrame
from dmf_deploy.runtime import Recognizer
from dmf_deploy.runtime.app.loop import run_loop
from dmf_deploy.runtime.app.sources import open_source

pytestmark = pytest.mark.skipif(not demo_bundle_installed(), reason="the demo bundle is not installed")
SHOTS = 30
HD = (720, 1280)


@pytest.fixture(scope="module")
def rec() -> Recognizer:
    return Recognizer.open("demo", backend="onnxruntime")


def hd(image: np.ndarray) -> np.ndarray:
    """A 720p frame: the drawing at 3x, centred on white paper. (Stretched to fill the frame, its 6 px
    pen line would be a 40-70 px band, which the demo model's frame rule does not take for ink: a blank
    frame, which enrolment refuses.)"""
    import cv2

    frame = np.full((*HD, 3), 255, np.uint8)
    big = cv2.resize(image, None, fx=3, fy=3, interpolation=cv2.INTER_NEAREST)
    top, left = (HD[0] - big.shape[0]) // 2, (HD[1] - big.shape[1]) // 2
    frame[top : top + big.shape[0], left : left + big.shape[1]] = big
    return frame


def test_enroll_k_from_a_video_holds_no_frames(rec: Recognizer, tmp_path) -> None:
    video = write_video(tmp_path / "hd.mp4", [hd(ring()) for _ in range(SHOTS)])
    output = Recorder(holds_last_frame=False)
    session = session_for(rec, output, tmp_path, f"enroll big {SHOTS}\n")
    tracemalloc.start()
    try:
        run_loop(rec, open_source(source=str(video)), session, output)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert output.events[0]["event"] == "enrolled" and output.events[0]["shots"] == SHOTS
    frame_bytes = HD[0] * HD[1] * 3
    # Held before: all 30 frames (30 frame sizes). Now: the frame being read, the loop's last frame, and
    # the decoder's and the resize's copies; 6 frame sizes leaves room for those and none for K frames.
    assert peak < 6 * frame_bytes, f"peak {peak / 2**20:.0f} MB for {frame_bytes / 2**20:.1f} MB frames"


def test_frame_by_frame_equals_enrolling_a_list(rec: Recognizer) -> None:
    frames = [hd(ring()), hd(cross()), hd(ring())]
    rec.enroll("listed", frames)
    enrollment = rec.enrollment("streamed")
    for frame in frames:
        enrollment.add(frame)
    assert "streamed" not in rec.classes  # nothing changes before commit
    enrollment.commit()
    g = rec.gallery
    listed, streamed = g.index("listed"), g.index("streamed")
    assert g.counts[streamed] == g.counts[listed] == 3
    # One batch of three against three batches of one: ONNX Runtime's sums differ in the last bits only.
    np.testing.assert_allclose(g.prototype(streamed), g.prototype(listed), rtol=1e-5, atol=1e-6)
    assert g.thumbnail("streamed") == g.thumbnail("listed")  # the first frame's, made the same way


def test_an_enrollment_refuses_what_enroll_refuses(rec: Recognizer) -> None:
    with pytest.raises(ValueError, match="empty"):
        rec.enrollment("  ")
    enrollment = rec.enrollment("nothing")
    with pytest.raises(InvalidFrame):
        enrollment.add(np.zeros((10, 10, 4), np.uint8))
    with pytest.raises(InvalidFrame, match="no frames"):
        enrollment.commit()
    assert "nothing" not in rec.classes
