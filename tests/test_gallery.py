"""The Gallery: row storage, names, running means, and a file (SQLite, version 3) that survives kill -9.

Real files and real processes only; nothing is mocked. The version 2 reader's own hostile-file tests
write 0.2's format with `save_v2` (tests/bundles.py).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import sqlite3
import stat
import subprocess
import sys
import time
import zlib
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np
import pytest
from bundles import (  # tests/bundles.py
    BANK_SHAPES,
    FEATURE_SHAPE,
    FP,
    assert_same,
    complete_banks,
    enroll,
    fake_bank,
    filled,
    new_gallery,
    npz_members,
    read_header,
    rewrite,
    save_v2,
    saved,
    savez,
    snapshot,
)

from dmf_deploy.atomic import current_umask
from dmf_deploy.names import InvalidClassName
from dmf_deploy.runtime.gallery import (
    FORMAT,
    MAX_HEADER_BYTES,
    THUMBNAILS_KEPT,
    Gallery,
    GalleryError,
    GalleryNotFoundError,
    converted_path,
)


def temp_files(folder: Path, name: str) -> list[Path]:
    return [p for p in folder.iterdir() if re.fullmatch(re.escape(f".{name}.") + r".+\.tmp", p.name)]


# ---------------------------------------------------------------------------------------------- storage


def test_round_trip_is_bit_exact(tmp_path: Path) -> None:
    g = filled(7)
    before = snapshot(g)
    path = saved(g, tmp_path / "g.dmfg")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.dmfg", "g.dmfg-banks"]  # closed: one file
    back = Gallery.load(path, FP)
    assert back.fingerprint == FP and back.model_description == "conv4 test model"
    assert back.feature_shape == FEATURE_SHAPE and back.bank_shapes == BANK_SHAPES
    assert back.missing_banks == []  # the banks came from the cache beside the file
    assert_same(before, snapshot(back))
    assert back.thumbnail("class 0") is not None and back.thumbnail("class 1") is None
    for row in range(len(back)):
        mean = before["sums"][row].astype(np.float64) / before["counts"][row]
        assert np.array_equal(mean.astype(np.float32), back.prototype(row))
    # The loaded gallery is fully usable: a snapshot elsewhere holds the same content, and it grows.
    back.save(tmp_path / "again.dmfg")
    again = Gallery.load(tmp_path / "again.dmfg", FP)
    assert again.missing_banks == again.names  # a copy is the file alone: banks are derived data
    assert_same(before, snapshot(complete_banks(again)))
    enroll(back, "one more", np.ones((1, *FEATURE_SHAPE), np.float32))
    assert back.names[-1] == "one more" and len(back) == 8
    assert back.path == path  # the snapshot did not move it off its own file


def test_empty_gallery_round_trips(tmp_path: Path) -> None:
    saved(new_gallery(), tmp_path / "empty.dmfg")
    back = Gallery.load(tmp_path / "empty.dmfg", FP)
    assert len(back) == 0 and back.names == []
    assert all(a.shape == (0, *BANK_SHAPES[k]) for k, a in back.bank_arrays().items())


def test_the_file_is_an_sqlite_database_a_user_can_read(tmp_path: Path) -> None:
    g = filled(3)
    sums = np.array(g.feature_sums)
    path = saved(g, tmp_path / "g.dmfg")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    tables = [r[0] for r in db.execute("SELECT name FROM sqlite_schema WHERE type = 'table' ORDER BY name")]
    assert tables == ["classes", "meta", "sums", "thumbnails"]
    assert db.execute("PRAGMA application_id").fetchone()[0] == 0x444D4647  # "DMFG"
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    meta = {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM meta")}
    assert meta["format"] == FORMAT and meta["format_version"] == 3
    assert meta["fingerprint"] == FP and meta["feature_shape"] == list(FEATURE_SHAPE)
    rows = db.execute("SELECT id, name, shots, created, updated FROM classes ORDER BY id").fetchall()
    assert [r[1] for r in rows] == ["class 0", "class 1", "class 2"] and [r[2] for r in rows] == [1, 2, 3]
    for _, _, _, created, updated in rows:
        assert datetime.fromisoformat(created).tzinfo == timezone.utc and created <= updated
    # Feature sums are float32 little-endian blobs; no class bank is stored (they are derived).
    for (class_id, *_), total in zip(rows, sums):
        blob = db.execute("SELECT data FROM sums WHERE class_id = ?", (class_id,)).fetchone()[0]
        assert np.array_equal(np.frombuffer(blob, "<f4").reshape(FEATURE_SHAPE), total)
    assert db.execute("SELECT count(*) FROM thumbnails").fetchone()[0] == 2  # classes 0 and 2
    db.close()


def test_saves_write_only_what_changed_and_a_new_file_is_private(tmp_path: Path) -> None:
    g = filled(40)
    path = g.save(tmp_path / "new" / "folder" / "g.dmfg")
    # Issue 29, item 8: a gallery holds pictures of camera frames: 0600, its new folders 0700.
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 & ~current_umask()
    for folder in (tmp_path / "new", tmp_path / "new" / "folder"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700 & ~current_umask()
    wal = Path(f"{path}-wal")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    frames_before = wal.stat().st_size
    enroll(g, "one more", np.ones((1, *FEATURE_SHAPE), np.float32))
    g.save()
    # One class's sum (8x3x3 float32) and rows: a few pages of the log, not the 40 classes again.
    written = wal.stat().st_size - frames_before
    page = db.execute("PRAGMA page_size").fetchone()[0]
    assert 0 < written <= 8 * (page + 24), written
    assert db.execute("SELECT count(*) FROM classes").fetchone()[0] == 41  # a reader sees it at once
    g.rename("class 3", "three")
    g.remove("class 5")
    g.save()
    names = [r[0] for r in db.execute("SELECT name FROM classes ORDER BY id")]
    assert names == g.names and "three" in names and "class 5" not in names
    db.close()
    g.close()
    assert not wal.exists()  # closing checkpoints the log into the file


def test_growth_doubles_capacity_and_keeps_every_row() -> None:
    g = new_gallery()
    capacities = []
    for i in range(100):
        enroll(g, f"c{i}", np.full((1, *FEATURE_SHAPE), i, np.float32))
        if g.capacity not in capacities:
            capacities.append(g.capacity)
    # Amortised doubling: few reallocations (not one per enrolment), each twice the last.
    assert capacities == [4, 8, 16, 32, 64, 128]
    assert len(g) == 100 and g.names == [f"c{i}" for i in range(100)]
    assert g.feature_sums.shape == (100, *FEATURE_SHAPE)
    assert np.array_equal(g.feature_sums[:, 0, 0, 0], np.arange(100, dtype=np.float32))
    for k, a in g.bank_arrays().items():
        assert a.shape == (100, *BANK_SHAPES[k])
    assert np.array_equal(g.bank_arrays()["class_weight"][:, 0], np.arange(100, dtype=np.float32))


def test_accessors_are_read_only_views_not_copies() -> None:
    g = filled(3)
    a, b = g.bank_arrays()["tap_projections"], g.bank_arrays()["tap_projections"]
    assert np.shares_memory(a, b) and np.shares_memory(g.feature_sum(1), g.feature_sum(1))
    with pytest.raises(ValueError):
        a[0] = 1.0
    with pytest.raises(ValueError):
        g.counts[0] = 5
    with pytest.raises(ValueError):
        g.feature_sum(0)[0] = 5  # held in memory, still read-only
    assert not g.feature_sums.flags.writeable  # every sum, a copy (a file's are read from it)


def test_duplicate_name_adds_shots_and_the_prototype_is_the_running_mean() -> None:
    rng = np.random.default_rng(1)
    shots = rng.standard_normal((6, *FEATURE_SHAPE)).astype(np.float32)
    g = new_gallery()
    enroll(g, "other", shots[:1])
    row = enroll(g, "mug", shots[:2])
    assert enroll(g, "mug", shots[2:3]) == row
    assert enroll(g, " mug ", shots[3:]) == row  # names are stripped, so this is the same class
    assert len(g) == 2 and g.names == ["other", "mug"] and g.counts[row] == 6
    np.testing.assert_allclose(g.prototype(row), shots.astype(np.float64).mean(axis=0), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(
        g.bank_arrays()["class_weight"][row], fake_bank(g.prototype(row))["class_weight"]
    )
    assert np.array_equal(g.prototypes()[row], g.prototype(row))


def test_more_shots_leave_the_bank_stale_until_set_bank(tmp_path: Path) -> None:
    g = filled(2)
    row = g.add_shots("class 1", np.ones(FEATURE_SHAPE, np.float32), 1)
    assert g.missing_banks == ["class 1"]
    with pytest.raises(GalleryError, match="class 1"):
        g.save(tmp_path / "g.dmfg")
    assert not (tmp_path / "g.dmfg").exists()
    g.set_bank(row, {k: v[None] for k, v in fake_bank(g.prototype(row)).items()})  # [1, ...] accepted
    assert g.missing_banks == []
    g.save(tmp_path / "g.dmfg")


def test_a_refused_enrolment_changes_nothing_and_later_saves_work(tmp_path: Path) -> None:
    """Issue 29, item 6: a bank that fails its check must not leave the shot count moved."""
    g = filled(2)
    path = g.save(tmp_path / "g.dmfg")
    before = snapshot(g)
    bad_bank = fake_bank(g.prototype(0))
    bad_bank["class_weight"] = np.full_like(bad_bank["class_weight"], np.nan)
    with pytest.raises(GalleryError, match="NaN"):
        g.add_shots("class 0", np.ones(FEATURE_SHAPE, np.float32), 1, bank=bad_bank)
    with pytest.raises(GalleryError, match="beyond any backbone"):
        g.add_shots("class 1", np.full(FEATURE_SHAPE, 3e38, np.float32), 1)  # finite, but absurd
    assert_same(before, snapshot(g))
    enroll(g, "new", np.ones((1, *FEATURE_SHAPE), np.float32))
    g.save()
    g.close()
    assert Gallery.load(path, FP).names == ["class 0", "class 1", "new"]


def test_reset_banks_keeps_the_classes_and_leaves_every_bank_to_recompute(tmp_path: Path) -> None:
    g = filled(3)
    before = snapshot(g)
    with pytest.raises(GalleryError, match="differ"):
        g.reset_banks({"support_offset": (18, 3, 3), "class_weight": (8,)})  # a tensor missing
    assert g.bank_shapes == BANK_SHAPES
    channel_last = {**BANK_SHAPES, "tap_projections": (9, 3, 3, 4)}
    g.reset_banks(channel_last)
    assert g.bank_shapes == channel_last
    assert g.missing_banks == before["names"]
    with pytest.raises(GalleryError, match="class 0"):
        g.save(tmp_path / "g.dmfg")
    for row in range(len(g)):
        bank = fake_bank(g.prototype(row))
        taps = bank["tap_projections"].transpose(0, 2, 3, 1)
        g.set_bank(row, {**bank, "tap_projections": taps}, touch=False)
    assert g.names == before["names"] and [g.timestamps(n) for n in g.names] == before["stamps"]
    np.testing.assert_array_equal(g.feature_sums, before["sums"])
    np.testing.assert_array_equal(
        g.bank_arrays()["tap_projections"], before["banks"]["tap_projections"].transpose(0, 1, 3, 4, 2)
    )
    loaded = Gallery.load(saved(g, tmp_path / "g.dmfg"), FP)
    assert loaded.bank_shapes == channel_last and loaded.missing_banks == []
    loaded.close()
    # Opened for a bundle with the first layout: another cache, so every bank is recomputed, not misread.
    first = Gallery.load(tmp_path / "g.dmfg", FP, bank_shapes=BANK_SHAPES)
    assert first.bank_shapes == BANK_SHAPES and first.missing_banks == before["names"]


def test_remove_compacts_rows_and_keeps_order() -> None:
    g = filled(6)
    before = snapshot(g)
    g.remove("class 2")
    g.remove("class 0")
    keep = [1, 3, 4, 5]
    assert g.names == [f"class {i}" for i in keep] and len(g) == 4
    assert [g.index(f"class {i}") for i in keep] == [0, 1, 2, 3]
    assert np.array_equal(g.feature_sums, before["sums"][keep])
    assert np.array_equal(g.counts, before["counts"][keep])
    for k, a in g.bank_arrays().items():
        assert np.array_equal(a, before["banks"][k][keep])
    assert [g.thumbnail(f"class {i}") for i in keep] == [before["thumbs"][i] for i in keep]
    assert "class 2" not in g
    with pytest.raises(KeyError):
        g.remove("class 2")
    g.remove("class 5")  # the last row
    enroll(g, "class 2", np.ones((1, *FEATURE_SHAPE), np.float32))  # a freed name can come back, at the end
    assert g.names == ["class 1", "class 3", "class 4", "class 2"]
    assert np.array_equal(g.feature_sums[3], np.ones(FEATURE_SHAPE, np.float32))


def test_rename_keeps_the_row() -> None:
    g = filled(3)
    before = snapshot(g)
    g.rename("class 1", "cup")
    assert g.names == ["class 0", "cup", "class 2"] and g.index("cup") == 1
    assert "class 1" not in g and "cup" in g
    assert np.array_equal(g.feature_sums, before["sums"])
    assert g.thumbnail("cup") == before["thumbs"][1]
    with pytest.raises(GalleryError, match="already exists"):
        g.rename("cup", "class 2")
    with pytest.raises(KeyError):
        g.rename("class 1", "mug")
    assert g.names == ["class 0", "cup", "class 2"]
    g.rename("cup", "cup")  # a no-op, not a clash with itself


BAD_NAMES = [
    "",
    "   ",
    "x" * 65,
    "../x",
    "a/b",
    "a\\b",
    "nul\x00byte",
    "tab\tname",
    "bell\x07",
    ".",
    "..",
    None,
    3,
]


@pytest.mark.parametrize("bad", BAD_NAMES, ids=repr)
def test_bad_names_are_refused_and_change_nothing(bad: object) -> None:
    g = filled(2)
    before = snapshot(g)
    with pytest.raises(InvalidClassName):
        g.add_shots(bad, np.ones(FEATURE_SHAPE, np.float32), 1)  # type: ignore[arg-type]
    with pytest.raises(InvalidClassName):
        g.rename("class 0", bad)  # type: ignore[arg-type]
    assert_same(before, snapshot(g))
    assert g.capacity == 4


def test_bad_features_are_refused_and_change_nothing() -> None:
    g = filled(2)
    before = snapshot(g)
    nan = np.ones(FEATURE_SHAPE, np.float32)
    nan[0, 0, 0] = np.nan
    for args in [
        ("class 0", np.ones((8, 3, 4), np.float32), 1),  # wrong shape
        ("class 0", nan, 1),
        ("class 0", np.ones(FEATURE_SHAPE), 0),  # no shots
        ("new", np.ones(FEATURE_SHAPE), 1, np.zeros((10, 10, 3), np.float32)),  # not a uint8 frame
    ]:
        with pytest.raises(GalleryError):
            g.add_shots(*args)
    with pytest.raises(GalleryError):
        g.set_bank(0, {"support_offset": np.zeros((18, 3, 3))})  # missing tensors
    with pytest.raises(IndexError):
        g.set_bank(2, fake_bank(g.prototype(0)))
    assert_same(before, snapshot(g))


def test_thumbnail_is_a_small_jpeg_of_the_frame() -> None:
    g = new_gallery()
    frame = np.zeros((120, 240, 3), np.uint8)
    frame[:, :, 2] = 255  # pure red in BGR
    enroll(g, "red", np.ones((1, *FEATURE_SHAPE), np.float32), frame)
    enroll(g, "grey", np.ones((1, *FEATURE_SHAPE), np.float32), np.full((30, 30), 128, np.uint8))
    enroll(g, "none", np.ones((1, *FEATURE_SHAPE), np.float32))
    image = cv2.imdecode(np.frombuffer(g.thumbnail("red"), np.uint8), cv2.IMREAD_COLOR)
    assert image.shape == (32, 64, 3)  # longest side 64, aspect kept
    assert image[..., 2].mean() > 240 and image[..., :2].mean() < 15
    assert g.thumbnail("grey")[:2] == b"\xff\xd8" and g.thumbnail("none") is None
    # More shots keep the first thumbnail, and the latest ones beside it (at most THUMBNAILS_KEPT).
    for shade in range(1, 8):
        g.add_shots("red", np.ones(FEATURE_SHAPE), 1, np.full((64, 64, 3), shade * 30, np.uint8))
    assert cv2.imdecode(np.frombuffer(g.thumbnail("red"), np.uint8), cv2.IMREAD_COLOR)[..., 2].mean() > 240
    kept = [cv2.imdecode(np.frombuffer(t, np.uint8), cv2.IMREAD_COLOR) for t in g.thumbnails("red")]
    assert len(kept) == THUMBNAILS_KEPT and kept[0][..., 2].mean() > 240
    assert [round(k.mean() / 30) for k in kept[1:]] == [5, 6, 7]
    assert g.page(0, 10)[0] == ("red", 8, *g.timestamps("red"), THUMBNAILS_KEPT)
    assert [c.name for c in g.page(1, 1)] == ["grey"] and g.page(3, 5) == [] and g.shots("red") == 8


# ------------------------------------------------------------------------------------------ bad files


def test_missing_file_is_a_clear_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(GalleryNotFoundError, match="does not exist") as info:
        Gallery.load(tmp_path / "nope.dmfg", FP)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, GalleryError)


def test_random_bytes_are_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    for i, prefix in enumerate([b"", b"PK\x03\x04", b"\x93NUMPY", b"SQLite format 3\x00"]):
        path = tmp_path / f"junk{i}.dmfg"
        path.write_bytes(prefix + rng.integers(0, 256, 20000, dtype=np.uint8).tobytes())
        with pytest.raises(GalleryError):
            Gallery.load(path, FP)


def open_and_read_everything(path: Path) -> list[str]:
    """Open a gallery and run its full check (every sum and thumbnail read); the problems found."""
    with Gallery.load(path, FP) as g:
        return g.check()


@pytest.mark.parametrize("fraction", [0.5, 0.1, 0.9, 0.999])
def test_truncated_file_is_refused(tmp_path: Path, fraction: float) -> None:
    g = filled(5)
    before = snapshot(g)
    path = saved(g, tmp_path / "g.dmfg")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    # Refused at open, or (where the cut lies in data that open does not read) found by the full check.
    # Refused at open, found by the full check, or the cut held nothing (free space at the end of a page).
    try:
        problems = open_and_read_everything(path)
    except GalleryError as exc:
        assert "corrupt" in str(exc) or "malformed" in str(exc) or "not a" in str(exc)
    else:
        if not problems:
            with Gallery.load(path, FP) as g:
                assert_same(before, snapshot(g))


@pytest.mark.parametrize("npz", [False, True])
def test_flipped_byte_in_feature_sums_is_found(tmp_path: Path, npz: bool) -> None:
    g = filled(5)
    target = np.asarray(g.feature_sums)[3].astype("<f4").tobytes()  # SQLite keeps no checksum of its own
    path = save_v2(g, tmp_path / "g.dmfg") if npz else saved(g, tmp_path / "g.dmfg")
    data = bytearray(path.read_bytes())
    at = bytes(data).find(target)
    assert at > 0
    data[at + 5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(GalleryError, match="corrupt|CRC"):
        if npz:
            Gallery.load(path, FP)  # the zip CRC
        else:
            Gallery.load(path, FP).feature_sum(3)


@pytest.mark.parametrize("npz", [False, True])
def test_gallery_of_another_model_names_both_models(tmp_path: Path, npz: bool) -> None:
    other = Gallery("f" * 64, FEATURE_SHAPE, BANK_SHAPES, "resnet12 miniImageNet")
    path = save_v2(other, tmp_path / "g.dmfg") if npz else saved(other, tmp_path / "g.dmfg")
    with pytest.raises(GalleryError) as info:
        Gallery.load(path, FP, "conv4 omniglot")
    message = str(info.value)
    assert "resnet12 miniImageNet" in message and "conv4 omniglot" in message
    assert "f" * 12 in message and FP[:12] in message


def edit_database(path: Path, *statements: str) -> None:
    """Change a gallery file as a hand-made or tampered one would be (the sqlite3 module, no checks)."""
    db = sqlite3.connect(path)
    for statement in statements:
        db.execute(statement)
    db.commit()
    db.close()


HOSTILE_EDITS = {
    "a trigger": "CREATE TRIGGER t AFTER INSERT ON classes BEGIN DELETE FROM sums; END",
    "a view": "CREATE VIEW v AS SELECT * FROM classes",
    "an index": "CREATE INDEX i ON classes (name)",
    "another table": "CREATE TABLE extra (x)",
    "a version 4": "UPDATE meta SET value = '4' WHERE key = 'format_version'",
    "another format": """UPDATE meta SET value = '"dmf-bundle"' WHERE key = 'format'""",
    "a missing field": "DELETE FROM meta WHERE key = 'feature_shape'",
    "absurd feature shape": "UPDATE meta SET value = '[100000, 100000, 100000]' WHERE key = 'feature_shape'",
    "other feature shape": "UPDATE meta SET value = '[8, 3, 4]' WHERE key = 'feature_shape'",
    "a short sum": "UPDATE sums SET data = substr(data, 1, 10) WHERE class_id = 2",
    "a text sum": "UPDATE sums SET data = 'x' WHERE class_id = 2",
    "a class without a sum": "DELETE FROM sums WHERE class_id = 1",
    "a sum without a class": "INSERT INTO sums VALUES (99, 0, zeroblob(288))",
    "a text shot count": "UPDATE classes SET shots = 'many' WHERE id = 1",
    "a huge shot count": f"UPDATE classes SET shots = {2**62} WHERE id = 1",
    "a duplicate name": "UPDATE classes SET name = 'class 0' WHERE id = 2",
    "a path as a name": "UPDATE classes SET name = '../evil' WHERE id = 2",
    "a NUL in a name": "UPDATE classes SET name = 'a' || char(0) || 'b' WHERE id = 2",
    "a zero revision": "UPDATE classes SET revision = 0 WHERE id = 2",
    "a huge thumbnail": "UPDATE thumbnails SET jpeg = zeroblob(300000)",
    "too many thumbnails": "INSERT INTO thumbnails SELECT class_id, seq + s, crc32, jpeg FROM thumbnails, "
    "(SELECT 10 AS s UNION ALL SELECT 20 UNION ALL SELECT 30 UNION ALL SELECT 40)",
    "another application": "PRAGMA application_id = 1",
}


@pytest.mark.parametrize("edit", sorted(HOSTILE_EDITS))
def test_tampered_databases_are_refused_at_open(tmp_path: Path, edit: str) -> None:
    path = saved(filled(3), tmp_path / "g.dmfg")
    edit_database(path, HOSTILE_EDITS[edit])
    with pytest.raises(GalleryError):
        Gallery.load(path, FP)
    if edit == "a trigger":
        assert sqlite3.connect(path).execute("SELECT count(*) FROM sums").fetchone()[0] == 3


@pytest.mark.parametrize("value", ["nan", "inf", "3e38"])
def test_sums_out_of_range_are_refused_when_read(tmp_path: Path, value: str) -> None:
    """Issue 29, item 6: finite but absurd sums (3e38) are refused at load, like NaN."""
    path = saved(filled(3), tmp_path / "g.dmfg")
    bad = np.full(FEATURE_SHAPE, float(value), "<f4").tobytes()
    db = sqlite3.connect(path)
    db.execute("UPDATE sums SET data = ?, crc32 = ? WHERE class_id = 2", (bad, zlib.crc32(bad)))
    db.commit()
    db.close()
    with Gallery.load(path, FP) as g:  # open reads no sum: it stays bounded by the class count
        with pytest.raises(GalleryError, match="NaN|beyond any backbone"):
            g.feature_sum(1)
        assert g.check()


def test_wrong_format_or_version_is_refused(tmp_path: Path) -> None:
    path = save_v2(filled(2), tmp_path / "g.dmfg")
    header = read_header(path)
    rewrite(path, {**header, "format_version": 3})
    with pytest.raises(GalleryError, match="version 3 in an .npz archive"):
        Gallery.load(path, FP)
    rewrite(path, {**header, "format": "dmf-bundle"})
    with pytest.raises(GalleryError, match="not a dmf-gallery"):
        Gallery.load(path, FP)
    np.save(tmp_path / "bare.npy", np.zeros(3))  # a valid numpy file, but no archive
    with pytest.raises(GalleryError, match="not a dmf-gallery file"):
        Gallery.load(tmp_path / "bare.npy", FP)


def test_arrays_inconsistent_with_the_header_are_refused(tmp_path: Path) -> None:
    path = save_v2(filled(3), tmp_path / "g.dmfg")
    good = npz_members(path)
    header = read_header(path)
    cases = [
        {"feature_sums": good["feature_sums"][:2]},  # a row short
        {"bank.class_weight": good["bank.class_weight"][:, :4]},
        {"feature_sums": good["feature_sums"].astype(np.float64)},
        {"thumbnail_offsets": good["thumbnail_offsets"][::-1].copy()},
        {"header": np.frombuffer(json.dumps({**header, "feature_shape": [8, 3, 4]}).encode(), np.uint8)},
        {"header": np.frombuffer(json.dumps({**header, "bank_shapes": {"w": [8]}}).encode(), np.uint8)},
    ]
    for case in cases:
        savez(path, **{**good, **case})
        with pytest.raises(GalleryError):
            Gallery.load(path, FP)
    nan_sums = good["feature_sums"].copy()
    nan_sums[1, 0, 0, 0] = np.nan
    savez(path, **{**good, "feature_sums": nan_sums})
    with pytest.raises(GalleryError, match="NaN"):
        Gallery.load(path, FP)
    savez(path, **{k: v for k, v in good.items() if k != "bank.tap_projections"})
    with pytest.raises(GalleryError, match="bank.tap_projections"):
        Gallery.load(path, FP)


@pytest.mark.parametrize("bad", ["../evil", "", "a\x00b", "x" * 65, "class 0"])
def test_invalid_or_duplicate_names_in_the_file_are_refused(tmp_path: Path, bad: str) -> None:
    path = save_v2(filled(2), tmp_path / "g.dmfg")
    header = read_header(path)
    header["classes"][1]["name"] = bad  # "class 0" duplicates row 0
    rewrite(path, header)
    with pytest.raises(GalleryError):
        Gallery.load(path, FP)


def test_oversized_header_is_refused_before_parsing(tmp_path: Path) -> None:
    path = save_v2(filled(1), tmp_path / "g.dmfg")
    members = npz_members(path)
    members["header"] = np.full(MAX_HEADER_BYTES + 1, ord(" "), np.uint8)
    savez(path, **members)
    with pytest.raises(GalleryError, match="at most"):
        Gallery.load(path, FP)


class _Exploit:
    """Unpickling this creates a marker file: proof that a loader ran pickle."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize(
    "where", ["raw pickle", "header", "feature_sums", "thumbnail_offsets", "bank.class_weight"]
)
def test_pickled_content_is_refused_and_never_unpickled(tmp_path: Path, where: str) -> None:
    marker = tmp_path / "pwned"
    exploit = _Exploit()
    exploit.marker = str(marker)
    path = tmp_path / "g.dmfg"
    if where == "raw pickle":
        import pickle

        path.write_bytes(pickle.dumps(exploit))
    else:
        save_v2(filled(2), path)
        members = npz_members(path)
        members[where] = np.array([exploit, exploit, exploit], dtype=object)
        savez(path, **members)  # np.savez pickles object arrays
    with pytest.raises(GalleryError):
        Gallery.load(path, FP)
    assert not marker.exists()


