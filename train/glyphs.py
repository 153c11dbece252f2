"""Glyph datasets for training and tests: `GlyphSet` classes (dmf_deploy/glyphs.py) as FewShotDatasets."""

from __future__ import annotations

import numpy as np

from dmf_deploy.glyphs import GlyphSet

from .fewshot import SPLITS, DatasetError, FewShotDataset

__all__ = ["GlyphSet", "glyph_dataset", "glyph_split"]

_SPLIT_CLASSES = {"train": 64, "val": 16, "test": 20}  # the miniImageNet class counts


def glyph_dataset(
    num_classes: int,
    per_class: int,
    seed: int = 0,
    *,
    name: str = "glyphs",
    image_size: int = 84,
    **glyph_options: object,
) -> FewShotDataset:
    """A FewShotDataset of `num_classes` glyph classes with `per_class` instances each (class-major).

    Image i is instance i % per_class of class i // per_class, rendered on demand (deterministic).
    """
    if per_class < 1:
        raise DatasetError(f"glyph split {name!r} is empty: per_class={per_class}")
    glyphs = GlyphSet(num_classes, seed, image_size, **glyph_options)  # type: ignore[arg-type]
    labels = np.repeat(np.arange(num_classes), per_class)
    names = [f"glyph{c:04d}" for c in range(num_classes)]
    return FewShotDataset(
        name,
        names,
        labels,
        _GlyphLoader(glyphs, per_class),
        flips_preserve_class=False,
        info={"seed": seed, "per_class": per_class, "glyphs": glyphs},
    )


class _GlyphLoader:
    """Image index -> rendered instance; a class (not a closure) so datasets pickle into workers."""

    def __init__(self, glyphs: GlyphSet, per_class: int) -> None:
        self.glyphs, self.per_class = glyphs, per_class

    def __call__(self, index: int) -> np.ndarray:
        return self.glyphs.render(index // self.per_class, index % self.per_class)


def glyph_split(
    split: str,
    num_classes: int | None = None,
    per_class: int = 20,
    seed: int = 0,
    **glyph_options: object,
) -> FewShotDataset:
    """train/val/test glyph splits: each split draws its classes from its own seed stream, so the
    splits do not share classes (defaults: 64/16/20 classes, as miniImageNet)."""
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    split_seed = int(np.random.SeedSequence([seed, SPLITS.index(split)]).generate_state(1)[0])
    count = _SPLIT_CLASSES[split] if num_classes is None else num_classes
    return glyph_dataset(count, per_class, split_seed, name=f"glyphs-{split}", **glyph_options)
