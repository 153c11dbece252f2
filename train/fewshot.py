"""The base of every few-shot dataset: `FewShotDataset` (one split), `DatasetError` and the split names."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

SPLITS = ("train", "val", "test")

Loader = Callable[[int], np.ndarray]


class DatasetError(ValueError):
    """The data on disk cannot give what training asked for; the message says what and where."""


class FewShotDataset:
    """One split: `labels[i]` is the class of image i, `load(i)` its HxWx3 uint8 BGR pixels.

    `class_groups` (optional) names a group per class: the alphabet for Omniglot. Episode samplers use
    it for "N-way within one alphabet". `flips_preserve_class` is False where a mirror image is a
    different class (characters, glyphs), and augmentation reads it to switch flips off.
    """

    def __init__(
        self,
        name: str,
        class_names: Sequence[str],
        labels: Sequence[int] | np.ndarray,
        loader: Loader,
        *,
        class_groups: Sequence[str] | None = None,
        flips_preserve_class: bool = True,
        info: Mapping[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.class_names = list(class_names)
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        self._loader = loader
        self.flips_preserve_class = flips_preserve_class
        self.info: dict[str, Any] = dict(info or {})
        if len(self.labels) == 0 or not self.class_names:
            raise DatasetError(
                f"split {name!r} is empty: {len(self.class_names)} classes, {len(self.labels)} images"
            )
        if len(set(self.class_names)) != len(self.class_names):
            raise DatasetError(f"split {name!r} has duplicate class names")
        if self.labels.min() < 0 or self.labels.max() >= len(self.class_names):
            raise DatasetError(f"split {name!r}: labels must lie in 0..{len(self.class_names) - 1}")
        if class_groups is not None and len(class_groups) != len(self.class_names):
            raise DatasetError(
                f"split {name!r}: {len(class_groups)} class groups for {len(self.class_names)} classes"
            )
        self.class_groups = None if class_groups is None else list(class_groups)
        # A stable sort keeps each class's images in file order, so sampling is reproducible.
        order = np.argsort(self.labels, kind="stable")
        bounds = np.searchsorted(self.labels[order], np.arange(len(self.class_names) + 1))
        self.indices_by_class = [order[bounds[c] : bounds[c + 1]] for c in range(len(self.class_names))]

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return f"FewShotDataset({self.name!r}, {self.num_classes} classes, {len(self)} images)"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def counts(self) -> np.ndarray:
        return np.array([len(ix) for ix in self.indices_by_class], dtype=np.int64)

    def load(self, index: int) -> np.ndarray:
        if not 0 <= index < len(self.labels):
            raise IndexError(f"image index {index} out of range for {len(self.labels)} images")
        return self._loader(int(index))

    def classes_by_group(self) -> dict[str, np.ndarray]:
        """Group name -> class ids, in order of first appearance (Omniglot: alphabet -> characters)."""
        if self.class_groups is None:
            raise DatasetError(f"split {self.name!r} has no class groups (alphabets)")
        groups: dict[str, list[int]] = {}
        for cls, group in enumerate(self.class_groups):
            groups.setdefault(group, []).append(cls)
        return {g: np.asarray(ids, dtype=np.int64) for g, ids in groups.items()}

    def require_per_class(self, needed: int) -> None:
        """Raise DatasetError, naming the classes, if any class has fewer than `needed` images."""
        counts = self.counts
        short = np.flatnonzero(counts < needed)
        if len(short) == 0:
            return
        shown = ", ".join(f"{self.class_names[c]!r} ({counts[c]})" for c in short[:5])
        more = f" and {len(short) - 5} more" if len(short) > 5 else ""
        raise DatasetError(
            f"split {self.name!r}: class {self.class_names[short[0]]!r} has {counts[short[0]]} images "
            f"but {needed} are needed per class (k_shot + q_query); {len(short)} classes are short: "
            f"{shown}{more}"
        )


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
