"""TensorRT backend: runs a bundle's prebuilt engines (``*.plan``) with the name-based TensorRT 10+ API.

The only runtime module that imports `tensorrt`, always lazily, so that `open_backend` can ask
`unavailable_reason` on any machine and fall back to onnxruntime. Device memory goes through one light
dependency, cuda-python (cudaMalloc / cudaMallocHost / cudaMemcpyAsync / streams), with grow-only
device buffers and pinned host staging buffers reused across calls.

The pure parts (staleness of an engine, profile limits, dtype mapping) are plain functions so that
they are tested on machines without TensorRT.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dmf_deploy.manifest import GRAPH_NAMES, BundleError, EngineSpec, Manifest, bundle_graph_io, sha256_file
from dmf_deploy.tensorrt_support import (
    cuda_check,
    gpu_identity,
    import_cudart,
    tensorrt_import_reason,
    tensorrt_logger,
    version_parts,
)

# Which input's leading axis is a batch of independent rows: larger batches run in chunks of the
# profile's max, which is exact because rows never interact (BatchNorm is folded, eval mode).
BATCH_INPUTS = {"backbone": "images", "head": "query_features"}
_AXIS_WORDS = {"B": "images", "Q": "queries", "N": "classes"}
_AXIS_FLAGS = {"B": "--max-batch", "Q": "--max-batch", "N": "--max-classes"}


class ProfileLimitError(ValueError):
    """An input shape the engine's optimization profile does not cover."""


class EngineLoadError(BundleError):
    """An engine that matches this machine (version, GPU, sha256) that TensorRT still cannot load:
    deserialization failed (e.g. a plan built on another OS) or no execution context (GPU memory short).
    `open_backend(..., "auto")` falls back to onnxruntime on it; `"tensorrt"` raises it."""


class EngineRunError(RuntimeError):
    """TensorRT refused a step of running an engine (a shape, a tensor address, the launch)."""


def require_loaded(value: Any, message: str) -> Any:
    """`value`, unless TensorRT signalled failure by returning None: then EngineLoadError(message)."""
    if value is None:
        raise EngineLoadError(message)
    return value


def require_accepted(ok: bool, message: str) -> None:
    """TensorRT's boolean results (set_input_shape, set_tensor_address, execute_async_v3)."""
    if not ok:
        raise EngineRunError(message)


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


class GrowOnlyPool:
    """Buffers keyed by tensor that only grow: a call that fits the buffer it has allocates nothing.

    `allocate(nbytes) -> pointer` and `free(pointer)` are the memory's own calls (cudaMalloc/cudaFree,
    cudaMallocHost/cudaFreeHost). Growing frees the old buffer first; callers grow only between
    synchronized calls, so no copy or kernel still uses it.
    """

    MIN_BYTES = 256

    def __init__(self, allocate: Callable[[int], int], free: Callable[[int], None]) -> None:
        self._allocate, self._free = allocate, free
        self._buffers: dict[Hashable, tuple[int, int]] = {}

    def get(self, key: Hashable, nbytes: int) -> int:
        """A pointer to at least `nbytes` bytes for `key`."""
        pointer, capacity = self._buffers.get(key, (0, 0))
        if nbytes > capacity or not pointer:
            if pointer:
                del self._buffers[key]
                self._free(pointer)
            capacity = max(int(nbytes), self.MIN_BYTES)
            pointer = int(self._allocate(capacity))
            self._buffers[key] = (pointer, capacity)
        return pointer

    def capacity(self, key: Hashable) -> int:
        return self._buffers.get(key, (0, 0))[1]

    def free_all(self) -> None:
        buffers, self._buffers = self._buffers, {}
        for pointer, _ in buffers.values():
            with contextlib.suppress(Exception):  # free what can be freed; CUDA may be shutting down
                self._free(pointer)


