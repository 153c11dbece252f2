"""Kept for compatibility: the console-script target of `dmf-demo` before runtime/tools/ existed."""

from dmf_deploy.runtime.tools.demo import main

__all__ = ["main"]
