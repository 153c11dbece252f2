"""Optional imports that skip a test, with the reason, when they are missing or broken.

`pytest.importorskip` catches only ImportError; a torchvision built for another torch raises
RuntimeError inside its import, which stopped the whole collection (issue 33).
"""

from __future__ import annotations

from types import ModuleType

import pytest

from dmf_deploy.torchvision_check import import_torchvision


def torchvision_or_skip() -> ModuleType:
    """torchvision, or a skip (module-level too) saying why it cannot be used."""
    try:
        return import_torchvision()
    except ImportError as exc:
        pytest.skip(f"torchvision unusable: {exc}", allow_module_level=True)
