"""The Gallery: the persistent, crash-safe store of enrolled classes (torch-free).

Per class it keeps the name, the shot count, the SUM of the support feature maps (the prototype is
sum / count, so more shots of a class give a running mean), the class-bank tensors that support.onnx
computes from the prototype, a small JPEG thumbnail and UTC timestamps.

Rows live in contiguous arrays with a leading class axis that grow by amortised doubling, so the head
can be fed ``bank_arrays()`` directly and enrolment never concatenates. Accessors return read-only
views of the first N rows; a view is valid until the next mutation (growth reallocates, removal shifts
rows). The gallery is not thread-safe: the Recognizer holds a lock around it.

File format (``format = "dmf-gallery"``, ``format_version = 2``): one ``.npz`` written by ``np.savez``
(every member stored, none compressed) with the members

- ``header``: uint8 [bytes], UTF-8 JSON (at most ``MAX_HEADER_BYTES``): format, format_version,
  fingerprint, model_description, feature_shape, feature_dtype, bank_shapes, bank_dtypes, classes
  (a list of {name, shots, created, updated}, in row order);
- ``feature_sums``: float32 [N, *feature_shape];
- ``bank.<name>``: bank_dtypes[name] [N, *bank_shapes[name]] for each class-bank tensor;

Version 1 (0.1.0's) has no bank_dtypes: its banks are float32. Banks are derived data: a bundle whose
bank shapes or dtypes differ recomputes them from the stored prototypes (``reset_banks``).
- ``thumbnail_bytes``: uint8 [total], the JPEG thumbnails concatenated;
- ``thumbnail_offsets``: int64 [N + 1], class i's JPEG is bytes[offsets[i]:offsets[i+1]] (empty: none).

No member is an object array, and loading never allows pickle. Saving is atomic (temporary file beside
the target, fsync, os.replace). A kill -9 during a save can leave one ``.<name>.XXXXXXXX.tmp`` file
beside the gallery; the target itself is always the old or the new gallery. A later save deletes such
leftovers once they are older than ``STALE_TEMP_SECONDS``.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, NamedTuple

import cv2
import numpy as np

from dmf_deploy.atomic import atomic_write_with, remove_stale, write_target
from dmf_deploy.image_size import jpeg_size
from dmf_deploy.names import name_key, validate_class_name

FORMAT = "dmf-gallery"
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)
MAX_HEADER_BYTES = 16 << 20  # checked before json.loads: a corrupt length must not cost gigabytes
THUMBNAIL_SIZE = 64  # longest side of a thumbnail, pixels
THUMBNAIL_QUALITY = 85
STALE_TEMP_SECONDS = 600.0  # a temp file untouched this long belongs to a save that died
SUM_DTYPE = np.dtype(np.float32)  # halves memory against float64; a few hundred shots lose nothing visible
BANK_DTYPE = np.dtype(np.float32)  # the default; a bundle may declare float16 banks
BANK_DTYPES = ("float32", "float16")
_MIN_CAPACITY = 4
# Bounds no real gallery reaches, checked before anything is allocated: a hand-made file must not cost
# more than its own size in memory, nor overflow int64 shot counts.
MAX_CLASSES = 1 << 20
MAX_SHOTS = 1 << 31  # per class
MAX_RANK = 8  # axes of a feature or class-bank tensor
MAX_ROW_ELEMENTS = 1 << 24  # elements of one class's feature map or bank tensor (64 MB of float32)
MAX_THUMBNAIL_BYTES = 256 << 10
MAX_THUMBNAIL_SIDE = 256  # pixels; saved thumbnails are THUMBNAIL_SIZE
_ZIP_MAGIC = b"PK\x03\x04"
_BANK_PREFIX = "bank."
_BANK_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class GalleryError(ValueError):
    """A gallery file that is corrupt, of another format or model; or an invalid gallery operation."""


class GalleryNotFoundError(GalleryError, FileNotFoundError):
    """The gallery file does not exist (caught by ``except FileNotFoundError`` as well)."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _shape(value: Any, what: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise GalleryError(f"{what} must be a sequence of positive integers, got {value!r}") from exc
    if not shape or min(shape) < 1:
        raise GalleryError(f"{what} must be a non-empty sequence of positive integers, got {value!r}")
    if len(shape) > MAX_RANK or math.prod(shape) > MAX_ROW_ELEMENTS:
        raise GalleryError(
            f"{what} {shape} is too large: at most {MAX_RANK} axes and {MAX_ROW_ELEMENTS} elements"
        )
    return shape


