"""TensorRT engines for a bundle: optimization profiles, FP16 casting, engine build and naming.

This is the only export-side module that imports `tensorrt`, and it does so inside functions, so the
module (profile shapes, engine names, the FP16 ONNX cast, the parity report's onnxruntime half)
imports and works on machines without TensorRT.

Written against the TensorRT 10+ name-based Python API, and kept valid on TensorRT 11:

- the network is always created STRONGLY_TYPED (required for FP16 on 10.x, ignored because always on in
  11.x) and never with EXPLICIT_BATCH (deprecated and implicit since 10.0);
- `BuilderFlag.FP16` is never used (removed in 11): FP16 means an FP16-cast ONNX graph, see
  `cast_onnx_to_fp16`.

Entry points for the CLI (`dmf-export --trt [--fp16] [--max-batch] [--max-classes] [--workspace]`):
`build_trt_for_bundle`; for the parity harness: `fp16_parity_report`.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dmf_deploy.atomic import atomic_write_bytes
from dmf_deploy.manifest import (
    GRAPH_NAMES,
    EngineSpec,
    Manifest,
    bundle_graph_io,
    sha256_file,
    verify_graph,
)

# The runtime module owns the (lazy) tensorrt / cuda-python imports and the GPU query; it imports
# neither torch nor tensorrt at module level, so the builder reuses it rather than duplicating them.
from dmf_deploy.runtime.tensorrt_backend import (
    TRT_MISSING,
    gpu_identity,
    tensorrt_import_reason,
    version_parts,
)

log = logging.getLogger("dmf_deploy.export")

PRECISIONS = ("fp32", "fp16")
DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_CLASSES = 256
DEFAULT_WORKSPACE_MB = 1024
# The live camera loop runs one frame at a time and enrolls one class at a time, so TensorRT tunes its
# kernels for batch 1; the class axis is tuned for a typical gallery of a few dozen classes.
DEFAULT_OPT_BATCH = 1
DEFAULT_OPT_CLASSES = 32


Shape = tuple[int, ...]
ProfileShapes = dict[str, tuple[Shape, Shape, Shape]]


# ----- availability -----------------------------------------------------------------------------------


def tensorrt_unavailable_reason() -> str | None:
    """None when `import tensorrt` works and it is TensorRT 10 or later; else why not."""
    return tensorrt_import_reason()


# ----- names and keys -----------------------------------------------------------------------------


def trt_version_tag(version: str) -> str:
    """ "10.8.0.43" -> "10.8.0": the build number does not change the engine format."""
    return ".".join(str(p) for p in (version_parts(version) + (0, 0))[:3])


_VENDOR_WORDS = {"nvidia", "geforce", "tesla", "quadro"}


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
    # A timing cache is only valid for one TensorRT version and GPU (we load it with
    # ignore_mismatch=False), so each combination keeps its own file.
    return (
        f"timing.trt{trt_version_tag(trt_version)}.{sm_tag(compute_capability)}."
        f"{sanitize_gpu_name(gpu_name)}.cache"
    )


# ----- optimization profiles ----------------------------------------------------------------------


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


def _profiles_json(shapes: ProfileShapes) -> dict[str, dict[str, list[int]]]:
    return {name: {"min": list(a), "opt": list(b), "max": list(c)} for name, (a, b, c) in shapes.items()}


# ----- FP16 ONNX cast -----------------------------------------------------------------------------

# Op types computed in float32 inside the FP16 graph. Not a precaution: ReduceL2 (what torch exports
# for F.normalize) is imported by TensorRT as x*x -> ReduceSum -> Sqrt, and the sum of squares over
# C = 640 channels overflows float16's 65504 as soon as the features' RMS exceeds 10. These ops run
# on the support side (once per class), so keeping them in float32 costs nothing per frame.
DEFAULT_KEEP_FP32_OPS = frozenset({"ReduceL2", "ReduceSumSquare", "LpNormalization"})
# Ops that read only their input's shape: they take whichever float type is there, no Cast needed.
_SHAPE_ONLY_OPS = frozenset({"Shape", "Size"})
# Ops whose float output type comes from a `dtype` attribute (float32 when absent).
_DTYPE_ATTR_OPS = frozenset(
    {"EyeLike", "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike"}
)
_FP16_MAX = float(np.finfo(np.float16).max)
_FP16_TINY = float(2.0**-24)  # smallest float16 subnormal


def cast_onnx_to_fp16(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    keep_fp32_ops: Iterable[str] = DEFAULT_KEEP_FP32_OPS,
) -> dict[str, Any]:
    """Write an FP16 copy of an ONNX graph that TensorRT builds as a STRONGLY_TYPED network.

    Design: the graph's inputs and outputs stay float32 and Cast nodes at the boundary convert to and
    from float16. Everything float inside becomes float16: float32 initializers, Constant / Cast /
    ConstantOfShape nodes (a Cast to float becomes a Cast to float16), and so every computed tensor by
    ONNX's type propagation, GridSample grids included. Integer tensors (Shape, indices, axes) are not
    touched. Why float32 I/O: the bundle contract (`graph_io`), the runtime, Triton configs and the
    clients stay the same for fp32 and fp16 engines, and in a strongly typed network the Cast layers
    are the only place precision changes, so TensorRT has nothing to guess. Ops in `keep_fp32_ops`
    (and inputs the spec types as float32 only, e.g. Resize scales) stay float32 behind Casts.

    Constants outside float16's range are clipped to +-65504, and nonzero ones below its smallest
    subnormal become +-2^-24 rather than 0 (epsilon guards must stay nonzero).

    Returns statistics: converted initializers, inserted casts, clipped and tiny values, and the op
    types kept float32.
    """
    import onnx

    model = onnx.load(str(src))
    stats = convert_model_to_fp16(model, keep_fp32_ops=keep_fp32_ops)
    onnx.checker.check_model(model, full_check=True)
    data = model.SerializeToString()
    atomic_write_bytes(dst, data)
    return stats


def convert_model_to_fp16(
    model: Any, *, keep_fp32_ops: Iterable[str] = DEFAULT_KEEP_FP32_OPS
) -> dict[str, Any]:
    """In-place float32 -> float16 conversion of an onnx.ModelProto (see `cast_onnx_to_fp16`)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    float32, float16 = TensorProto.FLOAT, TensorProto.FLOAT16
    keep = frozenset(keep_fp32_ops)
    graph = model.graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                raise ValueError(
                    f"cannot cast {node.op_type} node {node.name!r}: subgraphs are not supported"
                )

    # Element types of every tensor, from strict shape inference on the float32 graph.
    inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    elem: dict[str, int] = {}
    for vi in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        if vi.type.HasField("tensor_type"):
            elem[vi.name] = vi.type.tensor_type.elem_type
    initializers = {init.name: init for init in graph.initializer}
    for name, init in initializers.items():
        elem[name] = init.data_type

    def is_float(name: str) -> bool:
        return bool(name) and elem.get(name) == float32

    graph_inputs = {vi.name for vi in graph.input} - set(initializers)
    graph_outputs = {vi.name for vi in graph.output}
    nodes = list(graph.node)
    opset = {entry.domain or "": entry.version for entry in model.opset_import}
    rules = [_fp16_rules(node, opset) for node in nodes]
    # A node stays float32 when asked to, or when its schema has no float16 variant (e.g. Range).
    kept = [node.op_type in keep or not fp16_ok for node, (fp16_ok, _) in zip(nodes, rules)]

    def required(index: int, slot: int) -> int | None:
        """The float type input `slot` of node `index` must read; None: whatever is produced."""
        node = nodes[index]
        if node.op_type in _SHAPE_ONLY_OPS:
            return None
        return float32 if kept[index] or slot in rules[index][1] else float16

    wants: dict[str, set[int]] = {}  # tensor -> dtypes its consumers need
    for index, node in enumerate(nodes):
        for slot, name in enumerate(node.input):
            need = required(index, slot) if is_float(name) else None
            if need is not None:
                wants.setdefault(name, set()).add(need)
    for name in graph_outputs:
        if is_float(name):
            wants.setdefault(name, set()).add(float32)

    def flexible_dtype(name: str) -> int:
        # Constants and casts can produce either type; float16 if anything inside wants it.
        return float16 if float16 in wants.get(name, ()) else float32

    produced: dict[str, int] = {}
    for name in graph_inputs:
        if is_float(name):
            produced[name] = float32
    kept_ops: dict[str, int] = {}
    for node, is_kept in zip(nodes, kept):
        if is_kept and any(is_float(name) for name in (*node.input, *node.output)):
            kept_ops[node.op_type] = kept_ops.get(node.op_type, 0) + 1
    stats = {
        "initializers_converted": 0,
        "clipped": 0,
        "tiny_kept_nonzero": 0,
        "casts_inserted": 0,
        "kept_fp32": kept_ops,
    }

    for name, init in initializers.items():
        if init.data_type != float32:
            continue
        # An initializer that is also a graph output keeps its float32 name and data.
        produced[name] = float32 if name in graph_outputs else flexible_dtype(name)
        if produced[name] == float16:
            values = numpy_helper.to_array(init).astype(np.float32)
            init.CopyFrom(numpy_helper.from_array(_to_fp16(values, stats), name))
            stats["initializers_converted"] += 1

    for index, node in enumerate(nodes):
        float_outputs = [o for o in node.output if is_float(o)]
        if not float_outputs:
            continue
        if kept[index]:
            dtype = float32
        elif node.op_type in ("Constant", "Cast", "ConstantOfShape") or node.op_type in _DTYPE_ATTR_OPS:
            dtype = flexible_dtype(float_outputs[0])
            if dtype == float16:
                _retype_node_to_fp16(node, stats, helper, numpy_helper)
        else:
            dtype = float16  # type propagation: its float inputs are float16 now
        for out in float_outputs:
            produced[out] = dtype

    # Every float tensor now has a produced dtype; give each consumer the version it needs.
    versions: dict[str, dict[int, str]] = {}
    for name, dtype in produced.items():
        base = name
        if name in graph_outputs and dtype == float16:
            base = f"{name}__fp16"  # the float32 name belongs to the boundary Cast below
            _rename_output(nodes, name, base)
        versions[name] = {dtype: base}
    new_nodes: list[Any] = []

    def version(name: str, dtype: int | None) -> str:
        have = versions[name]
        if dtype is None:
            return next(iter(have.values()))  # the produced version, listed first
        if dtype not in have:
            ((source_dtype, source),) = have.items()
            if dtype == float32 and name in graph_outputs:
                target = name
            else:
                target = f"{name}__{'fp32' if dtype == float32 else 'fp16'}"
            new_nodes.append(helper.make_node("Cast", [source], [target], to=dtype, name=f"{target}__cast"))
            stats["casts_inserted"] += 1
            have[dtype] = target
        return have[dtype]

    for index, node in enumerate(nodes):
        for slot, name in enumerate(node.input):
            if is_float(name):
                node.input[slot] = version(name, required(index, slot))
    for name in graph_outputs:
        if is_float(name):
            version(name, float32)

    ordered = _topological_order(nodes + new_nodes, graph_inputs | set(initializers))
    del graph.node[:]
    graph.node.extend(ordered)
    # Types of intermediate tensors changed: drop the stale annotations and check that strict type
    # inference accepts the result (mixed float16/float32 operands would fail here, as in TensorRT).
    del graph.value_info[:]
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    return stats