# ------------------------------------------------------------------------------- crash safety, no torch


def test_leftovers_of_killed_saves_are_cleaned_at_the_next_open_and_nothing_else(tmp_path: Path) -> None:
    """Issue 29, item 8: a kill -9 leftover goes when it is provably a gallery temp file of this name
    and no live process holds its lock; a live writer's file, another file's, and SQLite's -wal and
    -shm (which hold acknowledged classes) are never touched."""
    target = saved(filled(2), tmp_path / "g.dmfg")
    sqlite_head = target.read_bytes()[:4096]
    orphan = tmp_path / ".g.dmfg.abc123xy.tmp"
    orphan.write_bytes(sqlite_head)
    empty = tmp_path / ".g.dmfg.0000aaaa.tmp"
    empty.write_bytes(b"")
    not_ours = tmp_path / ".g.dmfg.zz99zz99.tmp"
    not_ours.write_bytes(b"a user's own notes")
    foreign = tmp_path / ".other.dmfg.abc123xy.tmp"
    foreign.write_bytes(sqlite_head)
    live = tmp_path / ".g.dmfg.live1234.tmp"
    live.write_bytes(sqlite_head)
    kept_wal = tmp_path / "g.dmfg-wal"  # SQLite's: never ours to delete
    kept_shm = tmp_path / "g.dmfg-shm"
    long_ago = time.time() - 3600
    for p in (orphan, empty, not_ours, foreign, live):
        os.utime(p, (long_ago, long_ago))
    # A live writer: another process holds the lock of its temp file, as every save's writer does.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl,sys,time; f=open(sys.argv[1]); "
            "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)",
            str(live),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with Gallery.load(target, FP) as g:
            assert len(g) == 2
            for p in (kept_wal, kept_shm):
                p.write_bytes(b"") if not p.exists() else None
            kept = {p.name for p in tmp_path.iterdir()}
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert not orphan.exists() and not empty.exists()
    assert {not_ours.name, foreign.name, live.name, kept_wal.name, kept_shm.name} <= kept


