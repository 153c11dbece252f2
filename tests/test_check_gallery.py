"""`dmf-run --check-gallery`: the full check of a gallery, through the real console script, on real files.

Galleries are enrolled through the public API with the packaged demo bundle, then damaged as a bad disk
or a hand edit would: bytes of a stored blob changed in place with the sqlite3 module, which keeps no
checksum of its own (the gallery's CRC-32 of every sum and thumbnail is what finds them).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest
from bundles import dmf_run_command, pen_frame  # tests/bundles.py

from dmf_deploy.manifest import read_manifest
from dmf_deploy.packaged import DEMO_BUNDLE, demo_bundle_installed
from dmf_deploy.runtime import Gallery, Recognizer
from dmf_deploy.runtime.gallery import bank_cache_folder, converted_path

pytestmark = pytest.mark.skipif(not demo_bundle_installed(), reason="the demo bundle is not installed")

CLASSES = [f"class {i}" for i in range(5)]
DATA = Path(__file__).parent / "data" / "demo-0.2"
TIMEOUT = 60


@pytest.fixture(scope="module")
def sound(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A gallery of five classes, saved and closed (one file), without its bank cache."""
    path = tmp_path_factory.mktemp("sound") / "g.dmfg"
    with Recognizer.open(DEMO_BUNDLE, gallery=path) as rec:
        for i, name in enumerate(CLASSES):
            rec.enroll(name, [pen_frame(i)])
        rec.save()
    shutil.rmtree(bank_cache_folder(path))
    return path


def check(*args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    command = [*dmf_run_command(), "--check-gallery", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, env=env)


def damage_blob(path: Path, table: str, column: str, class_name: str) -> None:
    """Flip one bit in the middle of a class's stored blob, in place (its CRC left as it was)."""
    db = sqlite3.connect(path)
    (class_id,) = db.execute("SELECT id FROM classes WHERE name = ?", (class_name,)).fetchone()
    rowid, blob = db.execute(
        f"SELECT rowid, {column} FROM {table} WHERE class_id = ?", (class_id,)
    ).fetchone()
    data = bytearray(blob)
    data[len(data) // 2] ^= 0x10
    db.execute(f"UPDATE {table} SET {column} = ? WHERE rowid = ?", (bytes(data), rowid))
    db.commit()
    db.close()


def test_a_sound_gallery_passes_and_the_check_changes_nothing(sound: Path) -> None:
    before = hashlib.sha256(sound.read_bytes()).hexdigest()
    done = check("--gallery", sound)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"gallery {sound}: sound, 5 classes (SQLite quick_check, every feature sum and thumbnail read)"
    ]
    # It only reads: the file is as it was, no bank cache was made, no write-ahead log is left.
    assert hashlib.sha256(sound.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in sound.parent.iterdir()) == ["g.dmfg"]


def test_damaged_sums_and_thumbnails_are_reported_by_class(sound: Path, tmp_path: Path) -> None:
    path = Path(shutil.copy(sound, tmp_path / "g.dmfg"))
    damage_blob(path, "sums", "data", "class 1")
    damage_blob(path, "thumbnails", "jpeg", "class 1")  # the same class: a bad sum must not hide it
    damage_blob(path, "thumbnails", "jpeg", "class 3")
    # Opening the file reads no sum or thumbnail, so it does not see the damage: the full check does.
    with Gallery.load(path, read_manifest(DEMO_BUNDLE).fingerprint, bank_cache=False) as gallery:
        assert gallery.names == CLASSES
    done = check("--gallery", path)
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert lines == [
        f"{path} is corrupt: the feature sum of 'class 1' fails its CRC",
        f"{path} is corrupt: a thumbnail of 'class 1' fails its CRC",
        f"{path} is corrupt: a thumbnail of 'class 3' fails its CRC",
        f"gallery {path}: 3 problems found",
    ]
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "content",
    [b"", b"not a gallery\n" * 100, b"SQLite format 3\x00" + bytes(4000), "sqlite of another application"],
)
def test_a_file_that_is_not_a_gallery_fails_in_one_line(tmp_path: Path, content: bytes | str) -> None:
    path = tmp_path / "g.dmfg"
    if isinstance(content, str):  # a real SQLite database, not ours
        db = sqlite3.connect(path)
        db.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY, data BLOB)")
        db.commit()
        db.close()
    else:
        path.write_bytes(content)
    done = check("--gallery", path)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.startswith(f"dmf-run: error: cannot check the gallery {path}: ")
    assert len(done.stderr.splitlines()) == 1 and "Traceback" not in done.stderr


def test_a_missing_gallery_fails_and_a_source_is_refused(tmp_path: Path) -> None:
    done = check("--gallery", tmp_path / "none.dmfg")
    assert done.returncode == 1 and "does not exist" in done.stderr
    assert not (tmp_path / "none.dmfg").exists()
    done = check("--gallery", tmp_path / "none.dmfg", "--source", tmp_path / "clip.mp4")
    assert done.returncode == 2 and "give no --camera or --source" in done.stderr


def test_without_gallery_it_checks_the_bundles_default_gallery(sound: Path, tmp_path: Path) -> None:
    fingerprint = read_manifest(DEMO_BUNDLE).fingerprint
    default = tmp_path / "data" / "dmf-deploy" / "galleries" / f"{fingerprint[:16]}.dmfg"
    default.parent.mkdir(parents=True)
    shutil.copy(sound, default)
    damage_blob(default, "sums", "data", "class 4")
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "data")}  # where the default gallery lives
    done = check(env=env)
    assert done.returncode == 1
    assert done.stdout.splitlines() == [
        f"{default} is corrupt: the feature sum of 'class 4' fails its CRC",
        f"gallery {default}: 1 problem found",
    ]


def test_a_version_2_gallery_of_0_2_is_checked_and_left_as_it_is(tmp_path: Path) -> None:
    path = Path(shutil.copy(DATA / "gallery-v2.dmfg", tmp_path / "g.dmfg"))
    done = check("--bundle", DATA / "bundle", "--gallery", path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"gallery {path}: sound, 5 classes (an .npz gallery of version 1 or 2, read whole)"
    ]
    assert not converted_path(path).exists()
    assert path.read_bytes() == (DATA / "gallery-v2.dmfg").read_bytes()