def host_array(pointer: int, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
    """A numpy view of host memory at `pointer` (it must hold at least the array's bytes)."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    if count == 0:
        return np.empty(shape, dtype)
    raw = (ctypes.c_ubyte * (count * dtype.itemsize)).from_address(int(pointer))
    return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)


class CudaBuffers:
    """One CUDA stream, grow-only device buffers and pinned host staging buffers, via cuda-python.

    Copies go through page-locked (pinned) host memory: from pageable memory `cudaMemcpyAsync` is
    synchronous, from pinned memory it runs on the stream. `synchronize` must run before a downloaded
    array is read; the staging buffers are reused by the next call, so callers copy results out.
    """

    def __init__(self) -> None:
        cudart = self._cudart = import_cudart()
        self.stream = cuda_check(cudart.cudaStreamCreate(), "cudaStreamCreate")
        # cudaFree synchronizes the device, so a grown buffer's old memory is no longer in use.
        self._device = GrowOnlyPool(
            lambda n: cuda_check(cudart.cudaMalloc(n), f"cudaMalloc({n} bytes)"),
            lambda p: cuda_check(cudart.cudaFree(p), "cudaFree"),
        )
        self._pinned = GrowOnlyPool(
            lambda n: cuda_check(cudart.cudaMallocHost(n), f"cudaMallocHost({n} bytes)"),
            lambda p: cuda_check(cudart.cudaFreeHost(p), "cudaFreeHost"),
        )

    @property
    def handle(self) -> int:
        return int(self.stream)

    def buffer(self, key: Hashable, nbytes: int) -> int:
        """A device pointer with at least `nbytes` bytes for `key` (grow-only)."""
        return self._device.get(key, nbytes)

    def capacity(self, key: Hashable) -> int:
        return self._device.capacity(key)

    def pinned(self, key: Hashable, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
        """A pinned host array for `key` (grow-only memory, reused by the next call with `key`)."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        return host_array(self._pinned.get(key, nbytes), shape, dtype)

    def upload(self, key: Hashable, array: np.ndarray) -> int:
        """Queue a copy of `array` to `key`'s device buffer (through its pinned buffer); its pointer."""
        pointer = self.buffer(key, array.nbytes)
        if array.nbytes:
            staged = self.pinned(key, array.shape, array.dtype)
            staged[...] = array
            kind = self._cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
            call = self._cudart.cudaMemcpyAsync(pointer, staged.ctypes.data, array.nbytes, kind, self.stream)
            cuda_check(call, "cudaMemcpyAsync (host to device)")
        return pointer

    def download(
        self, key: Hashable, pointer: int, shape: tuple[int, ...], dtype: np.dtype | type
    ) -> np.ndarray:
        """Queue a copy from device `pointer` into `key`'s pinned array; valid after `synchronize`."""
        host = self.pinned(key, shape, dtype)
        if host.nbytes:
            kind = self._cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
            call = self._cudart.cudaMemcpyAsync(host.ctypes.data, pointer, host.nbytes, kind, self.stream)
            cuda_check(call, "cudaMemcpyAsync (device to host)")
        return host

    def synchronize(self) -> None:
        cuda_check(self._cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def close(self) -> None:
        if self.stream is None:
            return
        self.synchronize()
        self._device.free_all()
        self._pinned.free_all()
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
        self._graphs: dict[str, _EngineGraph] = {}
        self._runtime = trt.Runtime(tensorrt_logger())
        try:
            self._cuda = CudaBuffers()
        except RuntimeError as exc:  # no stream: the GPU is out of memory or unusable
            raise EngineLoadError(f"cannot set up CUDA for the TensorRT engines: {exc}") from exc
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
        try:
            engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
            engine = require_loaded(
                engine,
                f"TensorRT could not deserialize {path} (see its log above; a plan built on another OS "
                "or TensorRT build does not load); rebuild it here with `dmf-export --trt`",
            )
            context = require_loaded(
                engine.create_execution_context(),
                f"TensorRT could not create an execution context for {path} (out of GPU memory?)",
            )
        except EngineLoadError:
            raise
        except Exception as exc:  # TensorRT's bindings raise their own types for the same failures
            raise EngineLoadError(f"TensorRT could not load {path}: {exc}") from exc
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
            require_accepted(
                context.set_input_shape(name, array.shape),
                f"TensorRT rejected the shape {array.shape} for {graph}.{name}",
            )
            self._bind(context, graph, name, cuda.upload((graph, name), array))
        outputs: dict[str, tuple[tuple[int, ...], np.dtype, int]] = {}
        for name, dtype in state.outputs.items():
            shape = tuple(int(d) for d in context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise EngineRunError(f"TensorRT could not infer the shape of {graph}.{name}: {shape}")
            pointer = cuda.buffer((graph, name), int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
            self._bind(context, graph, name, pointer)
            outputs[name] = (shape, dtype, pointer)
        require_accepted(
            context.execute_async_v3(cuda.handle),
            f"TensorRT failed to run the {graph} engine (see its log above)",
        )
        hosts = {
            name: cuda.download((graph, name), pointer, shape, dtype)
            for name, (shape, dtype, pointer) in outputs.items()
        }
        cuda.synchronize()
        # Copied out of the pinned buffers, which the next call reuses. The bundle contract is float32
        # out; fp16 engines keep float32 I/O, but be strict anyway.
        return {name: np.array(host, dtype=np.float32) for name, host in hosts.items()}

    @staticmethod
    def _bind(context: Any, graph: str, name: str, pointer: int) -> None:
        require_accepted(
            context.set_tensor_address(name, pointer),
            f"TensorRT rejected the device address of {graph}.{name} (a tensor name the engine "
            "does not have, or a misaligned buffer)",
        )

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