def _bank_dtypes(
    dtypes: Mapping[str, str] | None, shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, np.dtype]:
    """Each bank tensor's dtype (default float32); GalleryError for other names or dtypes."""
    if dtypes is None:
        return {k: BANK_DTYPE for k in shapes}
    if not isinstance(dtypes, Mapping) or set(dtypes) != set(shapes):
        raise GalleryError(f"bank_dtypes must name exactly the bank tensors {sorted(shapes)}")
    for key, name in dtypes.items():
        if name not in BANK_DTYPES:
            raise GalleryError(f"bank dtype of {key!r} is {name!r}; a gallery stores {BANK_DTYPES}")
    return {k: np.dtype(dtypes[k]) for k in shapes}


def _short(fingerprint: str) -> str:
    return fingerprint[:12]


def encode_thumbnail(frame: np.ndarray, size: int = THUMBNAIL_SIZE) -> bytes:
    """JPEG of a BGR uint8 (HxWx3) or grey (HxW) frame, its longest side scaled to `size`."""
    frame = np.asarray(frame)
    if frame.dtype != np.uint8 or not (frame.ndim == 2 or (frame.ndim == 3 and frame.shape[2] == 3)):
        raise GalleryError(
            f"a thumbnail needs an HxWx3 BGR or HxW grey uint8 frame, got {frame.dtype} {frame.shape}"
        )
    h, w = frame.shape[:2]
    if h < 1 or w < 1:
        raise GalleryError(f"cannot make a thumbnail of an empty frame {frame.shape}")
    scale = size / max(h, w)
    small = cv2.resize(
        frame, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA
    )
    ok, buf = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, THUMBNAIL_QUALITY])
    if not ok:
        raise GalleryError("OpenCV could not encode the thumbnail")
    return buf.tobytes()


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
        self._feature_shape = _shape(feature_shape, "feature_shape")
        self._bank_shapes: dict[str, tuple[int, ...]] = {}
        for key, shape in bank_shapes.items():
            if not isinstance(key, str) or not _BANK_NAME.match(key):
                raise GalleryError(f"class-bank tensor name {key!r} is not an identifier")
            self._bank_shapes[key] = _shape(shape, f"bank shape of {key!r}")
        self._bank_dtypes = _bank_dtypes(bank_dtypes, self._bank_shapes)
        # Row storage: the first self._count rows are live; the rest is spare capacity.
        self._count = 0
        self._sums = np.zeros((0, *self._feature_shape), SUM_DTYPE)
        self._counts = np.zeros(0, np.int64)
        self._banks = {k: np.zeros((0, *s), self._bank_dtypes[k]) for k, s in self._bank_shapes.items()}
        # Per-row metadata, in row order.
        self._names: list[str] = []
        self._rows: dict[str, int] = {}
        self._thumbs: list[bytes | None] = []
        self._created: list[str] = []
        self._updated: list[str] = []
        self._bank_ready: list[bool] = []  # False between add_shots and set_bank: the bank is stale

    # ----------------------------------------------------------------- reading

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return self._feature_shape

    @property
    def bank_shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._bank_shapes)

    @property
    def bank_dtypes(self) -> dict[str, str]:
        return {k: d.name for k, d in self._bank_dtypes.items()}

    @property
    def capacity(self) -> int:
        return len(self._counts)

    def __len__(self) -> int:
        return self._count

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name_key(name) in self._rows

    def __repr__(self) -> str:
        return f"Gallery({self._count} classes, model {_short(self.fingerprint)})"

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

    @property
    def feature_sums(self) -> np.ndarray:
        """[N, *feature_shape] sums of each class's support features (read-only view)."""
        return self._view(self._sums, self._count)

    @property
    def counts(self) -> np.ndarray:
        """[N] shot counts (read-only view)."""
        return self._view(self._counts, self._count)

    def bank_arrays(self) -> dict[str, np.ndarray]:
        """{name: [N, *shape] of bank_dtypes[name]} class-bank tensors, ready for the head (read-only)."""
        return {k: self._view(a, self._count) for k, a in self._banks.items()}

    def prototype(self, row: int) -> np.ndarray:
        """The class's mean support feature map, float32 [*feature_shape]."""
        row = self._check_row(row)
        return (self._sums[row].astype(np.float64) / self._counts[row]).astype(np.float32)

    def prototypes(self) -> np.ndarray:
        """All prototypes, float32 [N, *feature_shape] (e.g. to recompute every bank)."""
        n = self._count
        scale = 1.0 / self._counts[:n].reshape((n,) + (1,) * len(self._feature_shape))
        return (self._sums[:n].astype(np.float64) * scale).astype(np.float32)

    def thumbnail(self, name: str) -> bytes | None:
        """The class's JPEG thumbnail, or None if it was enrolled without one."""
        return self._thumbs[self.index(name)]

    def timestamps(self, name: str) -> tuple[str, str]:
        """(created, updated) as UTC ISO-8601 strings."""
        row = self.index(name)
        return self._created[row], self._updated[row]

    @property
    def missing_banks(self) -> list[str]:
        """Classes whose bank was not set since their last add_shots; save() refuses while any remain."""
        return [n for n, ready in zip(self._names, self._bank_ready) if not ready]

    # ---------------------------------------------------------------- changing

    def add_shots(
        self,
        name: str,
        feature_sum_delta: np.ndarray,
        n_shots: int,
        thumbnail_bgr: np.ndarray | None = None,
    ) -> int:
        """Add `n_shots` support features (given as their sum) to a new or existing class; return its row.

        The class's bank is stale afterwards: compute it from ``prototype(row)`` and call ``set_bank``.
        A new class takes the thumbnail; an existing one keeps its first thumbnail unless it had none.
        Everything is validated before anything changes, so a refused call leaves the gallery as it was.
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
        if int(n_shots) + (0 if row is None else int(self._counts[row])) > MAX_SHOTS:
            raise GalleryError(f"class {name!r} would have more than {MAX_SHOTS} shots")
        thumb = None if thumbnail_bgr is None else encode_thumbnail(thumbnail_bgr)

        now = _now()
        if row is None:
            row = self._append_row(name, now)
        self._sums[row] += delta.astype(SUM_DTYPE)
        self._counts[row] += int(n_shots)
        if self._thumbs[row] is None:
            self._thumbs[row] = thumb
        self._updated[row] = now
        self._bank_ready[row] = False
        return row

    def set_bank(self, row: int, arrays: Mapping[str, np.ndarray], touch: bool = True) -> None:
        """Store the class-bank tensors of one row; each of shape bank_shapes[k] (or [1, *that]).

        `touch=False` keeps the class's update time (a bank recomputed from the same shots).
        """
        row = self._check_row(row)
        if set(arrays) != set(self._bank_shapes):
            raise GalleryError(f"set_bank needs exactly {sorted(self._bank_shapes)}, got {sorted(arrays)}")
        checked = {}
        for key, shape in self._bank_shapes.items():
            value = np.asarray(arrays[key])
            if value.shape == (1, *shape):  # a support.onnx output for one prototype
                value = value[0]
            if value.shape != shape:
                raise GalleryError(f"bank tensor {key!r} has shape {value.shape}; expected {shape}")
            if not np.all(np.isfinite(value)):
                raise GalleryError(f"bank tensor {key!r} contains NaN or infinity")
            checked[key] = value
        for key, value in checked.items():
            self._banks[key][row] = value
        self._bank_ready[row] = True
        if touch:
            self._updated[row] = _now()

    def reset_banks(
        self, bank_shapes: Mapping[str, Sequence[int]], bank_dtypes: Mapping[str, str] | None = None
    ) -> None:
        """Store class banks of other shapes or dtypes from now on (a bundle with other banks).

        Every row's bank becomes stale: recompute each from ``prototype(row)`` and call ``set_bank``.
        Names, shot counts, feature sums and thumbnails are kept.
        """
        if set(bank_shapes) != set(self._bank_shapes):
            raise GalleryError(
                f"class-bank tensors {sorted(bank_shapes)} differ from this gallery's "
                f"{sorted(self._bank_shapes)}"
            )
        shapes = {k: _shape(s, f"bank shape of {k!r}") for k, s in bank_shapes.items()}
        dtypes = _bank_dtypes(bank_dtypes, shapes)
        capacity = self.capacity
        self._bank_shapes, self._bank_dtypes = shapes, dtypes
        self._banks = {k: np.zeros((capacity, *s), dtypes[k]) for k, s in shapes.items()}
        self._bank_ready = [False] * self._count

    def remove(self, name: str) -> None:
        """Forget a class; later rows move up one, so enrolment order is kept."""
        row, n = self.index(name), self._count
        # Overlapping slice assignment is safe: numpy copies through a buffer when source and target overlap.
        for array in (self._sums, self._counts, *self._banks.values()):
            array[row : n - 1] = array[row + 1 : n]
            array[n - 1] = 0
        for meta in (self._names, self._thumbs, self._created, self._updated, self._bank_ready):
            del meta[row]
        self._count = n - 1
        self._rows = {nm: i for i, nm in enumerate(self._names)}

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
        self._updated[row] = _now()

    def _check_row(self, row: int) -> int:
        if isinstance(row, bool) or not isinstance(row, (int, np.integer)) or not 0 <= row < self._count:
            raise IndexError(f"row {row!r} is out of range for a gallery of {self._count} classes")
        return int(row)

    def _append_row(self, name: str, now: str) -> int:
        row = self._count
        self._reserve(row + 1)
        self._count = row + 1
        self._names.append(name)
        self._rows[name] = row
        self._thumbs.append(None)
        self._created.append(now)
        self._updated.append(now)
        self._bank_ready.append(False)
        return row

    def _reserve(self, needed: int) -> None:
        """Grow the row arrays to hold `needed` rows, doubling so that n enrolments cost O(n) copies."""
        if needed <= self.capacity:
            return
        capacity = max(needed, 2 * self.capacity, _MIN_CAPACITY)

        def grown(array: np.ndarray) -> np.ndarray:
            bigger = np.zeros((capacity, *array.shape[1:]), array.dtype)
            bigger[: self._count] = array[: self._count]
            return bigger

        self._sums, self._counts = grown(self._sums), grown(self._counts)
        self._banks = {k: grown(a) for k, a in self._banks.items()}

    # ------------------------------------------------------------------ saving

    def _header(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "model_description": self.model_description,
            "feature_shape": list(self._feature_shape),
            "feature_dtype": SUM_DTYPE.name,
            "bank_shapes": {k: list(s) for k, s in self._bank_shapes.items()},
            "bank_dtypes": self.bank_dtypes,
            "classes": [
                {"name": nm, "shots": int(c), "created": cr, "updated": up}
                for nm, c, cr, up in zip(self._names, self._counts, self._created, self._updated)
            ],
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the gallery atomically to `path`: a crash leaves the old file or the new one, never a mix."""
        if self.missing_banks:
            raise GalleryError(
                f"cannot save: the class bank of {self.missing_banks} was not set after add_shots"
            )
        target = Path(path)
        header = json.dumps(self._header(), ensure_ascii=False).encode("utf-8")
        if len(header) > MAX_HEADER_BYTES:
            raise GalleryError(
                f"the gallery header would be {len(header)} bytes; the limit is {MAX_HEADER_BYTES}"
            )
        thumbs = [t or b"" for t in self._thumbs]
        offsets = np.zeros(self._count + 1, np.int64)
        offsets[1:] = np.cumsum([len(t) for t in thumbs], dtype=np.int64)
        n = self._count
        arrays = {
            "header": np.frombuffer(header, np.uint8),
            "feature_sums": self._sums[:n],
            "thumbnail_bytes": np.frombuffer(b"".join(thumbs), np.uint8),
            "thumbnail_offsets": offsets,
            **{_BANK_PREFIX + k: a[:n] for k, a in self._banks.items()},
        }

        def write(handle: IO[bytes]) -> None:
            np.savez(handle, **arrays)

        try:
            real, _ = write_target(target)  # a symlink is saved through, to the file it names
            _remove_stale_temps(real)
            atomic_write_with(target, write)
        except OSError as exc:
            if exc.filename is not None or exc.errno is None:
                raise  # names its path already
            # A write error ("No space left on device") names no file; say which gallery was not saved.
            raise OSError(exc.errno, f"cannot save the gallery {target}: {exc.strerror}") from exc
        return target

    # ----------------------------------------------------------------- loading

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], expected_fingerprint: str, expected_description: str = ""
    ) -> Gallery:
        """Open a gallery saved for the model `expected_fingerprint`; GalleryError on anything else.

        The description is only used in messages (and kept for later saves if given).
        """
        path = Path(path)
        if not path.exists():  # follows links: a dangling link names the file a save will create
            raise GalleryNotFoundError(f"gallery file {path} does not exist")
        if not path.is_file():
            raise GalleryError(
                f"gallery path {path} exists but is not a regular file (a folder, device or FIFO); "
                "refusing to read or replace it"
            )
        try:
            with open(path, "rb") as handle:
                if handle.read(len(_ZIP_MAGIC)) != _ZIP_MAGIC:
                    raise GalleryError(f"{path} is not a {FORMAT} file (not an .npz archive)")
                size = os.fstat(handle.fileno()).st_size
                with zipfile.ZipFile(handle) as archive:
                    npz = _Archive(archive, size)
                    return cls._from_npz(path, npz, expected_fingerprint, expected_description)
        except GalleryError:
            raise
        except (
            OSError,
            ValueError,
            EOFError,
            KeyError,
            TypeError,
            OverflowError,
            zipfile.BadZipFile,
            zlib.error,
            struct.error,
            NotImplementedError,
            RecursionError,
        ) as exc:
            # Truncated, overwritten or hand-made files surface as any of these; all mean "corrupt".
            raise GalleryError(f"{path} is corrupt or not a {FORMAT} file: {exc}") from exc

    @classmethod
    def _from_npz(cls, path: Path, npz: _Archive, fingerprint: str, description: str) -> Gallery:
        header_array = _read_member(npz, "header", np.uint8, None, limit=MAX_HEADER_BYTES)
        header = json.loads(header_array.tobytes().decode("utf-8"))
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise GalleryError(f"{path} is not a {FORMAT} file")
        version = header.get("format_version")
        if isinstance(version, bool) or version not in READ_VERSIONS:
            raise GalleryError(
                f"{path} has {FORMAT} version {version!r}; "
                f"this runtime reads versions {' and '.join(map(str, READ_VERSIONS))}"
            )
        theirs = str(header.get("fingerprint"))
        if theirs != fingerprint:
            # Checked before shapes: another model is the likely cause and deserves the clearest message.
            saved_by = header.get("model_description") or "(no description)"
            open_model = description or "(no description)"
            raise GalleryError(
                f"{path} was enrolled with another model: it belongs to {saved_by!r} "
                f"(fingerprint {_short(theirs)}), but the open model is {open_model!r} "
                f"(fingerprint {_short(fingerprint)}). Enrol the classes again with this model, "
                "or open the bundle the gallery was made with."
            )
        if header.get("feature_dtype") != SUM_DTYPE.name:
            raise GalleryError(f"{path} stores feature sums as {header.get('feature_dtype')!r}")
        if not isinstance(header.get("bank_shapes"), dict):
            raise GalleryError(f"{path} has no valid bank_shapes")
        gallery = cls(
            fingerprint,
            header.get("feature_shape"),
            header["bank_shapes"],
            description or str(header.get("model_description", "")),
            header.get("bank_dtypes") if version >= 2 else None,
        )
        classes = header.get("classes")
        if not isinstance(classes, list):
            raise GalleryError(f"{path} has no class list")
        n = len(classes)
        # The class list is checked against the stored rows before it is walked.
        stored = _member_header(npz, "feature_sums").shape
        if n > MAX_CLASSES or stored[:1] != (n,):
            raise GalleryError(
                f"{path} lists {n} classes but stores feature sums of shape {stored} "
                f"(and at most {MAX_CLASSES} classes are allowed)"
            )
        names, counts, created, updated = [], [], [], []
        seen: set[str] = set()
        for entry in classes:
            if not isinstance(entry, dict):
                raise GalleryError(f"{path} has a malformed class entry {str(entry)[:100]!r}")
            name = validate_class_name(entry.get("name"))  # NFC: a gallery of older versions may hold NFD
            if name in seen:
                raise GalleryError(f"{path} has an invalid or duplicate class name {entry['name']!r}")
            seen.add(name)
            shots = entry.get("shots")
            if isinstance(shots, bool) or not isinstance(shots, int) or not 1 <= shots <= MAX_SHOTS:
                raise GalleryError(
                    f"{path}: class {name!r} has an invalid shot count {str(shots)[:40]!r} "
                    f"(1..{MAX_SHOTS})"
                )
            stamps = (entry.get("created"), entry.get("updated"))
            if not all(isinstance(s, str) and len(s) <= 64 for s in stamps):
                raise GalleryError(f"{path}: class {name!r} has invalid timestamps")
            names.append(name)
            counts.append(shots)
            created.append(stamps[0])
            updated.append(stamps[1])

        sums = _read_member(npz, "feature_sums", SUM_DTYPE, (n, *gallery.feature_shape))
        banks = {
            k: _read_member(npz, _BANK_PREFIX + k, gallery._bank_dtypes[k], (n, *s))
            for k, s in gallery._bank_shapes.items()
        }
        for what, array in (("feature_sums", sums), *banks.items()):
            if not np.all(np.isfinite(array)):
                raise GalleryError(f"{path}: {what} contains NaN or infinity")
        blob = _read_member(npz, "thumbnail_bytes", np.uint8, None).tobytes()
        offsets = _read_member(npz, "thumbnail_offsets", np.int64, (n + 1,))
        if offsets[0] != 0 or offsets[-1] != len(blob) or np.any(np.diff(offsets) < 0):
            raise GalleryError(f"{path} has inconsistent thumbnail offsets")

        gallery._reserve(n)
        gallery._count = n
        gallery._sums[:n] = sums
        gallery._counts[:n] = counts
        for k, a in banks.items():
            gallery._banks[k][:n] = a
        gallery._names = names
        gallery._rows = {nm: i for i, nm in enumerate(names)}
        gallery._thumbs = [
            _checked_thumbnail(path, name, blob[a:b])
            for name, a, b in zip(names, offsets[:-1].tolist(), offsets[1:].tolist())
        ]
        gallery._created, gallery._updated = created, updated
        gallery._bank_ready = [True] * n
        return gallery


