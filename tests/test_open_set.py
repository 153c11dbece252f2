"""The open-set rule (runtime/open_set.py), its fit (export/cohort.py), and "unknown" in the Recognizer."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from dmf_deploy.export.cohort import CohortError, degenerate_frames, draw_episodes, load_cohort_folder
from dmf_deploy.runtime.open_set import (
    DEFAULT_MIN_CONTRAST,
    MAX_SENSITIVITY,
    QUANTILE_STEPS,
    OpenSetError,
    OpenSetRule,
    frame_contrast,
    refusal,
    relative_score,
)
from dmf_deploy.train.glyphs import GlyphSet

QUANTILES = tuple(0.5 + 0.005 * i for i in range(QUANTILE_STEPS + 1))  # 0.50 at 0%, 0.75 at 50%


def rule(**changes) -> OpenSetRule:
    return OpenSetRule(known_quantiles=changes.pop("known_quantiles", QUANTILES), **changes)


# ------------------------------------------------------------------------------------------ the record


def test_record_round_trips():
    original = rule(min_contrast=5.0, default_sensitivity=0.1, fitted_on="a cohort")
    assert OpenSetRule.from_dict(original.to_dict()) == original


@pytest.mark.parametrize(
    "change",
    [
        {"format": "something else"},
        {"format_version": 99},
        {"known_quantiles": [0.5] * 10},  # too few
        {"known_quantiles": list(reversed(QUANTILES))},  # decreasing
        {"known_quantiles": [float("nan")] * (QUANTILE_STEPS + 1)},
        {"known_quantiles": "0.5"},
        {"min_contrast": -1},
        {"min_contrast": "high"},
        {"default_sensitivity": 0.9},
    ],
)
def test_malformed_records_raise_a_named_error(change):
    record = {**rule().to_dict(), **change}
    with pytest.raises(OpenSetError):
        OpenSetRule.from_dict(record)


def test_missing_field_and_non_dict_raise_a_named_error():
    record = rule().to_dict()
    del record["known_quantiles"]
    for bad in (record, [], None, "x"):
        with pytest.raises(OpenSetError):
            OpenSetRule.from_dict(bad)


def test_sensitivity_picks_the_known_quantile():
    r = rule(default_sensitivity=0.05)
    assert r.threshold() == pytest.approx(0.525)  # the 5% quantile
    assert r.threshold(0.0) == pytest.approx(0.5) and r.threshold(MAX_SENSITIVITY) == pytest.approx(0.75)
    assert r.threshold(0.125) == pytest.approx(0.5625)  # interpolated between 12% and 13%
    for bad in (-0.01, MAX_SENSITIVITY + 0.01, float("nan"), True, "0.1"):
        with pytest.raises(ValueError):
            r.threshold(bad)


# ------------------------------------------------------------------------------------------ the gates


@pytest.mark.parametrize("size", [32, 56, 84])
def test_blank_frames_fall_below_the_contrast_gate_and_drawings_above(size):
    frames = degenerate_frames()
    for name in ("black", "white", "grey 20", "grey 128", "grey 235", "blurred empty page"):
        assert frame_contrast(frames[name], size) < DEFAULT_MIN_CONTRAST, name
    glyphs = GlyphSet(num_classes=5, seed=5, image_size=105)
    for c in range(5):
        assert frame_contrast(glyphs.render(c, 1), size) > 2 * DEFAULT_MIN_CONTRAST  # measured >= 120
    page = np.full((480, 640, 3), 215, np.uint8)
    cv2.line(page, (200, 100), (450, 380), (60, 60, 60), 2)  # a pen line, 2 px wide, on a VGA frame
    # measured 24 at 32 px, 38 at 56 px: a faint drawing is not a blank frame
    assert frame_contrast(page, size) > DEFAULT_MIN_CONTRAST


def test_refusal_names_the_gate_and_its_value():
    r = rule(min_contrast=8.0, default_sensitivity=0.05)  # needs 0.525 of the frame's own score
    blank = refusal(r, 3.0, "mug", 50.0, 10.0)
    assert blank.startswith("blank frame") and "3.0" in blank  # whatever the score
    weak = refusal(r, 100.0, "mug", 5.0, 10.0)
    assert "'mug'" in weak and "0.50" in weak and "0.53" in weak
    assert refusal(r, 100.0, "mug", 6.0, 10.0) == ""
    assert refusal(r, 100.0, "mug", 6.0, 10.0, sensitivity=0.4) != ""  # stricter: needs 0.70
    assert refusal(r, 100.0, "mug", 6.0, 0.0) != ""  # a frame scoring <= 0 against itself
    # threshold= replaces the relative gate, never the contrast gate
    assert refusal(r, 100.0, "mug", 5.0, 10.0, threshold=4.0) == ""
    assert "threshold" in refusal(r, 100.0, "mug", 5.0, 10.0, threshold=6.0)
    assert refusal(r, 3.0, "mug", 5.0, 10.0, threshold=-1e9).startswith("blank frame")
    assert relative_score(3.0, -1.0) == -np.inf


# ------------------------------------------------------------------------------------------ the fit


def test_draws_follow_the_protocol():
    labels = np.repeat(np.arange(24), 20)
    for n in (1, 5, 10):
        draws = draw_episodes(labels, n, 50, seed=3)
        again = draw_episodes(labels, n, 50, seed=3)  # seeded: the same draws
        assert all(np.array_equal(a.known, b.known) for a, b in zip(draws, again))
        for d in draws:
            assert len(d.enrolled) == n and len(d.unknown) == 10
            enrolled = set(labels[d.enrolled].tolist())
            assert len(enrolled) == n
            assert np.array_equal(labels[d.known], labels[d.enrolled])  # another drawing of each
            assert not set(d.known.tolist()) & set(d.enrolled.tolist())
            assert not enrolled & set(labels[d.unknown].tolist())  # never enrolled
            assert len(set(labels[d.unknown].tolist())) == 10
    with pytest.raises(CohortError):
        draw_episodes(np.repeat(np.arange(5), 3), 5, 1, 0)


def test_cohort_folder_is_checked(tmp_path):
    with pytest.raises(CohortError):
        load_cohort_folder(tmp_path / "missing")
    glyphs = GlyphSet(num_classes=3, seed=1, image_size=40)
    for c in range(3):
        (tmp_path / f"c{c}").mkdir()
        for i in range(2 if c else 1):  # class 0 has a single image: skipped
            cv2.imwrite(str(tmp_path / f"c{c}" / f"{i}.png"), glyphs.render(c, i))
    (tmp_path / "c1" / "notes.txt").write_text("not an image")
    frames, labels, names = load_cohort_folder(tmp_path)
    assert names == ["c1", "c2"] and labels.tolist() == [0, 0, 1, 1] and frames[0].shape == (40, 40, 3)
    (tmp_path / "c2" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(CohortError, match="broken.png"):
        load_cohort_folder(tmp_path)
