"""Reading galleries of versions 1 and 2 (dmf-deploy 0.1 and 0.2): one `.npz` archive (torch-free).

Members: ``header`` (uint8 UTF-8 JSON: format, format_version, fingerprint, model_description,
feature_shape, feature_dtype, bank_shapes, bank_dtypes (version 2 only; version 1 banks are float32),
classes: [{name, shots, created, updated}] in row order), ``feature_sums`` float32 [N, *feature_shape],
``bank.<name>`` [N, *bank_shapes[name]], ``thumbnail_bytes`` uint8 (JPEGs concatenated) and
``thumbnail_offsets`` int64 [N + 1]. Nothing here writes that format: the runtime writes version 3
(gallery_file.py), and the first save of an old gallery converts it into a new file beside it.

Every size in the archive is checked against the file before anything is allocated, no member is
read with pickle, and whatever is wrong is a GalleryError.
"""

from __future__ import annotations

import json
import math
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from dmf_deploy.runtime.gallery_checks import (
    FORMAT,
    MAX_CLASSES,
    MAX_HEADER_BYTES,
    SUM_DTYPE,
    GalleryError,
    another_model,
    check_bank_dtypes,
    check_class_entry,
    check_feature_sums,
    check_shape,
    checked_thumbnail,
)

READ_VERSIONS = (1, 2)
ZIP_MAGIC = b"PK\x03\x04"
_BANK_PREFIX = "bank."


@dataclass
class LegacyGallery:
    """Everything a version 1 or 2 file holds, checked."""

    version: int
    model_description: str
    feature_shape: tuple[int, ...]
    bank_shapes: dict[str, tuple[int, ...]]
    bank_dtypes: dict[str, np.dtype]
    names: list[str]
    counts: list[int]
    created: list[str]
    updated: list[str]
    sums: np.ndarray  # float32 [N, *feature_shape]
    banks: dict[str, np.ndarray]
    thumbnails: list[bytes | None]


def read_legacy(path: Path, fingerprint: str, description: str) -> LegacyGallery:
    """Read a version 1 or 2 gallery of the model `fingerprint`; GalleryError on anything else."""
    try:
        with open(path, "rb") as handle:
            if handle.read(len(ZIP_MAGIC)) != ZIP_MAGIC:
                raise GalleryError(f"{path} is not a {FORMAT} file (not an .npz archive)")
            size = os.fstat(handle.fileno()).st_size
            with zipfile.ZipFile(handle) as archive:
                return _from_npz(path, _Archive(archive, size), fingerprint, description)
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


def _from_npz(path: Path, npz: _Archive, fingerprint: str, description: str) -> LegacyGallery:
    header_array = _read_member(npz, "header", np.uint8, None, limit=MAX_HEADER_BYTES)
    header = json.loads(header_array.tobytes().decode("utf-8"))
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise GalleryError(f"{path} is not a {FORMAT} file")
    version = header.get("format_version")
    if isinstance(version, bool) or version not in READ_VERSIONS:
        raise GalleryError(
            f"{path} has {FORMAT} version {version!r} in an .npz archive; this runtime reads archives "
            "of versions 1 and 2 (version 3 is an SQLite file)"
        )
    theirs = str(header.get("fingerprint"))
    if theirs != fingerprint:
        # Checked before shapes: another model is the likely cause and deserves the clearest message.
        raise another_model(
            path, theirs, str(header.get("model_description") or ""), fingerprint, description
        )
    if header.get("feature_dtype") != SUM_DTYPE.name:
        raise GalleryError(f"{path} stores feature sums as {header.get('feature_dtype')!r}")
    if not isinstance(header.get("bank_shapes"), dict):
        raise GalleryError(f"{path} has no valid bank_shapes")
    feature_shape = check_shape(header.get("feature_shape"), "feature_shape")
    bank_shapes = {k: check_shape(s, f"bank shape of {k!r}") for k, s in header["bank_shapes"].items()}
    bank_dtypes = check_bank_dtypes(header.get("bank_dtypes") if version >= 2 else None, bank_shapes)
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
        name = check_class_entry(
            path, entry.get("name"), entry.get("shots"), entry.get("created"), entry.get("updated")
        )
        if name in seen:
            raise GalleryError(f"{path} has an invalid or duplicate class name {entry['name']!r}")
        seen.add(name)
        names.append(name)
        counts.append(entry["shots"])
        created.append(entry["created"])
        updated.append(entry["updated"])

    sums = _read_member(npz, "feature_sums", SUM_DTYPE, (n, *feature_shape))
    banks = {k: _read_member(npz, _BANK_PREFIX + k, bank_dtypes[k], (n, *s)) for k, s in bank_shapes.items()}
    for what, array in banks.items():
        if not np.all(np.isfinite(array)):
            raise GalleryError(f"{path}: {what} contains NaN or infinity")
    check_feature_sums(path, names, sums, counts)
    blob = _read_member(npz, "thumbnail_bytes", np.uint8, None).tobytes()
    offsets = _read_member(npz, "thumbnail_offsets", np.int64, (n + 1,))
    if offsets[0] != 0 or offsets[-1] != len(blob) or np.any(np.diff(offsets) < 0):
        raise GalleryError(f"{path} has inconsistent thumbnail offsets")
    thumbnails = [
        checked_thumbnail(path, name, blob[a:b])
        for name, a, b in zip(names, offsets[:-1].tolist(), offsets[1:].tolist())
    ]
    return LegacyGallery(
        version,
        description or str(header.get("model_description", "")),
        feature_shape,
        bank_shapes,
        bank_dtypes,
        names,
        counts,
        created,
        updated,
        sums,
        banks,
        thumbnails,
    )


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
