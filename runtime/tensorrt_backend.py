"""TensorRT backend: runs a bundle's prebuilt engines (``*.plan``) with the name-based TensorRT 10+ API.

The only runtime module that imports `tensorrt`, always lazily, so that `open_backend` can ask
`unavailable_reason` on any machine and fall back to onnxruntime. Device memory goes through one light
dependency, cuda-python (cudaMalloc / cudaMemcpyAsync / streams), with grow-only buffers reused across
calls.

The pure parts (staleness of an engine, profile limits, dtype mapping) are plain functions so that
they are tested on machines without TensorRT.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dmf_deploy.manifest import GRAPH_NAMES, BundleError, EngineSpec, Manifest, bundle_graph_io, sha256_file

TRT_MISSING = (
    "the tensorrt Python package is not installed; install dmf-deploy[tensorrt] on a machine with "
    "NVIDIA TensorRT 10+"
)
# Which input's leading axis is a batch of independent rows: larger batches run in chunks of the
# profile's max, which is exact because rows never interact (BatchNorm is folded, eval mode).
BATCH_INPUTS = {"backbone": "images", "head": "query_features"}
_AXIS_WORDS = {"B": "images", "Q": "queries", "N": "classes"}
_AXIS_FLAGS = {"B": "--max-batch", "Q": "--max-batch", "N": "--max-classes"}


class ProfileLimitError(ValueError):
    """An input shape the engine's optimization profile does not cover."""


# ----- imports and device identity (shared with export.tensorrt_build) -------------------------------


def version_parts(version: str) -> tuple[int, ...]:
    parts = []
    for piece in str(version).split("."):
        match = re.match(r"\d+", piece)
        if not match:
            break
        parts.append(int(match.group()))
    return tuple(parts) or (0,)


def tensorrt_import_reason() -> str | None:
    """None when `import tensorrt` works and it is TensorRT 10 or later; else why not."""
    try:
        import tensorrt as trt
    except ImportError:
        return TRT_MISSING
    except Exception as exc:  # a broken install raises OSError etc. from its shared libraries
        return f"the tensorrt Python package failed to import: {exc}"
    version = getattr(trt, "__version__", "0")
    if version_parts(version)[0] < 10:
        return f"TensorRT {version} is too old: dmf-deploy needs TensorRT 10 or later"
    return None


