"""Frame sources for dmf-run: a camera, a video file, an image folder, or a network stream.

Every source has the same small interface (``read() -> frame | None``, ``close()``), in the spirit of
jetson-inference's ``videoSource``: the app loop does not care where frames come from. ``None`` means
the source has ended for good; transient trouble (a stream that drops) is handled inside the source.

- ``--camera N``: ``cv2.VideoCapture(N)``; ``--input-width/--input-height`` request a capture size.
- ``--source PATH``: a video file (anything FFmpeg reads), one image, or a folder of images read in
  natural order (``frame2.png`` before ``frame10.png``); ``--loop`` restarts at the end.
- ``--source URI``: rtsp://, rtmp://, http(s)://, udp://, tcp://. A stream that ends or stalls is
  reopened with exponential backoff, at most ``retries`` times a minute; beyond, the stream is lost
  (``lost`` says why) and the source ends.
"""

from __future__ import annotations

import glob
import logging
import re
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from dmf_deploy.preprocess import ImageFileError, read_image_file

log = logging.getLogger("dmf_deploy.runtime")

STREAM_SCHEMES = ("rtsp", "rtsps", "rtmp", "http", "https", "udp", "tcp", "srt")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pnm")
STREAM_TIMEOUT_MS = 5000  # open and read timeouts: a stalled stream must not block the loop forever
BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 8.0
RECONNECT_WINDOW_S = 60.0  # a stream may reconnect `retries` times within any such window


class SourceError(RuntimeError):
    """A source that cannot be opened; the message says what to try."""


class FrameSource(Protocol):
    kind: str  # "camera" | "file" | "folder" | "stream"
    description: str
    lost: str | None  # why the source was lost (a stream out of reconnects); None: it ended or runs

    def read(self) -> np.ndarray | None:
        """The next HxWx3 BGR uint8 frame, or None once the source has ended."""
        ...

    def close(self) -> None: ...


def is_stream_uri(text: str) -> bool:
    match = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", text)
    return bool(match) and match.group(1).lower() in STREAM_SCHEMES


def open_source(
    camera: int | None = None,
    source: str | None = None,
    *,
    width: int | None = None,
    height: int | None = None,
    loop: bool = False,
    retries: int = 5,
    sleep: Callable[[float], bool | None] = time.sleep,
) -> FrameSource:
    """Open exactly one of a camera index or a path/URI; raise SourceError with advice if it fails."""
    if (camera is None) == (source is None):
        raise SourceError("give exactly one of --camera N or --source PATH|URI")
    if camera is None:
        video_dev = re.fullmatch(r"/dev/video(\d+)", source or "")
        if video_dev:  # /dev/videoN is a camera, not a file to decode
            camera = int(video_dev.group(1))
    if camera is not None:
        return CameraSource(camera, width, height)
    assert source is not None
    if is_stream_uri(source):
        return StreamSource(source, retries=retries, sleep=sleep)
    path = Path(source).expanduser()
    if not path.exists():
        raise SourceError(
            f"source {source} does not exist (expected a video file, an image, an image "
            "folder, or a stream URI such as rtsp://host/path or http://host/path)"
        )
    if path.is_dir():
        return FolderSource(path, loop)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return FolderSource(path, loop)
    return VideoFileSource(path, loop)


def _as_bgr(frame: np.ndarray) -> np.ndarray:
    """Grey or BGRA captures (some cameras, PNGs) become plain BGR, as the runtime expects."""
    if frame.ndim == 2:
        return cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
    if frame.shape[2] == 4:
        return cv2.cvtColor(frame, cv2.COLOR_BGRA2BGR)
    return frame


