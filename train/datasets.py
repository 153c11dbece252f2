"""Few-shot image datasets as plain numpy: one split = class names, one label per image, a loader.

Every loader returns HxWx3 uint8 BGR (OpenCV's order), the same kind of frame the runtime sees, so
training goes through the one shared preprocessing function (`dmf_deploy.preprocess`). Problems
with the data (wrong path, empty split, too few images in a class) raise `DatasetError` when the
dataset is opened or the sampler is built, never halfway through training.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .fewshot import SPLITS, DatasetError, FewShotDataset, check_split
from .glyphs import glyph_split

KINDS = ("omniglot", "folder", "tiered", "mini-pickle", "glyphs")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")  # compared lower-case, so .JPEG counts too


def _decode(data: bytes, flags: int, where: str) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
    if image is None:
        raise DatasetError(f"cannot decode image {where}")
    return image


# --------------------------------------------------------------------------------------- Omniglot

# The shipped small background sets hold 8 alphabets (Greek and Latin are in both zips). Every test
# and validation alphabet has >= 20 characters so that "20-way within one alphabet" is possible;
# Tagalog (17) can therefore only be a training alphabet.
OMNIGLOT_DEFAULT_SPLIT: dict[str, tuple[str, ...]] = {
    "train": ("Balinese", "Early_Aramaic", "Japanese_(katakana)", "Sanskrit", "Tagalog"),
    "val": ("Greek",),
    "test": ("Korean", "Latin"),
}
ROTATIONS = (0, 90, 180, 270)


@dataclass(frozen=True)
class OmniglotCharacter:
    alphabet: str
    character: str
    source: str  # the zip or folder its images came from
    images: tuple[tuple[str, bytes], ...]  # (file name, PNG bytes), sorted by name


def _omniglot_sources(root: Path) -> list[Path]:
    if not root.exists():
        raise DatasetError(
            f"Omniglot path {root} does not exist; expected a folder holding images_background*.zip "
            "files or extracted images_background*/ folders"
        )
    if root.is_file() or root.name.startswith("images_background"):
        return [root]
    sources = sorted(
        p
        for p in root.iterdir()
        if p.name.startswith("images_background") and (p.is_dir() or p.suffix == ".zip")
    )
    if not sources:
        found = ", ".join(sorted(p.name for p in root.iterdir())[:10]) or "nothing"
        raise DatasetError(
            f"no Omniglot data in {root}: expected images_background*.zip files or extracted "
            f"images_background*/ folders (<alphabet>/<character>/<id>_<drawer>.png); found {found}"
        )
    return sources


def _read_source(source: Path) -> dict[tuple[str, str], list[tuple[str, bytes]]]:
    """(alphabet, character) -> [(file name, PNG bytes)]. Bytes are read eagerly: the PNGs are tiny,
    and holding no open zip handle keeps the dataset safe to fork into DataLoader workers."""
    chars: dict[tuple[str, str], list[tuple[str, bytes]]] = {}
    if source.is_file():
        try:
            with zipfile.ZipFile(source) as zf:
                for entry in zf.namelist():
                    parts = entry.split("/")
                    if len(parts) >= 3 and parts[-1].lower().endswith(".png"):
                        chars.setdefault((parts[-3], parts[-2]), []).append((parts[-1], zf.read(entry)))
        except zipfile.BadZipFile as err:
            raise DatasetError(f"{source} is not a readable zip file: {err}") from err
    else:
        for path in source.glob("*/*/*"):
            if path.suffix.lower() == ".png":
                chars.setdefault((path.parent.parent.name, path.parent.name), []).append(
                    (path.name, path.read_bytes())
                )
    return chars


def read_omniglot(root: str | os.PathLike[str]) -> tuple[list[OmniglotCharacter], dict[str, Any]]:
    """All characters from every source under root, deduplicated by alphabet/character.

    Greek and Latin are in both small background zips, as byte-identical files. The first source in
    sorted name order wins (images_background_small1) and later copies are dropped and counted.
    """
    root = Path(root)
    kept: dict[tuple[str, str], OmniglotCharacter] = {}
    dropped: set[tuple[str, str]] = set()
    sources = _omniglot_sources(root)
    for source in sources:
        for key, images in _read_source(source).items():
            if key in kept:
                dropped.add(key)
                continue
            kept[key] = OmniglotCharacter(key[0], key[1], source.name, tuple(sorted(images)))
    if not kept:
        raise DatasetError(
            f"no Omniglot PNGs found in {', '.join(str(s) for s in sources)}; expected "
            "<split>/<alphabet>/<character>/<id>_<drawer>.png"
        )
    info = {"sources": [s.name for s in sources], "duplicate_characters_dropped": len(dropped)}
    return [kept[k] for k in sorted(kept)], info


def _hash_split(alphabet: str) -> str:
    # Alphabets outside the default table (e.g. the full background set) get a stable ~70/15/15 split.
    bucket = int.from_bytes(hashlib.sha256(alphabet.encode()).digest()[:4], "big") / 2**32
    return "train" if bucket < 0.70 else "val" if bucket < 0.85 else "test"


def omniglot_alphabet_split(
    alphabets: Sequence[str], override: Mapping[str, Sequence[str]] | None = None
) -> dict[str, list[str]]:
    """split -> sorted alphabets. Whole alphabets only, so no validation alphabet is seen in training.

    `override` maps split names to alphabet lists; alphabets it does not name are left out entirely.
    """
    present = sorted(set(alphabets))
    if override is None:
        table = {a: s for s, names in OMNIGLOT_DEFAULT_SPLIT.items() for a in names}
        return {s: [a for a in present if table.get(a, _hash_split(a)) == s] for s in SPLITS}
    unknown_splits = set(override) - set(SPLITS)
    if unknown_splits:
        raise DatasetError(f"alphabet split names {sorted(unknown_splits)}; expected {', '.join(SPLITS)}")
    seen: dict[str, str] = {}
    for split, names in override.items():
        if isinstance(names, str):
            raise DatasetError(f"alphabet split for {split!r} must be a list of alphabets, not a string")
        for alphabet in names:
            if alphabet not in present:
                raise DatasetError(
                    f"alphabet {alphabet!r} (split {split!r}) is not in the data; "
                    f"available: {', '.join(present)}"
                )
            if alphabet in seen and seen[alphabet] != split:
                raise DatasetError(
                    f"alphabet {alphabet!r} is in both {seen[alphabet]!r} and {split!r}; "
                    "splits must be disjoint"
                )
            seen[alphabet] = split
    return {s: sorted(set(override.get(s, ()))) for s in SPLITS}


def _rotations(rotations: bool | Sequence[int]) -> tuple[int, ...]:
    if rotations is True:
        return ROTATIONS
    if rotations is False:
        return (0,)
    rots = tuple(int(r) for r in rotations)
    if not rots or any(r not in ROTATIONS for r in rots) or len(set(rots)) != len(rots):
        raise DatasetError(f"rotations must be distinct values from {ROTATIONS}, got {rotations!r}")
    return rots


def load_omniglot(
    root: str | os.PathLike[str],
    split: str,
    *,
    rotations: bool | Sequence[int] = False,
    alphabet_split: Mapping[str, Sequence[str]] | None = None,
) -> FewShotDataset:
    """Omniglot split; a class is alphabet/character, and each rotation (90/180/270) is a new class."""
    check_split(split)
    rots = _rotations(rotations)
    characters, info = read_omniglot(root)
    alphabets = omniglot_alphabet_split([c.alphabet for c in characters], alphabet_split)
    chosen = [c for c in characters if c.alphabet in set(alphabets[split])]
    if not chosen:
        raise DatasetError(
            f"Omniglot split {split!r} is empty: its alphabets are {alphabets[split]}; "
            f"the assignment is {alphabets}"
        )

    blobs: list[bytes] = []  # one entry per source image
    where: list[str] = []
    class_names: list[str] = []
    groups: list[str] = []
    labels: list[int] = []
    blob_of: list[int] = []  # per dataset image: which blob, and which rotation
    rot_of: list[int] = []
    for char in chosen:
        first = len(blobs)
        for fname, data in char.images:
            blobs.append(data)
            where.append(f"{char.source}:{char.alphabet}/{char.character}/{fname}")
        for rot in rots:
            suffix = f"/rot{rot}" if rot else ""
            class_names.append(f"{char.alphabet}/{char.character}{suffix}")
            groups.append(char.alphabet)
            for b in range(first, len(blobs)):
                labels.append(len(class_names) - 1)
                blob_of.append(b)
                rot_of.append(rot // 90)

    info.update(alphabets=alphabets[split], alphabet_split=alphabets, rotations=rots, root=str(root))
    loader = _OmniglotLoader(blobs, where, np.asarray(blob_of), np.asarray(rot_of))
    return FewShotDataset(
        f"omniglot-{split}",
        class_names,
        labels,
        loader,
        class_groups=groups,
        flips_preserve_class=False,
        info=info,
    )


class _OmniglotLoader:
    """PNG bytes -> BGR, rotated by k*90 degrees. A class rather than a closure so that datasets
    pickle into spawned DataLoader workers."""

    def __init__(self, blobs: list[bytes], where: list[str], blob_of: np.ndarray, rot_of: np.ndarray) -> None:
        self.blobs, self.where, self.blob_of, self.rot_of = blobs, where, blob_of, rot_of
        self.cache: dict[int, np.ndarray] = {}  # decoded grey images (105x105 bytes), decoded once

    def __call__(self, index: int) -> np.ndarray:
        b = int(self.blob_of[index])
        grey = self.cache.get(b)
        if grey is None:
            grey = self.cache[b] = _decode(self.blobs[b], cv2.IMREAD_GRAYSCALE, self.where[b])
        if self.rot_of[index]:
            grey = np.ascontiguousarray(np.rot90(grey, int(self.rot_of[index])))
        return cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)


# ------------------------------------------------------------------------------------ Image folder


def load_folder(root: str | os.PathLike[str], split: str, *, cache: bool = False) -> FewShotDataset:
    """`root/<split>/<class>/*.{jpg,jpeg,png}` (any case). Classes are sorted folder names."""
    check_split(split)
    base = Path(root)
    split_dir = base / split
    layout = "root/{train,val,test}/<class>/*.jpg|jpeg|png"
    if not base.is_dir():
        raise DatasetError(
            f"image folder dataset path {base} does not exist or is not a folder; expected {layout}"
        )
    if not split_dir.is_dir():
        raise DatasetError(f"split folder {split_dir} does not exist; expected {layout}")
    class_names: list[str] = []
    paths: list[Path] = []
    labels: list[int] = []
    for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(
            p
            for p in class_dir.iterdir()
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
        )
        class_names.append(class_dir.name)
        labels.extend([len(class_names) - 1] * len(files))
        paths.extend(files)
    if not paths:
        raise DatasetError(
            f"split {split!r} at {split_dir} is empty: {len(class_names)} class folders "
            f"and no images; expected {layout}"
        )
    return FewShotDataset(
        f"folder-{split}", class_names, labels, _FileLoader(paths, cache), info={"root": str(base)}
    )


class _FileLoader:
    def __init__(self, paths: list[Path], cache: bool) -> None:
        self.paths, self.cache = paths, cache
        self.memo: dict[int, np.ndarray] = {}

    def __call__(self, index: int) -> np.ndarray:
        if index in self.memo:
            return self.memo[index]
        image = cv2.imread(str(self.paths[index]), cv2.IMREAD_COLOR)
        if image is None:
            raise DatasetError(f"cannot decode image {self.paths[index]}")
        if self.cache:
            self.memo[index] = image
        return image


# ------------------------------------------------------------------- miniImageNet pickles (CAN/DMF)

MINI_PICKLE = "miniImageNet_category_split_{}.pickle"
_MINI_FILES = {"train": "train_phase_train", "val": "val", "test": "test"}


def load_mini_pickle(root: str | os.PathLike[str], split: str) -> FewShotDataset:
    """gidariss/CAN pickles: {'data': uint8 [n,84,84,3] RGB, 'labels': [n], 'catname2label'?}."""
    check_split(split)
    path = Path(root) / MINI_PICKLE.format(_MINI_FILES[split])
    if not path.is_file():
        raise DatasetError(
            f"miniImageNet pickle {path} not found; expected {Path(root)}/"
            f"{MINI_PICKLE.format('{train_phase_train,val,test}')}"
        )
    with path.open("rb") as f:
        # Trusted data only: unpickling runs code. These files come from the CAN/DMF authors'
        # release; latin1 decodes the Python 2 strings inside.
        payload = pickle.load(f, encoding="latin1")  # noqa: S301
    if not isinstance(payload, dict) or "data" not in payload or "labels" not in payload:
        raise DatasetError(f"{path} has no 'data' and 'labels' keys")
    data = np.asarray(payload["data"])
    raw = np.asarray(payload["labels"])
    if data.dtype != np.uint8 or data.ndim != 4 or data.shape[3] != 3 or len(raw) != len(data):
        raise DatasetError(
            f"{path}: expected uint8 data [n,H,W,3] and n labels, got data "
            f"{data.dtype}{list(data.shape)} and {len(raw)} labels"
        )
    ids, labels = np.unique(raw, return_inverse=True)  # global label ids -> 0..n-1
    names = {int(v): str(k) for k, v in payload.get("catname2label", {}).items()}
    class_names = [names.get(int(i), f"class_{int(i)}") for i in ids]

    return FewShotDataset(
        f"mini-{split}",
        class_names,
        labels,
        _RGBArrayLoader(data),
        info={"path": str(path), "original_labels": ids.tolist()},
    )


class _RGBArrayLoader:
    def __init__(self, data: np.ndarray) -> None:
        self.data = data

    def __call__(self, index: int) -> np.ndarray:
        return np.ascontiguousarray(self.data[index, :, :, ::-1])  # RGB -> BGR per image, not a full copy


# -------------------------------------------------------------------------------------- Front door


def open_dataset(
    kind: str, root: str | os.PathLike[str] | None, split: str, **options: Any
) -> FewShotDataset:
    """One split of a dataset: kind is omniglot | folder | tiered | mini-pickle | glyphs.

    Options go to the loader: omniglot takes rotations and alphabet_split; folder/tiered take cache;
    glyphs takes num_classes, per_class, seed and GlyphSet options (root is ignored).
    """
    if kind == "glyphs":
        return glyph_split(split, **options)
    if root is None:
        raise DatasetError(f"dataset kind {kind!r} needs a root path")
    if kind == "omniglot":
        return load_omniglot(root, split, **options)
    if kind in ("folder", "tiered"):
        return load_folder(root, split, **options)
    if kind == "mini-pickle":
        return load_mini_pickle(root, split, **options)
    raise DatasetError(f"unknown dataset kind {kind!r}; expected one of {', '.join(KINDS)}")