def test_a_fresh_leftover_is_kept_until_it_is_old_enough(tmp_path: Path) -> None:
    """A temp file just made may not be locked yet by its writer: it is left for a later open."""
    target = saved(filled(1), tmp_path / "g.dmfg")
    fresh = tmp_path / ".g.dmfg.fresh123.tmp"
    fresh.write_bytes(target.read_bytes()[:100])
    Gallery.load(target, FP).close()
    assert fresh.exists()


KILL_FP = "kill-test-model"
KILL_SHAPE = (64, 11, 11)  # ResNet-12-sized maps make each save a few hundred KB, so kills land mid-write

# The child: open the gallery at argv[1] (or start one), then enrol forever: class j gets one shot of
# (j+1)*pattern, a bank that is a fixed function of its prototype, and a thumbnail when j % 3 == 0;
# after each save returns it prints "ack j shots" (acknowledged: durable). Two rounds in three enrol a
# new class, the third adds a shot to an earlier one. The file must hold every acknowledged class with
# at least its acknowledged shots, and every row must be self-consistent (never half a change).
CHILD = r"""
import sys
import numpy as np
from dmf_deploy.runtime.gallery import Gallery, GalleryNotFoundError

path, fp = sys.argv[1], sys.argv[2]
shape = (64, 11, 11)
pattern = (np.arange(np.prod(shape)) % 97).reshape(shape).astype(np.float32)
try:
    g = Gallery.load(path, fp)
except GalleryNotFoundError:
    g = Gallery(fp, shape, {"support_offset": (18, 11, 11), "class_weight": (64,)}, "kill test")
for name in g.missing_banks:  # what a Recognizer does at open: the bank cache may lag the file
    row = g.index(name)
    p = g.prototype(row)
    g.set_bank(row, {"support_offset": p[:18], "class_weight": p.mean(axis=(1, 2))}, touch=False)
print("ready", len(g), flush=True)
frame = np.full((40, 40, 3), 7, np.uint8)
i = 0
while True:
    j = len(g) if i % 3 or not len(g) else i % len(g)
    row = g.add_shots(f"class {j}", pattern * (j + 1), 1, frame if j % 3 == 0 else None)
    p = g.prototype(row)
    g.set_bank(row, {"support_offset": p[:18], "class_weight": p.mean(axis=(1, 2))})
    g.save(path)
    print("ack", j, int(g.counts[row]), flush=True)
    i += 1
"""


