"""dmf_deploy/packaged.py: "demo" names the packaged files from any working directory."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dmf_deploy.packaged import DEMO_BUNDLE, DEMO_CHECKPOINT, demo_bundle_installed, resolve_bundle_path
from dmf_deploy.runtime import Recognizer


def test_demo_is_the_packaged_bundle_and_a_path_is_a_path():
    assert resolve_bundle_path("demo") == DEMO_BUNDLE
    assert resolve_bundle_path(Path("demo")) == DEMO_BUNDLE  # the same name however it is passed
    assert resolve_bundle_path("./demo") == Path("demo")  # a folder called demo, written as a path
    assert resolve_bundle_path("bundles/demo") == Path("bundles/demo")
    assert DEMO_BUNDLE.is_absolute() and DEMO_CHECKPOINT.parent == DEMO_BUNDLE.parent


@pytest.mark.skipif(not demo_bundle_installed(), reason="the demo bundle is not installed")
def test_open_demo_from_elsewhere_and_a_local_demo_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(DEMO_BUNDLE, tmp_path / "demo")  # a folder literally named "demo" here
    assert Recognizer.open("demo", backend="onnxruntime").bundle == DEMO_BUNDLE
    assert Recognizer.open("./demo", backend="onnxruntime").bundle == Path("demo")


def test_demo_checkpoint_resolves_from_the_same_place():
    pytest.importorskip("torch")
    from dmf_deploy.checkpoint import resolve_checkpoint

    if DEMO_CHECKPOINT.is_file():
        assert resolve_checkpoint("demo") == DEMO_CHECKPOINT