def _fp16_rules(node: Any, opset: Mapping[str, int]) -> tuple[bool, frozenset[int]]:
    """(whether the op has a float16 variant, input slots the schema types as float32 only).

    Read from the ONNX schema at the model's opset: e.g. Range's type T has no float16 (so the node
    stays float32), Resize's `scales` input is tensor(float) whatever X is (so only that slot does).
    """
    import onnx

    domain = node.domain or ""
    try:
        schema = onnx.defs.get_schema(node.op_type, opset.get(domain, 1), domain)
    except onnx.defs.SchemaError:
        return True, frozenset()  # unknown/custom op: assume its output follows its inputs
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    fp32_slots = set()
    fp16_ok = True

    def float32_only(type_str: str) -> bool:
        types = allowed.get(type_str, {type_str})
        return "tensor(float)" in types and "tensor(float16)" not in types

    for slot in range(len(node.input)):
        if not schema.inputs:
            break
        formal = schema.inputs[min(slot, len(schema.inputs) - 1)]  # the last one may be variadic
        if float32_only(formal.type_str):
            if formal.type_str in allowed:
                fp16_ok = False  # a type parameter: every tensor bound to it must stay float32
            else:
                fp32_slots.add(slot)
    if any(float32_only(formal.type_str) for formal in schema.outputs):
        fp16_ok = False
    return fp16_ok, frozenset(fp32_slots)


