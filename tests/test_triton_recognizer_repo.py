"""The dmf_recognizer model folder `dmf-export --triton` writes, and `dmf-serve` without the serve extra.

No server here (tests/test_triton_server.py runs one): these hold without the serve extra too.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dmf_deploy.export.triton import write_triton_repository
from dmf_deploy.export.triton_recognizer import GALLERY_FILE, MODEL_NAME, RECOGNIZER_MAX_BATCH
from dmf_deploy.manifest import read_manifest, sha256_file
from dmf_deploy.names import InvalidClassName
from dmf_deploy.packaged import DEMO_BUNDLE
from dmf_deploy.preprocess import InvalidFrame
from dmf_deploy.runtime.gallery import GalleryError
from dmf_deploy.runtime.serve import triton_model

# dmf_recognizer as `dmf-export --triton` wrote it at 0.2 (commit b549139): its config.pbtxt and its
# model.py (runtime/serve/triton_model.py of then), verbatim. Served in test_triton_server.py.
OLD_RECOGNIZER = Path(__file__).parent / "data" / "triton-0.2" / MODEL_NAME


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


def test_a_0_2_model_py_finds_what_it_imports() -> None:
    """A repository exported at 0.2 keeps its model.py: every dmf_deploy name it imports must exist."""
    path = OLD_RECOGNIZER / "1" / "model.py"
    text = path.read_text()
    wanted = [
        (node.module, alias.name)
        for node in ast.walk(ast.parse(text))
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dmf_deploy")
        for alias in node.names
    ]
    assert ("dmf_deploy.runtime.gallery", "GalleryError") in wanted
    assert ("dmf_deploy.runtime.recognizer", "Recognizer") in wanted
    for module, name in wanted:
        assert hasattr(importlib.import_module(module), name), f"{module}.{name}"

    # Loaded as Triton loads it (a file, not a package module); its error mapping imports lazily.
    spec = importlib.util.spec_from_file_location("dmf_recognizer_model_0_2", path)
    model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(model)
    assert model.error_kind(GalleryError("x")) == "GalleryError"
    assert model.error_kind(InvalidFrame("x")) == "InvalidFrame"
    assert model.error_kind(InvalidClassName("x")) == "InvalidClassName"


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
