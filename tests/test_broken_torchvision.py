"""A torchvision built for another torch makes the tests that need it skip, with the reason, instead of
stopping collection; dmf-deploy says in one line that torch and torchvision do not match (issue 33).

The subprocesses see a real broken torchvision first on PYTHONPATH: a package whose import raises what
a mismatched build raises (`RuntimeError: operator torchvision::nms does not exist`), with its own
dist-info so that its version is known.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[1]
BROKEN_VERSION = "0.99.0"
NEEDS_TORCHVISION = [  # the files and tests that run torchvision (deform_conv2d, or its models)
    "tests/test_checkpoint.py",
    "tests/test_head.py",
    "tests/test_training.py",
    "tests/test_bench.py::test_pytorch_head_benchmark_times_both_forms_beside_the_bundle",
    "tests/test_recipe.py::test_without_dynamic_sampling_the_filter_is_the_plain_3x3_conv_of_the_prototype",
]


@pytest.fixture
def broken_torchvision_env(tmp_path) -> dict[str, str]:
    site = tmp_path / "broken-site"
    package = site / "torchvision"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        'raise RuntimeError("operator torchvision::nms does not exist")  # a build for another torch\n'
    )
    info = site / f"torchvision-{BROKEN_VERSION}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torchvision\nVersion: {BROKEN_VERSION}\n")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, (str(site), os.environ.get("PYTHONPATH")))),
    }
    env.pop("PYTHONSTARTUP", None)
    return env


def test_tests_that_need_torchvision_skip_with_the_reason(broken_torchvision_env, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *NEEDS_TORCHVISION],
        cwd=REPO,
        env=broken_torchvision_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    summary = done.stdout.strip().splitlines()[-1]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "error" not in summary and "passed" not in summary and "skipped" in summary, summary
    skips = [line for line in done.stdout.splitlines() if line.startswith("SKIPPED")]
    counts = [int(line.split("[", 1)[1].split("]", 1)[0]) for line in skips]  # SKIPPED [n] where: why
    assert sum(counts) == len(NEEDS_TORCHVISION) and f"{len(NEEDS_TORCHVISION)} skipped" in summary, summary
    for line in skips:
        assert f"torchvision {BROKEN_VERSION} do not match" in line, line
        assert "operator torchvision::nms does not exist" in line, line


def test_dmf_deploy_says_in_one_line_that_torch_and_torchvision_do_not_match(
    broken_torchvision_env, tmp_path
):
    probe = textwrap.dedent(
        """
        import torch
        from dmf_deploy import DMFNet
        from dmf_deploy.config import conv4_config
        model = DMFNet(conv4_config(32, width=16))
        features = torch.zeros(1, 16, 2, 2)
        try:
            model.head.literal_score_map(features, features, "euler", 1)
        except ImportError as exc:
            print(type(exc).__name__ + ": " + str(exc))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env=broken_torchvision_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    import torch

    torch_version = torch.__version__.split("+")[0]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout
    assert lines[0].startswith(
        f"TorchvisionMismatch: torch {torch_version} and torchvision {BROKEN_VERSION} do not match "
        "(importing torchvision failed: operator torchvision::nms does not exist); install a matching pair"
    ), lines[0]
