"""`dmf-run --check-gallery`: the full check of a gallery file, with no camera and no frames.

Opening a gallery checks what is bounded by its class count (header, schema, every row's types and
sizes: docs/gallery-format.md). This check reads everything: SQLite's quick_check over the whole file,
then every feature sum and thumbnail, each against its CRC-32 and its limits. Its cost grows with the
file, so it runs only when asked. It only reads: the bank cache beside the gallery is neither made nor
locked, so a running dmf-run or dmf-serve on the same gallery keeps it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dmf_deploy.manifest import Manifest
from dmf_deploy.runtime.gallery import Gallery
from dmf_deploy.runtime.recognizer import describe_model


@dataclass(frozen=True)
class GalleryReport:
    """What the check found: one line per problem and their count, or one line saying the gallery is sound."""

    lines: list[str]
    sound: bool


def full_check(path: Path, manifest: Manifest) -> GalleryReport:
    """Check the gallery at `path` for the bundle of `manifest`. GalleryError (with its one-line reason)
    when the file cannot be opened as a gallery of this model at all."""
    with Gallery.load(path, manifest.fingerprint, describe_model(manifest), bank_cache=False) as gallery:
        problems = gallery.check()
        if tuple(gallery.feature_shape) != tuple(manifest.feature_shape):
            problems.insert(
                0,
                f"{path} stores feature maps of shape {list(gallery.feature_shape)}, but this bundle's "
                f"are {list(manifest.feature_shape)}",
            )
        classes = len(gallery)
        opened = gallery.path  # None: a version 1 or 2 file, read whole (and so checked) at open
    name = str(path) if opened is None or opened == path else f"{path} (converted: {opened})"
    if problems:
        lines = list(problems)  # each names the file, and the class where there is one
        count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        return GalleryReport([*lines, f"gallery {name}: {count} found"], sound=False)
    what = "SQLite quick_check, every feature sum and thumbnail read"
    if opened is None:
        what = "an .npz gallery of version 1 or 2, read whole"
    plural = "es" if classes != 1 else ""
    return GalleryReport([f"gallery {name}: sound, {classes} class{plural} ({what})"], sound=True)
