"""The open-set rule (dmf_deploy/open_set.py), its fit (export/cohort.py), and "unknown" in the Recognizer."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
from bundles import on_card  # tests/bundles.py

from dmf_deploy.export.cohort import (
    CohortError,
    degenerate_frames,
    draw_episodes,
    head_scores,
    load_cohort_folder,
    score_images,
)
from dmf_deploy.manifest import BundleError, Manifest
from dmf_deploy.open_set import (
    DEFAULT_MIN_CONTRAST,
    MAX_SENSITIVITY,
    OPEN_SET_FILE,
    QUANTILE_STEPS,
    OpenSetError,
    OpenSetRule,
    frame_contrast,
    refusal,
    relative_score,
)
from dmf_deploy.packaged import DEMO_BUNDLE, demo_bundle_installed
from dmf_deploy.runtime import Recognizer
from dmf_deploy.runtime.recognizer import new_gallery
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
    (tmp_path / "c2" / "broken.png").write_bytes(b"")  # cv2.imdecode raises on no bytes at all
    with pytest.raises(CohortError, match="broken.png is empty"):
        load_cohort_folder(tmp_path)


# ------------------------------------------------------------------------------------------ the Recognizer

needs_demo = pytest.mark.skipif(not demo_bundle_installed(), reason="no demo bundle")
GLYPHS = GlyphSet(num_classes=30, seed=5, image_size=105)  # drawn strokes, like the demo's characters


def glyph(class_id: int, index: int) -> np.ndarray:
    """A drawing of GLYPHS on a card, as a webcam sees it (the demo model finds the drawing in it)."""
    return on_card(GLYPHS.render(class_id, index))


@pytest.fixture(scope="module")
def demo():
    return Recognizer.open(DEMO_BUNDLE, backend="onnxruntime", threads=1)


def gallery_of(demo: Recognizer, classes: int) -> Recognizer:
    rec = Recognizer(demo.bundle, demo.manifest, demo.backend, new_gallery(demo.manifest), None)
    for c in range(classes):
        rec.enroll(f"g{c}", [glyph(c, 0)])
    return rec


@needs_demo
@pytest.mark.parametrize("classes", [1, 10])
def test_the_default_decision_refuses_every_degenerate_frame(demo, classes):
    rec = gallery_of(demo, classes)
    frames = degenerate_frames()
    for name, pred in zip(frames, rec.classify(list(frames.values()))):
        assert pred.label is None, (name, pred)
        assert pred.reason and pred.message == pred.reason, name
    # the gates that refused them: the contrast gate for frames without an edge, the score for the rest
    preds = dict(zip(frames, rec.classify(list(frames.values()))))
    for name in ("black", "white", "grey 128", "blurred empty page"):
        assert preds[name].reason.startswith("blank frame"), preds[name]
    # The demo model finds the drawing in a frame (locate="drawing"): a smooth skin-coloured blob holds
    # no ink, so it is redrawn blank and the contrast gate refuses it too.
    assert preds["hand-like blob"].reason.startswith("blank frame"), preds["hand-like blob"]
    # an absolute threshold that accepts anything still leaves blank frames unknown
    lenient = Recognizer(demo.bundle, demo.manifest, demo.backend, rec.gallery, None, threshold=-1e30)
    assert lenient.classify(frames["black"]).label is None


@needs_demo
def test_known_glyphs_pass_and_sensitivity_trades_them_against_unknown_ones(demo):
    rec = gallery_of(demo, 10)
    known = [glyph(c, i) for c in range(10) for i in range(1, 4)]
    unseen = [glyph(c, i) for c in range(10, 30) for i in range(1, 3)]
    refused = {}
    for sensitivity in (0.0, 0.05, 0.2, 0.5):
        rec.sensitivity = sensitivity
        refused[sensitivity] = (
            np.mean([p.label is None for p in rec.classify(known)]),
            np.mean([p.label is None for p in rec.classify(unseen)]),
        )
    # measured at the default 0.05: known 0% refused, unseen 35%; bounds far from both
    assert refused[0.05][0] <= 0.2 and refused[0.05][1] >= refused[0.05][0] + 0.15, refused
    for low, high in zip((0.0, 0.05, 0.2), (0.05, 0.2, 0.5)):  # a higher sensitivity refuses no fewer
        assert refused[high][0] >= refused[low][0] and refused[high][1] >= refused[low][1], refused
    assert refused[0.5][1] > refused[0.0][1]
    with pytest.raises(ValueError, match="sensitivity"):
        Recognizer.open(DEMO_BUNDLE, backend="onnxruntime", sensitivity=0.9)


@needs_demo
def test_the_benchmark_path_decides_as_the_recognizer_does(demo):
    """benchmarks/open_set.py and the fit score images through export/cohort.py: the same decisions."""
    rec = gallery_of(demo, 5)
    frames = [glyph(c, i) for c in range(12) for i in range(1, 3)]
    frames += list(degenerate_frames().values())
    preds = rec.classify(frames)
    cfg = demo.manifest.model.preprocess
    shots = score_images(demo.backend, cfg, [glyph(c, 0) for c in range(5)])
    queries = score_images(demo.backend, cfg, frames)
    scores = head_scores(demo.backend, queries.features, shots, np.arange(5))
    for i, pred in enumerate(preds):
        best = int(scores[i].argmax())
        # same graphs, batches of another size: scores equal to float rounding (ORT kernels)
        assert pred.score == pytest.approx(float(scores[i, best]), rel=1e-5)
        ratio = relative_score(float(scores[i, best]), float(queries.own[i]))
        if abs(ratio - rec.open_set.threshold()) > 1e-4:  # no decision that rounding could flip
            contrast, best_score = float(queries.contrast[i]), float(scores[i, best])
            why = refusal(rec.open_set, contrast, f"g{best}", best_score, float(queries.own[i]))
            assert (pred.label is None) == bool(why), (i, pred, why)


# ------------------------------------------------------------------------------------------ the bundle


def copy_of_demo(tmp_path: Path) -> Path:
    target = tmp_path / "bundle"
    shutil.copytree(DEMO_BUNDLE, target)
    return target


@needs_demo
def test_a_modified_or_missing_record_is_refused_at_open(tmp_path):
    bundle = copy_of_demo(tmp_path)
    record = bundle / OPEN_SET_FILE
    record.write_text(record.read_text().replace('"min_contrast": 8.0', '"min_contrast": 0.0'))
    with pytest.raises(BundleError, match="sha256"):
        Recognizer.open(bundle, backend="onnxruntime")
    record.unlink()
    with pytest.raises(BundleError, match="missing"):
        Recognizer.open(bundle, backend="onnxruntime")


@needs_demo
def test_a_bundle_without_a_record_gets_the_demo_models_rule(tmp_path):
    bundle = copy_of_demo(tmp_path)
    manifest = Manifest.read(bundle)
    replace(manifest, open_set=None).write(bundle)  # as 0.1.0 bundles are
    (bundle / OPEN_SET_FILE).unlink()
    rec = Recognizer.open(bundle, backend="onnxruntime")
    assert rec.open_set == Recognizer.open(DEMO_BUNDLE, backend="onnxruntime").open_set
    rec.enroll("g0", [glyph(0, 0)])
    assert rec.classify(degenerate_frames()["black"]).reason.startswith("blank frame")


def test_export_fits_the_rule_on_a_cohort_folder_and_refuses_a_bad_one(tmp_path):
    from bundles import make_checkpoint  # tests/bundles.py

    from dmf_deploy.export.bundle import ExportError, export_bundle

    ckpt = make_checkpoint(tmp_path / "model.pt", "conv4", 32, 16, 8, seed=0, train_steps=0)
    cohort = tmp_path / "cohort"
    glyphs = GlyphSet(num_classes=12, seed=9, image_size=48)
    for c in range(12):
        (cohort / f"c{c:02d}").mkdir(parents=True)
        for i in range(3):
            cv2.imwrite(str(cohort / f"c{c:02d}" / f"{i}.png"), glyphs.render(c, i))
    with pytest.raises(ExportError, match="--cohort"):
        export_bundle(ckpt, tmp_path / "bad", check=False, cohort=tmp_path / "no such folder")
    assert not (tmp_path / "bad").exists()  # refused before anything was written

    bundle = export_bundle(ckpt, tmp_path / "bundle", check=False, cohort=cohort)
    manifest = Manifest.read(bundle)
    assert manifest.open_set["file"] == OPEN_SET_FILE
    rule = Recognizer.open(bundle, backend="onnxruntime").open_set
    assert rule.fitted_on.startswith("cohort folder cohort: 12 classes, 36 images, N = 10")
    demo_rule = Recognizer.open(DEMO_BUNDLE, backend="onnxruntime").open_set
    assert rule.known_quantiles != demo_rule.known_quantiles  # fitted here, not copied


def test_export_without_a_cohort_copies_the_demo_rule_and_says_so(tmp_path_factory):
    from bundles import export_small_bundle  # tests/bundles.py

    rule = Recognizer.open(export_small_bundle(tmp_path_factory), backend="onnxruntime").open_set
    assert rule.fitted_on.startswith("not fitted for this model")
    demo_rule = Recognizer.open(DEMO_BUNDLE, backend="onnxruntime").open_set
    assert rule.known_quantiles == demo_rule.known_quantiles


@needs_demo
def test_a_cohort_of_blank_or_copied_images_is_refused():
    """Issue 29, item 8: a cohort of blank images gave exit 0 and a rule that refused every real frame.
    A cohort the frame gate calls blank, or whose known queries all score alike, is a CohortError."""
    from dmf_deploy.export.cohort import fit_rule
    from dmf_deploy.export.parity import OrtGraphs

    manifest = Manifest.read(DEMO_BUNDLE)
    graphs = OrtGraphs(DEMO_BUNDLE, manifest)
    labels = np.repeat(np.arange(12), 3)
    blank = [np.full((105, 105, 3), 255, np.uint8)] * len(labels)
    with pytest.raises(CohortError, match="36 of 36 cohort images are blank to the frame gate"):
        fit_rule(graphs, manifest.model.preprocess, blank, labels, "blank", draws=20)
    copies = [glyph(int(c), 0) for c in labels]  # each class: one drawing three times
    with pytest.raises(CohortError, match="scores do not separate"):
        fit_rule(graphs, manifest.model.preprocess, copies, labels, "copies", draws=20)
    drawn = [glyph(int(c), i % 3) for i, c in enumerate(labels)]
    rule = fit_rule(graphs, manifest.model.preprocess, drawn, labels, "drawings", draws=20)
    assert rule.known_quantiles[-1] > rule.known_quantiles[5]


@pytest.mark.skipif(not demo_bundle_installed(), reason="the demo bundle is not installed")
def test_classify_scores_the_frames_own_class_in_the_head_call_across_chunks():
    """classify scores a lone frame's own class as one more column of the head calls; with more
    classes than one call takes (HEAD_CHUNK), the column falls in the last chunk. Its scores and own
    score are those of scoring the gallery and the own class apart (float32 rounding of ~20: 1e-4)."""
    from dmf_deploy.open_set import own_scores
    from dmf_deploy.runtime.recognizer import HEAD_CHUNK

    rec = Recognizer.open(DEMO_BUNDLE, backend="onnxruntime", shortlist=None)
    glyphs = GlyphSet(HEAD_CHUNK + 4, seed=3, image_size=96)
    for c in range(HEAD_CHUNK + 4):
        rec.enroll(f"g{c}", [on_card(glyphs.render(c, 0))])
    feats = rec.features([on_card(glyphs.render(7, 1))])
    scores, own = rec._scores_and_own(feats)
    assert scores.shape == (1, HEAD_CHUNK + 4)
    np.testing.assert_allclose(scores, rec._classify_scores(feats), rtol=0, atol=1e-4)
    np.testing.assert_allclose(own, own_scores(rec.backend, feats), rtol=0, atol=1e-4)
