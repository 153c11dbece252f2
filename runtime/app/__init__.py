"""The live app, `dmf-run`: frame sources, the one frame loop, stdin commands, the window's overlay.

cli.py holds the click command. The names below are what `dmf_deploy.runtime.app` offered when it was
one module (its console-script target `dmf_deploy.runtime.app:main` among them), kept for compatibility.
"""

from dmf_deploy.runtime.app.cli import (
    AppError,
    default_gallery_path,
    finish,
    main,
    no_display,
    open_recognizer,
    parse_names,
    resolve_bundle,
)

__all__ = [
    "AppError",
    "default_gallery_path",
    "finish",
    "main",
    "no_display",
    "open_recognizer",
    "parse_names",
    "resolve_bundle",
]