def _to_fp16(values: np.ndarray, stats: dict[str, Any]) -> np.ndarray:
    finite = np.isfinite(values)
    big = finite & (np.abs(values) > _FP16_MAX)
    tiny = (values != 0) & (np.abs(values) < _FP16_TINY)
    stats["clipped"] += int(big.sum())
    stats["tiny_kept_nonzero"] += int(tiny.sum())
    # Clip rather than overflow to inf: a saturated weight is wrong, an infinite one poisons the output.
    values = np.where(big, np.sign(values) * _FP16_MAX, values)
    # Never round a nonzero constant to zero: epsilon guards such as F.normalize's Clip(min=1e-12)
    # must stay positive, or an all-zero feature position divides 0/0 = NaN. The smallest float16
    # subnormal (6e-8) keeps the guard and is a negligible change for any weight.
    return np.where(tiny, np.sign(values) * _FP16_TINY, values).astype(np.float16)


def _retype_node_to_fp16(node: Any, stats: dict[str, Any], helper: Any, numpy_helper: Any) -> None:
    from onnx import TensorProto

    float32, float16 = TensorProto.FLOAT, TensorProto.FLOAT16
    if node.op_type == "Cast":
        for attr in node.attribute:
            if attr.name == "to" and attr.i == float32:
                attr.i = float16
        return
    if node.op_type in _DTYPE_ATTR_OPS:
        for attr in node.attribute:
            if attr.name == "dtype":
                attr.i = float16
                return
        node.attribute.append(helper.make_attribute("dtype", float16))
        return
    if node.op_type == "ConstantOfShape":
        for attr in node.attribute:
            if attr.name == "value" and attr.t.data_type == float32:
                values = numpy_helper.to_array(attr.t).astype(np.float32)
                attr.t.CopyFrom(numpy_helper.from_array(_to_fp16(values, stats), attr.t.name))
                return
        if not any(attr.name == "value" for attr in node.attribute):  # default: float32 zero
            zero = numpy_helper.from_array(np.zeros(1, dtype=np.float16))
            node.attribute.append(helper.make_attribute("value", zero))
        return
    # Constant: value (tensor), value_float, value_floats.
    for position, attr in enumerate(node.attribute):
        if attr.name == "value" and attr.t.data_type == float32:
            values = numpy_helper.to_array(attr.t).astype(np.float32)
            attr.t.CopyFrom(numpy_helper.from_array(_to_fp16(values, stats), attr.t.name))
            return
        if attr.name in ("value_float", "value_floats"):
            scalar = attr.name == "value_float"
            values = np.asarray(attr.f if scalar else list(attr.floats), dtype=np.float32)
            tensor = numpy_helper.from_array(_to_fp16(values, stats))
            del node.attribute[position]
            node.attribute.append(helper.make_attribute("value", tensor))
            return


