"""TensorRT-readiness lint, runnable without TensorRT: what its ONNX parser needs from our graphs.

Per export target: the head's sampling form (GridSample for ``tensorrt``, Gather for ``onnxruntime``,
whose CPU GridSample is several times slower), and for INT8 graphs TensorRT's explicit quantization
form (symmetric int8, zero points 0, weights per output channel) for ``tensorrt``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from dmf_deploy.manifest import HEAD, MAX_OPSET, MIN_OPSET

TARGETS = ("onnxruntime", "tensorrt")

# Standard ONNX ops our graphs may use, all supported by TensorRT 10's ONNX parser.
ALLOWED_OPS = frozenset(
    {
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Neg",
        "Abs",
        "Exp",
        "Log",
        "Sqrt",
        "Reciprocal",
        "Pow",
        "Floor",  # the gather sampler's bilinear corners (dmf_deploy/bundle_head.py)
        "Max",
        "Min",
        "Clip",
        "Relu",
        "LeakyRelu",
        "Sigmoid",
        "Where",
        "Greater",
        "Less",
        "Equal",
        "Not",
        "Conv",
        "MatMul",
        "Gemm",
        "BatchNormalization",
        "MaxPool",
        "AveragePool",
        "GlobalAveragePool",
        "ReduceMean",
        "ReduceSum",
        "ReduceL2",
        "ReduceMax",
        "LpNormalization",
        "Reshape",
        "Transpose",
        "Flatten",
        "Squeeze",
        "Unsqueeze",
        "Concat",
        "Split",
        "Slice",
        "Gather",
        "Expand",
        "Tile",
        "Pad",
        "Shape",
        "Cast",
        "Constant",
        "ConstantOfShape",
        "Identity",
        "Range",
        "GridSample",
        "Softmax",
        "QuantizeLinear",  # INT8 backbones (QDQ; dmf_deploy/export/quantize.py)
        "DequantizeLinear",
    }
)
FORBIDDEN_OPS = frozenset({"Loop", "If", "Scan", "SequenceConstruct", "SequenceAt"})
DISCOURAGED_OPS = {"Einsum": "prefer MatMul: TensorRT lowers Einsum less reliably"}


@dataclass
class LintReport:
    graph: str
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def lint_model(
    model: onnx.ModelProto, name: str, declared_axes: dict[str, dict[int, str]], target: str = "onnxruntime"
) -> LintReport:
    """Check one graph. `declared_axes` maps each input/output name to its {axis: dim name}."""
    report = LintReport(name)
    if name == HEAD:
        report.errors += _check_head_form(model.graph, target)
    report.errors += _check_quantization(model.graph, target)
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    opset = opsets.get("ai.onnx")
    if opset is None or not MIN_OPSET <= opset <= MAX_OPSET:
        report.errors.append(f"opset {opset}: TensorRT-ready graphs use {MIN_OPSET}..{MAX_OPSET}")
    for node in _all_nodes(model.graph):
        where = f"{node.op_type} node {node.name!r}"
        if node.domain not in ("", "ai.onnx"):
            report.errors.append(
                f"{where} is in custom domain {node.domain!r}; only standard ops are allowed"
            )
        elif node.op_type in FORBIDDEN_OPS:
            report.errors.append(f"{where}: control flow is not allowed (the solver must be unrolled)")
        elif node.op_type in DISCOURAGED_OPS:
            report.warnings.append(f"{where}: {DISCOURAGED_OPS[node.op_type]}")
        elif node.op_type not in ALLOWED_OPS:
            report.errors.append(f"{where}: op outside the TensorRT-ready set")
        if node.op_type == "GridSample":
            report.errors += _check_grid_sample(node, where)
    for value in [*model.graph.input, *model.graph.output]:
        declared = declared_axes.get(value.name)
        if declared is None:
            report.errors.append(f"graph I/O {value.name!r} is not declared in the manifest")
            continue
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.HasField("dim_value"):
                if axis in declared:
                    report.errors.append(
                        f"{value.name} axis {axis} should be dynamic ({declared[axis]}) but is static"
                    )
            elif axis not in declared:
                report.errors.append(
                    f"{value.name} axis {axis} is dynamic ({dim.dim_param!r}) but not declared"
                )
    shape_ops = sum(1 for n in model.graph.node if n.op_type == "Shape")
    if shape_ops:
        report.warnings.append(
            f"{shape_ops} Shape op(s): int64 shape arithmetic, fine for TensorRT but not free"
        )
    return report


def _check_head_form(graph: onnx.GraphProto, target: str) -> list[str]:
    sampled = any(n.op_type == "GridSample" for n in _all_nodes(graph))
    if target == "tensorrt" and not sampled:
        return ["the tensorrt target's head samples with GridSample (TensorRT's layer); this one has none"]
    if target == "onnxruntime" and sampled:
        return ["the onnxruntime target's head samples with Gather: ONNX Runtime's CPU GridSample is slower"]
    return []


def _check_quantization(graph: onnx.GraphProto, target: str) -> list[str]:
    """For tensorrt: every QuantizeLinear/DequantizeLinear int8 with zero point 0 (or none), and every
    dequantized weight per output channel (one scale per channel along the DequantizeLinear's axis)."""
    if target != "tensorrt":
        return []
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    errors = []
    for node in _all_nodes(graph):
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        where = f"{node.op_type} node {node.name!r}"
        zero = constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if zero is not None and (zero.dtype != np.int8 or np.any(zero != 0)):
            errors.append(f"{where}: zero point {zero.dtype} not symmetric int8 (0), as TensorRT needs")
        weight = constants.get(node.input[0])
        if node.op_type == "DequantizeLinear" and weight is not None and weight.ndim > 1:
            scale = constants.get(node.input[1])
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            if weight.dtype != np.int8:
                errors.append(f"{where}: weight {weight.dtype}, TensorRT needs int8")
            if scale is None or scale.size != weight.shape[axis]:
                errors.append(f"{where}: weight scale is not per output channel")
    return errors


def _check_grid_sample(node: onnx.NodeProto, where: str) -> list[str]:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    mode = attrs.get("mode", b"bilinear")
    padding = attrs.get("padding_mode", b"zeros")
    errors = []
    # Opset 20 renamed "bilinear" to "linear"; TensorRT's parser then silently falls back to nearest.
    if mode != b"bilinear":
        errors.append(f"{where}: mode {mode!r}, expected b'bilinear' (NVIDIA/TensorRT#4646)")
    if padding != b"zeros":
        errors.append(f"{where}: padding_mode {padding!r}, expected b'zeros'")
    if attrs.get("align_corners", 0) != 1:
        errors.append(f"{where}: align_corners must be 1")
    return errors


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)


def lint_file(path: Path, name: str, io_spec: dict, target: str = "onnxruntime") -> LintReport:
    declared = {
        tensor: {axis: d for axis, d in enumerate(shape) if isinstance(d, str)}
        for section in ("inputs", "outputs")
        for tensor, shape in io_spec[section].items()
    }
    return lint_model(onnx.load(str(path)), name, declared, target)
