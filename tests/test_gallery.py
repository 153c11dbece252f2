"""The Gallery: contiguous row storage, names, running means, and a file that survives kill -9.

Real files and real processes only; nothing is mocked.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
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
    enroll,
    fake_bank,
    filled,
    new_gallery,
    npz_members,
    read_header,
    rewrite,
    savez,
    snapshot,
)

from dmf_deploy.names import InvalidClassName
from dmf_deploy.runtime.gallery import (
    FORMAT,
    MAX_HEADER_BYTES,
    Gallery,
    GalleryError,
    GalleryNotFoundError,
)


def temp_files(folder: Path, name: str) -> list[Path]:
    return [p for p in folder.iterdir() if re.fullmatch(re.escape(f".{name}.") + r".+\.tmp", p.name)]


# ---------------------------------------------------------------------------------------------- storage


def test_round_trip_is_bit_exact(tmp_path: Path) -> None:
    g = filled(7)
    path = g.save(tmp_path / "g.dmfg")
    back = Gallery.load(path, FP)
    assert back.fingerprint == FP and back.model_description == "conv4 test model"
    assert back.feature_shape == FEATURE_SHAPE and back.bank_shapes == BANK_SHAPES
    assert_same(snapshot(g), snapshot(back))
    assert back.thumbnail("class 0") is not None and back.thumbnail("class 1") is None
    for row in range(len(g)):
        assert np.array_equal(g.prototype(row), back.prototype(row))
    # The loaded gallery is fully usable: it saves the same content again, and grows.
    back.save(tmp_path / "again.dmfg")
    assert_same(snapshot(g), snapshot(Gallery.load(tmp_path / "again.dmfg", FP)))
    enroll(back, "one more", np.ones((1, *FEATURE_SHAPE), np.float32))
    assert back.names[-1] == "one more" and len(back) == 8


def test_empty_gallery_round_trips(tmp_path: Path) -> None:
    new_gallery().save(tmp_path / "empty.dmfg")
    back = Gallery.load(tmp_path / "empty.dmfg", FP)
    assert len(back) == 0 and back.names == []
    assert all(a.shape == (0, *BANK_SHAPES[k]) for k, a in back.bank_arrays().items())


def test_file_members_and_header(tmp_path: Path) -> None:
    path = filled(3).save(tmp_path / "g.dmfg")
    members = npz_members(path)
    assert set(members) == {
        "header",
        "feature_sums",
        "thumbnail_bytes",
        "thumbnail_offsets",
        "bank.support_offset",
        "bank.tap_projections",
        "bank.class_weight",
    }
    assert all(a.dtype != object for a in members.values())
    header = read_header(path)
    assert header["format"] == FORMAT and header["format_version"] == 2
    assert header["fingerprint"] == FP and header["feature_shape"] == list(FEATURE_SHAPE)
    assert [c["name"] for c in header["classes"]] == ["class 0", "class 1", "class 2"]
    assert [c["shots"] for c in header["classes"]] == [1, 2, 3]
    for c in header["classes"]:
        assert datetime.fromisoformat(c["created"]).tzinfo == timezone.utc
        assert c["created"] <= c["updated"]


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
    assert np.shares_memory(a, b) and np.shares_memory(g.feature_sums, g.feature_sums)
    with pytest.raises(ValueError):
        a[0] = 1.0
    with pytest.raises(ValueError):
        g.counts[0] = 5


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
    loaded = Gallery.load(g.save(tmp_path / "g.dmfg"), FP)
    assert loaded.bank_shapes == channel_last and loaded.missing_banks == []


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
    # More shots keep the first thumbnail.
    g.add_shots("red", np.ones(FEATURE_SHAPE), 1, np.zeros((64, 64, 3), np.uint8))
    assert cv2.imdecode(np.frombuffer(g.thumbnail("red"), np.uint8), cv2.IMREAD_COLOR)[..., 2].mean() > 240


# ------------------------------------------------------------------------------------------ bad files


def test_missing_file_is_a_clear_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(GalleryNotFoundError, match="does not exist") as info:
        Gallery.load(tmp_path / "nope.dmfg", FP)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, GalleryError)


def test_random_bytes_are_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    for i, prefix in enumerate([b"", b"PK\x03\x04", b"\x93NUMPY"]):
        path = tmp_path / f"junk{i}.dmfg"
        path.write_bytes(prefix + rng.integers(0, 256, 20000, dtype=np.uint8).tobytes())
        with pytest.raises(GalleryError):
            Gallery.load(path, FP)


@pytest.mark.parametrize("fraction", [0.5, 0.1, 0.9, 0.999])
def test_truncated_file_is_refused(tmp_path: Path, fraction: float) -> None:
    path = filled(5).save(tmp_path / "g.dmfg")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(GalleryError, match="corrupt"):
        Gallery.load(path, FP)


def test_flipped_byte_in_array_data_is_refused(tmp_path: Path) -> None:
    path = filled(5).save(tmp_path / "g.dmfg")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the arrays; the zip CRC catches it
    path.write_bytes(bytes(data))
    with pytest.raises(GalleryError, match="corrupt"):
        Gallery.load(path, FP)


def test_gallery_of_another_model_names_both_models(tmp_path: Path) -> None:
    path = Gallery("f" * 64, FEATURE_SHAPE, BANK_SHAPES, "resnet12 miniImageNet").save(tmp_path / "g.dmfg")
    with pytest.raises(GalleryError) as info:
        Gallery.load(path, FP, "conv4 omniglot")
    message = str(info.value)
    assert "resnet12 miniImageNet" in message and "conv4 omniglot" in message
    assert "f" * 12 in message and FP[:12] in message


def test_wrong_format_or_version_is_refused(tmp_path: Path) -> None:
    path = filled(2).save(tmp_path / "g.dmfg")
    header = read_header(path)
    rewrite(path, {**header, "format_version": 3})
    with pytest.raises(GalleryError, match="version 3; this runtime reads versions 1 and 2"):
        Gallery.load(path, FP)
    rewrite(path, {**header, "format": "dmf-bundle"})
    with pytest.raises(GalleryError, match="not a dmf-gallery"):
        Gallery.load(path, FP)
    np.save(tmp_path / "bare.npy", np.zeros(3))  # a valid numpy file, but no archive
    with pytest.raises(GalleryError, match="not an .npz"):
        Gallery.load(tmp_path / "bare.npy", FP)


def test_arrays_inconsistent_with_the_header_are_refused(tmp_path: Path) -> None:
    path = filled(3).save(tmp_path / "g.dmfg")
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
    path = filled(2).save(tmp_path / "g.dmfg")
    header = read_header(path)
    header["classes"][1]["name"] = bad  # "class 0" duplicates row 0
    rewrite(path, header)
    with pytest.raises(GalleryError):
        Gallery.load(path, FP)


def test_oversized_header_is_refused_before_parsing(tmp_path: Path) -> None:
    path = filled(1).save(tmp_path / "g.dmfg")
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
        filled(2).save(path)
        members = npz_members(path)
        members[where] = np.array([exploit, exploit, exploit], dtype=object)
        savez(path, **members)  # np.savez pickles object arrays
    with pytest.raises(GalleryError):
        Gallery.load(path, FP)
    assert not marker.exists()


# ------------------------------------------------------------------------------- crash safety, no torch


def test_stale_temp_files_are_cleaned_but_fresh_and_foreign_ones_kept(tmp_path: Path) -> None:
    target = tmp_path / "g.dmfg"
    old = tmp_path / ".g.dmfg.abc123xy.tmp"
    fresh = tmp_path / ".g.dmfg.zz99zz99.tmp"
    foreign = tmp_path / ".other.dmfg.abc123xy.tmp"
    for p in (old, fresh, foreign):
        p.write_bytes(b"partial")
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))
    os.utime(foreign, (an_hour_ago, an_hour_ago))
    filled(2).save(target)
    assert not old.exists() and fresh.exists() and foreign.exists()
    assert temp_files(tmp_path, "g.dmfg") == [fresh]
    assert len(Gallery.load(target, FP)) == 2


KILL_FP = "kill-test-model"
KILL_CAP = 48  # classes; then the child keeps adding shots to existing ones
KILL_SHAPE = (64, 11, 11)  # resnet12-sized maps make each save a few MB, so kills land mid-write

# The child: open the gallery at argv[1] (or start one), report how many classes it found, then save
# forever, one more class (or one more shot) per save. Class j's every shot is (j+1)*pattern, so a
# consistent file has sums[j] == (j+1)*pattern*counts[j] and its bank is a fixed function of that.
CHILD = r"""
import sys
import numpy as np
from dmf_deploy.runtime.gallery import Gallery, GalleryNotFoundError

