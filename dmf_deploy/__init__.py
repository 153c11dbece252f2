"""dmf-deploy: Dynamic Meta-filter few-shot classifiers from PyTorch to the edge.

This module imports no torch: `import dmf_deploy.runtime` must work where torch is absent.
The torch-backed API (`load_checkpoint`, `save_checkpoint`, `DMFNet`) is loaded on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from dmf_deploy.config import ModelConfig, PreprocessConfig

__version__ = "0.3.0"  # as pyproject.toml says (tests/test_cli_conventions.py checks)

_LAZY = {
    "DMFNet": "dmf_deploy.model",
    "load_checkpoint": "dmf_deploy.checkpoint",
    "save_checkpoint": "dmf_deploy.checkpoint",
    "CheckpointError": "dmf_deploy.checkpoint",
}

__all__ = ["ModelConfig", "PreprocessConfig", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dmf_deploy' has no attribute {name!r}")
