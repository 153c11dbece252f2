"""Triton model repository: configs parse as Triton's ModelConfig and match the ONNX graphs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from bundles import fake_engines, tiny_bundle  # tests/bundles.py
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format

from dmf_deploy.config import ModelConfig
from dmf_deploy.export.triton import (
    MODEL_NAMES,
    class_bank_bytes_per_class,
    repository_readme,
    write_triton_repository,
)
from dmf_deploy.manifest import GRAPH_NAMES, graph_io, read_manifest, sha256_file


def _model_config_class():
    """Triton's ModelConfig message: from tritonclient when installed, else the subset we emit.

    The fallback mirrors the field names, types and enum values of Triton's model_config.proto for
    name, platform, max_batch_size, input/output {name, data_type, dims}, instance_group {count, kind}
    and dynamic_batching; text_format.Parse rejects any field outside it.
    """
    try:
        from tritonclient.grpc import model_config_pb2

        return model_config_pb2.ModelConfig
    except (ImportError, RuntimeError):  # RuntimeError: tritonclient installed without its grpc extra
        pass
    F = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(
        name="dmf_test_model_config.proto", package="inference", syntax="proto3"
    )
    data_type = proto.enum_type.add(name="DataType")
    for number, name in enumerate(
        [
            "TYPE_INVALID",
            "TYPE_BOOL",
            "TYPE_UINT8",
            "TYPE_UINT16",
            "TYPE_UINT32",
            "TYPE_UINT64",
            "TYPE_INT8",
            "TYPE_INT16",
            "TYPE_INT32",
            "TYPE_INT64",
            "TYPE_FP16",
            "TYPE_FP32",
            "TYPE_FP64",
            "TYPE_STRING",
            "TYPE_BF16",
        ]
    ):
        data_type.value.add(name=name, number=number)

    def message(name: str, fields: list[tuple]) -> descriptor_pb2.DescriptorProto:
        msg = proto.message_type.add(name=name)
        for field_name, number, kind, label, type_name in fields:
            field = msg.field.add(name=field_name, number=number, type=kind, label=label)
            if type_name:
                field.type_name = type_name
        return msg

    one, many = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    for name in ("ModelInput", "ModelOutput"):
        message(
            name,
            [
                ("name", 1, F.TYPE_STRING, one, None),
                ("data_type", 2, F.TYPE_ENUM, one, ".inference.DataType"),
                ("dims", 4 if name == "ModelInput" else 3, F.TYPE_INT64, many, None),
            ],
        )
    group = message(
        "ModelInstanceGroup",
        [
            ("name", 1, F.TYPE_STRING, one, None),
            ("count", 2, F.TYPE_INT32, one, None),
            ("kind", 4, F.TYPE_ENUM, one, ".inference.ModelInstanceGroup.Kind"),
        ],
    )
    kind = group.enum_type.add(name="Kind")
    for number, name in enumerate(["KIND_AUTO", "KIND_GPU", "KIND_CPU", "KIND_MODEL"]):
        kind.value.add(name=name, number=number)
    message(
        "ModelDynamicBatching",
        [
            ("preferred_batch_size", 1, F.TYPE_INT32, many, None),
            ("max_queue_delay_microseconds", 2, F.TYPE_UINT64, one, None),
        ],
    )
    message(
        "ModelConfig",
        [
            ("name", 1, F.TYPE_STRING, one, None),
            ("platform", 2, F.TYPE_STRING, one, None),
            ("max_batch_size", 4, F.TYPE_INT32, one, None),
            ("input", 5, F.TYPE_MESSAGE, many, ".inference.ModelInput"),
            ("output", 6, F.TYPE_MESSAGE, many, ".inference.ModelOutput"),
            ("instance_group", 7, F.TYPE_MESSAGE, many, ".inference.ModelInstanceGroup"),
            ("dynamic_batching", 11, F.TYPE_MESSAGE, one, ".inference.ModelDynamicBatching"),
        ],
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("inference.ModelConfig"))


ModelConfigProto = _model_config_class()


def _parse(path: Path):
    return text_format.Parse(path.read_text(), ModelConfigProto())


def _onnx_dims(value_info) -> list[int]:
    return [d.dim_value if d.HasField("dim_value") else -1 for d in value_info.type.tensor_type.shape.dim]


@pytest.fixture()
def bundle(tmp_path: Path) -> Path:
    return tiny_bundle(tmp_path)


def test_onnx_repository_configs_match_the_graphs(bundle: Path, tmp_path: Path) -> None:
    """The configs and the README follow the graphs' own I/O, as the manifest records it."""
    out = tmp_path / "repo"
    platforms = write_triton_repository(bundle, read_manifest(bundle), out, use_plans=False)
    assert platforms == {model: "onnxruntime_onnx" for model in MODEL_NAMES.values()}
    fp32 = ModelConfigProto.DESCRIPTOR.fields_by_name["input"].message_type.fields_by_name["data_type"]
    fp32 = fp32.enum_type.values_by_name["TYPE_FP32"].number
    for graph in GRAPH_NAMES:
        model = MODEL_NAMES[graph]
        config = _parse(out / model / "config.pbtxt")
        assert config.name == model and config.platform == "onnxruntime_onnx"
        onnx_path = out / model / "1" / "model.onnx"
        assert sha256_file(onnx_path) == sha256_file(bundle / f"{graph}.onnx")
        graph_proto = onnx.load(str(onnx_path)).graph
        batched = graph == "backbone"
        assert config.max_batch_size == (8 if batched else 0)
        assert config.HasField("dynamic_batching") == batched  # never for the head: banks must not merge
        assert [g.count for g in config.instance_group] == [1]
        for declared, actual in ((config.input, graph_proto.input), (config.output, graph_proto.output)):
            actual = {vi.name: _onnx_dims(vi) for vi in actual}
            assert [t.name for t in declared] == list(actual)
            for tensor in declared:
                dims = actual[tensor.name]
                assert list(tensor.dims) == (dims[1:] if batched else dims), tensor.name
                assert tensor.data_type == fp32
    head = _parse(out / "dmf_head" / "config.pbtxt")
    assert [list(t.dims) for t in head.output] == [[-1, -1]]  # scores [Q, N]
    readme = (out / "README.md").read_text()
    for name, shape in read_manifest(bundle).graphs["support"].outputs.items():
        assert f"`{name}` [{','.join(str(d) for d in shape)}]" in readme


