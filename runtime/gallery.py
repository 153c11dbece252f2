"""The Gallery: the enrolled classes of one model, in memory and in their file (torch-free).

Per class it keeps the name, the shot count, the SUM of the support feature maps (the prototype is
sum / count, so more shots of a class give a running mean), JPEG thumbnails of its first and latest
enrolments and UTC timestamps: what enrolment measured. The class banks that support.onnx computes from
the prototypes are derived data, kept by slot in memory or in a cache folder beside the file
(bank_cache.py) and recomputed when missing or stale.

A gallery opened from a file (version 3, one SQLite database: gallery_file.py) reads at open only the
class list and the ranking vectors (each class's `class_weight`); feature sums and thumbnails are read
when a class needs them, and the banks a frame needs are read from the cache. `save()` writes what
changed since the last save in one transaction, durable when it returns. Version 1 and 2 files (.npz,
gallery_legacy.py) open in memory, and their first save writes a version 3 file beside them
(`converted_path`), leaving the old file in place; later opens of the old path open the converted file.

Rows are in enrolment order. Accessors return read-only arrays; a view is valid until the next change.
The gallery is not thread-safe: the Recognizer holds a lock around it (its file has its own lock).
"""

from __future__ import annotations

import logging
import os
import re
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from dmf_deploy.atomic import remove_orphans
from dmf_deploy.names import name_key, validate_class_name
from dmf_deploy.runtime.bank_cache import BankSlots, CachedBankSlots, cache_key
from dmf_deploy.runtime.gallery_checks import (
    BANK_DTYPE,
    BANK_DTYPES,
    FORMAT,
    MAX_CLASSES,
    MAX_HEADER_BYTES,
    MAX_PROTOTYPE_ABS,
    MAX_ROW_ELEMENTS,
    MAX_SHOTS,
    MAX_THUMBNAIL_BYTES,
    MAX_THUMBNAIL_SIDE,
    SUM_DTYPE,
    THUMBNAIL_QUALITY,
    THUMBNAIL_SIZE,
    THUMBNAILS_KEPT,
    GalleryError,
    GalleryNotFoundError,
    check_bank_dtypes,
    check_feature_sum,
    check_shape,
    decode_thumbnail,
    encode_thumbnail,
    jpeg_size,
    now,
    short,
)
from dmf_deploy.runtime.gallery_file import (
    FORMAT_VERSION,
    SQLITE_MAGIC,
    Changes,
    ClassRecord,
    GalleryFile,
    is_gallery_database,
    iter_meta,
    write_new,
)
from dmf_deploy.runtime.gallery_legacy import READ_VERSIONS, ZIP_MAGIC, read_legacy

__all__ = [
    "BANK_DTYPE",
    "BANK_DTYPES",
    "FORMAT",
    "FORMAT_VERSION",
    "MAX_CLASSES",
    "MAX_HEADER_BYTES",
    "MAX_PROTOTYPE_ABS",
    "MAX_ROW_ELEMENTS",
    "MAX_SHOTS",
    "MAX_THUMBNAIL_BYTES",
    "MAX_THUMBNAIL_SIDE",
    "READ_VERSIONS",
    "SUM_DTYPE",
    "THUMBNAIL_QUALITY",
    "THUMBNAIL_SIZE",
    "THUMBNAILS_KEPT",
    "ClassInfo",
    "Gallery",
    "GalleryError",
    "GalleryNotFoundError",
    "bank_cache_folder",
    "converted_path",
    "decode_thumbnail",
    "encode_thumbnail",
    "jpeg_size",
]

log = logging.getLogger("dmf_deploy.runtime")

RANKING = "class_weight"  # the bank tensor a shortlist ranks by; kept in memory for every class
_MIN_CAPACITY = 4
_BANK_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class ClassInfo(NamedTuple):
    """One class as a list shows it (`Gallery.page`)."""

    name: str
    shots: int
    created: str
    updated: str
    thumbnails: int  # how many thumbnails `thumbnails(name)` returns


def converted_path(path: Path) -> Path:
    """Where the first save of a version 1 or 2 gallery writes version 3: `g.dmfg` -> `g.v3.dmfg`."""
    return path.with_name(f"{path.stem}.v{FORMAT_VERSION}{path.suffix or '.dmfg'}")


