"""Kept for compatibility: the console-script target of `dmf-explain` before runtime/tools/ existed."""

from dmf_deploy.runtime.tools.explain_cli import main

__all__ = ["main"]
