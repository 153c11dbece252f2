"""Property-based fuzzing of the gallery reader: any bytes give a Gallery or a GalleryError, never
another exception, within 1 s of CPU and 256 MB of memory (checked in a child with a memory limit that
opens each file and reads every sum and thumbnail in it).

Input: arbitrary bytes (bare, or after a zip or SQLite magic); a real gallery file, version 3 (SQLite)
or version 2 (.npz, 0.2's), with bytes changed, cut or inserted; and a well-formed version 2 archive
whose JSON header holds arbitrary values. Example counts are modest (the CI machine
has 2 cores); Hypothesis is derandomised so a CI failure reproduces locally.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from bounded_reader import BoundedReader
from bundles import apply_edits, byte_edits, filled, json_values, npz_members, save_v2, saved, savez
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

CPU_BOUND_S = 1.0  # the bound per file; CPU time, so a busy CI machine does not inflate it
FUZZ = settings(
    max_examples=150,
    deadline=None,  # timing is checked in the child, on CPU time
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def reader() -> Iterator[BoundedReader]:
    child = BoundedReader(memory_mb=256)
    yield child
    child.close()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def good_file(workdir: Path) -> Path:
    return save_v2(filled(3), workdir / "good.dmfg")


@pytest.fixture(scope="module")
def good_database(workdir: Path) -> Path:
    return saved(filled(3), workdir / "good3.dmfg")


def check(reader: BoundedReader, path: Path, data: bytes) -> None:
    path.write_bytes(data)
    answer = reader.load(path)
    assert answer["outcome"] in ("ok", "GalleryError"), answer["message"]
    assert answer["cpu_s"] < CPU_BOUND_S, answer


@FUZZ
@given(
    data=st.one_of(
        st.binary(max_size=4096),
        st.binary(max_size=4096).map(lambda b: b"PK\x03\x04" + b),
        st.binary(max_size=4096).map(lambda b: b"SQLite format 3\x00" + b),
    )
)
def test_arbitrary_bytes(reader: BoundedReader, workdir: Path, data: bytes) -> None:
    check(reader, workdir / "bytes.dmfg", data)


@FUZZ
@given(edits=byte_edits())
def test_mutated_gallery(
    reader: BoundedReader, workdir: Path, good_file: Path, edits: list[tuple[str, float, bytes]]
) -> None:
    check(reader, workdir / "mutated.dmfg", apply_edits(good_file.read_bytes(), edits))


@FUZZ
@given(edits=byte_edits())
def test_mutated_database(
    reader: BoundedReader, workdir: Path, good_database: Path, edits: list[tuple[str, float, bytes]]
) -> None:
    check(reader, workdir / "mutated3.dmfg", apply_edits(good_database.read_bytes(), edits))


json_value = json_values(allow_nan=False)
header_key = st.sampled_from(["feature_shape", "bank_shapes", "classes", "feature_dtype", "format_version"])


@FUZZ
@given(
    changes=st.dictionaries(header_key, json_value, max_size=3),
    # Counts near and past the int32/int64 limits, where numpy overflows, as often as any other value.
    shots=st.builds(lambda k, d: 2**k + d, st.integers(0, 100), st.integers(-2, 2)) | json_value,
)
def test_arbitrary_header_values(
    reader: BoundedReader, workdir: Path, good_file: Path, changes: dict, shots: object
) -> None:
    members = npz_members(good_file)
    header = json.loads(members["header"].tobytes())
    header["classes"][0]["shots"] = shots
    header.update(changes)
    members["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    path = workdir / "header.dmfg"
    savez(path, **members)
    check(reader, path, path.read_bytes())