def check_kill_gallery(g: Gallery, acknowledged: dict[int, int]) -> None:
    """Every acknowledged class with at least its acknowledged shots; every row self-consistent."""
    pattern = (np.arange(np.prod(KILL_SHAPE)) % 97).reshape(KILL_SHAPE).astype(np.float32)
    assert g.names == [f"class {j}" for j in range(len(g))]
    assert len(g) >= len(acknowledged)
    banks = g.bank_arrays()
    for j in range(len(g)):
        assert g.counts[j] >= acknowledged.get(j, 1), f"class {j} lost acknowledged shots"
        assert np.array_equal(g.feature_sum(j), pattern * (j + 1) * g.counts[j]), f"row {j} is mixed"
        p = g.prototype(j)
        assert np.array_equal(p, pattern * (j + 1))
        assert np.array_equal(banks["support_offset"][j], p[:18])
        assert np.array_equal(banks["class_weight"][j], p.mean(axis=(1, 2)))
        assert (g.thumbnail(f"class {j}") is not None) == (j % 3 == 0)


def kill_trials(folder: Path, trials: int, seconds: float, seed: int) -> tuple[int, int]:
    """Kill an enrolling child at random moments; after each kill the file must reopen holding every
    class and shot the child acknowledged. Returns (kills, acknowledged classes)."""
    rng = random.Random(seed)
    path = folder / "g.dmfg"
    acknowledged: dict[int, int] = {}
    kills = 0
    end = time.monotonic() + seconds
    for _ in range(trials):
        if time.monotonic() > end:
            break
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(path), KILL_FP],
            cwd=folder,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = child.stdout.readline()
        if not line.startswith("ready"):
            child.kill()
            pytest.fail(f"the enrolling child did not start: {line!r} {child.communicate()[1]}")
        assert int(line.split()[1]) >= len(acknowledged)
        time.sleep(rng.uniform(0.05, 0.4))
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        # What it acknowledged before it died: whole lines only. A kill can cut the line being
        # written ("ack 5"), and an acknowledgement that did not reach the reader was not given.
        for ack in child.stdout.read().split("\n")[:-1]:
            if ack.startswith("ack"):
                _, j, shots = ack.split()
                acknowledged[int(j)] = max(acknowledged.get(int(j), 0), int(shots))
        child.stdout.close()
        child.stderr.close()
        assert child.returncode == -signal.SIGKILL, "the child died before it was killed"
        kills += 1
        if not acknowledged and not path.exists():
            continue  # killed before its first save returned: nothing was promised yet
        with Gallery.load(path, KILL_FP) as g:
            for name in g.missing_banks:  # banks lag after a kill: recompute, as a Recognizer does
                row = g.index(name)
                p = g.prototype(row)
                g.set_bank(row, {"support_offset": p[:18], "class_weight": p.mean(axis=(1, 2))}, touch=False)
            check_kill_gallery(g, acknowledged)
    return kills, len(acknowledged)


