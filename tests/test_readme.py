"""The README's examples are real: its quick start runs top to bottom from a folder outside the
repository (train, export, run), and its embedding example runs as written and prints what it says
(with torch installed, and with torch blocked as on a `[runtime]`-only install)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from bundles import parse_lines
from readme_example import readme_example  # tests/readme_example.py, also used by .ci/run

from dmf_deploy.packaged import demo_bundle_installed
from dmf_deploy.torchvision_check import CPU_INDEX, CPU_PAIR

README = Path(__file__).resolve().parents[1] / "README.md"
QUICK_START_TIMEOUT_S = 900  # a glyphs-smoke training: 1 to 3 minutes on a busy 2-core CPU, with room


def quick_start_lines() -> list[str]:
    """The commands of the README's "Quick start" block, comments removed, in order."""
    section = README.read_text().split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"^```\n(.*?)^```", section, re.S | re.M).group(1)
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.strip()]


def console_script(name: str) -> str:
    beside = Path(sys.executable).with_name(name)  # this venv's script, whatever PATH says
    return str(beside) if beside.exists() else (shutil.which(name) or pytest.fail(f"{name} is not installed"))


def test_the_quick_start_uses_no_dataset_and_connects_its_files() -> None:
    lines = quick_start_lines()
    assert [line.split()[0] for line in lines] == ["dmf-train", "dmf-export", "dmf-run"]
    assert "--data-root" not in " ".join(lines)  # runnable on a fresh clone
    assert "--out runs/x" in lines[0] and "--ckpt runs/x/best.pt" in lines[1]
    out = lines[1].split("--out", 1)[1].split()[0]
    assert f"--bundle {out}" in lines[2] and "--camera 0" in lines[2]


@pytest.mark.slow  # a training run and an export: 1 to 4 minutes on two cores
def test_the_quick_start_runs_top_to_bottom_from_a_fresh_folder(tmp_path: Path, clip: Path) -> None:
    pytest.importorskip("torch")
    work = tmp_path / "fresh"
    work.mkdir()
    env = {**os.environ, "HOME": str(tmp_path / "home"), "XDG_DATA_HOME": str(tmp_path / "data")}
    for line in quick_start_lines():
        args = shlex.split(line.replace("--camera 0", f"--source {clip} --headless"))
        args[0] = console_script(args[0])
        commands = "enroll c0 3\nwait 10\nlist\nquit\n" if "--headless" in args else None
        done = subprocess.run(
            args,
            cwd=work,
            env=env,
            input=commands,
            capture_output=True,
            text=True,
            timeout=QUICK_START_TIMEOUT_S,
        )
        assert done.returncode == 0, f"{line}\n{done.stderr[-3000:]}"
    assert (work / "runs" / "x" / "best.pt").is_file() and (work / "runs" / "x" / "bundle").is_dir()
    predictions, events = parse_lines(done.stdout)
    assert len(predictions) >= 10
    assert [e["classes"] for e in events if e["event"] == "list"] == [[{"name": "c0", "shots": 3}]]
    assert "gallery" in done.stderr.splitlines()[0]  # dmf-run names its gallery at start


def test_the_cpu_install_line_pins_a_matching_pair() -> None:
    assert f"pip install {CPU_PAIR} --index-url {CPU_INDEX}" in README.read_text()


@pytest.mark.skipif(not demo_bundle_installed(), reason="the demo bundle is not installed")
@pytest.mark.parametrize("torch_blocked", [False, True], ids=["full", "no-torch"])
def test_readme_embedding_example_runs_anywhere_and_recognises(tmp_path: Path, torch_blocked: bool) -> None:
    code = readme_example()
    assert len(code.strip().splitlines()) <= 14  # "a ten-line example" stays short
    env = dict(os.environ)
    if torch_blocked:
        blocker = tmp_path / "blocker" / "torch"
        blocker.mkdir(parents=True)
        (blocker / "__init__.py").write_text('raise ImportError("torch is blocked by the test")\n')
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(blocker.parent), env.get("PYTHONPATH")) if p)
    cwd = tmp_path / "app"
    cwd.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "label='ring'" in result.stdout
    assert (cwd / "my-gallery.dmfg").is_file()


def test_the_example_opens_the_packaged_bundle_by_name() -> None:
    assert 'Recognizer.open("demo"' in readme_example()  # no path that only works in the repository