path, cap, fp = sys.argv[1], int(sys.argv[2]), sys.argv[3]
shape = (64, 11, 11)
pattern = (np.arange(np.prod(shape)) % 97).reshape(shape).astype(np.float32)
try:
    g = Gallery.load(path, fp)
except GalleryNotFoundError:
    g = Gallery(fp, shape, {"support_offset": (18, 11, 11), "class_weight": (64,)}, "kill test")
print("ready", len(g), flush=True)
frame = np.full((40, 40, 3), 7, np.uint8)
i = 0
while True:
    j = len(g) if len(g) < cap else i % cap
    row = g.add_shots(f"class {j}", pattern * (j + 1), 1, frame if j % 3 == 0 else None)
    p = g.prototype(row)
    g.set_bank(row, {"support_offset": p[:18], "class_weight": p.mean(axis=(1, 2))})
    g.save(path)
    i += 1
"""


def check_kill_gallery(g: Gallery) -> None:
    pattern = (np.arange(np.prod(KILL_SHAPE)) % 97).reshape(KILL_SHAPE).astype(np.float32)
    assert g.names == [f"class {j}" for j in range(len(g))]
    banks = g.bank_arrays()
    for j in range(len(g)):
        assert np.array_equal(g.feature_sums[j], pattern * (j + 1) * g.counts[j]), f"row {j} is mixed"
        p = g.prototype(j)
        assert np.array_equal(p, pattern * (j + 1))
        assert np.array_equal(banks["support_offset"][j], p[:18])
        assert np.array_equal(banks["class_weight"][j], p.mean(axis=(1, 2)))
        assert (g.thumbnail(f"class {j}") is not None) == (j % 3 == 0)


def test_kill_minus_9_during_saves_never_loses_saved_classes(tmp_path: Path) -> None:
    """SIGKILL a saving process at random moments: the file always reopens with everything saved before.

    A kill can leave at most one temp file beside the gallery (the save it interrupted); those
    leftovers never accumulate beyond one per kill, and a later save removes them once stale.
    """
    rng = random.Random(20240611)
    path = tmp_path / "g.dmfg"
    rounds, budget_end = 14, time.monotonic() + 25.0
    saved_before = 0  # classes the file held when the round started
    kills = kills_mid_save = 0
    for _ in range(rounds):
        if time.monotonic() > budget_end:
            break
        temps_before = len(temp_files(tmp_path, path.name))  # before the child can start a save
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(path), str(KILL_CAP), KILL_FP],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = child.stdout.readline()
        if not line.startswith("ready"):
            child.kill()
            pytest.fail(f"the saving child did not start: {line!r} {child.communicate()[1]}")
        assert int(line.split()[1]) == saved_before  # it opened exactly what we verified last round
        time.sleep(rng.uniform(0.0, 0.35))
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        child.stdout.close()
        child.stderr.close()
        assert child.returncode == -signal.SIGKILL, "the child died before it was killed"
        kills += 1

        if saved_before == 0 and not path.exists():
            continue  # killed before its first save finished: nothing was promised yet
        g = Gallery.load(path, KILL_FP)
        assert len(g) >= saved_before
        check_kill_gallery(g)
        saved_before = len(g)
        temps = len(temp_files(tmp_path, path.name))
        assert temps <= temps_before + 1  # one interrupted save, one leftover at most
        kills_mid_save += temps - temps_before

    assert kills > 10
    assert saved_before >= 10, "the children made too little progress to test anything"
    # At least one kill landed inside a save (else this test proved nothing about atomicity).
    assert kills_mid_save >= 1
    assert len(temp_files(tmp_path, path.name)) <= kills

    # Leftovers are harmless, and the next save clears them once they are stale.
    long_ago = time.time() - 3600
    for leftover in temp_files(tmp_path, path.name):
        os.utime(leftover, (long_ago, long_ago))
    g = Gallery.load(path, KILL_FP)
    g.save(path)
    assert temp_files(tmp_path, path.name) == []
    check_kill_gallery(Gallery.load(path, KILL_FP))


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


def test_version_1_gallery_still_opens_with_float32_banks(tmp_path: Path) -> None:
    """0.1.0 wrote version 1: the same members, a header without bank_dtypes (float32 banks)."""
    g = filled(3)
    path = g.save(tmp_path / "g.dmfg")
    header = read_header(path)
    assert header["format_version"] == 2 and header["bank_dtypes"] == dict.fromkeys(BANK_SHAPES, "float32")
    del header["bank_dtypes"]
    rewrite(path, {**header, "format_version": 1})
    loaded = Gallery.load(path, FP)
    assert loaded.names == g.names and loaded.bank_dtypes == dict.fromkeys(BANK_SHAPES, "float32")
    for key, array in g.bank_arrays().items():
        np.testing.assert_array_equal(loaded.bank_arrays()[key], array)
    assert read_header(loaded.save(path))["format_version"] == 2  # saved again: version 2


def test_float16_banks_are_stored_and_loaded_as_float16(tmp_path: Path) -> None:
    dtypes = {**dict.fromkeys(BANK_SHAPES, "float32"), "tap_projections": "float16"}
    g = Gallery(FP, FEATURE_SHAPE, BANK_SHAPES, "half banks", dtypes)
    row = g.add_shots("a", np.ones(FEATURE_SHAPE, np.float32), 1)
    g.set_bank(row, fake_bank(g.prototype(row)))
    assert g.bank_arrays()["tap_projections"].dtype == np.float16
    loaded = Gallery.load(g.save(tmp_path / "g.dmfg"), FP)
    assert loaded.bank_dtypes == dtypes
    assert {k: a.dtype.name for k, a in loaded.bank_arrays().items()} == dtypes
    np.testing.assert_array_equal(loaded.bank_arrays()["tap_projections"], g.bank_arrays()["tap_projections"])


@pytest.mark.parametrize(
    "bank_dtypes", ["float32", {"class_weight": "float32"}, dict.fromkeys(BANK_SHAPES, "float64")]
)
def test_bad_bank_dtypes_are_refused(tmp_path: Path, bank_dtypes) -> None:
    path = filled(2).save(tmp_path / "g.dmfg")
    rewrite(path, {**read_header(path), "bank_dtypes": bank_dtypes})
    with pytest.raises(GalleryError, match="bank_dtypes|bank dtype"):
        Gallery.load(path, FP)
    with pytest.raises(GalleryError, match="bank_dtypes|bank dtype"):
        Gallery(FP, FEATURE_SHAPE, BANK_SHAPES, "", bank_dtypes)
