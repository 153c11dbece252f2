"""Hostile input to galleries, the atomic writer and frames: refused with a named error, nothing replaced.

Each test is a regression of a failure found by an adversarial pass over 0.1.0 (issue "Hardening").
File readers run in a child process with a memory limit and a CPU-time bound (`bounded_reader`).
Real files, real FIFOs, real processes; nothing is mocked.
"""

from __future__ import annotations

import io
import json
import os
import re
import sqlite3
import stat
import subprocess
import sys
import textwrap
import unicodedata
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from bounded_reader import BoundedReader
from bundles import FP, enroll, filled, new_gallery, read_header, rewrite, save_v2

from dmf_deploy.atomic import NotARegularFile, atomic_write_bytes
from dmf_deploy.preprocess import InvalidFrame
from dmf_deploy.runtime.gallery import (
    MAX_SHOTS,
    MAX_THUMBNAIL_SIDE,
    Gallery,
    GalleryError,
    GalleryNotFoundError,
    decode_thumbnail,
    jpeg_size,
)

DEMO_BUNDLE = Path(__file__).parents[1] / "dmf_deploy" / "assets" / "demo_bundle"
CPU_BOUND_S = 1.0  # the issue's bound per file; CPU time, so a busy 2-core CI machine does not inflate it


@pytest.fixture(scope="module")
def reader() -> Iterator[BoundedReader]:
    child = BoundedReader(memory_mb=256)
    yield child
    child.close()


def assert_refused_in_bounds(reader: BoundedReader, path: Path, match: str = "") -> dict:
    answer = reader.load(path)
    assert answer["outcome"] == "GalleryError", answer["message"]
    assert match in answer["message"]
    assert answer["cpu_s"] < CPU_BOUND_S, answer
    return answer


def raw_members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def write_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def npy_claiming(shape: tuple[int, ...], dtype: str, payload: bytes = b"") -> bytes:
    """An .npy header that claims `shape`, followed by only `payload`."""
    buf = io.BytesIO()
    descr = np.lib.format.dtype_to_descr(np.dtype(dtype))
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue() + payload


def declare_member_size(path: Path, member: str, size: int) -> None:
    """Make the zip's central directory claim `size` bytes for `member` (compressed and not)."""
    data = bytearray(path.read_bytes())
    at = data.find(b"PK\x01\x02")
    while at >= 0:
        name_length = int.from_bytes(data[at + 28 : at + 30], "little")
        if data[at + 46 : at + 46 + name_length] == member.encode():
            data[at + 20 : at + 24] = data[at + 24 : at + 28] = size.to_bytes(4, "little")
            path.write_bytes(bytes(data))
            return
        at = data.find(b"PK\x01\x02", at + 4)
    raise AssertionError(f"{member} is not in {path}")


def tiny_gallery_file(
    path: Path, names: list[str], rows: int | None = None, feature_shape: tuple[int, ...] = (1,)
) -> Path:
    """A gallery file of 1-element banks, listing `names` and storing `rows` rows of `feature_shape`."""
    rows = len(names) if rows is None else rows
    header = {
        "format": "dmf-gallery",
        "format_version": 1,
        "fingerprint": FP,
        "model_description": "",
        "feature_shape": list(feature_shape),
        "feature_dtype": "float32",
        "bank_shapes": {"w": [1]},
        "classes": [{"name": n, "shots": 1, "created": "t", "updated": "t"} for n in names],
    }
    with open(path, "wb") as handle:
        np.savez(
            handle,
            header=np.frombuffer(json.dumps(header).encode(), np.uint8),
            feature_sums=np.ones((rows, *feature_shape), np.float32),
            **{"bank.w": np.ones((rows, 1), np.float32)},
            thumbnail_bytes=np.zeros(0, np.uint8),
            thumbnail_offsets=np.zeros(rows + 1, np.int64),
        )
    return path


# ------------------------------------------------------------------------- paths that are not files


