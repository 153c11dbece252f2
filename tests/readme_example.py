"""The README's embedding example, as code: shared by tests/test_readme.py and .ci/run.

python tests/readme_example.py > embed.py    # the block, to run from any folder
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "### 4. Embed the Recognizer"


def readme_example(readme: Path = README) -> str:
    """The first ```python block after the embedding section's heading."""
    text = readme.read_text(encoding="utf-8")
    if SECTION not in text:
        raise SystemExit(f"{readme}: no section {SECTION!r}")
    match = re.search(r"```python\n(.*?)```", text[text.index(SECTION) :], re.S)
    if match is None:
        raise SystemExit(f"{readme}: no python block in the section {SECTION!r}")
    return match.group(1)


if __name__ == "__main__":
    sys.stdout.write(readme_example())
