"""Export: ONNX graphs, bundle writer, parity reports, TensorRT builder, Triton repository.

`export_bundle` is the public entry point; it is loaded on first use so that importing
this package stays cheap.
"""

from __future__ import annotations

from typing import Any

__all__ = ["export_bundle"]


def __getattr__(name: str) -> Any:
    if name == "export_bundle":
        from dmf_deploy.export.bundle import export_bundle

        return export_bundle
    raise AttributeError(f"module 'dmf_deploy.export' has no attribute {name!r}")