def test_gallery_path_that_is_not_a_regular_file_is_refused_at_open(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.dmfg"
    os.mkfifo(fifo)
    folder = tmp_path / "folder.dmfg"
    folder.mkdir()
    for path in (fifo, folder, Path("/dev/null")):
        with pytest.raises(GalleryError, match="not a regular file") as info:
            Gallery.load(path, FP)
        # Not "missing": a missing gallery starts empty and is later written, replacing the path.
        assert not isinstance(info.value, GalleryNotFoundError)


def test_atomic_writer_refuses_to_replace_what_is_not_a_regular_file(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    for path in (fifo, folder):
        with pytest.raises(NotARegularFile, match="not a regular file"):
            atomic_write_bytes(path, b"data")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert (folder / "keep.txt").read_text() == "mine"
    with pytest.raises(OSError, match="not a regular file"):  # a save to a FIFO says so, too
        filled(1).save(fifo)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "folder"]  # no temp file left


def test_save_through_a_symlink_writes_its_target_and_keeps_the_link(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "g.dmfg"
    new_gallery().save(target)
    link = tmp_path / "link.dmfg"
    link.symlink_to(target)
    filled(3).save(link)
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert Gallery.load(target, FP).names == ["class 0", "class 1", "class 2"]
    assert not any(p.name.endswith(".tmp") for p in tmp_path.rglob("*"))


@pytest.mark.parametrize("mode", [0o600, 0o640])
def test_save_keeps_the_file_mode(tmp_path: Path, mode: int) -> None:
    path = new_gallery().save(tmp_path / "g.dmfg")
    path.chmod(mode)
    filled(2).save(path)
    assert stat.S_IMODE(path.stat().st_mode) == mode


def test_a_failed_write_names_the_gallery(tmp_path: Path) -> None:
    # A real write error, as a full disk gives: a file-size limit makes write() fail with EFBIG.
    path = tmp_path / "full.dmfg"
    child = textwrap.dedent(
        f"""
        import resource, signal, sys
        import numpy as np
        from dmf_deploy.runtime.gallery import Gallery
        g = Gallery("f" * 64, (64, 8, 8), {{"w": (4,)}})
        row = g.add_shots("big", np.ones((64, 8, 8), np.float32), 1)
        g.set_bank(row, {{"w": np.ones(4, np.float32)}})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an error from write(), not a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            g.save({str(path)!r})
        except OSError as exc:
            print(exc)
        """
    )
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    # SQLite reports the failed write as an I/O error (SQLITE_IOERR_WRITE or SQLITE_FULL), not by errno.
    assert str(path) in done.stdout and re.search("disk I/O error|full", done.stdout), done.stdout
    assert not path.exists()


# ----------------------------------------------------------------------------- what the file claims


def test_junk_file_is_not_a_gallery_with_no_pickle_advice(tmp_path: Path) -> None:
    path = tmp_path / "junk.dmfg"
    path.write_bytes(b"this is not a gallery at all\n" * 40)
    with pytest.raises(GalleryError, match="not a dmf-gallery file") as info:
        Gallery.load(path, FP)
    assert "pickle" not in str(info.value)


@pytest.mark.parametrize("shots", [10**30, 2**63 - 1, MAX_SHOTS + 1, 0, -1, 1.5])
def test_absurd_shot_counts_are_refused(tmp_path: Path, shots: object) -> None:
    path = save_v2(filled(2), tmp_path / "g.dmfg")
    header = read_header(path)
    header["classes"][1]["shots"] = shots
    rewrite(path, header)
    with pytest.raises(GalleryError, match="shot count"):
        Gallery.load(path, FP)


def test_adding_shots_beyond_the_bound_is_refused() -> None:
    g = filled(1)
    with pytest.raises(GalleryError, match="more than"):
        g.add_shots("class 0", np.zeros(g.feature_shape, np.float32), MAX_SHOTS)
    assert int(g.counts[0]) == 1


@pytest.mark.parametrize("shape", [(65536, 65536), (1 << 40,), (1,) * 9])
def test_absurd_feature_shapes_are_refused(tmp_path: Path, shape: tuple[int, ...]) -> None:
    # An empty gallery with consistent arrays: 0.1.0 opened it, and the first enrolment allocated 16 GB+.
    path = tiny_gallery_file(tmp_path / "g.dmfg", [], feature_shape=shape)
    with pytest.raises(GalleryError, match="feature_shape"):
        Gallery.load(path, FP)


def test_member_declaring_more_than_the_archive_holds_is_refused(
    tmp_path: Path, reader: BoundedReader
) -> None:
    members = raw_members(save_v2(filled(2), tmp_path / "g.dmfg"))
    claimed = 0xFFFF_FF00  # ~4 GiB of thumbnails, in a file of a few KB
    members["thumbnail_bytes.npy"] = npy_claiming((claimed,), "u1", b"\xff" * 64)
    path = write_zip(tmp_path / "liar.dmfg", members)
    declare_member_size(path, "thumbnail_bytes.npy", claimed + 128)
    assert_refused_in_bounds(reader, path, "more than the")


def test_class_list_longer_than_the_stored_rows_is_refused_first(
    tmp_path: Path, reader: BoundedReader
) -> None:
    # 160,000 names over 2 stored rows: 0.1.0 validated every name against a list first (551 s of CPU).
    path = tiny_gallery_file(tmp_path / "long.dmfg", [f"c{i}" for i in range(160_000)], rows=2)
    assert_refused_in_bounds(reader, path, "lists 160000 classes")


def test_many_classes_load_in_linear_time(tmp_path: Path, reader: BoundedReader) -> None:
    path = tiny_gallery_file(tmp_path / "many.dmfg", [f"c{i}" for i in range(50_000)])
    # The least of three loads: the first also pays one-time warm-up, and on a 2-core CI machine a
    # test running on the sibling core inflates CPU time (1.2-1.3 s seen there; 0.4-0.7 s alone).
    answers = [reader.load(path) for _ in range(3)]
    assert all(a["outcome"] == "ok" for a in answers), answers
    fastest = min(a["cpu_s"] for a in answers)
    assert fastest < CPU_BOUND_S, answers  # a list-based duplicate check took minutes here


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real 8x8 JPEG whose frame header is changed to claim width x height pixels."""
    ok, buf = cv2.imencode(".jpg", np.full((8, 8, 3), 128, np.uint8))
    assert ok
    data = bytearray(buf.tobytes())
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def test_thumbnail_bomb_is_refused_at_load_and_never_decoded(tmp_path: Path) -> None:
    bomb = jpeg_claiming(10000, 10000)
    assert jpeg_size(bomb) == (10000, 10000)
    assert decode_thumbnail(bomb) is None  # decoding would allocate 300 MB in the window
    path = save_v2(filled(1, thumbs=False), tmp_path / "g.dmfg")
    rewrite(
        path,
        thumbnail_bytes=np.frombuffer(bomb, np.uint8),
        thumbnail_offsets=np.array([0, len(bomb)], np.int64),
    )
    with pytest.raises(GalleryError, match="10000x10000"):
        Gallery.load(path, FP)
    small = jpeg_claiming(MAX_THUMBNAIL_SIDE, 16)
    assert decode_thumbnail(small).shape == (16, MAX_THUMBNAIL_SIDE, 3)


def test_thumbnail_bomb_in_a_version_3_file_is_refused_when_read(tmp_path: Path, reader) -> None:
    bomb = jpeg_claiming(10000, 10000)
    path = filled(1).save(tmp_path / "g.dmfg")
    db = sqlite3.connect(path)
    db.execute("UPDATE thumbnails SET jpeg = ?, crc32 = ?", (bomb, zlib.crc32(bomb)))
    db.commit()
    db.close()
    with Gallery.load(path, FP) as g, pytest.raises(GalleryError, match="10000x10000"):
        g.thumbnail("class 0")
    assert_refused_in_bounds(reader, path, "10000x10000")


# ---------------------------------------------------------------------------------- names and frames


def test_class_names_are_normalised_to_nfc() -> None:
    nfc = unicodedata.normalize("NFC", "café")
    nfd = unicodedata.normalize("NFD", "café")
    assert nfc != nfd
    g = new_gallery()
    rng = np.random.default_rng(0)
    enroll(g, nfc, rng.standard_normal((1, 8, 3, 3)).astype(np.float32))
    enroll(g, nfd, rng.standard_normal((2, 8, 3, 3)).astype(np.float32))
    assert g.names == [nfc] and int(g.counts[0]) == 3
    assert nfd in g and g.index(nfd) == 0


@pytest.fixture(scope="module")
def recognizer():
    from dmf_deploy.runtime.recognizer import Recognizer

    return Recognizer.open(DEMO_BUNDLE, threads=1)


def test_a_frame_that_is_none_says_the_image_did_not_load(recognizer) -> None:
    frame = np.zeros((40, 40, 3), np.uint8)
    calls = [
        lambda: recognizer.classify(None),
        lambda: recognizer.classify([frame, None]),
        lambda: recognizer.enroll("x", None),
        lambda: recognizer.enroll("x", [frame, None]),
    ]
    for call in calls:
        with pytest.raises(InvalidFrame, match=r"is None \(did the image fail to load\?\)"):
            call()
    assert recognizer.classes == []


def test_image_files_from_outside_give_image_file_errors(tmp_path: Path) -> None:
    """The one reader of image files (dmf-explain's frames, --cohort, --calib): every bad file is an
    ImageFileError naming it, never cv2.error or OSError."""
    from dmf_deploy.preprocess import ImageFileError, read_image_file

    cases = {"empty.png": b"", "junk.png": b"not an image", "big.png": b"x" * 2048}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "folder.png").mkdir()
    for name, problem in [
        ("empty.png", "is empty"),
        ("junk.png", "not an image of a format"),
        ("folder.png", "not a file"),
        ("missing.png", "does not exist"),
    ]:
        with pytest.raises(ImageFileError, match=problem):
            read_image_file(tmp_path / name)
    with pytest.raises(ImageFileError, match="larger than"):
        read_image_file(tmp_path / "big.png", max_bytes=1024)
