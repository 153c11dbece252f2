"""Kept for compatibility: the console-script target of `dmf-bench` before runtime/tools/ existed."""

from dmf_deploy.runtime.tools.bench import main

__all__ = ["main"]