def bank_cache_folder(path: Path) -> Path:
    """The folder of class-bank caches beside a gallery file: `g.dmfg` -> `g.dmfg-banks/`."""
    return path.with_name(path.name + "-banks")


def _temp_pattern(path: Path) -> re.Pattern[str]:
    """The names of the temp files a write of `path` makes (dmf_deploy/atomic.py), never -wal or -shm."""
    return re.compile(re.escape(f".{path.name}.") + r"[A-Za-z0-9_]{8}\.tmp\Z")


def _is_gallery_temp(path: Path) -> bool:
    """A killed save's leftover: empty, or begun as an SQLite or .npz gallery."""
    with open(path, "rb") as handle:
        head = handle.read(16)
    return head == b"" or head.startswith(SQLITE_MAGIC) or head.startswith(ZIP_MAGIC)


def remove_leftovers(path: Path) -> list[Path]:
    """Delete the temp files that killed saves of `path` left beside it, once no live process owns them."""
    return remove_orphans(path.parent, _temp_pattern(path), _is_gallery_temp)


def _new_revision() -> int:
    return secrets.randbits(62) + 1  # never 0, the token of an empty bank slot


def _same_file(a: Path, b: Path) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


class Gallery:
    """Enrolled classes of one model, identified by its fingerprint."""

    def __init__(
        self,
        fingerprint: str,
        feature_shape: Sequence[int],
        bank_shapes: Mapping[str, Sequence[int]],
        model_description: str = "",
        bank_dtypes: Mapping[str, str] | None = None,
    ) -> None:
        if not isinstance(fingerprint, str) or not fingerprint:
            raise GalleryError("a gallery needs the model's fingerprint (a non-empty string)")
        self.fingerprint = fingerprint
        self.model_description = str(model_description)
        self._feature_shape = check_shape(feature_shape, "feature_shape")
        shapes: dict[str, tuple[int, ...]] = {}
        for key, shape in bank_shapes.items():
            if not isinstance(key, str) or not _BANK_NAME.match(key):
                raise GalleryError(f"class-bank tensor name {key!r} is not an identifier")
            shapes[key] = check_shape(shape, f"bank shape of {key!r}")
        self._banks = BankSlots(shapes, check_bank_dtypes(bank_dtypes, shapes))
        # Row storage: the first self._count rows are live; the rest is spare capacity.
        self._count = 0
        self._ids = np.zeros(0, np.int64)  # the class's id in the file (enrolment order)
        self._counts = np.zeros(0, np.int64)
        self._revisions = np.zeros(0, np.int64)  # token of the current feature sum
        self._slots = np.zeros(0, np.int64)  # bank slot; -1: the bank is stale
        self._weights = self._empty_weights()
        self._names: list[str] = []
        self._rows: dict[str, int] = {}
        self._created: list[str] = []
        self._updated: list[str] = []
        # Held in memory: every class's sum and thumbnails without a file; with one, the changed ones.
        self._sums: dict[int, np.ndarray] = {}
        self._thumbs: dict[int, list[bytes]] = {}
        self._dirty: set[int] = set()  # ids whose class row changed since the last save
        self._removed: set[int] = set()  # ids removed since the last save
        self._meta_dirty = True
        self._next_id = 1
        self._file: GalleryFile | None = None
        self._legacy_path: Path | None = None  # the version 1 or 2 file this gallery was read from

    def _empty_weights(self) -> np.ndarray | None:
        if RANKING not in self._banks.shapes:
            return None
        return np.zeros((0, *self._banks.shapes[RANKING]), self._banks.dtypes[RANKING])

    # ----------------------------------------------------------------- reading

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return self._feature_shape

    @property
    def bank_shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._banks.shapes)

    @property
    def bank_dtypes(self) -> dict[str, str]:
        return {k: d.name for k, d in self._banks.dtypes.items()}

    @property
    def capacity(self) -> int:
        return len(self._counts)

    @property
    def path(self) -> Path | None:
        """The version 3 file this gallery saves to (None: not saved yet, or read from an old version)."""
        return None if self._file is None else self._file.path

    @property
    def unsaved(self) -> bool:
        """Whether anything changed since the last save (or since it was read from an old version)."""
        return bool(self._dirty or self._removed or self._meta_dirty)

    def __len__(self) -> int:
        return self._count

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name_key(name) in self._rows

    def __repr__(self) -> str:
        return f"Gallery({self._count} classes, model {short(self.fingerprint)})"

    @property
    def names(self) -> list[str]:
        """Class names in enrolment (row) order; a copy."""
        return list(self._names)

    def index(self, name: str) -> int:
        """Row of a class; KeyError if it is not enrolled."""
        key = name_key(name) if isinstance(name, str) else name
        try:
            return self._rows[key]
        except (KeyError, TypeError):
            raise KeyError(f"no class named {name!r} in the gallery") from None

    @staticmethod
    def _view(array: np.ndarray, n: int) -> np.ndarray:
        view = array[:n]
        view.flags.writeable = False  # callers read; only Gallery methods may change rows
        return view

    def shots(self, name: str) -> int:
        """How many frames the class was enrolled from."""
        return int(self._counts[self.index(name)])

    def page(self, offset: int = 0, limit: int = 100) -> list[ClassInfo]:
        """Classes `offset` to `offset + limit` in enrolment order (for lists that page through them)."""
        if isinstance(offset, bool) or isinstance(limit, bool) or min(int(offset), int(limit)) < 0:
            raise ValueError(f"offset and limit must be non-negative integers, got {offset!r}, {limit!r}")
        rows = range(int(offset), min(self._count, int(offset) + int(limit)))
        return [
            ClassInfo(
                self._names[r],
                int(self._counts[r]),
                self._created[r],
                self._updated[r],
                len(self._thumbnails_of(r)),
            )
            for r in rows
        ]

    def feature_sum(self, row: int) -> np.ndarray:
        """One class's sum of support feature maps, float32 [*feature_shape] (read-only)."""
        row = self._check_row(row)
        class_id = int(self._ids[row])
        total = self._sums.get(class_id)
        if total is None:
            total = self._file_sum(row)
        view = total.view()
        view.flags.writeable = False
        return view

    @property
    def feature_sums(self) -> np.ndarray:
        """[N, *feature_shape] sums of every class (read-only; reads every sum a file holds)."""
        out = np.zeros((self._count, *self._feature_shape), SUM_DTYPE)
        for row in range(self._count):
            out[row] = self.feature_sum(row)
        out.flags.writeable = False
        return out

    @property
    def counts(self) -> np.ndarray:
        """[N] shot counts (read-only view)."""
        return self._view(self._counts, self._count)

    def class_weights(self) -> np.ndarray:
        """[N, C] every class's `class_weight` (the shortlist's ranking vectors), in memory (read-only)."""
        if self._weights is None:
            raise GalleryError(f"this gallery's banks have no {RANKING!r} to rank classes by")
        return self._view(self._weights, self._count)

    def bank_rows(self, rows: np.ndarray | slice) -> dict[str, np.ndarray]:
        """{name: [len(rows), *shape]} the class banks of some rows, ready for the head (read-only)."""
        slots = self._slots[: self._count][rows]
        if np.any(slots < 0):
            raise GalleryError(f"cannot use the class banks of {self.missing_banks[:5]}: they were not set")
        out = self._banks.read(slots)
        for array in out.values():
            array.flags.writeable = False
        return out

    def bank_arrays(self) -> dict[str, np.ndarray]:
        """{name: [N, *shape] of bank_dtypes[name]} every class bank (read-only; a stale bank reads as
        zeros). A view while the banks lie in memory in row order, else a copy: for small galleries and
        tests; the Recognizer reads the rows it needs with `bank_rows`."""
        slots = self._slots[: self._count]
        if np.all(slots >= 0):
            return self.bank_rows(slice(0, self._count))
        out = {k: np.zeros((self._count, *s), self._banks.dtypes[k]) for k, s in self._banks.shapes.items()}
        ready = np.flatnonzero(slots >= 0)
        for key, array in self._banks.read(slots[ready]).items():
            out[key][ready] = array
        for array in out.values():
            array.flags.writeable = False
        return out

    def prototype(self, row: int) -> np.ndarray:
        """The class's mean support feature map, float32 [*feature_shape]."""
        row = self._check_row(row)
        return (self.feature_sum(row).astype(np.float64) / self._counts[row]).astype(np.float32)

    def prototypes(self, rows: Sequence[int] | None = None) -> np.ndarray:
        """Prototypes of `rows` (default: all), float32 [len(rows), *feature_shape]."""
        rows = range(self._count) if rows is None else rows
        out = np.zeros((len(rows), *self._feature_shape), np.float32)
        for i, row in enumerate(rows):
            out[i] = self.prototype(row)
        return out

    def thumbnail(self, name: str) -> bytes | None:
        """The class's JPEG thumbnail (of its first enrolment), or None if it was enrolled without one."""
        found = self._thumbnails_of(self.index(name))
        return found[0] if found else None

    def thumbnails(self, name: str) -> list[bytes]:
        """The class's JPEG thumbnails: its first enrolment's, then those of the latest ones (at most
        THUMBNAILS_KEPT in all)."""
        return list(self._thumbnails_of(self.index(name)))

    def timestamps(self, name: str) -> tuple[str, str]:
        """(created, updated) as UTC ISO-8601 strings."""
        row = self.index(name)
        return self._created[row], self._updated[row]

    @property
    def missing_banks(self) -> list[str]:
        """Classes whose bank is stale (not set since their last add_shots, or not in the cache)."""
        return [self._names[r] for r in np.flatnonzero(self._slots[: self._count] < 0).tolist()]

    # ---------------------------------------------------------------- changing

    def add_shots(
        self,
        name: str,
        feature_sum_delta: np.ndarray,
        n_shots: int,
        thumbnail_bgr: np.ndarray | None = None,
        bank: Mapping[str, np.ndarray] | None = None,
    ) -> int:
        """Add `n_shots` support features (given as their sum) to a new or existing class; return its row.

        With `bank` (the class bank computed from the new prototype) the class is complete; without,
        its bank is stale: compute it from ``prototype(row)`` and call ``set_bank``. A new enrolment's
        thumbnail is kept with the first one's. Everything is computed and checked before anything
        changes, so a refused call leaves the gallery as it was.
        """
        name = validate_class_name(name)
        if isinstance(n_shots, bool) or not isinstance(n_shots, (int, np.integer)) or n_shots < 1:
            raise GalleryError(f"n_shots must be a positive integer, got {n_shots!r}")
        delta = np.asarray(feature_sum_delta)
        if delta.shape != self._feature_shape:
            raise GalleryError(
                f"feature sum has shape {delta.shape}; this gallery stores {self._feature_shape}"
            )
        if not np.all(np.isfinite(delta)):
            raise GalleryError(f"the features of {name!r} contain NaN or infinity")
        row = self._rows.get(name)
        count = int(n_shots) + (0 if row is None else int(self._counts[row]))
        if count > MAX_SHOTS:
            raise GalleryError(f"class {name!r} would have more than {MAX_SHOTS} shots")
        if row is None and self._count >= MAX_CLASSES:
            raise GalleryError(f"a gallery holds at most {MAX_CLASSES} classes")
        total = delta.astype(SUM_DTYPE) if row is None else self.feature_sum(row) + delta.astype(SUM_DTYPE)
        check_feature_sum("enrolment", name, total, count)
        checked = None if bank is None else self._checked_bank(bank)
        thumbs = [] if row is None else list(self._thumbnails_of(row))
        if thumbnail_bgr is not None:
            thumbs.append(encode_thumbnail(thumbnail_bgr))
            if len(thumbs) > THUMBNAILS_KEPT:
                thumbs = [thumbs[0], *thumbs[len(thumbs) - THUMBNAILS_KEPT + 1 :]]

        # Every check passed: from here on nothing fails but memory.
        stamp = now()
        if row is None:
            row = self._append_row(name, stamp)
        class_id = int(self._ids[row])
        self._sums[class_id] = total
        self._thumbs[class_id] = thumbs
        self._counts[row] = count
        self._revisions[row] = _new_revision()
        self._updated[row] = stamp
        self._dirty.add(class_id)
        self._banks.retire(int(self._slots[row]))
        self._slots[row] = -1
        if checked is not None:
            self._store_bank(row, checked)
        return row

    def set_bank(self, row: int, arrays: Mapping[str, np.ndarray], touch: bool = True) -> None:
        """Store the class-bank tensors of one row; each of shape bank_shapes[k] (or [1, *that]).

        `touch=False` keeps the class's update time (a bank recomputed from the same shots).
        """
        row = self._check_row(row)
        checked = self._checked_bank(arrays)
        self._banks.retire(int(self._slots[row]))
        self._store_bank(row, checked)
        if touch:
            self._updated[row] = now()
            self._dirty.add(int(self._ids[row]))

    def reset_banks(
        self, bank_shapes: Mapping[str, Sequence[int]], bank_dtypes: Mapping[str, str] | None = None
    ) -> None:
        """Store class banks of other shapes or dtypes from now on (a bundle with other banks).

        Every row's bank becomes stale: recompute each from ``prototype(row)`` and call ``set_bank``.
        Names, shot counts, feature sums and thumbnails are kept.
        """
        if set(bank_shapes) != set(self._banks.shapes):
            raise GalleryError(
                f"class-bank tensors {sorted(bank_shapes)} differ from this gallery's "
                f"{sorted(self._banks.shapes)}"
            )
        shapes = {k: check_shape(s, f"bank shape of {k!r}") for k, s in bank_shapes.items()}
        dtypes = check_bank_dtypes(bank_dtypes, shapes)
        self._banks.close()
        self._banks = self._open_banks(shapes, dtypes)
        self._slots[: self._count] = self._banks.bind(self._revisions[: self._count])
        if RANKING in shapes:
            self._weights = np.zeros((self.capacity, *shapes[RANKING]), dtypes[RANKING])
        self._load_weights()
        self._meta_dirty = True

    def remove(self, name: str) -> None:
        """Forget a class; later rows move up one, so enrolment order is kept."""
        row, n = self.index(name), self._count
        class_id = int(self._ids[row])
        self._banks.retire(int(self._slots[row]))
        arrays = [self._ids, self._counts, self._revisions, self._slots]
        if self._weights is not None:
            arrays.append(self._weights)
        # Overlapping slice assignment is safe: numpy copies through a buffer when source and target overlap.
        for array in arrays:
            array[row : n - 1] = array[row + 1 : n]
            array[n - 1] = 0
        for meta in (self._names, self._created, self._updated):
            del meta[row]
        self._count = n - 1
        self._rows = {nm: i for i, nm in enumerate(self._names)}
        self._sums.pop(class_id, None)
        self._thumbs.pop(class_id, None)
        self._dirty.discard(class_id)
        self._removed.add(class_id)

    def rename(self, old: str, new: str) -> None:
        """Rename a class in place (same row, same data). GalleryError if `new` is another class."""
        row = self.index(old)
        new = validate_class_name(new)
        if new == self._names[row]:
            return
        if new in self._rows:
            raise GalleryError(f"cannot rename {old!r} to {new!r}: a class named {new!r} already exists")
        del self._rows[self._names[row]]
        self._names[row] = new
        self._rows[new] = row
        self._updated[row] = now()
        self._dirty.add(int(self._ids[row]))

    def _checked_bank(self, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        shapes = self._banks.shapes
        if set(arrays) != set(shapes):
            raise GalleryError(f"set_bank needs exactly {sorted(shapes)}, got {sorted(arrays)}")
        checked = {}
        for key, shape in shapes.items():
            value = np.asarray(arrays[key])
            if value.shape == (1, *shape):  # a support.onnx output for one prototype
                value = value[0]
            if value.shape != shape:
                raise GalleryError(f"bank tensor {key!r} has shape {value.shape}; expected {shape}")
            if not np.all(np.isfinite(value)):
                raise GalleryError(f"bank tensor {key!r} contains NaN or infinity")
            checked[key] = value.astype(self._banks.dtypes[key])
            if not np.all(np.isfinite(checked[key])):  # float16 overflows beyond 65504
                raise GalleryError(f"bank tensor {key!r} overflows {self._banks.dtypes[key].name}")
        return checked

    def _store_bank(self, row: int, checked: Mapping[str, np.ndarray]) -> None:
        slot = self._banks.take()
        self._banks.write(slot, checked, int(self._revisions[row]))
        self._slots[row] = slot
        if self._weights is not None:
            self._weights[row] = checked[RANKING]

    def _check_row(self, row: int) -> int:
        if isinstance(row, bool) or not isinstance(row, (int, np.integer)) or not 0 <= row < self._count:
            raise IndexError(f"row {row!r} is out of range for a gallery of {self._count} classes")
        return int(row)

    def _append_row(self, name: str, stamp: str) -> int:
        row = self._count
        self._reserve(row + 1)
        self._count = row + 1
        self._ids[row] = self._next_id
        self._next_id += 1
        self._slots[row] = -1
        self._names.append(name)
        self._rows[name] = row
        self._created.append(stamp)
        self._updated.append(stamp)
        return row

    def _reserve(self, needed: int) -> None:
        """Grow the row arrays to hold `needed` rows, doubling so that n enrolments cost O(n) copies."""
        if needed <= self.capacity:
            return
        capacity = max(needed, 2 * self.capacity, _MIN_CAPACITY)
        self._ids, self._counts, self._revisions, self._slots = (
            _grown(a, capacity, self._count) for a in (self._ids, self._counts, self._revisions, self._slots)
        )
        self._reserve_weights(capacity)

    def _reserve_weights(self, capacity: int) -> None:
        if self._weights is not None and len(self._weights) < capacity:
            self._weights = _grown(self._weights, capacity, self._count)

    def _thumbnails_of(self, row: int) -> list[bytes]:
        class_id = int(self._ids[row])
        held = self._thumbs.get(class_id)
        if held is not None or self._file is None:
            return held or []
        return self._file.read_thumbnails(self._record(row))

    def _file_sum(self, row: int) -> np.ndarray:
        if self._file is None:
            raise GalleryError(f"the feature sum of {self._names[row]!r} is missing")
        return self._file.read_sum(self._record(row))

    def _record(self, row: int) -> ClassRecord:
        return ClassRecord(
            int(self._ids[row]),
            self._names[row],
            int(self._counts[row]),
            int(self._revisions[row]),
            self._created[row],
            self._updated[row],
        )

    # ------------------------------------------------------------------ saving

    def save(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Save to the gallery's own file (default) or to `path`; return the file written.

        - its own file (or `path` naming it): what changed since the last save, in one transaction;
        - read from a version 1 or 2 file, and `path` is that file (or None): a version 3 file beside it
          (`converted_path`), which this gallery saves to from then on; the old file is left in place;
        - another `path` while it has a file: a consistent snapshot there; it keeps saving to its own;
        - no file yet: a new file at `path`, which it saves to from then on.
        Durable when it returns. Refused while a class's bank is stale (GalleryError).
        """
        if self.missing_banks:
            raise GalleryError(
                f"cannot save: the class bank of {self.missing_banks[:5]} was not set after add_shots"
            )
        target = Path(path) if path is not None else (self.path or self._legacy_path)
        if target is None:
            raise GalleryError("this gallery has no file yet: pass a path to save()")
        if self._legacy_path is not None and _same_file(target, self._legacy_path):
            target = converted_path(self._legacy_path)  # the old file is left as it is
        if self._file is not None and _same_file(target, self._file.path):
            self._file.commit(self._changes())
            self._saved()
            return self._file.path
        if self._legacy_path is not None and target == converted_path(self._legacy_path):
            if target.exists():
                raise GalleryError(
                    f"cannot convert {self._legacy_path}: {target} exists already (open that file instead)"
                )
            log.info(
                "saving %s (version 1 or 2) as version %d in %s", self._legacy_path, FORMAT_VERSION, target
            )
        if self._file is not None:
            return self._file.snapshot(target, self._changes())
        remove_leftovers(target)
        self._write_everything(target)
        return target

    def _write_everything(self, target: Path) -> None:
        """A new file holding every class; this gallery saves to it from then on."""
        changes = Changes(meta=self._meta())
        for row in range(self._count):
            record = self._record(row)
            changes.records.append(record)
            changes.sums[record.id] = self._sums[record.id]
            changes.thumbnails[record.id] = self._thumbs.get(record.id, [])
        write_new(target, changes)
        legacy = self._legacy_path
        file = GalleryFile.open(target, self.fingerprint, self.model_description)
        self._file = file
        self._legacy_path = legacy  # a later save(old path) still means this file
        self._saved()
        self._move_banks_to_cache()

    def _changes(self) -> Changes:
        changes = Changes(meta=self._meta() if self._meta_dirty else {}, removed=sorted(self._removed))
        rows = {int(i): r for r, i in enumerate(self._ids[: self._count].tolist())}
        for class_id in sorted(self._dirty):
            row = rows[class_id]
            changes.records.append(self._record(row))
            if class_id in self._sums:
                changes.sums[class_id] = self._sums[class_id]
            if class_id in self._thumbs:
                changes.thumbnails[class_id] = self._thumbs[class_id]
        return changes

    def _meta(self) -> dict[str, object]:
        return dict(
            iter_meta(
                self.fingerprint,
                self.model_description,
                self._feature_shape,
                self._banks.shapes,
                self._banks.dtypes,
            )
        )

    def _saved(self) -> None:
        """The file holds everything: forget what was held for it, free retired bank slots."""
        self._dirty.clear()
        self._removed.clear()
        self._meta_dirty = False
        self._sums.clear()
        self._thumbs.clear()
        self._banks.committed()
        self._banks.sync()

    def close(self) -> None:
        """Checkpoint and close the file (a closed gallery is one file) and the bank cache. Unsaved
        changes are not saved. The gallery is unusable for reading sums or thumbnails afterwards."""
        if self._file is not None:
            self._file.close()
        self._banks.close()

    def __enter__(self) -> Gallery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check(self) -> list[str]:
        """A full check of the file: SQLite's quick_check and every feature sum and thumbnail read and
        checked (its cost grows with the file; `dmf-run --check-gallery`). [] when all is well."""
        if self._file is None:
            return []
        problems = self._file.check()
        for row in range(self._count):
            record = self._record(row)
            for read in (self._file.read_sum, self._file.read_thumbnails):  # a bad sum hides no thumbnail
                try:
                    read(record)
                except GalleryError as exc:
                    problems.append(str(exc))
        return problems

    # ----------------------------------------------------------------- loading

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        expected_fingerprint: str,
        expected_description: str = "",
        bank_shapes: Mapping[str, Sequence[int]] | None = None,
        bank_dtypes: Mapping[str, str] | None = None,
        bank_cache: bool = True,
    ) -> Gallery:
        """Open a gallery saved for the model `expected_fingerprint`; GalleryError on anything else.

        `bank_shapes`/`bank_dtypes`: the banks the caller's bundle uses (default: those of the bundle
        that saved it); rows whose bank is not cached in that layout are stale (`missing_banks`).
        `bank_cache=False` leaves the bank cache alone (neither made nor locked; every bank stale): for
        a check that only reads the file.
        A version 1 or 2 file whose converted file (`converted_path`) exists opens that file.
        """
        path = Path(path)
        if not path.exists():  # follows links: a dangling link names the file a save will create
            raise GalleryNotFoundError(f"gallery file {path} does not exist")
        if not path.is_file():
            raise GalleryError(
                f"gallery path {path} exists but is not a regular file (a folder, device or FIFO); "
                "refusing to read or replace it"
            )
        head = _read_head(path)
        if head.startswith(ZIP_MAGIC):
            newer = converted_path(path)
            if newer.is_file():
                log.info("%s was converted to %s; opening that", path, newer)
                gallery = cls._load_file(
                    newer, expected_fingerprint, expected_description, bank_shapes, bank_dtypes, bank_cache
                )
            else:
                gallery = cls._load_legacy(path, expected_fingerprint, expected_description)
            gallery._legacy_path = path
            return gallery
        if is_gallery_database(head):
            return cls._load_file(
                path, expected_fingerprint, expected_description, bank_shapes, bank_dtypes, bank_cache
            )
        if head.startswith(SQLITE_MAGIC):
            raise GalleryError(f"{path} is not a {FORMAT} file (an SQLite database of another application)")
        raise GalleryError(f"{path} is not a {FORMAT} file (neither an .npz archive nor a gallery database)")

    @classmethod
    def _load_legacy(cls, path: Path, fingerprint: str, description: str) -> Gallery:
        old = read_legacy(path, fingerprint, description)
        dtypes = {k: d.name for k, d in old.bank_dtypes.items()}
        gallery = cls(fingerprint, old.feature_shape, old.bank_shapes, old.model_description, dtypes)
        n = len(old.names)
        gallery._reserve(n)
        for row in range(n):
            gallery._append_row(old.names[row], old.created[row])
            gallery._updated[row] = old.updated[row]
            gallery._counts[row] = old.counts[row]
            gallery._revisions[row] = _new_revision()
            class_id = int(gallery._ids[row])
            gallery._sums[class_id] = old.sums[row]
            gallery._thumbs[class_id] = [] if old.thumbnails[row] is None else [old.thumbnails[row]]
            gallery._dirty.add(class_id)
            gallery._store_bank(row, {k: a[row] for k, a in old.banks.items()})
        return gallery

    @classmethod
    def _load_file(
        cls,
        path: Path,
        fingerprint: str,
        description: str,
        bank_shapes: Mapping[str, Sequence[int]] | None,
        bank_dtypes: Mapping[str, str] | None,
        bank_cache: bool = True,
    ) -> Gallery:
        remove_leftovers(path)
        file = GalleryFile.open(path, fingerprint, description)
        try:
            meta = file.meta
            if bank_shapes is None:
                bank_shapes = meta["bank_shapes"]
                bank_dtypes = {k: d.name for k, d in meta["bank_dtypes"].items()}
            gallery = cls(
                fingerprint,
                meta["feature_shape"],
                bank_shapes,
                description or meta["model_description"],
                bank_dtypes,
            )
            records = file.records()
            n = len(records)
            gallery._reserve(n)
            for row, record in enumerate(records):
                gallery._append_row(record.name, record.created)
                gallery._updated[row] = record.updated
                gallery._ids[row] = record.id
                gallery._counts[row] = record.shots
                gallery._revisions[row] = record.revision
            gallery._next_id = 1 + max((r.id for r in records), default=0)
            gallery._file = file
            gallery._meta_dirty = (
                gallery._banks.shapes != meta["bank_shapes"]
                or gallery._banks.dtypes != meta["bank_dtypes"]
                or gallery.model_description != meta["model_description"]
            )
            if bank_cache:
                gallery._move_banks_to_cache()
        except BaseException:
            file.close()
            raise
        return gallery

    # ------------------------------------------------------------- bank cache

    def _open_banks(self, shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, np.dtype]) -> BankSlots:
        """The bank cache beside the file, keyed by model and bank layout; in memory without one."""
        if self._file is not None:
            folder = bank_cache_folder(self._file.path) / cache_key(self.fingerprint, shapes, dtypes)
            cached = CachedBankSlots.open(folder, shapes, dtypes)
            if cached is not None:
                return cached
        return BankSlots(shapes, dtypes)

    def _move_banks_to_cache(self) -> None:
        """Use the file's bank cache: bind the rows it holds, copy in the fresh banks held in memory."""
        old = self._banks
        banks = self._open_banks(old.shapes, old.dtypes)
        if not banks.persistent:
            return  # no cache folder here: the banks stay in memory
        n = self._count
        held = np.flatnonzero(self._slots[:n] >= 0)
        fresh = old.read(self._slots[:n][held]) if len(held) else {}
        self._banks = banks
        self._slots[:n] = banks.bind(self._revisions[:n])
        for i, row in enumerate(held.tolist()):
            if self._slots[row] < 0:
                self._store_bank(row, {k: a[i] for k, a in fresh.items()})
        old.close()
        self._load_weights()
        banks.sync()

    def _load_weights(self) -> None:
        """The ranking vectors of every row whose bank is cached, read once into memory."""
        if self._weights is None or not self._count:
            return
        slots = self._slots[: self._count]
        ready = np.flatnonzero(slots >= 0)
        if len(ready):
            every = self._banks.read_tensor(RANKING)
            self._weights[ready] = every[slots[ready]]


def _grown(array: np.ndarray, capacity: int, count: int) -> np.ndarray:
    bigger = np.zeros((capacity, *array.shape[1:]), array.dtype)
    bigger[:count] = array[:count]
    return bigger


def _read_head(path: Path) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read(100)
    except OSError as exc:
        raise GalleryError(f"cannot read the gallery {path}: {exc}") from exc
