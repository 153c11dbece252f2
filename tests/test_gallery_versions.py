"""Galleries of older versions, through the public API: a version 2 file that 0.2 wrote with its demo
bundle (tests/data/demo-0.2, made by make_gallery.py there) opens and classifies identically, and its
first save converts it beside the original. Real bundle, real ONNX Runtime sessions, real files.
"""

from __future__ import annotations

import shutil
import sqlite3
import zlib
from pathlib import Path

import numpy as np
import pytest

from dmf_deploy.manifest import Manifest
from dmf_deploy.runtime import Gallery, GalleryError, Recognizer
from dmf_deploy.runtime.gallery import converted_path

DATA = Path(__file__).parent / "data" / "demo-0.2"


@pytest.fixture()
def old(tmp_path: Path) -> tuple[Path, Path]:
    """The 0.2 bundle and its version 2 gallery, copied (a save writes beside the gallery)."""
    bundle = shutil.copytree(DATA / "bundle", tmp_path / "bundle")
    gallery = shutil.copy(DATA / "gallery-v2.dmfg", tmp_path / "g.dmfg")
    return bundle, Path(gallery)


def test_a_version_2_gallery_of_0_2_classifies_identically_and_converts_beside_itself(old) -> None:
    bundle, path = old
    expected = np.load(DATA / "expected.npz")
    original = path.read_bytes()
    rec = Recognizer.open(bundle, backend="onnxruntime", gallery=path)
    assert rec.classes == list(expected["classes"])
    queries = list(expected["queries"])
    # Its banks come from the file itself: the same float32 banks 0.2 computed, so the same scores.
    np.testing.assert_array_equal(rec.scores(queries), expected["scores"])
    best = expected["scores"].argmax(axis=1)
    assert [p.scores and max(p.scores, key=p.scores.get) for p in rec.classify(queries)] == [
        rec.classes[i] for i in best
    ]

    written = rec.save()
    assert written == converted_path(path) == path.with_name("g.v3.dmfg")
    assert path.read_bytes() == original  # left in place, untouched
    assert rec.gallery_path == written
    rec.enroll("later", queries[:1])
    rec.save()
    rec.close()
    # The old path opens the converted file from then on.
    again = Recognizer.open(bundle, backend="onnxruntime", gallery=path)
    assert again.gallery_path == written and again.classes == [*expected["classes"], "later"]
    assert again.gallery.missing_banks == []  # the banks the conversion cached, not recomputed
    # Six classes in one head call round a few ulp differently from five: float32 rounding, no more.
    np.testing.assert_allclose(again.scores(queries)[:, :-1], expected["scores"], rtol=1e-6, atol=1e-5)
    again.close()


def test_a_gallery_of_this_model_with_other_feature_maps_is_refused_at_open(old, tmp_path: Path) -> None:
    """Issue 29, item 8: the bundle's fingerprint but another feature shape (a hand-made or damaged
    file) is a GalleryError at open, not an ONNX Runtime INVALID_ARGUMENT at the first frame."""
    bundle, _ = old
    manifest = Manifest.read(bundle)
    c, h, w = manifest.feature_shape
    odd = Gallery(manifest.fingerprint, (c, h + 1, w), manifest.bank_shapes, "odd", manifest.bank_dtypes)
    row = odd.add_shots("x", np.ones((c, h + 1, w), np.float32), 1)
    odd.set_bank(row, {k: np.zeros(s, np.float32) for k, s in manifest.bank_shapes.items()})
    path = odd.save(tmp_path / "odd.dmfg")
    odd.close()
    with pytest.raises(GalleryError, match="feature maps of shape"):
        Recognizer.open(bundle, backend="onnxruntime", gallery=path)
    with pytest.raises(GalleryError, match="feature maps of shape"):
        Recognizer.open(bundle, backend="onnxruntime", gallery=Gallery.load(path, manifest.fingerprint))


def test_a_huge_stored_sum_is_refused_and_blocks_nothing(old, tmp_path: Path) -> None:
    """Issue 29, item 6: a class whose stored sum is finite but huge (3e38) used to fail `enroll` on the
    NaN check of its bank after its shot count had moved, and every later save failed. Now the sum is
    refused when read, nothing changes, and the session's other enrolments save."""
    bundle, path = old
    rec = Recognizer.open(bundle, backend="onnxruntime", gallery=path)
    frames = list(np.load(DATA / "expected.npz")["queries"][:2])
    converted = rec.save()
    rec.close()
    db = sqlite3.connect(converted)
    huge = np.full(Manifest.read(bundle).feature_shape, 3e38, "<f4").tobytes()
    db.execute("UPDATE sums SET data = ?, crc32 = ? WHERE class_id = 1", (huge, zlib.crc32(huge)))
    db.commit()
    db.close()
    rec = Recognizer.open(bundle, backend="onnxruntime", gallery=converted)  # its bank is cached
    shots_before = rec.shots("glyph 0")
    with pytest.raises(GalleryError, match="beyond any backbone"):
        rec.enroll("glyph 0", frames)
    assert rec.shots("glyph 0") == shots_before
    rec.enroll("fresh", frames)
    rec.save()
    rec.close()
    assert Recognizer.open(bundle, backend="onnxruntime", gallery=converted).classes[-1] == "fresh"
    # A version 2 file is read whole at open: the same sum is refused there.
    legacy = Gallery.load(DATA / "gallery-v2.dmfg", Manifest.read(bundle).fingerprint)
    legacy.add_shots("glyph 4", np.full(legacy.feature_shape, 1e5, np.float32), 1)  # fine: 1e5 a shot
    with pytest.raises(GalleryError, match="beyond any backbone"):
        legacy.add_shots("glyph 4", np.full(legacy.feature_shape, 3e38, np.float32), 1)