def test_plans_are_used_where_they_exist(bundle: Path, tmp_path: Path) -> None:
    engines = fake_engines(bundle)
    manifest = read_manifest(bundle).with_engines({"backbone": engines["backbone"]})  # only its plan
    manifest.write(bundle)
    out = tmp_path / "repo"
    platforms = write_triton_repository(bundle, manifest, out, use_plans=True)
    assert platforms == {
        "dmf_backbone": "tensorrt_plan",
        "dmf_support": "onnxruntime_onnx",
        "dmf_head": "onnxruntime_onnx",
    }
    backbone = _parse(out / "dmf_backbone" / "config.pbtxt")
    assert backbone.platform == "tensorrt_plan"
    assert backbone.max_batch_size == 4  # the plan's profile max
    assert (out / "dmf_backbone" / "1" / "model.plan").read_bytes() == (
        bundle / engines["backbone"].file
    ).read_bytes()
    assert not (out / "dmf_backbone" / "1" / "model.onnx").exists()
    with pytest.raises(ValueError, match="exceeds the backbone plan's profile max 4"):
        write_triton_repository(bundle, manifest, out, use_plans=True, max_batch=16)
    # back to ONNX: the plan goes away, batch size is the explicit one
    write_triton_repository(bundle, manifest, out, use_plans=False, max_batch=16)
    assert not (out / "dmf_backbone" / "1" / "model.plan").exists()
    assert _parse(out / "dmf_backbone" / "config.pbtxt").max_batch_size == 16


def test_readme_has_serve_command_client_and_request_size(bundle: Path, tmp_path: Path) -> None:
    resnet = ModelConfig()  # ResNet-12, G=64, k=1, 84x84 -> 11x11
    assert class_bank_bytes_per_class(resnet) == 4 * (18 * 121 + 9 * 64 * 121 + 640) == 290_056
    bank_shapes = graph_io(resnet)["support"]["outputs"]
    text = repository_readme(resnet, tmp_path / "repo", {"dmf_backbone": "onnxruntime_onnx"}, 8, bank_shapes)
    assert "290,056 bytes = **0.28 MiB per class for ResNet-12 G=64 k=1**" in text
    assert "tritonserver --model-repository" in text
    for needle in ("tritonclient.http", "InferInput", "InferRequestedOutput", "dmf_support", "dmf_head"):
        assert needle in text
    k3 = ModelConfig(kernel=3)
    assert class_bank_bytes_per_class(k3) == 4 * (18 * 121 + 9 * 576 * 121 + 640)

    out = tmp_path / "repo2"
    write_triton_repository(bundle, read_manifest(bundle), out)
    readme = (out / "README.md").read_text()
    tiny = read_manifest(bundle).model
    assert f"{class_bank_bytes_per_class(tiny):,} bytes" in readme
    # the client example is valid Python
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    compile(code, "client_example.py", "exec")
    assert np.isfinite(class_bank_bytes_per_class(tiny))
