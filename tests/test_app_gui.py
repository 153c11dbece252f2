"""The dmf-run window under a real X server (Xvfb), driven by real key presses (xdotool).

There is no window manager, so keys go straight to the window with `xdotool key --window`. OpenCV's
Qt backend keeps only the last key pressed between two waitKey calls, so keys are sent 150 ms apart
(a person types slower than that; the loop runs every few tens of ms).

The app writes its last window image with --screenshot; it is kept under $DMF_TEST_ARTIFACTS when set,
else in pytest's tmp folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import cv2
import pytest
from bundles import dmf_run_command, export_small_bundle, write_video  # tests/bundles.py

from dmf_deploy.glyphs import GlyphSet
from dmf_deploy.runtime import Recognizer

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


@pytest.fixture()
def display():
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
            pytest.fail(f"Xvfb :{number} did not start")
        time.sleep(0.05)
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
        press(env, window, "n", "t", "m", "p", "Return", "space", "d")  # enrolled, then deleted
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