class _Archive:
    """An open gallery zip and the size of its file (what every declared size is checked against)."""

    def __init__(self, archive: zipfile.ZipFile, size: int) -> None:
        self.zip = archive
        self.size = size


class _Member(NamedTuple):
    info: zipfile.ZipInfo
    shape: tuple[int, ...]
    fortran: bool
    dtype: np.dtype
    data_offset: int  # where the array data starts within the member


def _member_header(npz: _Archive, key: str) -> _Member:
    """One stored array's zip entry and .npy header, read without touching its data."""
    try:
        info = npz.zip.getinfo(key + ".npy")
    except KeyError:
        raise GalleryError(f"gallery file lacks the array {key!r}") from None
    if info.compress_type != zipfile.ZIP_STORED:
        raise GalleryError(f"gallery array {key!r} is compressed; np.savez never writes that")
    # Sizes in a zip are claims of the file itself: a stored member must lie within the archive.
    if info.file_size != info.compress_size or info.header_offset + info.compress_size > npz.size:
        raise GalleryError(
            f"gallery array {key!r} declares {info.file_size} bytes, more than the {npz.size}-byte file holds"
        )
    with npz.zip.open(info) as member:
        version = np.lib.format.read_magic(member)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(member)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(member)
        else:
            raise GalleryError(f"gallery array {key!r} has unsupported .npy version {version}")
        return _Member(info, tuple(shape), bool(fortran), dtype, member.tell())


