"""runtime/app/loop.py: the one frame loop of dmf-run, driven directly with real frames from a real image
folder, the demo bundle, and an Output that records what it is shown."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from bundles import Recorder, cross, ring, session_for  # tests/bundles.py

from dmf_deploy.packaged import demo_bundle_installed
from dmf_deploy.runtime import Recognizer
from dmf_deploy.runtime.app.commands import Session
from dmf_deploy.runtime.app.loop import JsonLinesOutput, prediction_record, run_loop
from dmf_deploy.runtime.app.sources import open_source

pytestmark = pytest.mark.skipif(not demo_bundle_installed(), reason="the demo bundle is not installed")


@pytest.fixture
def folder(tmp_path):
    path = tmp_path / "frames"
    path.mkdir()
    for i, image in enumerate([ring(), ring(), cross(), cross(), ring()]):
        cv2.imwrite(str(path / f"frame{i}.png"), image)
    return path


def test_commands_enrol_frames_and_the_end_is_its_own_event(folder, tmp_path):
    rec = Recognizer.open("demo", backend="onnxruntime")
    output = Recorder(holds_last_frame=False)
    script = "enroll ring 1\nwait 1\nenroll cross 1\nwait 3\nlist\nenroll late 1\n"
    session = session_for(rec, output, tmp_path, script)
    result = run_loop(rec, open_source(source=str(folder)), session, output)
    assert output.shown == ["(enrolled)", "ring", "(enrolled)", "cross", "ring"]
    kinds = [e["event"] for e in output.events]
    assert kinds == ["enrolled", "enrolled", "end_of_source", "list", "error"]
    assert output.events[2] == {"event": "end_of_source", "frames": 5}  # it also ends the `wait 3`
    assert output.events[4]["command"] == "enroll late 1"  # refused by the Session, not by the loop
    assert result.stats.frames == 5 and result.stats.classified == 3
    assert result.last_prediction is not None and result.last_prediction.label == "ring"


def test_an_output_that_holds_the_last_frame_sees_it_against_the_changed_gallery(folder, tmp_path):
    rec = Recognizer.open("demo", backend="onnxruntime")
    rec.enroll("ring", [ring()])

    def act(shows: int, session: Session) -> None:
        if shows == 6:  # the first show of the held frame (the fifth image, a ring)
            session.remove("ring")
            session.enroll("circle", [ring()])
        if shows == 8:
            session.stopped = True  # as q does

    output = Recorder(holds_last_frame=True, on_show=act)
    session = session_for(rec, output, tmp_path, None)
    result = run_loop(rec, open_source(source=str(folder)), session, output)
    assert output.shown[:6] == ["ring", "ring", None, None, "ring", "ring"]  # a cross: unknown
    assert output.shown[6:] == ["circle", "circle"]  # re-classified once the gallery changed
    assert [e["event"] for e in output.events] == ["end_of_source", "removed", "enrolled"]
    assert result.stats.frames == 5  # held frames are not read again


def test_a_stop_keeps_the_frames_a_pending_enrol_got(folder, tmp_path):
    rec = Recognizer.open("demo", backend="onnxruntime")
    output = Recorder(holds_last_frame=False, max_shows=2)  # the output ends the loop after 2 frames
    session = session_for(rec, output, tmp_path, "enroll ring 4\n")
    run_loop(rec, open_source(source=str(folder)), session, output)
    assert output.events[-1]["event"] == "enrolled"
    assert output.events[-1]["shots"] == 2 and output.events[-1]["requested"] == 4


def test_json_lines_output_prints_the_documented_fields(folder, tmp_path, capsys):
    rec = Recognizer.open("demo", backend="onnxruntime")
    rec.enroll("ring", [ring()])
    output = JsonLinesOutput()
    session = session_for(rec, output, tmp_path, "wait 2\nquit\n")
    run_loop(rec, open_source(source=str(folder)), session, output)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    import json

    first = json.loads(lines[0])
    assert set(first) == {"frame", "label", "score", "top", "latency_ms", "reason"}
    assert first["frame"] == 0 and first["label"] == "ring" and first["top"][0][0] == "ring"
    assert first["reason"] is None  # recognised: nothing to explain


def test_a_refused_frame_says_why_in_its_json_line():
    rec = Recognizer.open("demo", backend="onnxruntime")
    rec.enroll("ring", [ring()])
    record = prediction_record(0, rec.classify(np.full((64, 64, 3), 255, np.uint8)), 1.0)
    assert record["label"] is None and record["reason"].startswith("blank frame")


def test_a_pending_enrol_skips_blank_frames_and_keeps_its_shots(tmp_path):
    """A card that leaves the view for a frame (blank paper) costs that frame, not the enrolment."""
    path = tmp_path / "frames"
    path.mkdir()
    blank = np.full((105, 105, 3), 230, np.uint8)
    for i, image in enumerate([ring(), blank, blank, ring(), ring(), cross()]):
        cv2.imwrite(str(path / f"frame{i}.png"), image)
    rec = Recognizer.open("demo", backend="onnxruntime")
    output = Recorder(holds_last_frame=False)
    session = session_for(rec, output, tmp_path, "enroll ring 3\nwait 1\n")
    run_loop(rec, open_source(source=str(path)), session, output)
    assert output.shown == ["(enrolled)"] * 5 + [None]  # the cross is not the ring
    kinds = [e["event"] for e in output.events]
    assert kinds == ["skipped", "skipped", "enrolled", "end_of_source"]
    # Frames are numbered by the enrolment's frames, refused ones included (the 2nd and 3rd).
    assert output.events[0]["message"].startswith("frame 1 is blank to the model")
    assert output.events[1]["message"].startswith("frame 2 is blank to the model")
    assert output.events[2]["shots"] == 3 and "requested" not in output.events[2]
    # Which source frames became shots, and how many were skipped on the way.
    assert (output.events[2]["first_frame"], output.events[2]["last_frame"]) == (0, 4)
    assert output.events[2]["skipped"] == 2 and [e["frame"] for e in output.events[:2]] == [1, 2]
    assert rec.gallery.shots("ring") == 3


def test_a_pending_enrol_gives_up_after_too_many_blank_frames(tmp_path):
    from dmf_deploy.runtime.app.commands import MIN_SKIPS

    path = tmp_path / "frames"
    path.mkdir()
    images = [ring()] + [np.full((105, 105, 3), 230, np.uint8)] * (MIN_SKIPS + 2)
    for i, image in enumerate(images):
        cv2.imwrite(str(path / f"frame{i:03d}.png"), image)
    rec = Recognizer.open("demo", backend="onnxruntime")
    output = Recorder(holds_last_frame=False)
    session = session_for(rec, output, tmp_path, "enroll ring 2\n")
    run_loop(rec, open_source(source=str(path)), session, output)
    kinds = [e["event"] for e in output.events]
    assert kinds == ["skipped"] * MIN_SKIPS + ["enrolled", "end_of_source"]
    assert output.events[MIN_SKIPS]["shots"] == 1 and output.events[MIN_SKIPS]["requested"] == 2
    assert output.shown == ["(enrolled)"] * (1 + MIN_SKIPS) + [None, None]  # classified once given up

    # With no shot at all, the enrolment is an error and the gallery stays empty.
    for i in range(len(images)):
        cv2.imwrite(str(path / f"frame{i:03d}.png"), images[-1])
    rec = Recognizer.open("demo", backend="onnxruntime")
    output = Recorder(holds_last_frame=False)
    session = session_for(rec, output, tmp_path, "enroll nothing 2\n")
    run_loop(rec, open_source(source=str(path)), session, output)
    errors = [e for e in output.events if e["event"] == "error"]
    assert errors == [
        {
            "event": "error",
            "command": "enroll nothing",
            "message": f"{MIN_SKIPS} frames were blank to the model before any frame could be enrolled: "
            "nothing was enrolled; show the drawing to the camera and enrol again",
        }
    ]
    assert rec.classes == []
