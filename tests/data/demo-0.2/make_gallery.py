"""How gallery-v2.dmfg was made: the 0.2 demo bundle (bundle/, from commit b549139) enrols five glyph
classes, and 0.2's own gallery writer (runtime/gallery.py at b549139, read from git) saves them as a
version 2 file. expected.npz keeps query frames and the scores of the enrolling recogniser (the head on
exactly the banks the file stores, as 0.2 ran it), so a test can check that today's runtime opens the
file and classifies identically. Run once, from the repository root:

    python tests/data/demo-0.2/make_gallery.py

The glyphs are procedural (dmf_deploy/glyphs.py), not Omniglot.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np

from dmf_deploy.glyphs import GlyphSet
from dmf_deploy.manifest import CLASS_BANK
from dmf_deploy.runtime import Recognizer

HERE = Path(__file__).parent
GLYPHS = GlyphSet(5, seed=32, image_size=96, jitter=0.3)
SHOTS = 3


def old_gallery_module():
    """0.2's runtime/gallery.py, as it was at commit b549139."""
    source = subprocess.run(
        ["git", "show", "b549139:runtime/gallery.py"], check=True, capture_output=True, text=True
    ).stdout
    path = HERE / "_gallery_0_2.py"
    path.write_text(source)
    try:
        spec = importlib.util.spec_from_file_location("gallery_0_2", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["gallery_0_2"] = module
        spec.loader.exec_module(module)
        return module
    finally:
        path.unlink()


def main() -> None:
    old = old_gallery_module()
    rec = Recognizer.open(HERE / "bundle", backend="onnxruntime")
    for c in range(GLYPHS.num_classes):
        rec.enroll(f"glyph {c}", [GLYPHS.render(c, i) for i in range(SHOTS)])
    g, m = rec.gallery, rec.manifest
    written = old.Gallery(m.fingerprint, m.feature_shape, m.bank_shapes, g.model_description, m.bank_dtypes)
    banks = g.bank_arrays()
    for row, name in enumerate(g.names):
        thumb = rec.gallery.thumbnail(name)
        picture = None if thumb is None else old.decode_thumbnail(thumb)
        new = written.add_shots(name, g.feature_sum(row), int(g.counts[row]), picture)
        written.set_bank(new, {k: banks[k][row] for k in CLASS_BANK})
    written.save(HERE / "gallery-v2.dmfg")
    # The enrolling recogniser's own scores: the head on exactly the banks the file stores.
    queries = np.stack([GLYPHS.render(c, 100 + i) for c in range(GLYPHS.num_classes) for i in range(2)])
    np.savez(HERE / "expected.npz", queries=queries, scores=rec.scores(list(queries)), classes=g.names)


if __name__ == "__main__":
    main()
