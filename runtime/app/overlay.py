"""The dmf-run window: the live frame, the top classes with score bars, the enrolled-class strip with
thumbnails, and a status line; and the keys that drive it.

Drawing is a pure function of (frame, View) -> image, so it renders without a display too (the
--screenshot option and the tests use that). `Window` is the frame loop's window Output: it shows
the image with OpenCV highgui and turns key presses into Session operations.

OpenCV's Hershey fonts draw ASCII only; other characters of a class name are shown as '?'.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import click
import cv2
import numpy as np

from dmf_deploy.names import InvalidClassName, validate_class_name
from dmf_deploy.preprocess import Roi
from dmf_deploy.runtime.app.commands import Event, Session
from dmf_deploy.runtime.app.loop import TOP_K, RunResult, Stats
from dmf_deploy.runtime.explain import Explanation, ExplanationUnavailable, draw_live
from dmf_deploy.runtime.gallery import GalleryError, decode_thumbnail
from dmf_deploy.runtime.recognizer import Prediction

log = logging.getLogger("dmf_deploy.runtime")

VIDEO_WIDTH = 640
MAX_VIDEO_HEIGHT = 480  # keeps the window (~630 px tall) on 1024x600 panels and 768-line screens
PANEL_WIDTH = 280
STRIP_HEIGHT = 104
STATUS_HEIGHT = 48
THUMB = 64
FONT = cv2.FONT_HERSHEY_SIMPLEX

BG = (32, 32, 32)
PANEL = (48, 48, 48)
TEXT = (235, 235, 235)
DIM = (150, 150, 150)
KNOWN = (90, 220, 90)  # BGR green
UNKNOWN = (40, 160, 255)  # BGR orange
BAR = (200, 160, 60)
BAR_BEST = (90, 220, 90)
BAR_UNKNOWN = (105, 105, 105)  # grey: on an unknown frame the bars are not confidence
CURRENT = (0, 215, 255)  # BGR yellow
GUIDE = (255, 200, 80)  # BGR light blue: the --roi guide box
GUIDE_LINE = 2  # pixels: the guide box's border, drawn inside the region the model sees

WINDOW = "dmf-run"
STATUS_SECONDS = 4.0
SYSTEM_FONTS = "/usr/share/fonts"
ENTER, BACKSPACE, ESC, TAB = 13, 8, 27, 9
# waitKeyEx gives ASCII for text keys and X keysyms (Qt on Linux) for the rest.
SPECIAL_KEYS = {
    10: ENTER,
    13: ENTER,
    0xFF0D: ENTER,
    0xFF8D: ENTER,
    8: BACKSPACE,
    127: BACKSPACE,
    0xFF08: BACKSPACE,
    27: ESC,
    0xFF1B: ESC,
    9: TAB,
    0xFF09: TAB,
    0xFE20: TAB,
}
HELP = "n new class  space add shot  p pause  tab next class  d delete  u undo  s save  q quit"


@dataclass
class View:
    """Everything the window shows besides the frame."""

    prediction: Prediction | None = None
    fps: float = 0.0
    classes: list[tuple[str, int]] = field(default_factory=list)  # (name, shots) in enrolment order
    thumbnails: dict[str, np.ndarray] = field(default_factory=dict)  # name -> decoded BGR thumbnail
    current: str | None = None  # the class that `space` adds shots to
    typing: str | None = None  # the name being typed after `n`; None when not naming
    paused: bool = False
    confirm_delete: str | None = None  # the class a second `d` deletes
    status: str = ""
    shots_target: int = 5
    source: str = ""
    explanation: Explanation | None = None  # `e`: what the model aligned for the predicted class
    pointer: tuple[int, int] | None = None  # the mouse over the video, window pixels
    roi: Roi | None = None  # the guide box: the region of the frame the model sees (--roi)


def ascii_text(text: str) -> str:
    return "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in text)


def put(
    img: np.ndarray,
    text: str,
    org: tuple[int, int],
    scale: float = 0.5,
    color: tuple[int, int, int] = TEXT,
    thickness: int = 1,
) -> None:
    cv2.putText(img, ascii_text(text), org, FONT, scale, color, thickness, cv2.LINE_AA)


def fit_text(text: str, width: int, scale: float = 0.5, thickness: int = 1) -> str:
    """Shorten text with '..' so that it fits `width` pixels."""
    text = ascii_text(text)
    while text and cv2.getTextSize(text, FONT, scale, thickness)[0][0] > width:
        text = text[:-3] + ".." if len(text) > 3 else text[:-1]
    return text


def render(frame: np.ndarray, view: View) -> np.ndarray:
    """The whole window image for one frame."""
    h, w = frame.shape[:2]
    video_h = min(MAX_VIDEO_HEIGHT, max(120, round(VIDEO_WIDTH * h / w)))
    canvas = np.full((video_h + STRIP_HEIGHT + STATUS_HEIGHT, VIDEO_WIDTH + PANEL_WIDTH, 3), BG, np.uint8)
    canvas[:video_h, :VIDEO_WIDTH] = letterbox(frame, VIDEO_WIDTH, video_h)
    if view.explanation is not None:
        to_video = letterbox_affine(frame.shape, VIDEO_WIDTH, video_h)
        draw_live(canvas[:video_h, :VIDEO_WIDTH], view.explanation, frame, to_video, view.pointer)
    if view.roi is not None:
        draw_guide_box(canvas[:video_h, :VIDEO_WIDTH], view.roi, frame.shape)
    draw_panel(canvas[:video_h, VIDEO_WIDTH:], view)
    draw_strip(canvas[video_h : video_h + STRIP_HEIGHT], view)
    draw_status(canvas[video_h + STRIP_HEIGHT :], view)
    return canvas


def draw_guide_box(video: np.ndarray, roi: Roi, frame_shape: tuple[int, ...]) -> None:
    """The --roi region on the frame letterboxed into `video` (the window's video area, the web console's
    live view): a border just inside the pixels the model sees, and where to hold the card."""
    left, top, right, bottom = guide_box_pixels(roi, frame_shape, video.shape[1], video.shape[0])
    line = GUIDE_LINE
    video[top : top + line, left:right] = GUIDE
    video[max(top, bottom - line) : bottom, left:right] = GUIDE
    video[top:bottom, left : left + line] = GUIDE
    video[top:bottom, max(left, right - line) : right] = GUIDE
    put(video, "hold the card here", (left + 6, max(14, top - 6)), 0.45, GUIDE)


def guide_box_pixels(
    roi: Roi, frame_shape: tuple[int, ...], width: int, height: int
) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) pixels of the guide box on a frame of `frame_shape` letterboxed into
    width x height: the pixels `Roi.crop` keeps for the model (`Roi.box`), scaled as `letterbox` scales
    the frame. The one guide-box arithmetic of the window, its screenshot and the web console."""
    h, w = frame_shape[:2]
    _, nw, nh, shift_x, shift_y = letterbox_box(frame_shape, width, height)
    left, top, right, bottom = roi.box(w, h)
    x0, y0 = shift_x + round(left * nw / w), shift_y + round(top * nh / h)
    x1, y1 = shift_x + round(right * nw / w), shift_y + round(bottom * nh / h)
    return x0, y0, max(x0 + 1, x1), max(y0 + 1, y1)


