"""The README's embedding example is real code: run it as written, from a folder outside the
repository, and check what it prints (with torch installed, and with torch blocked as on a
`[runtime]`-only install)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from readme_example import readme_example  # tests/readme_example.py, also used by .ci/run

from dmf_deploy.packaged import demo_bundle_installed


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
