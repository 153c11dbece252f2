"""The dmf_recognizer model folder `dmf-export --triton` writes, and `dmf-serve` without the serve extra.

No server here (tests/test_triton_server.py runs one): these hold without the serve extra too.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dmf_deploy.export.triton import write_triton_repository
from dmf_deploy.export.triton_recognizer import GALLERY_FILE, MODEL_NAME, RECOGNIZER_MAX_BATCH
from dmf_deploy.manifest import read_manifest, sha256_file
from dmf_deploy.packaged import DEMO_BUNDLE
from dmf_deploy.runtime import triton_model


def test_recognizer_model_folder(tmp_path: Path) -> None:
    out = tmp_path / "repo"
    manifest = read_manifest(DEMO_BUNDLE)
    write_triton_repository(DEMO_BUNDLE, manifest, out)
    model = out / MODEL_NAME
    assert (model / "1" / "model.py").read_bytes() == Path(triton_model.__file__).read_bytes()
    for graph in manifest.graphs.values():  # the bundle travels with the model, unchanged
        assert sha256_file(model / "1" / "bundle" / graph.file) == graph.sha256
    assert "open_set.json" in manifest.files()  # travels too: the runtime refuses a bundle without it
    for name in manifest.files():
        assert (model / "1" / "bundle" / name).read_bytes() == (DEMO_BUNDLE / name).read_bytes()
    config = (model / "config.pbtxt").read_text()
    assert 'backend: "python"' in config and f"max_batch_size: {RECOGNIZER_MAX_BATCH}" in config
    assert "dynamic_batching" in config and f'string_value: "{GALLERY_FILE}"' in config
    readme = (out / "README.md").read_text()
    assert "## Which to use when" in readme and "dmf-serve --repo" in readme

    # The server's gallery is state: a second export must keep it, byte for byte.
    gallery = model / GALLERY_FILE
    gallery.write_bytes(b"enrolled classes")
    write_triton_repository(DEMO_BUNDLE, manifest, out)
    assert gallery.read_bytes() == b"enrolled classes"


@pytest.mark.parametrize("shape", [(1, 0), (3, 0), (0, 5), (2, 0, 4), (2, 3)])
def test_outputs_have_the_strides_the_stubs_dlpack_check_wants(shape: tuple[int, ...]) -> None:
    """The Python stub takes a DLPack tensor only if each stride is the product of the later dimensions;
    numpy gives an empty array (an empty gallery's scores, [B, 0]) strides of 0 (issue 29, item 7)."""
    array = triton_model.c_order(np.zeros(shape, np.float32))
    assert array.shape == shape and array.dtype == np.float32
    wanted = [int(np.prod(shape[axis + 1 :])) * array.itemsize for axis in range(len(shape))]
    assert list(array.strides) == wanted


def test_dmf_serve_without_the_extra_says_what_to_install(tmp_path: Path) -> None:
    # A plain module named pytriton first on the path: not the wheel's package, as where it is absent.
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "pytriton.py").write_text("")
    path = os.pathsep.join(filter(None, [str(blocker), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path)
    result = subprocess.run(
        [sys.executable, "-m", "dmf_deploy.runtime.serve", "--repo", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert 'pip install "dmf-deploy[serve]"' in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("port", ["0", "70000"])
def test_dmf_serve_refuses_a_bad_port(tmp_path: Path, port: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dmf_deploy.runtime.serve", "--repo", str(tmp_path), "--http-port", port],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "--http-port" in result.stderr
