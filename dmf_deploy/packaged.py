"""The files shipped inside the package: the demo checkpoint and the demo bundle exported from it.

Torch-free, so the runtime finds the demo bundle without the training stack. Every place that means
"the demo" resolves it here, from the installed package, whatever the working directory.

The reserved name "demo" means the packaged file wherever a checkpoint or a bundle is accepted
(`--ckpt demo`, `--bundle demo`, `Recognizer.open("demo")`), as it always has for checkpoints. A file
or folder that is literally called "demo" is reached by writing it as a path: "./demo".
"""

from __future__ import annotations

import os
from pathlib import Path

DEMO_NAME = "demo"
ASSETS = Path(__file__).resolve().parent / "assets"
DEMO_CHECKPOINT = ASSETS / "demo.pt"
DEMO_BUNDLE = ASSETS / "demo_bundle"


def is_demo_name(path: str | os.PathLike[str]) -> bool:
    return os.fspath(path) == DEMO_NAME


def resolve_bundle_path(bundle: str | os.PathLike[str]) -> Path:
    """A bundle folder: the reserved name "demo" is the packaged demo bundle."""
    return DEMO_BUNDLE if is_demo_name(bundle) else Path(bundle)


def demo_bundle_installed() -> bool:
    return (DEMO_BUNDLE / "manifest.json").is_file()
