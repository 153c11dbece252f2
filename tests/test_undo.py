"""Recognizer.remove hands back what `restore` needs: the window's `u` undoes a deletion with it."""

from __future__ import annotations

import numpy as np
import pytest
from bundles import export_small_bundle  # tests/bundles.py

from dmf_deploy.runtime import GalleryError, Recognizer
from dmf_deploy.train.glyphs import GlyphSet

GLYPHS = GlyphSet(num_classes=4, seed=2, image_size=48)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return export_small_bundle(tmp_path_factory)


def test_a_removed_class_comes_back_with_its_shots_scores_and_thumbnail(bundle, tmp_path):
    rec = Recognizer.open(bundle, backend="onnxruntime")
    for c in range(3):
        rec.enroll(f"g{c}", [GLYPHS.render(c, i) for i in range(c + 1)])
    queries = [GLYPHS.render(c, 50) for c in range(4)]
    before = rec.scores(queries)
    thumb = rec.gallery.thumbnail("g1")

    removed = rec.remove("g1")
    assert rec.classes == ["g0", "g2"] and removed.count == 2
    rec.restore(removed)
    assert rec.classes == ["g0", "g2", "g1"]  # back as the last class
    assert rec.gallery.counts.tolist() == [1, 3, 2]
    # the same sum and count give the same prototype and bank: the same scores, column for column
    np.testing.assert_array_equal(rec.scores(queries)[:, [0, 2, 1]], before)
    assert rec.gallery.thumbnail("g1") is not None and thumb is not None  # re-encoded JPEG
    rec.save(tmp_path / "g.dmfg")  # a restored class has its bank: the gallery saves

    rec.enroll("g1", [GLYPHS.render(3, 0)])  # the name taken again: no silent merge
    with pytest.raises(GalleryError, match="g1"):
        rec.restore(removed)