def _read_member(
    npz: _Archive, key: str, dtype: Any, shape: tuple[int, ...] | None, limit: int | None = None
) -> np.ndarray:
    """Read one array after checking its .npy header, so a lying file cannot make us allocate or unpickle.

    `shape` None means any 1-D array (of at most `limit` bytes if given). The result has native byte order.
    """
    dtype = np.dtype(dtype)
    info, got_shape, fortran, got_dtype, data_offset = _member_header(npz, key)
    nbytes = math.prod(got_shape) * got_dtype.itemsize  # Python ints: no overflow
    # A stored member holds its data: a header claiming more would make numpy allocate what the file lacks.
    if min(got_shape, default=1) < 0 or data_offset + nbytes > info.file_size:
        raise GalleryError(
            f"gallery array {key!r} claims shape {got_shape}, more than its {info.file_size} bytes"
        )
    # Compare kind and size, not byte order: a big-endian writer is fine, an object array is not.
    if (got_dtype.kind, got_dtype.itemsize) != (dtype.kind, dtype.itemsize):
        raise GalleryError(f"gallery array {key!r} has dtype {got_dtype}; expected {dtype}")
    if shape is None:
        if len(got_shape) != 1 or (limit is not None and nbytes > limit):
            raise GalleryError(
                f"gallery array {key!r} has shape {got_shape}; expected 1-D"
                + (f" of at most {limit} bytes" if limit is not None else "")
            )
    elif got_shape != shape:
        raise GalleryError(
            f"gallery array {key!r} has shape {got_shape}, inconsistent with the header's {shape}"
        )
    with npz.zip.open(info) as member:
        member.seek(data_offset)
        data = member.read(nbytes)
    if len(data) != nbytes:
        raise GalleryError(f"gallery array {key!r} is truncated")
    array = np.frombuffer(data, got_dtype).reshape(got_shape, order="F" if fortran else "C")
    return array.astype(dtype)  # native byte order, writable, C order