def _rename_output(nodes: list[Any], old: str, new: str) -> None:
    for node in nodes:
        for slot, name in enumerate(node.output):
            if name == old:
                node.output[slot] = new


def _topological_order(nodes: list[Any], available: set[str]) -> list[Any]:
    """Stable Kahn sort: the original order wherever dependencies allow (inserted Casts move up)."""
    ready = set(available) | {""}  # "" is an omitted optional input
    pending = list(nodes)
    ordered: list[Any] = []
    while pending:
        rest = []
        for node in pending:
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            missing = sorted({n for node in rest for n in node.input if n not in ready})
            raise ValueError(f"graph is not a DAG or reads undefined tensors: {missing[:5]}")
        pending = rest
    return ordered


# ----- engine build ---------------------------------------------------------------------------------


def _parser_errors(parser: Any) -> str:
    lines = []
    for index in range(parser.num_errors):
        error = parser.get_error(index)
        try:
            where = f"{error.node_operator()} node {error.node_name()!r}: " if error.node() >= 0 else ""
            lines.append(f"{where}{error.desc()}")
        except AttributeError:  # older/newer ParserError without those accessors
            lines.append(str(error))
    return "\n  ".join(lines) or "no error was recorded (is the file a valid ONNX model?)"


def build_engines(
    bundle_dir: str | os.PathLike[str],
    manifest: Manifest,
    *,
    fp16: bool = False,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_classes: int = DEFAULT_MAX_CLASSES,
    workspace_mb: int = DEFAULT_WORKSPACE_MB,
    timing_cache_path: str | os.PathLike[str] | None = None,
) -> dict[str, EngineSpec]:
    """Build one engine per bundle graph on the current GPU; return the manifest's engines.

    Plans are written atomically into the bundle; the manifest itself is not touched (see
    `build_trt_for_bundle`). The timing cache (default: `timing.<trt>.<sm>.<gpu>.cache` in the
    bundle) makes rebuilds on the same GPU fast.
    """
    reason = tensorrt_unavailable_reason()
    if reason:
        raise RuntimeError(f"cannot build TensorRT engines: {reason}")
    import tensorrt as trt

    bundle = Path(bundle_dir)
    gpu_name, cc = gpu_identity()
    version = trt.__version__
    precision = "fp16" if fp16 else "fp32"
    io = bundle_graph_io(manifest)
    cache_path = (
        Path(timing_cache_path) if timing_cache_path else bundle / timing_cache_name(version, gpu_name, cc)
    )
    cache_bytes = cache_path.read_bytes() if cache_path.is_file() else b""

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    engines: dict[str, EngineSpec] = {}
    with tempfile.TemporaryDirectory(prefix="dmf-trt-") as scratch:
        for graph in GRAPH_NAMES:
            onnx_path = verify_graph(bundle, manifest, graph)
            if fp16:
                fp16_path = Path(scratch) / f"{graph}.fp16.onnx"
                cast_onnx_to_fp16(onnx_path, fp16_path)
                onnx_path = fp16_path
            shapes = profile_shapes(io, graph, max_batch, max_classes)

            # Strongly typed in both precisions: the ONNX types are the engine's types, so "fp32" is
            # float32 end to end and "fp16" is exactly the cast graph (TensorRT 11 types this way anyway).
            flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
            network = builder.create_network(flags)
            parser = trt.OnnxParser(network, logger)
            # parse_from_file, not parse(bytes): the parser then resolves external data next to the file.
            if not parser.parse_from_file(str(onnx_path)):
                raise RuntimeError(f"TensorRT cannot parse {onnx_path.name}:\n  {_parser_errors(parser)}")

            config = builder.create_builder_config()
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
            if not fp16 and hasattr(trt.BuilderFlag, "TF32"):
                # TF32 would silently round float32 convolutions/matmuls to 10-bit mantissas; an engine
                # labelled fp32 should match onnxruntime's float32 numbers.
                config.clear_flag(trt.BuilderFlag.TF32)
            profile = builder.create_optimization_profile()
            for name, (lo, opt, hi) in shapes.items():
                profile.set_shape(name, lo, opt, hi)
            config.add_optimization_profile(profile)
            try:
                cache = config.create_timing_cache(cache_bytes)
            except Exception:  # a truncated or foreign cache file: TensorRT raises its own types
                cache = None
            if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
                log.warning(
                    "timing cache %s does not match this GPU/TensorRT; starting a fresh one", cache_path
                )
                cache = config.create_timing_cache(b"")
                config.set_timing_cache(cache, ignore_mismatch=False)

            log.info("building the %s engine (%s, %s, %s)", graph, precision, gpu_name, version)
            plan = builder.build_serialized_network(network, config)
            if plan is None:
                raise RuntimeError(
                    f"TensorRT failed to build the {graph} engine; its log above says why "
                    "(a larger --workspace or smaller --max-batch/--max-classes may help)"
                )
            cache_bytes = bytes(config.get_timing_cache().serialize())
            file_name = engine_file_name(graph, version, gpu_name, cc, precision)
            atomic_write_bytes(bundle / file_name, bytes(plan))
            engines[graph] = EngineSpec(
                file=file_name,
                sha256=sha256_file(bundle / file_name),
                tensorrt_version=version,
                gpu=gpu_name,
                compute_capability=cc,
                precision=precision,
                profiles=_profiles_json(shapes),
            )
    if cache_bytes:
        atomic_write_bytes(cache_path, cache_bytes)
    return engines


