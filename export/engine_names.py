"""Names of TensorRT engine and timing-cache files: each carries the TensorRT version and GPU it is for."""

from __future__ import annotations

import re

from dmf_deploy.manifest import GRAPH_NAMES
from dmf_deploy.tensorrt_support import version_parts

PRECISIONS = ("fp32", "fp16")
_VENDOR_WORDS = {"nvidia", "geforce", "tesla", "quadro"}


def trt_version_tag(version: str) -> str:
    """ "10.8.0.43" -> "10.8.0": the build number does not change the engine format."""
    return ".".join(str(p) for p in (version_parts(version) + (0, 0))[:3])


def sanitize_gpu_name(name: str) -> str:
    """ "NVIDIA GeForce RTX 4090" -> "RTX4090": vendor words dropped, only [A-Za-z0-9] kept."""
    words = [w for w in re.split(r"[^A-Za-z0-9]+", name) if w and w.lower() not in _VENDOR_WORDS]
    return "".join(words)[:40] or "gpu"


def sm_tag(compute_capability: str) -> str:
    """ "8.9" -> "sm89"."""
    major, _, minor = str(compute_capability).partition(".")
    return f"sm{int(major)}{int(minor or 0)}"


def engine_key(graph: str, trt_version: str, gpu_name: str, compute_capability: str, precision: str) -> str:
    """The identity of one engine: e.g. ``head.trt10.8.0.sm89.RTX4090.fp16``.

    Engines are valid only for the TensorRT version and GPU that built them, so the key (and the file
    name) carries both; the manifest entry keeps the unabbreviated values that staleness checks use.
    """
    if graph not in GRAPH_NAMES:
        raise ValueError(f"graph must be one of {GRAPH_NAMES}, got {graph!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return (
        f"{graph}.trt{trt_version_tag(trt_version)}.{sm_tag(compute_capability)}."
        f"{sanitize_gpu_name(gpu_name)}.{precision}"
    )


def engine_file_name(
    graph: str, trt_version: str, gpu_name: str, compute_capability: str, precision: str
) -> str:
    return engine_key(graph, trt_version, gpu_name, compute_capability, precision) + ".plan"


def timing_cache_name(trt_version: str, gpu_name: str, compute_capability: str) -> str:
    # A timing cache is only valid for one TensorRT version and GPU (it is loaded with
    # ignore_mismatch=False), so each combination keeps its own file.
    return (
        f"timing.trt{trt_version_tag(trt_version)}.{sm_tag(compute_capability)}."
        f"{sanitize_gpu_name(gpu_name)}.cache"
    )