def test_kill_minus_9_while_enrolling_never_loses_an_acknowledged_class(tmp_path: Path) -> None:
    """SIGKILL an enrolling child at random moments: every reopen is a valid gallery with every class
    (and shot) whose save had returned. A few seconds here; benchmarks/gallery_scale.py --kill-trials 20
    runs the long version."""
    kills, acked = kill_trials(tmp_path, trials=8, seconds=12.0, seed=20240611)
    assert kills >= 5
    assert acked >= 5, "the children made too little progress to test anything"


@pytest.mark.slow
def test_kill_minus_9_twenty_trials(tmp_path: Path) -> None:
    kills, acked = kill_trials(tmp_path, trials=20, seconds=120.0, seed=7)
    assert kills == 20 and acked >= 20


def test_gallery_works_where_torch_is_absent(tmp_path: Path) -> None:
    source = Path(sys.modules[Gallery.__module__].__file__).read_text()
    assert not re.search(r"^\s*(import|from)\s+torch", source, re.MULTILINE)
    # Block torch outright (sys.modules[name] = None makes `import torch` fail), then use the gallery.
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np\n"
        "from dmf_deploy.runtime.gallery import Gallery\n"
        "g = Gallery('fp', (2, 2), {'w': (2,)})\n"
        "r = g.add_shots('a', np.ones((2, 2)), 1, np.zeros((8, 8, 3), np.uint8))\n"
        "g.set_bank(r, {'w': np.ones(2)})\n"
        "g.save(sys.argv[1]); assert Gallery.load(sys.argv[1], 'fp').names == ['a']\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "g.dmfg")], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


