"""Hostile input to dmf-export and checkpoint loading: named errors, nothing deleted that was not a bundle.

Each test is a regression of a failure found by an adversarial pass over 0.1.0 (issue "Hardening").
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from bundles import make_checkpoint

from dmf_deploy.atomic import exchange_folders
from dmf_deploy.checkpoint import CheckpointError, load_checkpoint
from dmf_deploy.export.bundle import STALE_EXPORT_SECONDS, ExportError, export_bundle
from dmf_deploy.manifest import FORMAT_VERSION, MANIFEST_NAME
from dmf_deploy.open_set import OPEN_SET_FILE
from dmf_deploy.packaged import DEMO_BUNDLE

CLI_TIMEOUT_S = 300  # an import of torch + onnx on a busy 2-core machine, with room to spare


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt")


def dmf_export(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "60"}  # a narrow terminal: messages must not wrap mid-sentence
    return subprocess.run(
        [sys.executable, "-m", "dmf_deploy.export.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )


# --------------------------------------------------------------------------------------- --force


def test_force_refuses_a_folder_that_is_not_a_bundle(tmp_path: Path, ckpt: Path) -> None:
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "chapter1.tex").write_text("years of work")
    with pytest.raises(ExportError, match="replaces only an empty folder or a dmf bundle"):
        export_bundle(ckpt, thesis, force=True, check=False)
    assert (thesis / "chapter1.tex").read_text() == "years of work"


def test_force_refuses_a_bundle_holding_files_its_manifest_does_not_name(tmp_path: Path, ckpt: Path) -> None:
    out = tmp_path / "bundle"
    out.mkdir()
    (out / MANIFEST_NAME).write_text(json.dumps({"format": "dmf-bundle", "graphs": {}}))
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match=r"does not name \(notes.txt\)"):
        export_bundle(ckpt, out, force=True, check=False)
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.slow  # an export: 20 to 75 s on two cores
def test_force_replaces_an_empty_folder_then_a_bundle_of_any_version(tmp_path: Path, ckpt: Path) -> None:
    out = tmp_path / "bundle"
    out.mkdir()
    export_bundle(ckpt, out, force=True, check=False)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    # What an older or newer dmf-export and a TensorRT build leave in a bundle is still a bundle.
    (out / MANIFEST_NAME).write_text(json.dumps({**manifest, "format_version": 99}))
    (out / "parity.json").write_text("{}")
    (out / "backbone.trt10.8.0.sm89.fp16.plan").write_bytes(b"engine")
    # Leftovers of killed exports: old ones are cleaned, a fresh one (an export running now) is kept.
    stale = [tmp_path / ".bundle.abc123.partial", tmp_path / ".bundle.old-4242"]
    fresh = tmp_path / ".bundle.xyz789.partial"
    for folder in (*stale, fresh):
        folder.mkdir()
        (folder / "backbone.onnx").write_bytes(b"x")
    long_ago = time.time() - STALE_EXPORT_SECONDS - 60
    for folder in stale:
        os.utime(folder, (long_ago, long_ago))
    export_bundle(ckpt, out, force=True, check=False)
    assert json.loads((out / MANIFEST_NAME).read_text())["format_version"] == FORMAT_VERSION
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [MANIFEST_NAME, "backbone.onnx", "support.onnx", "head.onnx", OPEN_SET_FILE, "explain.onnx"]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [fresh.name, "bundle"]


def test_exchange_swaps_two_folders_in_one_step(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "from_a").touch()
    (b / "from_b").touch()
    if not exchange_folders(a, b):
        pytest.skip("this OS or filesystem has no renameat2(RENAME_EXCHANGE); export uses two renames")
    assert [p.name for p in a.iterdir()] == ["from_b"]
    assert [p.name for p in b.iterdir()] == ["from_a"]


def test_cli_refusal_uses_cli_words_on_one_line(tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").touch()
    done = dmf_export("--ckpt", "demo", "--out", "taken", "--no-check", cwd=tmp_path)
    assert done.returncode == 2
    assert "force=True" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("dmf-export: error:")]
    assert lines and lines[0].endswith("already exists; pass --force to replace it"), done.stderr


def test_an_out_or_triton_folder_that_cannot_be_written_fails_before_exporting(tmp_path: Path) -> None:
    """Issue 29, item 8: --out under /proc gave a traceback, --triton into an unwritable place one only
    after the whole export. Each is now one error line, before any export work."""
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    for args, words in (
        (["--out", "/proc/dmf-deploy-test-bundle"], "the output folder /proc is not writable"),
        (
            ["--out", "b", "--triton", "/proc/dmf-deploy-test-repo"],
            "--triton: /proc/dmf-deploy-test-repo cannot",
        ),
        (["--out", "b", "--triton", str(a_file / "repo")], f"--triton: {a_file / 'repo'} cannot be written"),
    ):
        done = dmf_export("--ckpt", "demo", *args, "--no-check", cwd=tmp_path)
        assert done.returncode == 2, done.stderr
        assert words in " ".join(done.stderr.split()) and "Traceback" not in done.stderr, done.stderr
        assert "exported" not in done.stderr and not (tmp_path / "b").exists()
    assert a_file.read_text() == "mine"


def test_trt_without_tensorrt_fails_before_exporting(tmp_path: Path) -> None:
    from dmf_deploy.tensorrt_support import tensorrt_import_reason

    if tensorrt_import_reason() is None:
        pytest.skip("TensorRT is installed here")
    done = dmf_export("--ckpt", "demo", "--out", "b", "--trt", "--no-check", cwd=tmp_path)
    assert done.returncode == 2 and "--trt" in done.stderr, done.stderr
    assert "exported" not in done.stderr
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------ checkpoints


def official_file(path: Path, state: object) -> Path:
    torch.save({"state_dict": state, "epoch": 1}, path)
    return path


def official_state(kernel: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "dw_gen.kernel_conv.weight": kernel,
        "global_clasifier.weight": torch.zeros(5, 16, 1, 1),
        "base.layer4.0.conv1.weight": torch.zeros(16, 8, 3, 3),
    }


@pytest.mark.parametrize(
    "state",
    [
        official_state(torch.zeros(0, 16, 1, 1)),  # a zero-channel kernel
        official_state(torch.zeros(8)),  # a 1-D kernel
        [torch.zeros(3)],  # a state_dict that is a list
        {**official_state(torch.zeros(8, 16, 1, 1)), "dw_gen.kernel_conv.weight": [1, 2]},  # no tensor
        {"base.layer4.0.conv1.weight": "weights"},
    ],
    ids=["zero-channel", "1-d-kernel", "list", "non-tensor", "string"],
)
def test_malformed_checkpoints_raise_checkpoint_error(tmp_path: Path, state: object) -> None:
    with pytest.raises(CheckpointError):
        load_checkpoint(official_file(tmp_path / "bad.pth.tar", state))


def test_malformed_checkpoint_is_one_error_line_in_dmf_export(tmp_path: Path) -> None:
    official_file(tmp_path / "bad.pth.tar", official_state(torch.zeros(0, 16, 1, 1)))
    done = dmf_export("--ckpt", "bad.pth.tar", "--out", "b", "--no-check", cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "error:" in done.stderr


@pytest.mark.parametrize(
    "text",
    ["hello world\n", "(lp0\nI1\na.", "}", "", "#!/bin/sh\necho best.pt\n"],
    ids=["hello", "protocol-0-pickle-like", "brace", "empty", "script"],
)
def test_a_text_file_is_not_a_checkpoint(tmp_path: Path, text: str) -> None:
    # 0.2 answered these with KeyError: 101, "pop from empty list" or "holds Python objects".
    path = tmp_path / "best.pt"
    path.write_text(text)
    with pytest.raises(CheckpointError, match=r"best\.pt is not a checkpoint: PyTorch writes a zip"):
        load_checkpoint(path)


def test_a_wrong_ckpt_is_named_before_an_existing_out(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello world")
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "mine.txt").write_text("mine")
    done = dmf_export("--ckpt", "notes.txt", "--out", "bundle", "--no-check", cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines() == [
        "dmf-export: error: notes.txt is not a checkpoint: PyTorch writes a zip archive (or, before 1.6, a "
        "pickle), and this file starts as neither; --ckpt wants a checkpoint file (ours, or an official "
        '.pth.tar) or "demo"'
    ]
    assert (tmp_path / "bundle" / "mine.txt").read_text() == "mine"


def test_legacy_tar_checkpoint_is_refused_without_unsafe_advice(tmp_path: Path) -> None:
    path = tmp_path / "old.pth.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("sys_info", "pickle", "tensors", "storages"):
            info = tarfile.TarInfo(name)
            info.size = 4
            tar.addfile(info, io.BytesIO(b"\x80\x02N."))
    with pytest.raises(CheckpointError, match="legacy tar format") as info:
        load_checkpoint(path)
    assert "weights_only=False" not in str(info.value)


def test_ckpt_given_a_bundle_folder_says_what_ckpt_wants(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r'is a bundle folder.*--ckpt wants .*"demo"'):
        load_checkpoint(DEMO_BUNDLE)
    with pytest.raises(CheckpointError, match="is a folder, not a checkpoint"):
        load_checkpoint(tmp_path)
