"""Inference backends: one runner per engine type, all with the same small interface.

A backend runs the three bundle graphs by name (``backbone``, ``support``, ``head``) on numpy
arrays. onnxruntime lives here; TensorRT lives in `tensorrt_backend.py`, the only module that
imports tensorrt.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from dmf_deploy.manifest import GRAPH_NAMES, BundleError, GraphSpec, verify_graph
from dmf_deploy.runtime.onnx_scan import NotOnnx, external_tensors

log = logging.getLogger("dmf_deploy.runtime")

BACKENDS = ("auto", "onnxruntime", "tensorrt")
REBUILD_HINT = "Rebuild them with `dmf-export --trt`."
# ONNX Runtime's intra-op threads spin for a while after each run by default. The three bundle
# sessions take turns on the same cores, so a spinning session steals them from the next one
# (benchmarks/README.md, "Runtime latency", has the figures).
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
            refuse_external_data(path)
            try:
                session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
            except Exception as exc:  # onnxruntime raises its own exception types
                raise BundleError(f"onnxruntime cannot load {path}: {exc}") from exc
            check_session_io(session, manifest.graphs[graph], graph)
            self._sessions[graph] = session
            self._outputs[graph] = [o.name for o in session.get_outputs()]

    @property
    def device(self) -> str:
        return "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"

    def run(self, graph: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = self._outputs[graph]
        values = self._sessions[graph].run(names, inputs)
        return dict(zip(names, values))


def refuse_external_data(path: Path) -> None:
    """Weights in files beside a graph are covered by no sha256 of the manifest: refuse them."""
    try:
        outside = external_tensors(path.read_bytes())
    except NotOnnx as exc:
        raise BundleError(f"{path} is not an ONNX model: {exc}") from None
    if outside:
        shown = ", ".join(outside[:3]) + (f" and {len(outside) - 3} more" if len(outside) > 3 else "")
        raise BundleError(
            f"{path.name} keeps tensors outside itself (external data: {shown}); no sha256 covers those "
            "files, so bundles must hold their weights inside each .onnx (re-export with dmf-export)"
        )


ORT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "int8": "tensor(int8)"}


def check_session_io(session: Any, spec: GraphSpec, graph: str) -> None:
    """The session's inputs and outputs are the manifest's: names, shapes (a named axis in the
    manifest is a dynamic one in the graph) and element types. BundleError naming graph and tensor."""
    where = f"graph {graph} ({spec.file})"
    for kind, declared, actual in (
        ("input", spec.inputs, session.get_inputs()),
        ("output", spec.outputs, session.get_outputs()),
    ):
        found = {arg.name: arg for arg in actual}
        if set(found) != set(declared):
            raise BundleError(
                f"{where} has {kind}s {sorted(found)}, but the manifest names {sorted(declared)}"
            )
        for tensor, shape in declared.items():
            arg = found[tensor]
            if not _same_shape(shape, arg.shape):
                raise BundleError(
                    f"{where} {kind} {tensor!r} has shape {list(arg.shape)}, "
                    f"but the manifest says {list(shape)}"
                )
            wanted = ORT_TYPES[spec.dtype(tensor)]
            if arg.type != wanted:
                raise BundleError(f"{where} {kind} {tensor!r} is {arg.type}, but the manifest says {wanted}")


def _same_shape(declared: tuple[int | str, ...], actual: list[int | str | None]) -> bool:
    if len(declared) != len(actual):
        return False
    for want, have in zip(declared, actual):
        fixed = isinstance(have, int)
        if (isinstance(want, int) and have != want) or (isinstance(want, str) and fixed):
            return False
    return True


def open_backend(
    bundle: str | os.PathLike[str],
    manifest: dict[str, Any],
    backend: str = "auto",
    threads: int | None = None,
) -> Backend:
    """Create the requested backend; `auto` prefers matching TensorRT engines, else onnxruntime."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    def onnxruntime() -> Backend:
        chosen = OnnxRuntimeBackend(bundle, manifest, threads)
        log.info("backend: onnxruntime (%s)", ", ".join(chosen.providers))
        return chosen

    if backend == "onnxruntime":
        return onnxruntime()
    from dmf_deploy.runtime import tensorrt_backend

    reason = tensorrt_backend.unavailable_reason(Path(bundle), manifest)
    if reason is None:
        return tensorrt_or_fallback(
            backend, lambda: tensorrt_backend.TensorRTBackend(Path(bundle), manifest), onnxruntime
        )
    if backend == "tensorrt":
        raise RuntimeError(f"backend 'tensorrt' is not usable: {reason}")
    if tensorrt_backend.has_engines(manifest):
        log.warning("TensorRT engines not used (%s); falling back to onnxruntime. %s", reason, REBUILD_HINT)
    return onnxruntime()


def tensorrt_or_fallback(
    backend: str, open_tensorrt: Callable[[], Backend], open_onnxruntime: Callable[[], Backend]
) -> Backend:
    """Open the TensorRT backend for engines that match this machine (version, GPU, sha256).

    TensorRT can still fail to load them (EngineLoadError: a plan from another OS, GPU memory short).
    `auto` then warns with the reason and returns `open_onnxruntime()`, like a stale engine does;
    `tensorrt` raises.
    """
    from dmf_deploy.runtime.tensorrt_backend import EngineLoadError

    try:
        chosen = open_tensorrt()
    except EngineLoadError as exc:
        if backend == "tensorrt":
            raise
        log.warning("TensorRT engines not used (%s); falling back to onnxruntime. %s", exc, REBUILD_HINT)
        return open_onnxruntime()
    log.info("backend: tensorrt (%s)", getattr(chosen, "description", chosen.name))
    return chosen
