"""The README's embedding example is real code: run it as written and check what it prints."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "dmf_deploy" / "assets" / "demo_bundle"


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("### 4. Embed the Recognizer") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.skipif(not BUNDLE.is_dir(), reason="the demo bundle is not installed")
def test_readme_embedding_example_runs_and_recognises(tmp_path: Path) -> None:
    code = readme_example().replace('"dmf_deploy/assets/demo_bundle"', repr(str(BUNDLE)))
    assert len(code.strip().splitlines()) <= 14  # "a ten-line example" stays short
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "label='ring'" in result.stdout
    assert (tmp_path / "my-gallery.dmfg").is_file()