def import_cudart() -> Any:
    """cuda-python's runtime module: `cuda.bindings.runtime` (12.6+) or the older `cuda.cudart`."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6
        except ImportError as exc:
            raise ImportError(
                "cuda-python is not installed; install dmf-deploy[tensorrt] (it brings cuda-python)"
            ) from exc
    return cudart


def cuda_check(result: Any, what: str) -> Any:
    """Unpack a cuda-python ``(err, *values)`` tuple; raise RuntimeError naming a CUDA error."""
    cudart = import_cudart()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        raise RuntimeError(f"{what} failed: {getattr(err, 'name', err)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def gpu_identity(device: int | None = None) -> tuple[str, str]:
    """(GPU name, compute capability "major.minor") of the current CUDA device."""
    cudart = import_cudart()
    if device is None:
        device = cuda_check(cudart.cudaGetDevice(), "cudaGetDevice")
    props = cuda_check(cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = props.name
    if isinstance(name, (bytes, bytearray)):
        name = bytes(name).split(b"\0", 1)[0].decode("utf-8", "replace")
    return str(name).strip(), f"{props.major}.{props.minor}"


# ----- pure logic: staleness and profile limits --------------------------------------------------------


def has_engines(manifest: Manifest) -> bool:
    return bool(manifest.engines)


def same_engine_version(built: str, running: str) -> bool:
    """Whether an engine built by TensorRT `built` deserializes under `running`.

    TensorRT plans (without the version-compatible flag) load only in the TensorRT release that built
    them, so major.minor.patch must agree; the fourth (build) number does not change the format.
    Comparing only major.minor would let e.g. a 10.8.0 engine reach a 10.8.1 runtime, fail there at
    deserialization, and break `open` instead of falling back to onnxruntime.
    """
    return (version_parts(built) + (0, 0, 0))[:3] == (version_parts(running) + (0, 0, 0))[:3]


def engine_staleness(
    engine: EngineSpec,
    trt_version: str,
    gpu_name: str,
    compute_capability: str,
    *,
    bundle: str | os.PathLike[str] | None = None,
) -> str | None:
    """None if this engine can run here; else the reason, naming the field that differs.

    With `bundle`, also checks that the plan file exists and its sha256 matches the manifest.
    """
    file, built = engine.file, engine.tensorrt_version
    if not same_engine_version(built, trt_version):
        return f"engine {file} was built with TensorRT {built}; this machine has TensorRT {trt_version}"
    if engine.gpu != gpu_name:
        return f"engine {file} was built for the GPU {engine.gpu!r}; this machine has {gpu_name!r}"
    if engine.compute_capability != str(compute_capability):
        return (
            f"engine {file} was built for compute capability {engine.compute_capability}; "
            f"this GPU has {compute_capability}"
        )
    if bundle is not None:
        path = Path(bundle) / file
        if Path(file).name != file or not path.is_file():
            return f"engine {file} is missing from {bundle}"
        actual = sha256_file(path)
        if actual != engine.sha256:
            return (
                f"engine {file} is corrupt or was modified: sha256 {actual[:12]}... does not match the "
                f"manifest's {engine.sha256[:12]}..."
            )
    return None


def _next_power_of_two(value: int) -> int:
    return 1 << max(0, int(value) - 1).bit_length()


def check_input_shapes(
    graph: str,
    shapes: Mapping[str, tuple[int, ...]],
    limits: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]],
    axes: Mapping[str, list[Any]],
) -> None:
    """Raise ProfileLimitError unless every input shape lies inside the engine profile's (min, max).

    `axes` is the graph's inputs from `bundle_graph_io`: strings name the dynamic axes (B, Q, N), which the
    message uses, with the `dmf-export` flag that would widen the profile.
    """
    expected, got = sorted(limits), sorted(shapes)
    if expected != got:
        raise ProfileLimitError(f"the {graph} engine takes inputs {expected}; got {got}")
    for name, shape in shapes.items():
        lo, hi = limits[name]
        dims = list(axes.get(name, [None] * len(lo)))
        if len(shape) != len(lo):
            raise ProfileLimitError(
                f"{name} has {len(shape)} dimensions {tuple(shape)}; the {graph} engine expects {len(lo)}"
            )
        for index, (value, low, high) in enumerate(zip(shape, lo, hi)):
            if low <= value <= high:
                continue
            axis = dims[index] if index < len(dims) else None
            if not isinstance(axis, str):
                want = "x".join(str(d) for d in lo) if lo == hi else f"{lo}..{hi}"
                raise ProfileLimitError(
                    f"{name} has shape {tuple(shape)}; the {graph} engine expects {want} (axis {index} is "
                    f"{value}, the bundle fixes it)"
                )
            word = _AXIS_WORDS.get(axis, "")
            if value < low:
                raise ProfileLimitError(
                    f"{axis}={value} is below the engine profile's min {low} {word} ({graph}.{name})"
                )
            flag = _AXIS_FLAGS.get(axis, "")
            raise ProfileLimitError(
                f"{axis}={value} exceeds the engine profile's max {high} {word}; rebuild with "
                f"dmf-export --trt {flag} {_next_power_of_two(value)} or use backend onnxruntime"
            )


_NUMPY_DTYPES = {
    "FLOAT": np.float32,
    "HALF": np.float16,
    "INT32": np.int32,
    "INT64": np.int64,
    "INT8": np.int8,
    "UINT8": np.uint8,
    "BOOL": np.bool_,
}


def numpy_dtype(trt_dtype: Any) -> np.dtype:
    """numpy dtype of a `tensorrt.DataType` (or its name, e.g. "FLOAT")."""
    name = trt_dtype if isinstance(trt_dtype, str) else getattr(trt_dtype, "name", str(trt_dtype))
    name = name.rsplit(".", 1)[-1].upper()
    if name not in _NUMPY_DTYPES:
        raise TypeError(f"TensorRT tensor type {name} has no numpy equivalent here")
    return np.dtype(_NUMPY_DTYPES[name])


def unavailable_reason(bundle_path: str | os.PathLike[str], manifest: Manifest) -> str | None:
    """None when TensorRT can run this bundle's engines here; else why not (for a warning)."""
    if not has_engines(manifest):
        return "the bundle has no TensorRT engines; build them with `dmf-export --trt`"
    reason = tensorrt_import_reason()
    if reason:
        return reason
    try:
        import_cudart()
        gpu_name, cc = gpu_identity()
    except ImportError as exc:
        return str(exc)
    except RuntimeError as exc:
        return f"no usable CUDA GPU: {exc}"
    import tensorrt as trt

    for graph in GRAPH_NAMES:
        entry = manifest.engines.get(graph)
        if entry is None:
            return f"the manifest lists no TensorRT engine for the {graph} graph"
        stale = engine_staleness(entry, trt.__version__, gpu_name, cc, bundle=bundle_path)
        if stale:
            return stale
    return None


