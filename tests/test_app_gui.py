"""The dmf-run window under a real X server (Xvfb), driven by real key presses (xdotool).

There is no window manager, so keys go straight to the window with `xdotool key --window`. OpenCV's
Qt backend keeps only the last key pressed between two waitKey calls, so keys are sent 150 ms apart
(a person types slower than that; the loop runs every few tens of ms).

The app writes its last window image with --screenshot; it is kept under $DMF_TEST_ARTIFACTS when set,
else in pytest's tmp folder.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from bundles import dmf_run_command, export_small_bundle, write_video  # tests/bundles.py

from dmf_deploy.glyphs import GlyphSet
from dmf_deploy.runtime import Recognizer
from dmf_deploy.runtime.app.overlay import (
    BAR,
    BAR_UNKNOWN,
    KNOWN,
    STATUS_HEIGHT,
    STRIP_HEIGHT,
    UNKNOWN,
    VIDEO_WIDTH,
)

GLYPHS = GlyphSet(3, seed=11, image_size=96, jitter=0.3)  # three classes, as test_app.py's clip

pytestmark = pytest.mark.skipif(
    not (shutil.which("Xvfb") and shutil.which("xdotool")),
    reason="needs Xvfb and xdotool on PATH (apt-get install -y xvfb xdotool)",
)
# OpenCV's Qt window keeps only the last key pressed between two waitKey calls, so keys must come
# slower than the slowest frame: 150 ms lost a key on a 2-core machine at load average 10.
KEY_DELAY_MS = 500


def free_display() -> int:
    for number in range(99, 199):
        if not Path(f"/tmp/.X{number}-lock").exists() and not Path(f"/tmp/.X11-unix/X{number}").exists():
            return number
    raise RuntimeError("no free X display number in 99..198")


def start_xvfb() -> tuple[subprocess.Popen, int] | None:
    """Our own Xvfb on a free display number; None when another process took the number first."""
    number = free_display()
    server = subprocess.Popen(
        ["Xvfb", f":{number}", "-screen", "0", "1024x768x24", "-nolisten", "tcp"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while not Path(f"/tmp/.X11-unix/X{number}").exists():
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            return None
        time.sleep(0.05)
    time.sleep(0.5)
    # The socket may be another test run's that started on the same number a moment earlier: then our
    # server has exited ("server already active"), and that display goes away with the other run.
    if server.poll() is not None:
        return None
    return server, number


@pytest.fixture()
def display():
    for _ in range(5):
        started = start_xvfb()
        if started is not None:
            break
    else:
        pytest.fail("Xvfb did not start on a free display number (5 tries)")
    server, number = started
    yield f":{number}"
    server.terminate()
    server.wait(timeout=10)


@pytest.fixture()
def artifacts(tmp_path) -> Path:
    folder = Path(os.environ.get("DMF_TEST_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def find_window(env: dict[str, str], child: subprocess.Popen, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.poll() is not None:
            pytest.fail(f"dmf-run exited early ({child.returncode}): {child.stderr.read()}")
        found = subprocess.run(
            ["xdotool", "search", "--name", "^dmf-run$"], env=env, capture_output=True, text=True
        )
        if found.stdout.split():
            return found.stdout.split()[0]
        time.sleep(0.1)
    pytest.fail("the dmf-run window did not appear")


def press(env: dict[str, str], window: str, *keys: str, closes_window: bool = False) -> None:
    subprocess.run(
        ["xdotool", "key", "--window", window, "--delay", str(KEY_DELAY_MS), *keys],
        env=env,
        # A key that quits the app closes the window while xdotool still holds it: that error is success.
        check=not closes_window,
        capture_output=True,
    )


def test_window_enrols_with_keys(display, artifacts, tmp_path_factory, tmp_path):
    bundle = export_small_bundle(tmp_path_factory, seed=0, train_steps=200)  # shared with test_app.py
    clip = write_video(tmp_path / "clip.mp4", [GLYPHS.render(c, i) for c in range(3) for i in range(20)])
    gallery = tmp_path / "g.dmfg"
    shot = artifacts / "dmf-run-window.png"
    shot.unlink(missing_ok=True)
    env = {**os.environ, "DISPLAY": display, "QT_QPA_PLATFORM": "xcb"}
    child = subprocess.Popen(
        [
            *dmf_run_command(),
            "--source",
            str(clip),
            "--loop",
            "--bundle",
            str(bundle),
            "--gallery",
            str(gallery),
            "--names",
            "mug",
            "--shots",
            "3",
            "--screenshot",
            str(shot),
        ],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        window = find_window(env, child)
        press(env, window, "n", "space", "space")  # `n` takes "mug" from --names; two shots
        press(env, window, "n", "c", "u", "p", "x", "BackSpace", "Return", "space")  # typed name "cup"
        press(env, window, "n", "z", "Escape")  # naming cancelled: no class
        press(env, window, "n", "t", "m", "p", "Return", "space", "d", "d")  # enrolled, then deleted
        press(env, window, "Tab", "space")  # tab selects the first class (mug): a third shot
        press(env, window, "s")
        press(env, window, "q", closes_window=True)
        out, err = child.communicate(timeout=30)
    finally:
        child.kill()
    assert child.returncode == 0, err
    assert "fps end to end" in err

    saved = Recognizer.open(bundle, gallery=gallery)
    assert saved.classes == ["mug", "cup"]
    assert saved.gallery.counts.tolist() == [3, 1]

    image = cv2.imread(str(shot))
    assert image is not None, f"no screenshot at {shot}"
    assert image.shape[1] >= 900 and image.shape[0] >= 480
    print(f"window screenshot: {shot}")


def colour_pixels(image, colour, tolerance: int = 12) -> int:
    """Pixels within `tolerance` of a BGR colour (anti-aliased text edges blend into the panel)."""
    return int((np.abs(image.astype(int) - np.array(colour)).max(axis=2) <= tolerance).sum())


def test_window_pauses_confirms_deletes_undoes_and_greys_an_unknown_frame(
    display, artifacts, tmp_path_factory, tmp_path
):
    bundle = export_small_bundle(tmp_path_factory, seed=0, train_steps=200)  # shared with test_app.py
    blank = np.full_like(GLYPHS.render(0, 0), 255)  # no edge: unknown whatever the model scores
    rate = 10.0
    clip = write_video(tmp_path / "clip.mp4", [GLYPHS.render(0, i) for i in range(40)] + [blank] * 40, rate)
    gallery = tmp_path / "g.dmfg"
    shot = artifacts / "dmf-run-unknown.png"
    shot.unlink(missing_ok=True)
    env = {**os.environ, "DISPLAY": display, "QT_QPA_PLATFORM": "xcb"}
    command = [*dmf_run_command(), "--source", str(clip), "--bundle", str(bundle), "--gallery", str(gallery)]
    child = subprocess.Popen(
        [*command, "--names", "mug", "--shots", "3", "--screenshot", str(shot)],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    started = time.monotonic()
    try:
        window = find_window(env, child)
        press(env, window, "n", "p", "space", "space")  # paused: space enrols the held frame, twice
        # "cup", one shot of the held glyph (a blank frame, once the clip gets there, is refused), resume
        press(env, window, "n", "c", "u", "p", "Return", "space", "p")
        press(env, window, "d", "x")  # asked, then any other key: cup is kept
        press(env, window, "d", "d")  # asked and confirmed: cup is deleted
        press(env, window, "u")  # and undone (nothing was saved in between)
        # Let the clip reach its blank frames and end: the last frame held on screen is unknown.
        time.sleep(max(0.0, 80 / rate + 2.0 - (time.monotonic() - started)))
        press(env, window, "q", closes_window=True)
        out, err = child.communicate(timeout=30)
    finally:
        child.kill()
    assert child.returncode == 0, err

    saved = Recognizer.open(bundle, gallery=gallery)
    assert saved.classes == ["mug", "cup"]  # cup restored after its deletion (as the last class)
    assert saved.gallery.counts.tolist() == [2, 1]  # mug: the two shots taken while paused
    # The file played at its own 10 fps, not as fast as the CPU allows (a slower machine is slower,
    # never faster: 1.3x leaves room for the first frames' catch-up after the window opened).
    fps = float(re.search(r"([0-9.]+) fps end to end", err).group(1))
    assert fps <= 1.3 * rate, err

    image = cv2.imread(str(shot))
    assert image is not None, f"no screenshot at {shot}"
    video_h = image.shape[0] - STRIP_HEIGHT - STATUS_HEIGHT
    panel = image[:video_h, VIDEO_WIDTH:]
    headline, bars = panel[60:100], panel[130:]
    assert colour_pixels(headline, UNKNOWN) > 50  # "unknown" in the unknown colour
    assert colour_pixels(panel, KNOWN) == 0  # no known-green headline and no green best bar
    assert colour_pixels(bars, BAR_UNKNOWN, tolerance=4) > 100 and colour_pixels(bars, BAR, 12) == 0
    print(f"window screenshot of an unknown frame: {shot}")


def test_window_refuses_a_shot_outside_the_guide_box(display, artifacts, tmp_path):
    """Issue [R]: with --roi, `space` on a frame whose drawing lies outside the guide box says what to do
    (the status line, and the log on stderr) and enrols nothing; the box drawn is the region the model
    sees. The frame is one image, held after the source ends."""
    from dmf_deploy.preprocess import Roi
    from dmf_deploy.runtime.app.overlay import GUIDE, GUIDE_LINE, guide_box_pixels

    folder = tmp_path / "frames"
    folder.mkdir()
    frame = np.full((480, 640, 3), 220, np.uint8)  # an "A" in pen on the left half; the box is the right
    cv2.polylines(frame, [np.array([[80, 330], [160, 150], [240, 330]], np.int32)], False, (30, 30, 30), 8)
    cv2.line(frame, (120, 260), (200, 260), (30, 30, 30), 8)
    cv2.imwrite(str(folder / "frame.png"), frame)
    gallery = tmp_path / "g.dmfg"
    shot = artifacts / "dmf-run-guide-box.png"
    shot.unlink(missing_ok=True)
    env = {**os.environ, "DISPLAY": display, "QT_QPA_PLATFORM": "xcb"}
    command = [*dmf_run_command(), "--source", str(folder), "--gallery", str(gallery), "--roi", "0.5,0,0.5,1"]
    child = subprocess.Popen(
        [*command, "--names", "A", "--screenshot", str(shot)],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        window = find_window(env, child)
        press(env, window, "n", "space")
        press(env, window, "q", closes_window=True)
        out, err = child.communicate(timeout=30)
    finally:
        child.kill()
    assert child.returncode == 0 and "Traceback" not in err, err
    assert "dmf-run: error: frame 0 is blank to the model" in err
    assert "hold the drawing inside the guide box" in err
    assert not gallery.exists()  # nothing enrolled, nothing saved

    image = cv2.imread(str(shot))
    assert image is not None, f"no screenshot at {shot}"
    left, top, right, bottom = guide_box_pixels(Roi(0.5, 0, 0.5, 1), frame.shape, VIDEO_WIDTH, 480)
    guide = np.all(image[:480, :VIDEO_WIDTH] == GUIDE, axis=2)
    for side in (slice(left, left + GUIDE_LINE), slice(right - GUIDE_LINE, right)):
        assert guide[top:bottom, side].mean() > 0.9
    assert not guide[:, : left - 1].any()  # the box, not the frame's left half, is where the model looks
    print(f"window screenshot with the guide box: {shot}")


def test_explain_overlay_draws_the_markers(display, artifacts, tmp_path):
    """`e` draws the predicted class's explanation: the heat map over the frame, the position under the
    mouse in green, and its sampled points in red on the thumbnail inset (the demo bundle has
    explain.onnx). The frame is one image, held after the source ends, so the test knows every pixel's
    place: a 128x96 frame letterboxes into the 640x480 video area at exactly 5x."""
    from dmf_deploy.runtime.explain import LIVE_THUMB

    folder = tmp_path / "frames"
    folder.mkdir()
    frame = cv2.resize(GLYPHS.render(2, 3), (128, 96))
    cv2.imwrite(str(folder / "frame.png"), frame)
    gallery = tmp_path / "g.dmfg"
    shot = artifacts / "dmf-run-explain.png"
    shot.unlink(missing_ok=True)
    env = {**os.environ, "DISPLAY": display, "QT_QPA_PLATFORM": "xcb"}
    command = [*dmf_run_command(), "--source", str(folder), "--bundle", "demo", "--gallery", str(gallery)]
    child = subprocess.Popen(
        [*command, "--names", "mug", "--screenshot", str(shot)],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Feature cell (i, j) = (1, 5) of the demo's 7x7 map: its centre in the 56x56 preprocessed image is
    # (43.5, 11.5); in the frame, where the demo's frame rule redrew the drawing from (frame_affine:
    # the square around the drawing it found); on the canvas 5x that, with centres at integers. The
    # inset (bottom right of the video area) does not cover it.
    from dmf_deploy.runtime.explain import frame_affine

    size, cells, scale = 56, 7, 5
    i, j = 1, 5
    point = np.array([(j + 0.5) * size / cells - 0.5, (i + 0.5) * size / cells - 0.5])
    to_frame = frame_affine(frame, Recognizer.open("demo").manifest.model.preprocess)
    in_frame = to_frame[:, :2] @ point + to_frame[:, 2]
    pointer = np.round((in_frame + 0.5) * scale - 0.5).astype(int)
    try:
        window = find_window(env, child)
        press(env, window, "n", "space", "e")  # enrol the held frame as "mug", then explain it
        subprocess.run(
            ["xdotool", "mousemove", "--window", window, str(pointer[0]), str(pointer[1])],
            env=env,
            check=True,
            capture_output=True,
        )
        time.sleep(1.0)  # frames keep coming while the window holds the last one
        press(env, window, "q", closes_window=True)
        out, err = child.communicate(timeout=30)
    finally:
        child.kill()
    assert child.returncode == 0, err

    image = cv2.imread(str(shot))
    assert image is not None, f"no screenshot at {shot}"
    rec = Recognizer.open("demo", gallery=gallery)
    ex = rec.explain(frame, "mug")
    assert ex.position_at(*point) == i * cells + j
    assert ex.best_position != i * cells + j  # so the green dot there is the pointer's doing
    b, g, r = image[pointer[1], pointer[0]].astype(int)
    assert g > 180 and r < 60 and b < 60, (b, g, r)  # the green dot under the pointer
    video_w, video_h = 640, 480
    top, left = video_h - LIVE_THUMB, video_w - LIVE_THUMB
    drawn = 0
    for x, y in ex.sampled_points[i * cells + j]:
        if not (2 < x < size - 3 and 2 < y < size - 3):
            continue  # a point near the edge may be drawn half off the inset
        u = round((x + 0.5) * LIVE_THUMB / size - 0.5)
        v = round((y + 0.5) * LIVE_THUMB / size - 0.5)
        b, g, r = image[top + v, left + u].astype(int)
        assert r > 180 and g < 60 and b < 60, (x, y, b, g, r)  # a red sampled point
        drawn += 1
    assert drawn >= 3
    # The heat map covers what the model saw (the square around the drawing, upright here): the white
    # paper there is coloured (saturated) almost everywhere.
    corners = np.array([[0, 0], [size - 1, size - 1]], np.float64) @ to_frame[:, :2].T + to_frame[:, 2]
    (x0, y0), (x1, y1) = np.round((corners + 0.5) * scale - 0.5).astype(int)
    x0, y0, x1, y1 = max(x0 + 3, 0), max(y0 + 3, 0), min(x1 - 3, video_w), min(y1 - 3, top)
    assert x1 - x0 > 100 and y1 - y0 > 100  # a sizeable area, inside the video and above the inset
    view = cv2.cvtColor(image[y0:y1, x0:x1], cv2.COLOR_BGR2HSV)
    assert np.mean(view[:, :, 1] > 80) > 0.8
    print(f"explain overlay screenshot: {shot}")
