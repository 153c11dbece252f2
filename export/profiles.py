"""TensorRT optimization profiles: the (min, opt, max) shape of every graph input."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_CLASSES = 256
# The live camera loop runs one frame at a time and enrolls one class at a time, so TensorRT tunes its
# kernels for batch 1; the class axis is tuned for a typical gallery of a few dozen classes.
DEFAULT_OPT_BATCH = 1
DEFAULT_OPT_CLASSES = 32

Shape = tuple[int, ...]
ProfileShapes = dict[str, tuple[Shape, Shape, Shape]]


def choose_opt_batch(max_batch: int, opt_batch: int | None = None, *, triton: bool = False) -> int:
    """The batch (B, Q) TensorRT tunes its kernels for: `--opt-batch` when given; for a Triton
    repository `--max-batch`, since Triton batches backbone requests dynamically up to it; else 1."""
    if opt_batch is not None:
        return int(opt_batch)
    return int(max_batch) if triton else DEFAULT_OPT_BATCH


def profile_shapes(
    manifest_graph_io: Mapping[str, Any],
    graph: str,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_classes: int = DEFAULT_MAX_CLASSES,
    max_queries: int | None = None,
    *,
    opt_batch: int = DEFAULT_OPT_BATCH,
    opt_classes: int = DEFAULT_OPT_CLASSES,
) -> ProfileShapes:
    """{input name: (min, opt, max)} for one graph's optimization profile.

    `manifest_graph_io` is `bundle_graph_io(manifest)`: shapes whose strings are the dynamic axes. B (backbone
    images) and Q (head queries) range over 1..max_batch (Q: 1..max_queries, default max_batch), N
    (classes, support and head) over 1..max_classes. `--max-classes` sizes only this profile: ONNX and
    onnxruntime have no class limit.
    """
    max_queries = max_batch if max_queries is None else max_queries
    for flag, value in (("max_batch", max_batch), ("max_classes", max_classes), ("max_queries", max_queries)):
        if int(value) < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    limits = {"B": max_batch, "Q": max_queries, "N": max_classes}
    opts = {"B": opt_batch, "Q": opt_batch, "N": opt_classes}
    if graph not in manifest_graph_io:
        raise ValueError(f"unknown graph {graph!r}; expected one of {sorted(manifest_graph_io)}")
    shapes: ProfileShapes = {}
    for name, dims in manifest_graph_io[graph]["inputs"].items():
        lo, opt, hi = [], [], []
        for dim in dims:
            if isinstance(dim, str):
                if dim not in limits:
                    raise ValueError(f"{graph}.{name} has an unknown dynamic axis {dim!r}")
                top = int(limits[dim])
                lo.append(1)
                opt.append(max(1, min(int(opts[dim]), top)))
                hi.append(top)
            else:
                lo.append(int(dim))
                opt.append(int(dim))
                hi.append(int(dim))
        shapes[name] = (tuple(lo), tuple(opt), tuple(hi))
    return shapes


def profiles_json(shapes: ProfileShapes) -> dict[str, dict[str, list[int]]]:
    """The manifest's form of a profile: {input: {"min": [...], "opt": [...], "max": [...]}}."""
    return {name: {"min": list(a), "opt": list(b), "max": list(c)} for name, (a, b, c) in shapes.items()}