def build_trt_for_bundle(
    bundle_dir: str | os.PathLike[str],
    *,
    fp16: bool = False,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_classes: int = DEFAULT_MAX_CLASSES,
    workspace_mb: int = DEFAULT_WORKSPACE_MB,
) -> dict[str, EngineSpec]:
    """`dmf-export --trt`: build the engines, record them in manifest.json (atomically), return them.

    Plan files that the previous manifest named and the new one does not (another GPU or TensorRT
    version) are removed, so a bundle holds one consistent set of engines.
    """
    bundle = Path(bundle_dir)
    manifest = Manifest.read(bundle)
    engines = build_engines(
        bundle, manifest, fp16=fp16, max_batch=max_batch, max_classes=max_classes, workspace_mb=workspace_mb
    )
    write_engines_to_manifest(bundle, engines)
    return engines


def write_engines_to_manifest(
    bundle_dir: str | os.PathLike[str], engines: Mapping[str, EngineSpec]
) -> None:
    """Replace the manifest's engines atomically and delete plans it no longer names."""
    bundle = Path(bundle_dir)
    manifest = Manifest.read(bundle)
    manifest.with_engines(engines).write(bundle)
    keep = {entry.file for entry in engines.values()}
    for entry in manifest.engines.values():
        name = entry.file
        stale = bundle / name
        # Only a bare *.plan name inside the bundle: never follow a path out of it.
        if name.endswith(".plan") and Path(name).name == name and name not in keep and stale.is_file():
            stale.unlink()