def letterbox(frame: np.ndarray, width: int, height: int) -> np.ndarray:
    """The frame scaled to fit width x height, centred on black, aspect ratio kept."""
    scale, nw, nh, left, top = letterbox_box(frame.shape, width, height)
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    out = np.zeros((height, width, 3), np.uint8)
    out[top : top + nh, left : left + nw] = cv2.resize(frame, (nw, nh), interpolation=interp)
    return out


def letterbox_box(shape: tuple[int, ...], width: int, height: int) -> tuple[float, int, int, int, int]:
    """(scale, new width, new height, left, top) of a frame of `shape` letterboxed into width x height."""
    h, w = shape[:2]
    scale = min(width / w, height / h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    return scale, nw, nh, (width - nw) // 2, (height - nh) // 2


def letterbox_affine(shape: tuple[int, ...], width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift) per axis (x, y): letterboxed pixel = scale * frame pixel + shift."""
    _, nw, nh, left, top = letterbox_box(shape, width, height)
    scale = np.array([nw / shape[1], nh / shape[0]], np.float64)
    return scale, 0.5 * scale - 0.5 + np.array([left, top], np.float64)


def draw_panel(panel: np.ndarray, view: View) -> None:
    panel[:] = PANEL
    width = panel.shape[1]
    put(panel, "dmf-run", (14, 28), 0.7, TEXT, 2)
    put(panel, f"{view.fps:5.1f} fps", (width - 100, 28), 0.5, DIM)
    put(panel, fit_text(view.source, width - 28, 0.4), (14, 50), 0.4, DIM)
    pred = view.prediction
    if (pred is None or not view.classes) and view.current is not None:
        headline, color = f"'{view.current}': no shots yet", DIM
        detail = "space adds the current frame"
    elif pred is None or not view.classes:
        headline, color = "no classes yet", DIM
        detail = "press n to add one"
    elif pred.label is None:
        headline, color = "unknown", UNKNOWN
        detail = pred.reason or pred.message or "no class is a convincing match"
    else:
        headline, color = pred.label, KNOWN
        detail = f"score {pred.score:.3f}"
    put(panel, fit_text(headline, width - 28, 0.9, 2), (14, 92), 0.9, color, 2)
    put(panel, fit_text(detail, width - 28, 0.42), (14, 116), 0.42, DIM)
    rows = pred.top(TOP_K) if pred is not None else []
    if not rows:
        return
    best = max(rows[0][1], 1e-12)
    y = 146
    for i, (name, score) in enumerate(rows):
        if y + 30 > panel.shape[0]:
            break
        put(panel, fit_text(name, width - 100, 0.45), (14, y), 0.45, TEXT)
        put(panel, f"{score:.3f}", (width - 62, y), 0.42, DIM)
        # Bars are relative to the best score: DMF scores have no fixed scale across models.
        length = int(np.clip(score / best, 0.0, 1.0) * (width - 28)) if score > 0 else 0
        if pred is not None and pred.label is None:
            bar_color = BAR_UNKNOWN
        else:
            bar_color = BAR_BEST if i == 0 and pred is not None and pred.label == name else BAR
        cv2.rectangle(panel, (14, y + 6), (14 + width - 28, y + 14), (70, 70, 70), -1)
        if length:
            cv2.rectangle(panel, (14, y + 6), (14 + length, y + 14), bar_color, -1)
        y += 34


def strip_slots(width: int = VIDEO_WIDTH + PANEL_WIDTH) -> int:
    """How many class tiles the strip shows at `width` pixels (the window's, by default)."""
    return max(1, (width - 16) // (THUMB + 24))


def draw_strip(strip: np.ndarray, view: View) -> None:
    """Enrolled classes as thumbnails with names and shot counts; the current class is framed."""
    strip[:] = BG
    cell = THUMB + 24
    fits = strip_slots(strip.shape[1])
    classes = view.classes
    hidden = max(0, len(classes) - fits)
    if hidden:  # show the newest classes; say how many older ones are off the strip
        classes = classes[-(fits - 1) :] if fits > 1 else classes[-1:]
        hidden = len(view.classes) - len(classes)
    x = 8
    if hidden:
        put(strip, f"+{hidden}", (x + 14, 48), 0.6, DIM)
        x += cell
    if not classes:
        put(strip, "enrolled classes appear here", (14, 56), 0.5, DIM)
    for name, shots in classes:
        thumb = view.thumbnails.get(name)
        top = 6
        if thumb is not None:
            tile = letterbox(thumb, THUMB, THUMB)
            strip[top : top + THUMB, x + 12 : x + 12 + THUMB] = tile
        else:
            cv2.rectangle(strip, (x + 12, top), (x + 11 + THUMB, top + THUMB - 1), DIM, 1)
        if name == view.current:
            cv2.rectangle(strip, (x + 9, top - 3), (x + 14 + THUMB, top + THUMB + 2), CURRENT, 2)
        put(
            strip,
            fit_text(name, cell - 4, 0.4),
            (x + 4, top + THUMB + 16),
            0.4,
            CURRENT if name == view.current else TEXT,
        )
        put(strip, f"{shots} shot{'s' if shots != 1 else ''}", (x + 4, top + THUMB + 31), 0.35, DIM)
        x += cell


def draw_status(bar: np.ndarray, view: View) -> None:
    bar[:] = (24, 24, 24)
    width = bar.shape[1]
    if view.typing is not None:
        line, color = f"name of the new class: {view.typing}_   (Enter confirms, Esc cancels)", CURRENT
    elif view.confirm_delete is not None:
        line = f"delete '{view.confirm_delete}'? d deletes it (u undoes until saved), any other key keeps it"
        color = UNKNOWN
    elif view.current is not None:
        shots = dict(view.classes).get(view.current, 0)
        line = f"class '{view.current}': {shots}/{view.shots_target} shots - space adds the current frame"
        color = CURRENT
    else:
        line, color = "live", TEXT
    if view.paused:
        line = f"PAUSED (p resumes)   {line}"
    if view.status:
        line = f"{line}   |   {view.status}"
    put(bar, fit_text(line, width - 20, 0.45), (10, 19), 0.45, color)
    put(bar, fit_text(HELP, width - 20, 0.4), (10, 39), 0.4, DIM)


def class_strip(session: Session) -> tuple[list[tuple[str, int]], dict[str, np.ndarray]]:
    """(name, shots) of every class, and the gallery thumbnails, decoded from JPEG, of the newest
    classes: those the strip shows. Only those: every class's would cost time in N at each change of
    the gallery (half a second at 10,000 classes, read from the file and decoded)."""
    classes = [(c["name"], c["shots"]) for c in session.class_list()]
    thumbs = {}
    for name, _ in classes[-strip_slots() :]:
        image = decode_thumbnail(session.rec.gallery.thumbnail(name))
        if image is not None:
            thumbs[name] = image
    return classes, thumbs


# ----- window --------------------------------------------------------------------------------------
class Window:
    """The highgui window (an Output of the frame loop): renders the View and turns key presses into
    Session operations. After the source ends it holds the last frame until q."""

    holds_last_frame = True

    def __init__(
        self,
        names: list[str],
        shots: int,
        source: str,
        frame_rate: float | None = None,
        roi: Roi | None = None,
    ) -> None:
        self.names = list(names)  # --names: taken in turn by `n`, so no typing is needed
        self.view = View(shots_target=shots, source=source, roi=roi)
        self.frame_rate = frame_rate  # a video file's own rate: frames are shown at it; None: at once
        self._next_frame = time.monotonic()
        self.status_until = 0.0
        self.last_canvas: np.ndarray | None = None
        self._thumbs_version = -1
        self._open = True
        if "QT_QPA_FONTDIR" not in os.environ and Path(SYSTEM_FONTS).is_dir():
            # OpenCV's pip wheels bundle Qt without fonts and warn at every window; use the system's.
            os.environ["QT_QPA_FONTDIR"] = SYSTEM_FONTS
        cv2.namedWindow(WINDOW, cv2.WINDOW_AUTOSIZE | cv2.WINDOW_GUI_NORMAL)
        self.explaining = False  # `e` toggles the explanation overlay
        cv2.setMouseCallback(WINDOW, self._on_mouse)

    def say(self, text: str) -> None:
        self.view.status = text
        self.status_until = time.monotonic() + STATUS_SECONDS

    def emit(self, event: Event) -> None:
        """Outcomes go to the status line; once the window is closed (the save at exit), to stderr."""
        if not self._open:
            message = event.get("message") if event["event"] == "error" else None
            click.echo(f"dmf-run: error: {message}" if message else f"dmf-run: {json.dumps(event)}", err=True)
            return
        kind = event["event"]
        if kind == "end_of_source":
            text = "end of the source - q quits"
        elif kind == "enrolled":
            total = event["total_shots"]
            text = f"'{event['name']}' now has {total} shot{'s' if total != 1 else ''}"
        elif kind == "removed":
            text = f"deleted '{event['name']}' - u undoes it until you save"
        elif kind == "restored":
            text = f"restored '{event['name']}'"
        elif kind == "saved":
            text = f"saved {event['classes']} classes to {event['path']}"
        elif kind == "error":
            text = f"error: {event['message']}"
        elif kind == "skipped":
            text = f"skipped a frame: {event['message']}"
        else:
            text = kind
        log.info("%s", text) if kind != "error" else log.warning("%s", text)
        self.say(text)

    def show(self, frame: np.ndarray, prediction: Prediction | None, session: Session, stats: Stats) -> bool:
        """Draw the frame, then handle a key; False once the window is closed."""
        self._refresh_classes(session)
        if self.view.status and time.monotonic() > self.status_until:
            self.view.status = ""
        if prediction is not None:  # a frame taken by an enrolment keeps the last prediction on screen
            self.view.prediction = prediction
        self.view.fps = stats.recent
        self.view.explanation = self._explain(frame, session) if self.explaining else None
        self.last_canvas = render(frame, self.view)
        cv2.imshow(WINDOW, self.last_canvas)
        self.on_key(cv2.waitKeyEx(self._wait_ms(session)), frame, session)
        return not self.closed()

    @property
    def paused(self) -> bool:
        return self.view.paused

    def _wait_ms(self, session: Session) -> int:
        """How long to wait for a key: until the next frame is due, for a file played at its rate."""
        if session.frames_over or self.view.paused:
            return 30
        if not self.frame_rate:
            return 1
        now = time.monotonic()
        self._next_frame = max(self._next_frame + 1.0 / self.frame_rate, now)
        return max(1, round(1000 * (self._next_frame - now)))

    def close(self) -> None:
        self._open = False
        cv2.destroyAllWindows()

    def report(self, result: RunResult) -> None:
        pass  # the window showed everything; the summary line on stderr is the app's

    def closed(self) -> bool:
        try:
            return cv2.getWindowProperty(WINDOW, cv2.WND_PROP_VISIBLE) < 1
        except cv2.error:
            return True

    def _refresh_classes(self, session: Session) -> None:
        # Decoding thumbnails every frame would be waste: only when the gallery changed.
        if self._thumbs_version == session.version:
            return
        self._thumbs_version = session.version
        self.view.classes, self.view.thumbnails = class_strip(session)

    def on_key(self, code: int, frame: np.ndarray, session: Session) -> None:
        key = SPECIAL_KEYS.get(code, code)
        if code < 0 or (key > 0xFF and code not in SPECIAL_KEYS):
            return  # no key, or a special key we do not use (arrows, shift...)
        confirming, self.view.confirm_delete = self.view.confirm_delete, None  # any key ends it
        if self.view.typing is not None:
            self._on_typing_key(key, session)
        elif key in (ord("q"), ESC):
            session.stopped = True
        elif key == ord("n"):
            self._new_class(session)
        elif key == ord(" "):
            if self.view.current is None:
                self.say("press n to name a class first (tab picks an enrolled one)")
            else:
                session.enroll(self.view.current, [frame])
        elif key == TAB:
            names = [n for n, _ in self.view.classes]
            if names:
                i = names.index(self.view.current) + 1 if self.view.current in names else 0
                self.view.current = names[i % len(names)]
        elif key == ord("d"):
            if self.view.current is None:
                self.say("no current class to delete (tab picks one)")
            elif confirming == self.view.current:
                session.remove(self.view.current)
                self.view.current = None
            else:
                self.view.confirm_delete = self.view.current
        elif key == ord("u"):
            session.undo()
        elif key == ord("p"):
            self.view.paused = not self.view.paused
        elif key == ord("s"):
            session.save()
        elif key == ord("e"):
            self.explaining = not self.explaining
            on = "explain: the predicted class's heat map; the mouse picks a position"
            self.say(on if self.explaining else "explain off")

    def _on_mouse(self, event: int, x: int, y: int, flags: int, param: object) -> None:
        if event == cv2.EVENT_MOUSEMOVE:
            self.view.pointer = (x, y) if x < VIDEO_WIDTH else None

    def _explain(self, frame: np.ndarray, session: Session) -> Explanation | None:
        """The predicted class's explanation of the frame, or None (unknown, or no explain.onnx)."""
        prediction = self.view.prediction
        if prediction is None or prediction.label is None:
            return None
        try:
            return session.rec.explain(frame, prediction.label)
        except ExplanationUnavailable as exc:
            self.explaining = False
            self.say(f"error: {exc}")
        except GalleryError:  # the class went away since the prediction
            pass
        return None

    def _new_class(self, session: Session) -> None:
        if self.names:
            self._set_current(self.names.pop(0), session)
        else:
            self.view.typing = ""

    def _on_typing_key(self, key: int, session: Session) -> None:
        typed = self.view.typing or ""
        if key == ENTER:
            self.view.typing = None
            self._set_current(typed, session)
        elif key == ESC:
            self.view.typing = None
            self.say("cancelled")
        elif key == BACKSPACE:
            self.view.typing = typed[:-1]
        elif 32 <= key < 127:
            self.view.typing = typed + chr(key)

    def _set_current(self, name: str, session: Session) -> None:
        try:
            self.view.current = validate_class_name(name)
        except InvalidClassName as exc:
            self.say(f"error: {exc}")
        # The status line names the current class and its shots: no second message.
