"""One convention for every dmf-* command (issue 33): the error format, --version, option names, the
--backend default, --opset checked before the checkpoint loads, the extras named when missing, the
gallery named at start, and dmf-bench's targets shown only for the model they were set for."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
from bundles import cross, dmf_run_command, ring
from click.testing import CliRunner

import dmf_deploy
from dmf_deploy.manifest import BundleError, Manifest
from dmf_deploy.packaged import DEMO_BUNDLE, DEMO_CHECKPOINT
from dmf_deploy.runtime.app.cli import main as run_main
from dmf_deploy.runtime.serve.server import main as serve_main
from dmf_deploy.runtime.tools import bench
from dmf_deploy.runtime.tools.demo import main as demo_main
from dmf_deploy.runtime.tools.explain_cli import main as explain_main

REPO = Path(__file__).resolve().parents[1]
needs_demo = pytest.mark.skipif(not (DEMO_BUNDLE / "manifest.json").is_file(), reason="no demo bundle")


def pyproject(section: str) -> str:
    """A [section] of pyproject.toml as text (tomllib is Python 3.11+; the project supports 3.10)."""
    text = (REPO / "pyproject.toml").read_text()
    return text.split(f"\n[{section}]\n", 1)[1].split("\n[", 1)[0]


def commands() -> dict[str, object]:
    """Every console script of pyproject.toml, imported (dmf-train and dmf-export need torch)."""
    found = {"dmf-run": run_main, "dmf-bench": bench.main, "dmf-demo": demo_main, "dmf-explain": explain_main}
    found["dmf-serve"] = serve_main
    try:
        from dmf_deploy.export.cli import main as export_main
        from dmf_deploy.train.cli import main as train_main
    except ImportError:
        return found
    return {**found, "dmf-train": train_main, "dmf-export": export_main}


def test_every_console_script_is_covered():
    scripts = re.findall(r"^(dmf-[a-z]+) = ", pyproject("project.scripts"), re.M)
    pytest.importorskip("torch")
    assert set(scripts) == set(commands())


def test_every_command_prints_the_version_pyproject_declares():
    version = re.search(r'^version = "(.+)"$', pyproject("project"), re.M).group(1)
    assert dmf_deploy.__version__ == version
    for name, command in commands().items():
        result = CliRunner().invoke(command, ["--version"], prog_name=name)
        assert result.exit_code == 0 and result.output == f"{name} {version}\n", (name, result.output)


ERRORS = {  # a mistake each command must refuse, and words its one error line must hold
    "dmf-run": (["--camera", "0", "--source", "clip.mp4"], "give exactly one of"),
    "dmf-bench": (["--bundle", "missing"], "missing does not exist"),
    "dmf-demo": (["--classes", "1"], "--classes"),
    "dmf-explain": (["--frame", "missing.png", "--out", "x.png", "--support", "s.png"], "missing.png"),
    "dmf-serve": (["--repo", "missing"], "missing"),
    "dmf-train": (["eval", "--ckpt", "missing.pt", "--dataset", "glyphs"], "missing.pt does not exist"),
    "dmf-export": (["--ckpt", "missing.pt"], "missing.pt does not exist"),
}


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_every_command_reports_an_error_as_name_error_message(name, tmp_path, monkeypatch):
    command = commands().get(name)
    if command is None:
        pytest.skip(f"{name} needs torch")
    monkeypatch.chdir(tmp_path)
    args, words = ERRORS[name]
    result = CliRunner().invoke(command, args, prog_name=name)
    assert result.exit_code in (1, 2), result.output
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith(f"{name}: error: "), result.stderr
    assert words in errors[0]
    assert "Traceback" not in result.output


def test_fit_and_eval_share_option_names_and_the_old_ones_still_work():
    pytest.importorskip("torch")
    from dmf_deploy.train.cli import main

    runner = CliRunner()
    for sub in ("fit", "eval"):
        help_text = runner.invoke(main, [sub, "--help"]).output
        assert all(option in help_text for option in ("--way", "--shot", "--queries", "-q, --quiet"))
        assert not any(old in help_text for old in ("--n-way", "--k-shot", "--q-query", "--no-progress"))
    new = runner.invoke(main, ["--dry-run", "--way", "3", "--shot", "2", "--queries", "4", "-q"])
    old = runner.invoke(main, ["--dry-run", "--n-way", "3", "--k-shot=2", "--q-query", "4", "--no-progress"])
    assert new.exit_code == old.exit_code == 0, (new.output, old.output)
    assert new.output == old.output
    assert {"n_way: 3", "k_shot: 2", "q_query: 4"} <= set(new.output.splitlines())


def test_backend_defaults_to_auto_everywhere():
    defaults = {
        name: param.default
        for name, command in commands().items()
        for param in command.params
        if param.name == "backend"
    }
    assert set(defaults) >= {"dmf-run", "dmf-bench", "dmf-demo"}
    assert set(defaults.values()) == {"auto"}, defaults


def test_opset_is_refused_before_the_checkpoint_is_read(tmp_path):
    pytest.importorskip("torch")
    from dmf_deploy.export.cli import main

    result = CliRunner().invoke(main, ["--ckpt", str(tmp_path / "missing.pt"), "--opset", "20"])
    assert result.exit_code == 2
    assert "--opset" in result.stderr and "missing.pt" not in result.stderr, result.stderr


@pytest.fixture
def no_torch_env(tmp_path):
    """PYTHONPATH with a fake torch package first, whose import fails as on a machine without torch."""
    fake = tmp_path / "blocker" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise ImportError("torch is not installed (blocked by the test)")\n')
    path = os.pathsep.join(filter(None, (str(fake.parent), os.environ.get("PYTHONPATH"))))
    env = {**os.environ, "PYTHONPATH": path}
    env.pop("PYTHONSTARTUP", None)
    return env


def run_module(module: str, args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    code = f"import sys; from {module} import main; sys.argv[0] = 'x'; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_a_missing_extra_is_one_line_naming_it(tmp_path, no_torch_env):
    export = run_module("dmf_deploy.export.cli", ["--ckpt", "demo"], no_torch_env, tmp_path)
    assert export.returncode == 2
    assert export.stderr.splitlines() == [
        "dmf-export: error: needs the export extra: pip install '.[export]' (torch is not installed)"
    ]
    fit = ["--preset", "glyphs-smoke", "--out", "x"]
    train = run_module("dmf_deploy.train.cli", fit, no_torch_env, tmp_path)
    assert train.returncode == 2
    assert train.stderr.splitlines() == [
        "dmf-train: error: needs the train extra: pip install '.[train]' (torch is not installed)"
    ]
    dry = run_module(
        "dmf_deploy.train.cli", ["--preset", "glyphs-smoke", "--dry-run"], no_torch_env, tmp_path
    )
    assert dry.returncode == 0 and "n_way: 5" in dry.stdout, dry.stderr  # the settings need no torch
    assert list(tmp_path.iterdir()) == [tmp_path / "blocker"]  # nothing written


def test_a_checkpoint_given_as_a_bundle_is_named_with_the_export_command(tmp_path):
    if not DEMO_CHECKPOINT.is_file():
        pytest.skip("no demo checkpoint")
    best = tmp_path / "best.pt"
    best.write_bytes(DEMO_CHECKPOINT.read_bytes())
    export_hint = r"best\.pt is a checkpoint .*`dmf-export --ckpt .*best\.pt --out bundle/`"
    with pytest.raises(BundleError, match=export_hint):
        Manifest.read(best)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(BundleError, match="is a file, not a bundle folder"):
        Manifest.read(tmp_path / "notes.txt")
    result = CliRunner().invoke(run_main, ["--bundle", str(best), "--headless", "--source", str(tmp_path)])
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"dmf-run: error: {best} is a checkpoint (what training writes), not a bundle folder: export it "
        f"first with `dmf-export --ckpt {best} --out bundle/`, then use bundle/"
    ]


@needs_demo
def test_dmf_run_names_its_gallery_and_what_it_holds_at_start(tmp_path):
    frames = tmp_path / "frames"
    frames.mkdir()
    for i, image in enumerate([ring(), ring(), cross()]):
        cv2.imwrite(str(frames / f"{i}.png"), image)
    gallery = tmp_path / "shelf.dmfg"

    def start_line(commands: str, *mode: str) -> str:
        done = subprocess.run(
            [*dmf_run_command(), "--source", str(frames), "--gallery", str(gallery), *mode],
            input=commands,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )
        assert done.returncode == 0, done.stderr
        return done.stderr.splitlines()[0]

    assert start_line("enroll ring 1\nquit\n", "--headless") == (
        f"dmf-run: gallery {gallery}: new, no classes yet (saved at exit)"
    )
    expected = f"dmf-run: gallery {gallery}: 1 class: ring (saved at exit; --gallery FILE for another)"
    assert start_line("quit\n", "--headless") == expected
    # The window mode prints the same line from the same code (tests/test_app_gui.py runs a window).


def test_dmf_bench_shows_classify_targets_only_for_the_model_they_were_set_for():
    run = {
        "by_classes": {10: {"classify": {"ratio_to_backbone": 8.83}}},
        "enroll": {"shot_ratio_to_classify": 1.2},
    }
    conv4 = bench.targets({**run, "backbone": "conv4", "image_size": 56})
    assert not any("classify exact" in line for line in conv4)
    assert any("enrolment shot" in line for line in conv4)  # the model-free targets stay
    resnet = bench.targets({**run, "backbone": "resnet12", "image_size": 84})
    assert "classify exact at N = 10: 8.83x the backbone (<= 1.5x: MISSED)" in resnet


def test_readme_names_the_command_ci_runs():
    readme = (REPO / "README.md").read_text()
    tests = readme.split("## Tests", 1)[1]
    command = re.search(r"^    (\S.*)$", tests, re.M).group(1)  # the section's first code line
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert command in [line.strip() for line in ci], f"README says CI runs {command!r}; .ci/run does not"
