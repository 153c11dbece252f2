"""What the TensorRT builder (export) and the TensorRT backend (runtime) both need: whether a usable
`tensorrt` imports, TensorRT version numbers, and the identity of the CUDA GPU.

Torch-free and import-light: `tensorrt` and cuda-python are imported inside the functions, so every
part of the package can import this module on machines without them.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

TRT_MISSING = (
    "the tensorrt Python package is not installed; install dmf-deploy[tensorrt] on a machine with "
    "NVIDIA TensorRT 10+"
)


def version_parts(version: str) -> tuple[int, ...]:
    """ "10.8.0.43" -> (10, 8, 0, 43); stops at the first piece that does not start with a digit."""
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


_SHARED: dict[str, Any] = {}
_SHARED_LOCK = threading.Lock()


def process_shared(key: str, factory: Callable[[], T]) -> T:
    """The one object of `key` in this process: made by `factory` on first use, under a lock."""
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = factory()
        return _SHARED[key]


def tensorrt_logger() -> Any:
    """The process's one `trt.Logger` (WARNING), shared by the engine builder and the backend.

    TensorRT keeps one logger per process and warns when a later Builder/Runtime passes a different one.
    """
    import tensorrt as trt

    return process_shared("tensorrt.Logger", lambda: trt.Logger(trt.Logger.WARNING))


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
