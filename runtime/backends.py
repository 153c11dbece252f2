"""Inference backends: one runner per engine type, all with the same small interface.

A backend runs the three bundle graphs by name (``backbone``, ``support``, ``head``) on numpy
arrays. onnxruntime lives here; TensorRT lives in `tensorrt_backend.py`, the only module that
imports tensorrt.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from dmf_deploy.manifest import GRAPH_NAMES, BundleError, verify_graph

log = logging.getLogger("dmf_deploy.runtime")

BACKENDS = ("auto", "onnxruntime", "tensorrt")
# ONNX Runtime's intra-op threads spin for a while after each run by default. The three bundle
# sessions take turns on the same cores, so a spinning session steals them from the next one: on two
# cores the backbone after a head run took 67 ms instead of 35 (benchmarks/README.md, dmf-bench).
ALLOW_SPINNING = "0"


class Backend(Protocol):
    name: str

    def run(self, graph: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one graph; inputs and outputs keyed by the manifest's tensor names."""
        ...


class OnnxRuntimeBackend:
    """onnxruntime on the CPU provider, or CUDA when onnxruntime-gpu is installed."""

    name = "onnxruntime"

    def __init__(
        self,
        bundle: str | os.PathLike[str],
        manifest: dict[str, Any],
        threads: int | None = None,
        graphs: Sequence[str] = GRAPH_NAMES,
    ) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", ALLOW_SPINNING)
        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.providers = providers
        self._sessions = {}
        self._outputs: dict[str, list[str]] = {}
        for graph in graphs:
            path = verify_graph(bundle, manifest, graph)
            try:
                session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
            except Exception as exc:  # onnxruntime raises its own exception types
                raise BundleError(f"onnxruntime cannot load {path}: {exc}") from exc
            self._sessions[graph] = session
            self._outputs[graph] = [o.name for o in session.get_outputs()]

    @property
    def device(self) -> str:
        return "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"

    def run(self, graph: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = self._outputs[graph]
        values = self._sessions[graph].run(names, inputs)
        return dict(zip(names, values))


def open_backend(
    bundle: str | os.PathLike[str],
    manifest: dict[str, Any],
    backend: str = "auto",
    threads: int | None = None,
) -> Backend:
    """Create the requested backend; `auto` prefers matching TensorRT engines, else onnxruntime."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend in ("auto", "tensorrt"):
        from dmf_deploy.runtime import tensorrt_backend

        reason = tensorrt_backend.unavailable_reason(Path(bundle), manifest)
        if reason is None:
            chosen = tensorrt_backend.TensorRTBackend(Path(bundle), manifest)
            log.info("backend: tensorrt (%s)", chosen.description)
            return chosen
        if backend == "tensorrt":
            raise RuntimeError(f"backend 'tensorrt' is not usable: {reason}")
        if tensorrt_backend.has_engines(manifest):
            log.warning(
                "TensorRT engines not used (%s); falling back to onnxruntime. "
                "Rebuild them with `dmf-export --trt`.",
                reason,
            )
    chosen = OnnxRuntimeBackend(bundle, manifest, threads)
    log.info("backend: onnxruntime (%s)", ", ".join(chosen.providers))
    return chosen