# ----- FP16 parity ------------------------------------------------------------------------------------


def fp16_parity_report(
    bundle_dir: str | os.PathLike[str],
    *,
    classes: int = 5,
    queries_per_class: int = 4,
    seed: int = 0,
) -> dict[str, Any]:
    """How far FP16 moves the bundle's numbers; for the parity harness.

    Runs a synthetic episode (distinct class patterns, noisy shots and queries, so scores really
    differ between classes) through the bundle's three float32 graphs and their FP16 casts in
    onnxruntime (CPU), feeding each graph the float32 pipeline's inputs so errors do not compound, and
    reports per graph and output the relative error max|fp16 - fp32| / max|fp32| plus the top-1
    agreement of the scores. Caveat: onnxruntime's CPU provider lacks many float16 kernels and runs
    those in float32 between casts, so this measures the weight and tensor rounding of the cast graph;
    TensorRT's float16 arithmetic is measured under "tensorrt" when this machine can run the bundle's
    engines (they must be fp16 engines built by `build_trt_for_bundle(..., fp16=True)`).
    """
    import onnxruntime as ort

    bundle = Path(bundle_dir)
    manifest = Manifest.read(bundle)
    config = manifest.model
    rng = np.random.default_rng(seed)
    size = config.preprocess.image_size
    patterns = rng.normal(0.0, 1.0, (classes, 3, size, size)).astype(np.float32)

    def noisy(count: int) -> np.ndarray:
        return (
            np.repeat(patterns, count, axis=0) + rng.normal(0, 0.5, (classes * count, 3, size, size))
        ).astype(np.float32)

    shots, queries = noisy(2), noisy(queries_per_class)
    labels = np.repeat(np.arange(classes), queries_per_class)
    report: dict[str, Any] = {"graphs": {}, "classes": classes, "queries": int(len(queries))}
    with tempfile.TemporaryDirectory(prefix="dmf-fp16-") as scratch:
        options = ort.SessionOptions()
        options.log_severity_level = 3  # float16 nodes without CPU kernels log warnings, not news here
        sessions = {}
        for graph in GRAPH_NAMES:
            fp32_path = verify_graph(bundle, manifest, graph)
            fp16_path = Path(scratch) / f"{graph}.fp16.onnx"
            cast_onnx_to_fp16(fp32_path, fp16_path)
            sessions[graph] = tuple(
                ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
                for p in (fp32_path, fp16_path)
            )

        feeds: dict[str, dict[str, np.ndarray]] = {}
        refs: dict[str, dict[str, np.ndarray]] = {}

        def run(
            graph: str, inputs: dict[str, np.ndarray]
        ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
            ref_session, half_session = sessions[graph]
            names = [o.name for o in ref_session.get_outputs()]
            ref = dict(zip(names, ref_session.run(names, inputs)))
            half = dict(zip(names, half_session.run(names, inputs)))
            feeds[graph], refs[graph] = inputs, ref
            report["graphs"][graph] = {
                name: {"relative_error": _relative_error(half[name], ref[name])} for name in names
            }
            return ref, half

        query_features = sessions["backbone"][0].run(["features"], {"images": queries})[0]
        support_features = run("backbone", {"images": shots})[0]["features"]
        prototypes = support_features.reshape(classes, 2, *support_features.shape[1:]).mean(axis=1)
        bank, _ = run("support", {"prototypes": prototypes.astype(np.float32)})
        ref, half = run("head", {"query_features": query_features, **bank})
    scores_ref, scores_half = ref["scores"], half["scores"]
    report["top1_agreement"] = float(np.mean(scores_ref.argmax(1) == scores_half.argmax(1)))
    report["fp32_accuracy"] = float(np.mean(scores_ref.argmax(1) == labels))
    report["tensorrt"] = _tensorrt_parity(bundle, manifest, feeds, refs)
    return report


def _relative_error(got: np.ndarray, ref: np.ndarray) -> float:
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    diff = float(np.max(np.abs(got.astype(np.float64) - ref))) if ref.size else 0.0
    return diff / scale if scale > 0 else diff


def _tensorrt_parity(
    bundle: Path,
    manifest: Mapping[str, Any],
    feeds: dict[str, dict[str, np.ndarray]],
    refs: dict[str, dict[str, np.ndarray]],
) -> dict[str, Any]:
    """The bundle's engines against the float32 ONNX outputs on the same inputs, when they can run."""
    from dmf_deploy.runtime import tensorrt_backend

    reason = tensorrt_backend.unavailable_reason(bundle, manifest)
    if reason is not None:
        return {"skipped": reason}
    backend = tensorrt_backend.TensorRTBackend(bundle, manifest)
    try:
        outputs = {graph: backend.run(graph, inputs) for graph, inputs in feeds.items()}
    finally:
        backend.close()
    scores = outputs["head"]["scores"]
    return {
        "precision": backend.precision,
        "graphs": {
            graph: {
                name: {"relative_error": _relative_error(value, refs[graph][name])}
                for name, value in out.items()
            }
            for graph, out in outputs.items()
        },
        "top1_agreement": float(np.mean(scores.argmax(1) == refs["head"]["scores"].argmax(1))),
    }


__all__ = [
    "DEFAULT_KEEP_FP32_OPS",
    "PRECISIONS",
    "TRT_MISSING",
    "build_engines",
    "build_trt_for_bundle",
    "cast_onnx_to_fp16",
    "convert_model_to_fp16",
    "engine_file_name",
    "engine_key",
    "fp16_parity_report",
    "gpu_identity",
    "profile_shapes",
    "sanitize_gpu_name",
    "tensorrt_unavailable_reason",
    "trt_version_tag",
    "write_engines_to_manifest",
]