# ----- CUDA memory -------------------------------------------------------------------------------------


class CudaBuffers:
    """One CUDA stream and grow-only device buffers keyed by tensor, via cuda-python.

    A buffer is reallocated only when a call needs more bytes than it holds, so steady-state frames
    allocate nothing. Host arrays are staged with cudaMemcpyAsync on the stream; `synchronize` must
    run before the host arrays are read or freed.
    """

    def __init__(self) -> None:
        self._cudart = import_cudart()
        self.stream = cuda_check(self._cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._buffers: dict[Any, tuple[int, int]] = {}

    @property
    def handle(self) -> int:
        return int(self.stream)

    def buffer(self, key: Any, nbytes: int) -> int:
        """A device pointer with at least `nbytes` bytes for `key` (grow-only)."""
        pointer, capacity = self._buffers.get(key, (0, 0))
        if nbytes > capacity or not pointer:
            if pointer:
                # cudaFree synchronizes the device, so no kernel still reads the old buffer.
                cuda_check(self._cudart.cudaFree(pointer), "cudaFree")
                del self._buffers[key]
            capacity = max(int(nbytes), 256)
            pointer = int(cuda_check(self._cudart.cudaMalloc(capacity), f"cudaMalloc({capacity} bytes)"))
            self._buffers[key] = (pointer, capacity)
        return pointer

    def capacity(self, key: Any) -> int:
        return self._buffers.get(key, (0, 0))[1]

    def upload(self, pointer: int, array: np.ndarray) -> None:
        if array.nbytes:
            kind = self._cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
            call = self._cudart.cudaMemcpyAsync(pointer, array.ctypes.data, array.nbytes, kind, self.stream)
            cuda_check(call, "cudaMemcpyAsync (host to device)")

    def download(self, array: np.ndarray, pointer: int) -> None:
        if array.nbytes:
            kind = self._cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
            call = self._cudart.cudaMemcpyAsync(array.ctypes.data, pointer, array.nbytes, kind, self.stream)
            cuda_check(call, "cudaMemcpyAsync (device to host)")

    def synchronize(self) -> None:
        cuda_check(self._cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def close(self) -> None:
        if self.stream is None:
            return
        self.synchronize()
        for pointer, _ in self._buffers.values():
            self._cudart.cudaFree(pointer)
        self._buffers.clear()
        self._cudart.cudaStreamDestroy(self.stream)
        self.stream = None


# ----- the backend ------------------------------------------------------------------------------------


@dataclass
class _EngineGraph:
    engine: Any
    context: Any
    inputs: dict[str, np.dtype]
    outputs: dict[str, np.dtype]
    limits: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]
    axes: dict[str, list[Any]]


class TensorRTBackend:
    """Runs the bundle's three engines: one execution context per graph, tensors bound by name.

    The contexts and device buffers are shared state, so `run` serialises calls with a lock; a caller
    that wants parallel inference opens one backend per thread.
    """

    name = "tensorrt"

    def __init__(self, bundle_path: str | os.PathLike[str], manifest: Manifest) -> None:
        reason = tensorrt_import_reason()
        if reason:
            raise RuntimeError(reason)
        import tensorrt as trt

        bundle = Path(bundle_path)
        io = bundle_graph_io(manifest)
        gpu_name, cc = gpu_identity()
        self._trt = trt
        self._lock = threading.Lock()
        self._cuda = CudaBuffers()
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._graphs: dict[str, _EngineGraph] = {}
        try:
            for graph in GRAPH_NAMES:
                entry = manifest.engines[graph]
                stale = engine_staleness(entry, trt.__version__, gpu_name, cc, bundle=bundle)
                if stale:
                    raise BundleError(stale)
                self._graphs[graph] = self._load(bundle / entry.file, graph, io[graph]["inputs"])
        except BaseException:
            self.close()
            raise
        precision = manifest.engines[GRAPH_NAMES[0]].precision
        self.precision = precision
        self.description = f"TensorRT {trt.__version__}, {precision}, {gpu_name} (sm {cc})"

    def _load(self, path: Path, graph: str, axes: dict[str, list[Any]]) -> _EngineGraph:
        trt = self._trt
        engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise BundleError(
                f"TensorRT could not deserialize {path} (see its log above); rebuild with `dmf-export --trt`"
            )
        context = engine.create_execution_context()
        if context is None:
            raise RuntimeError(
                f"TensorRT could not create an execution context for {path} (out of GPU memory?)"
            )
        inputs: dict[str, np.dtype] = {}
        outputs: dict[str, np.dtype] = {}
        for index in range(engine.num_io_tensors):
            name = engine.get_tensor_name(index)
            dtype = numpy_dtype(engine.get_tensor_dtype(name))
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                inputs[name] = dtype
            else:
                outputs[name] = dtype
        if sorted(inputs) != sorted(axes):
            raise BundleError(
                f"engine {path.name} takes inputs {sorted(inputs)}; "
                f"the bundle's {graph} graph has {sorted(axes)}"
            )
        limits = {}
        for name in inputs:
            low, _opt, high = engine.get_tensor_profile_shape(name, 0)
            limits[name] = (tuple(int(d) for d in low), tuple(int(d) for d in high))
        return _EngineGraph(engine, context, inputs, outputs, limits, dict(axes))

    def profile_max(self, graph: str, name: str) -> tuple[int, ...]:
        return self._graphs[graph].limits[name][1]

    def run(self, graph: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one graph on host arrays; same names, shapes and float32 outputs as onnxruntime."""
        if graph not in self._graphs:
            raise ValueError(f"graph must be one of {GRAPH_NAMES}, got {graph!r}")
        state = self._graphs[graph]
        unknown = sorted(set(inputs) - set(state.inputs))
        missing = sorted(set(state.inputs) - set(inputs))
        if unknown or missing:
            raise ValueError(
                f"the {graph} graph takes inputs {sorted(state.inputs)}; missing {missing}, unknown {unknown}"
            )
        arrays = {name: np.ascontiguousarray(inputs[name], dtype=state.inputs[name]) for name in state.inputs}
        batch_input = BATCH_INPUTS.get(graph)
        with self._lock:
            if batch_input is None or arrays[batch_input].ndim == 0:
                return self._run_once(graph, state, arrays)
            rows = arrays[batch_input].shape[0]
            step = max(1, state.limits[batch_input][1][0])
            if rows <= step:
                return self._run_once(graph, state, arrays)
            parts = [
                self._run_once(
                    graph, state, {**arrays, batch_input: arrays[batch_input][start : start + step]}
                )
                for start in range(0, rows, step)
            ]
            return {name: np.concatenate([part[name] for part in parts], axis=0) for name in parts[0]}

    def _run_once(
        self, graph: str, state: _EngineGraph, arrays: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        check_input_shapes(graph, {n: a.shape for n, a in arrays.items()}, state.limits, state.axes)
        context, cuda = state.context, self._cuda
        for name, array in arrays.items():
            if not context.set_input_shape(name, array.shape):
                raise RuntimeError(f"TensorRT rejected the shape {array.shape} for {graph}.{name}")
            pointer = cuda.buffer((graph, name), array.nbytes)
            cuda.upload(pointer, array)
            context.set_tensor_address(name, pointer)
        results: dict[str, tuple[np.ndarray, int]] = {}
        for name, dtype in state.outputs.items():
            shape = tuple(int(d) for d in context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise RuntimeError(f"TensorRT could not infer the shape of {graph}.{name}: {shape}")
            host = np.empty(shape, dtype=dtype)
            pointer = cuda.buffer((graph, name), host.nbytes)
            context.set_tensor_address(name, pointer)
            results[name] = (host, pointer)
        if not context.execute_async_v3(cuda.handle):
            raise RuntimeError(f"TensorRT failed to run the {graph} engine (see its log above)")
        for host, pointer in results.values():
            cuda.download(host, pointer)
        cuda.synchronize()
        # The bundle contract is float32 out; fp16 engines keep float32 I/O, but be strict anyway.
        return {name: host.astype(np.float32, copy=False) for name, (host, _) in results.items()}

    def close(self) -> None:
        """Free the GPU: contexts before engines, then buffers and the stream."""
        graphs = getattr(self, "_graphs", {})
        for state in graphs.values():
            state.context = None
            state.engine = None
        graphs.clear()
        cuda = getattr(self, "_cuda", None)
        if cuda is not None:
            cuda.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown: CUDA may already be gone
            self.close()