# ------------------------------------------------------------------ format versions and bank dtypes


@pytest.mark.parametrize("version", [1, 2])
def test_old_versions_open_and_the_first_save_converts_beside_them(tmp_path: Path, version: int) -> None:
    """0.1.0 wrote version 1 (no bank_dtypes: float32 banks), 0.2 version 2: both open; the first save
    writes g.v3.dmfg beside the old file, which is left as it was, and later opens of g.dmfg open it."""
    g = filled(3)
    path = save_v2(g, tmp_path / "g.dmfg", version=version)
    original = path.read_bytes()
    loaded = Gallery.load(path, FP)
    assert loaded.names == g.names and loaded.bank_dtypes == dict.fromkeys(BANK_SHAPES, "float32")
    assert loaded.path is None and loaded.unsaved
    assert_same(snapshot(g), snapshot(loaded))
    written = loaded.save()  # no path: its own, the old file's converted name
    assert written == converted_path(path) == tmp_path / "g.v3.dmfg"
    assert path.read_bytes() == original
    enroll(loaded, "after", np.ones((1, *FEATURE_SHAPE), np.float32))
    assert loaded.save(path) == written  # saving to the old path means its own file now
    loaded.close()
    assert path.read_bytes() == original
    again = Gallery.load(path, FP)
    assert again.path == written and again.names == [*g.names, "after"] and again.missing_banks == []