class CameraSource:
    kind = "camera"
    lost = None

    def __init__(self, index: int, width: int | None = None, height: int | None = None) -> None:
        self.description = f"camera {index}"
        # V4L2 directly on Linux: CAP_ANY also probes other camera backends that log their own errors.
        api = cv2.CAP_V4L2 if sys.platform.startswith("linux") else cv2.CAP_ANY
        self._cap = cv2.VideoCapture(index, api)
        if not self._cap.isOpened():
            self._cap.release()
            raise SourceError(camera_advice(index, "cannot be opened"))
        if width:
            self._cap.set(cv2.CAP_PROP_FRAME_WIDTH, width)
        if height:
            self._cap.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
        # A one-frame driver buffer keeps what we classify close to "now" when we run slower than the camera.
        self._cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
        ok, frame = self._cap.read()
        if not ok or frame is None:
            self._cap.release()
            raise SourceError(camera_advice(index, "opened but delivers no frames"))
        self._first: np.ndarray | None = frame
        h, w = frame.shape[:2]
        self.description = f"camera {index} ({w}x{h})"
        if (width and width != w) or (height and height != h):
            log.warning("camera %d gives %dx%d, not the requested %sx%s", index, w, h, width, height)

    def read(self) -> np.ndarray | None:
        if self._first is not None:
            frame, self._first = self._first, None
            return _as_bgr(frame)
        ok, frame = self._cap.read()
        return _as_bgr(frame) if ok and frame is not None else None

    def close(self) -> None:
        self._cap.release()


def camera_advice(index: int, problem: str) -> str:
    lines = [f"camera {index} {problem}."]
    if sys.platform.startswith("linux"):
        device = Path(f"/dev/video{index}")
        present = sorted(glob.glob("/dev/video*"), key=_natural_key)
        if not device.exists():
            found = ", ".join(present) if present else "none"
            lines.append(f"{device} does not exist (video devices here: {found}).")
        lines.append(
            "Try another index (--camera 0, 1, ...); check that you may read /dev/videoN "
            "(ls -l /dev/video*; add yourself to the 'video' group); list cameras with "
            "`v4l2-ctl --list-devices`; and close other programs that use the camera."
        )
    else:
        lines.append("Try another index (--camera 0, 1, ...), and close other programs that use the camera.")
    return " ".join(lines)


MAX_FRAME_RATE = 1000.0  # beyond this a container's frame rate is a placeholder, not a rate


class VideoFileSource:
    kind = "file"
    lost = None

    def __init__(self, path: Path, loop: bool = False) -> None:
        self.path, self.loop = path, loop
        self.description = f"video {path}"
        self._cap = self._open()
        self._frames_this_pass = 0
        fps = self._cap.get(cv2.CAP_PROP_FPS)
        # What the file says it plays at; None where the container gives nothing sensible.
        self.frame_rate: float | None = float(fps) if 0 < fps <= MAX_FRAME_RATE else None

    def _open(self) -> cv2.VideoCapture:
        cap = cv2.VideoCapture(str(self.path))
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"cannot decode {self.path}: not a video OpenCV/FFmpeg can read")
        return cap

    def read(self) -> np.ndarray | None:
        ok, frame = self._cap.read()
        if not ok and self.loop and self._frames_this_pass > 0:
            # Reopening is more reliable than seeking to frame 0 across containers and codecs.
            self._cap.release()
            self._cap = self._open()
            self._frames_this_pass = 0
            ok, frame = self._cap.read()
        if not ok or frame is None:
            return None
        self._frames_this_pass += 1
        return _as_bgr(frame)

    def close(self) -> None:
        self._cap.release()


def _natural_key(text: str) -> list[object]:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", str(text))]


