"""FP16 copies of ONNX graphs for TensorRT's STRONGLY_TYPED networks (TensorRT 11 has no FP16 flag).

The graph's inputs and outputs stay float32 and Cast nodes at the boundary convert to and from float16:
the bundle contract (`graph_io`), the runtime, Triton configs and clients stay the same for fp32 and
fp16 engines, and in a strongly typed network the Casts are the only place precision changes, so
TensorRT has nothing to guess.

This is our own converter rather than onnxconverter-common's `convert_float_to_float16`: on the DMF
graphs that one writes graphs that are not valid ONNX (tests/test_tensorrt.py,
`test_onnxconverter_common_breaks_the_dmf_graphs`, shows how).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from dmf_deploy.atomic import atomic_write_bytes

# Op types computed in float32 inside the FP16 graph. Not a precaution: ReduceL2 (what torch exports
# for F.normalize) is imported by TensorRT as x*x -> ReduceSum -> Sqrt, and the sum of squares over
# C = 640 channels overflows float16's 65504 as soon as the features' RMS exceeds 10. These ops run
# on the support side (once per class), so keeping them in float32 costs nothing per frame.
DEFAULT_KEEP_FP32_OPS = frozenset({"ReduceL2", "ReduceSumSquare", "LpNormalization"})
_NORM_OPS = DEFAULT_KEEP_FP32_OPS
# The epsilon guard after such a norm, x / max(||x||, eps) (F.normalize: ReduceL2 -> Clip -> Expand ->
# Div), stays float32 with it. In float16, eps = 1e-12 becomes 2^-24, a subnormal that kernels which
# flush subnormals read as 0, so an all-zero prototype would divide 0/0. The guard ops are followed
# from the norm; the division (or reciprocal) that reads them ends the float32 chain.
_NORM_GUARD_OPS = frozenset({"Clip", "Max", "Add", "Sqrt", "Expand", "Reshape", "Unsqueeze", "Squeeze"})
_NORM_DIVIDE_OPS = frozenset({"Div", "Reciprocal"})
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
    (and inputs the spec types as float32 only, e.g. Resize scales) stay float32 behind Casts; so do
    the epsilon guard and the division after a kept norm (an L2 normalisation stays float32 whole).

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
    _keep_norm_guards(nodes, kept, keep & _NORM_OPS)

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


def _keep_norm_guards(nodes: list[Any], kept: list[bool], norm_ops: Iterable[str]) -> None:
    """Mark, in place, the epsilon guard and division after each kept norm node as kept float32."""
    roots = frozenset(norm_ops)
    consumers: dict[str, list[int]] = {}
    for index, node in enumerate(nodes):
        for name in node.input:
            consumers.setdefault(name, []).append(index)
    frontier = [i for i, node in enumerate(nodes) if kept[i] and node.op_type in roots]
    while frontier:
        for name in nodes[frontier.pop()].output:
            for index in consumers.get(name, ()):
                op = nodes[index].op_type
                if kept[index] or op not in _NORM_GUARD_OPS | _NORM_DIVIDE_OPS:
                    continue
                kept[index] = True
                if op in _NORM_GUARD_OPS:
                    frontier.append(index)


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