def test_float16_banks_are_stored_and_loaded_as_float16(tmp_path: Path) -> None:
    dtypes = {**dict.fromkeys(BANK_SHAPES, "float32"), "tap_projections": "float16"}
    g = Gallery(FP, FEATURE_SHAPE, BANK_SHAPES, "half banks", dtypes)
    row = g.add_shots("a", np.ones(FEATURE_SHAPE, np.float32), 1)
    g.set_bank(row, fake_bank(g.prototype(row)))
    taps = g.bank_arrays()["tap_projections"].copy()
    assert taps.dtype == np.float16
    loaded = Gallery.load(saved(g, tmp_path / "g.dmfg"), FP)
    assert loaded.bank_dtypes == dtypes
    assert {k: a.dtype.name for k, a in loaded.bank_arrays().items()} == dtypes
    np.testing.assert_array_equal(loaded.bank_arrays()["tap_projections"], taps)


@pytest.mark.parametrize(
    "bank_dtypes", ["float32", {"class_weight": "float32"}, dict.fromkeys(BANK_SHAPES, "float64")]
)
def test_bad_bank_dtypes_are_refused(tmp_path: Path, bank_dtypes) -> None:
    path = save_v2(filled(2), tmp_path / "g.dmfg")
    rewrite(path, {**read_header(path), "bank_dtypes": bank_dtypes})
    with pytest.raises(GalleryError, match="bank_dtypes|bank dtype"):
        Gallery.load(path, FP)
    with pytest.raises(GalleryError, match="bank_dtypes|bank dtype"):
        Gallery(FP, FEATURE_SHAPE, BANK_SHAPES, "", bank_dtypes)