class FolderSource:
    """The images of a folder in natural name order (or one image); unreadable files are skipped."""

    kind = "folder"
    lost = None

    def __init__(self, path: Path, loop: bool = False) -> None:
        if path.is_dir():
            files = [p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
            if not files:
                raise SourceError(f"folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            self.files = sorted(files, key=lambda p: _natural_key(p.name))
            self.description = f"folder {path} ({len(self.files)} images)"
        else:
            self.files = [path]
            self.description = f"image {path}"
        self.loop = loop
        self._next = 0
        self._good = 0  # images decoded on this pass: a loop over only broken files must end

    def read(self) -> np.ndarray | None:
        while True:
            if self._next >= len(self.files):
                if not (self.loop and self._good):
                    return None
                self._next, self._good = 0, 0
            path = self.files[self._next]
            self._next += 1
            try:  # sized from its header before it is decoded: an image bomb is skipped, not decoded
                frame = read_image_file(path)
            except ImageFileError as exc:
                log.warning("skipping %s", exc)
                continue
            self._good += 1
            return frame

    def close(self) -> None:
        pass


class StreamSource:
    """A network stream; when it ends or stalls it is reopened with backoff, at most `retries` times
    within any RECONNECT_WINDOW_S. The budget is over time, not per outage: a source that sends a few
    frames and closes, again and again, is lost once it has used it. A lost stream sets `lost`."""

    kind = "stream"

    def __init__(
        self, uri: str, retries: int = 5, sleep: Callable[[float], bool | None] = time.sleep
    ) -> None:
        self.uri, self.retries, self._sleep = uri, retries, sleep
        self.description = f"stream {_redact(uri)}"
        self.reconnects = 0
        self.lost: str | None = None
        self._ended = False
        self._attempts: deque[float] = deque()  # monotonic times of reconnect attempts in the window
        self._cap = self._open()
        if self._cap is None:
            raise SourceError(
                f"cannot open {_redact(uri)}: check the address, the credentials, and that the stream "
                f"is live (e.g. `ffprobe {_redact(uri)}`)"
            )

    def _open(self) -> cv2.VideoCapture | None:
        params = [
            cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
            STREAM_TIMEOUT_MS,
            cv2.CAP_PROP_READ_TIMEOUT_MSEC,
            STREAM_TIMEOUT_MS,
        ]
        cap = cv2.VideoCapture(self.uri, cv2.CAP_FFMPEG, params)
        if cap.isOpened():
            return cap
        cap.release()
        return None

    def read(self) -> np.ndarray | None:
        if self._ended:
            return None
        if self._cap is not None:
            ok, frame = self._cap.read()
            if ok and frame is not None:
                return _as_bgr(frame)
        # The stream ended, stalled past the read timeout, or dropped: reconnect with backoff.
        delay = BACKOFF_START_S
        while self._may_reconnect():
            if self._cap is not None:
                self._cap.release()
                self._cap = None
            log.warning(
                "stream %s interrupted; reconnecting in %.1f s (reconnect %d of %d allowed per %.0f s)",
                _redact(self.uri),
                delay,
                len(self._attempts),
                self.retries,
                RECONNECT_WINDOW_S,
            )
            if self._sleep(delay):  # a sleep that returns True was interrupted: the run is stopping
                self._ended = True
                return None
            delay = min(2 * delay, BACKOFF_MAX_S)
            self._cap = self._open()
            if self._cap is None:
                continue
            ok, frame = self._cap.read()
            if ok and frame is not None:
                self.reconnects += 1
                return _as_bgr(frame)
        self.lost = (
            f"lost the stream {_redact(self.uri)}: it ended or stalled more than {self.retries} times "
            f"within {RECONNECT_WINDOW_S:.0f} s (--retries {self.retries})"
        )
        log.warning("%s", self.lost)
        self._ended = True
        return None

    def _may_reconnect(self) -> bool:
        """Count one reconnect attempt if the budget of the last RECONNECT_WINDOW_S allows it."""
        now = time.monotonic()
        while self._attempts and now - self._attempts[0] > RECONNECT_WINDOW_S:
            self._attempts.popleft()
        if len(self._attempts) >= self.retries:
            return False
        self._attempts.append(now)
        return True

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()


def _redact(uri: str) -> str:
    """Hide a password in rtsp://user:password@host URIs before it reaches logs and messages."""
    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", uri)