def _thumbnail_problem(data: bytes) -> str | None:
    if len(data) > MAX_THUMBNAIL_BYTES:
        return f"is {len(data)} bytes (the limit is {MAX_THUMBNAIL_BYTES})"
    size = jpeg_size(data)
    if size is None:
        return "is not a JPEG image"
    if min(size) < 1 or max(size) > MAX_THUMBNAIL_SIDE:
        return f"is {size[0]}x{size[1]} pixels (the limit is {MAX_THUMBNAIL_SIDE} a side)"
    return None


def _checked_thumbnail(path: Path, name: str, data: bytes) -> bytes | None:
    if not data:
        return None
    problem = _thumbnail_problem(data)
    if problem:
        raise GalleryError(f"{path}: the thumbnail of {name!r} {problem}")
    return data


def decode_thumbnail(data: bytes | None) -> np.ndarray | None:
    """A thumbnail as a BGR image; None when there is none or it is not a small JPEG.

    Dimensions are read from the JPEG header first: a "thumbnail" of 10000x10000 pixels is never decoded.
    """
    if not data or _thumbnail_problem(data):
        return None
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)


def _remove_stale_temps(target: Path) -> None:
    """Delete temp files that earlier saves to `target` left when killed (atomic_open's naming)."""
    pattern = re.compile(re.escape(f".{target.name}.") + r"[A-Za-z0-9_]+\.tmp\Z")
    remove_stale(target.parent, pattern, STALE_TEMP_SECONDS)
