"""The dmf-run window's drawing without a display (`render` is a pure function of frame and View).

A real Recognizer of the packaged demo bundle with a real gallery file; the window's class strip is
drawn as the window draws it (`class_strip` at a gallery change, `render` at every frame).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from bundles import pen_frame  # tests/bundles.py

from dmf_deploy.packaged import DEMO_BUNDLE, demo_bundle_installed
from dmf_deploy.runtime import Recognizer
from dmf_deploy.runtime.app.commands import Session
from dmf_deploy.runtime.app.overlay import View, class_strip, render, strip_slots
from dmf_deploy.runtime.gallery import decode_thumbnail

pytestmark = pytest.mark.skipif(not demo_bundle_installed(), reason="the demo bundle is not installed")


def test_the_class_strip_decodes_only_the_thumbnails_it_shows(tmp_path: Path) -> None:
    slots = strip_slots()
    n = 3 * slots  # more classes than the strip shows: it shows the newest
    with Recognizer.open(DEMO_BUNDLE, gallery=tmp_path / "g.dmfg") as rec:
        for i in range(n):
            rec.enroll(f"class {i}", [pen_frame(i)])
        rec.save()
        session = Session(rec, tmp_path / "g.dmfg", lambda _event: None)
        classes, thumbnails = class_strip(session)
        assert classes == [(f"class {i}", 1) for i in range(n)]
        newest = [f"class {i}" for i in range(n - slots, n)]
        assert sorted(thumbnails) == sorted(newest)  # a gallery change reads `slots` thumbnails, not n
        every = {name: decode_thumbnail(rec.gallery.thumbnail(name)) for name, _ in classes}
        frame = pen_frame(n - 1)
        prediction = rec.classify(frame)
    # The window is the same image as with every thumbnail decoded: none that it draws is missing.
    shown = render(frame, View(prediction=prediction, classes=classes, thumbnails=thumbnails))
    full = render(frame, View(prediction=prediction, classes=classes, thumbnails=every))
    np.testing.assert_array_equal(shown, full)
    # And the strip does draw thumbnails (a window without them would be the same image too).
    blank = render(frame, View(prediction=prediction, classes=classes, thumbnails={}))
    assert not np.array_equal(shown, blank)