def test_feature_sums_are_checked_a_block_at_a_time_and_the_first_bad_class_named():
    """A version 1/2 file's sums are checked a block of rows at a time; the error is the one the first
    failing class alone gives (a bad row past the first block of 1,024 included)."""
    from dmf_deploy.runtime.gallery_checks import MAX_PROTOTYPE_ABS, check_feature_sums

    names = [f"c{i}" for i in range(3000)]
    counts = [2] * 3000
    sums = np.ones((3000, 2, 3), np.float64)
    check_feature_sums("g.dmfg", names, sums, counts)  # all sound: no error
    sums[2500, 1, 2] = 2.5 * MAX_PROTOTYPE_ABS  # 1.25 x the bound once divided by its 2 shots
    sums[2900, 0, 0] = np.nan
    with pytest.raises(GalleryError, match=r"g.dmfg: the features of 'c2500' reach .* beyond any backbone"):
        check_feature_sums("g.dmfg", names, sums, counts)
    sums[1200, 0, 1] = np.inf
    with pytest.raises(GalleryError, match=r"the feature sum of 'c1200' contains NaN or infinity"):
        check_feature_sums("g.dmfg", names, sums, counts)
    counts[2500] = 3  # the same sum over 3 shots is within the bound
    sums[1200, 0, 1] = sums[2900, 0, 0] = 1.0
    check_feature_sums("g.dmfg", names, sums, counts)
