"""A Triton Inference Server model repository for a bundle (`dmf-export --triton DIR`).

Three models, one per bundle graph:

- ``dmf_backbone``: images -> features. Stateless per image, so Triton batches requests dynamically
  (max_batch_size > 0, and then the dims omit the batch axis).
- ``dmf_support``: prototypes -> class bank. Called at enrolment; N is an explicit -1 axis.
- ``dmf_head``: query features + class bank -> scores. max_batch_size 0 and no dynamic batching: the
  class bank is an input, so servers keep no state and scale out, and two requests' banks must never
  be concatenated along a batch axis.

Beside them, ``dmf_recognizer`` (export/triton_recognizer.py): one stateful Python-backend model that
holds the gallery in server memory and runs the torch-free Recognizer (classify and enrol).

Each of the three graph models is ONNX (onnxruntime backend) or, where the bundle has a TensorRT plan
and `use_plans` is set, the plan. Graph I/O keeps the bundle's dtypes (float32; a half bank's
tap_projections float16). The repository follows the export target: ONNX models of a
``tensorrt``-target bundle (GridSample head, symmetric INT8) ask Triton's onnxruntime backend for its
TensorRT execution accelerator.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dmf_deploy.atomic import atomic_write_bytes
from dmf_deploy.config import ModelConfig
from dmf_deploy.export.engine_names import trt_version_tag
from dmf_deploy.export.triton_recognizer import MODEL_NAME as RECOGNIZER_MODEL
from dmf_deploy.export.triton_recognizer import write_recognizer_model
from dmf_deploy.manifest import (
    BACKBONE,
    CLASS_BANK,
    GRAPH_NAMES,
    HEAD,
    SUPPORT,
    BundleError,
    EngineSpec,
    Manifest,
    bundle_graph_io,
    sha256_file,
    verify_graph,
)

log = logging.getLogger("dmf_deploy.export")

MODEL_NAMES = {BACKBONE: "dmf_backbone", SUPPORT: "dmf_support", HEAD: "dmf_head"}
DEFAULT_MAX_BATCH = 8
TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16"}
TENSORRT_ACCELERATOR = (
    'optimization {\n  execution_accelerators {\n    gpu_execution_accelerator : [ { name : "tensorrt" } ]\n'
    "  }\n}"
)


def class_bank_bytes_per_class(config: ModelConfig) -> int:
    """Bytes of float32 class bank one class adds to every head request: 4*(18hw + 9*G*k*k*hw + C)."""
    hw = config.feature_size**2
    return 4 * (18 * hw + 9 * config.filter_channels * hw + config.channels)


def _dims(shape: list[Any], *, drop_batch: bool) -> list[int]:
    dims = [-1 if isinstance(d, str) else int(d) for d in shape]
    return dims[1:] if drop_batch else dims


def _tensor_block(name: str, dims: list[int], dtype: str = "float32") -> str:
    return (
        f'  {{\n    name: "{name}"\n    data_type: {TRITON_TYPES[dtype]}\n'
        f"    dims: [ {', '.join(str(d) for d in dims)} ]\n  }}"
    )


def model_config_text(
    model_name: str,
    platform: str,
    max_batch_size: int,
    inputs: Mapping[str, list[int]],
    outputs: Mapping[str, list[int]],
    *,
    dynamic_batching: bool,
    instance_kind: str,
    dtypes: Mapping[str, str] | None = None,
    tensorrt_accelerator: bool = False,
) -> str:
    """One config.pbtxt in protobuf text format (Triton's ModelConfig), fields Triton documents."""
    dtypes = dtypes or {}

    def blocks(tensors: Mapping[str, list[int]]) -> str:
        return ",\n".join(_tensor_block(n, d, dtypes.get(n, "float32")) for n, d in tensors.items())

    lines = [
        f'name: "{model_name}"',
        f'platform: "{platform}"',
        f"max_batch_size: {max_batch_size}",
        "input [\n" + blocks(inputs) + "\n]",
        "output [\n" + blocks(outputs) + "\n]",
        f"instance_group [\n  {{\n    count: 1\n    kind: {instance_kind}\n  }}\n]",
    ]
    if dynamic_batching:
        lines.append("dynamic_batching { }")
    if tensorrt_accelerator:
        lines.append(TENSORRT_ACCELERATOR)
    return "\n".join(lines) + "\n"


def _plan_entry(bundle: Path, manifest: Manifest, graph: str) -> EngineSpec | None:
    entry = manifest.engines.get(graph)
    if entry is not None and Path(entry.file).name == entry.file and (bundle / entry.file).is_file():
        return entry
    return None


def checked_plans(bundle: Path, manifest: Manifest) -> dict[str, EngineSpec]:
    """The plans the repository will serve, checked: each file is the one its manifest entry records
    (sha256), and all were built by one TensorRT x.y.z for one GPU model, since one Triton loads them."""
    plans = {g: e for g in GRAPH_NAMES if (e := _plan_entry(bundle, manifest, g)) is not None}
    for graph, plan in plans.items():
        if sha256_file(bundle / plan.file) != plan.sha256:
            raise BundleError(
                f"the {graph} plan {plan.file} does not match the sha256 its manifest records; "
                "rebuild the engines with dmf-export --trt"
            )
    builds = {(trt_version_tag(p.tensorrt_version), p.gpu, p.compute_capability) for p in plans.values()}
    if len(builds) > 1:
        listed = ", ".join(f"{g}: TensorRT {p.tensorrt_version} on {p.gpu}" for g, p in plans.items())
        raise BundleError(
            f"the bundle's plans were built by different TensorRT versions or GPUs ({listed}); one Triton "
            "loads only one; rebuild them together with dmf-export --trt"
        )
    return plans


def write_triton_repository(
    bundle_dir: str | os.PathLike[str],
    manifest: Manifest,
    out_dir: str | os.PathLike[str],
    use_plans: bool = False,
    *,
    max_batch: int | None = None,
) -> dict[str, str]:
    """Write `out_dir/<model>/config.pbtxt` + `<model>/1/model.onnx|model.plan` and a README.

    The backbone's max_batch_size is `max_batch`, or its TensorRT plan's profile max, or 8. Returns
    {model name: platform}. A plan is used only for a graph whose plan file exists; the others fall
    back to ONNX with a log line, so a partial set of engines still gives a working repository.
    """
    bundle, out = Path(bundle_dir), Path(out_dir)
    config = manifest.model
    io = bundle_graph_io(manifest)
    platforms: dict[str, str] = {}
    backbone_batch = max_batch
    plans = checked_plans(bundle, manifest) if use_plans else {}
    for graph in GRAPH_NAMES:
        model = MODEL_NAMES[graph]
        plan = plans.get(graph)
        if use_plans and plan is None:
            log.info("no TensorRT plan for %s in %s; %s serves the ONNX graph", graph, bundle, model)
        version_dir = out / model / "1"
        version_dir.mkdir(parents=True, exist_ok=True)
        for stale in ("model.onnx", "model.plan"):  # a rerun may switch between ONNX and plan
            (version_dir / stale).unlink(missing_ok=True)
        if plan is not None:
            platform, kind = "tensorrt_plan", "KIND_GPU"
            shutil.copyfile(bundle / plan.file, version_dir / "model.plan")
        else:
            platform, kind = "onnxruntime_onnx", "KIND_AUTO"
            shutil.copyfile(verify_graph(bundle, manifest, graph), version_dir / "model.onnx")
        batched = graph == BACKBONE
        if batched:
            if backbone_batch is None and plan is not None:
                backbone_batch = int(plan.profiles["images"]["max"][0])
            backbone_batch = backbone_batch or DEFAULT_MAX_BATCH
            if plan is not None and backbone_batch > int(plan.profiles["images"]["max"][0]):
                raise ValueError(
                    f"max_batch {backbone_batch} exceeds the backbone plan's profile max "
                    f"{plan.profiles['images']['max'][0]}; rebuild with dmf-export --trt --max-batch"
                )
        text = model_config_text(
            model,
            platform,
            backbone_batch if batched else 0,
            {n: _dims(s, drop_batch=batched) for n, s in io[graph]["inputs"].items()},
            {n: _dims(s, drop_batch=batched) for n, s in io[graph]["outputs"].items()},
            dynamic_batching=batched,
            instance_kind=kind,
            dtypes=manifest.graphs[graph].dtypes,
            tensorrt_accelerator=plan is None and manifest.target == "gridsample",
        )
        atomic_write_bytes(out / model / "config.pbtxt", text.encode("utf-8"))
        platforms[model] = platform
    write_recognizer_model(bundle, manifest, out)
    bank_shapes = io[SUPPORT]["outputs"]
    readme = repository_readme(
        config, out, platforms, backbone_batch or DEFAULT_MAX_BATCH, bank_shapes, plans=plans, io=io
    )
    atomic_write_bytes(out / "README.md", readme.encode("utf-8"))
    return platforms


def _axis_max(plan: EngineSpec, inputs: Mapping[str, list[Any]], axis: str) -> int | None:
    """The profile max of dynamic axis `axis` ("B", "Q", "N") in a plan, from the graph's input axes."""
    for name, dims in inputs.items():
        if axis in dims and name in plan.profiles:
            return int(plan.profiles[name]["max"][list(dims).index(axis)])
    return None


def plan_requirements(plans: Mapping[str, EngineSpec], io: Mapping[str, Any]) -> str:
    """README section: where the `tensorrt_plan` models load, and the shape limits their profiles set."""
    first = next(iter(plans.values()))
    lines = [
        "",
        "## TensorRT plans",
        "",
        f"The `tensorrt_plan` models load only in a Triton whose TensorRT is exactly "
        f"**{trt_version_tag(first.tensorrt_version)}** (the release that built them; recorded "
        f"{first.tensorrt_version}), on the GPU model they were built for: **{first.gpu}** (compute "
        "capability "
        f"{first.compute_capability}). For another Triton release or GPU, rebuild the engines there "
        "(`dmf-export --trt`) or write the repository without plans.",
        "",
    ]
    limits = {
        BACKBONE: [("B", "images per request", "--max-batch")],
        HEAD: [("Q", "queries per request", "--max-batch"), ("N", "classes", "--max-classes")],
        SUPPORT: [("N", "classes per request", "--max-classes")],
    }
    for graph, plan in plans.items():
        inputs = io[graph]["inputs"]
        parts = [
            f"{axis} <= {top} {words} (`{flag}`)"
            for axis, words, flag in limits[graph]
            if (top := _axis_max(plan, inputs, axis)) is not None
        ]
        if parts:
            lines.append(f"- `{MODEL_NAMES[graph]}`: " + ", ".join(parts) + ".")
    lines += [
        "",
        "A request beyond these limits fails; rebuild with larger flags or serve the ONNX graphs.",
        "",
    ]
    return "\n".join(lines)


def _human(size: int) -> str:
    mib = size / 2**20
    return f"{mib:.2f} MiB" if mib >= 0.01 else f"{size / 2**10:.1f} KiB"


def _shape_text(shape: list[Any]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def repository_readme(
    config: ModelConfig,
    out: Path,
    platforms: Mapping[str, str],
    max_batch: int,
    bank_shapes: Mapping[str, list[Any]],
    *,
    plans: Mapping[str, EngineSpec] | None = None,
    io: Mapping[str, Any] | None = None,
) -> str:
    """The repository's README; `bank_shapes`: the support graph's outputs as the bundle records them.

    With `plans` (the TensorRT plans served, and the bundle's `io`), a section says what they need.
    """
    per_class = class_bank_bytes_per_class(config)
    bank = ", ".join(f"`{name}` {_shape_text(shape)}" for name, shape in bank_shapes.items())
    s, c, size = config.feature_size, config.channels, config.preprocess.image_size
    name = f"{'ResNet-12' if config.backbone == 'resnet12' else 'Conv-4'} G={config.groups} k={config.kernel}"
    models = "\n".join(f"| `{model}` | `{platform}` |" for model, platform in platforms.items())
    return f"""# DMF model repository for Triton Inference Server

| model | platform |
|---|---|
| `{RECOGNIZER_MODEL}` | `python` (dmf_deploy's Recognizer) |
{models}
{plan_requirements(plans, io) if plans and io else ""}
## Which to use when

- `{RECOGNIZER_MODEL}`: many cameras, one shared gallery. The server holds the gallery
  (`{RECOGNIZER_MODEL}/gallery.dmfg`, saved atomically after every change); clients send frames and
  get labels and scores back, and enrol, remove and rename classes with requests to the same model.
  Serve it with `dmf-serve --repo {out.resolve()}` (`pip install "dmf-deploy[serve]"`) and talk to it
  with `dmf_deploy.runtime.serve.remote.RemoteRecognizer`, which sends the key `dmf-serve` asks of every
  client (dmf-deploy's README, "Serve with Triton", says where it lives).
- `dmf_backbone`, `dmf_support`, `dmf_head`: for NVIDIA's Triton containers with the ONNX Runtime
  (or TensorRT) backend, when the client keeps the classes itself. Stateless, but every head request
  carries the whole class bank (below). Serve them in such a container with
  `tritonserver --model-repository {out.resolve()} --model-control-mode explicit
  --load-model dmf_backbone --load-model dmf_support --load-model dmf_head` (`{RECOGNIZER_MODEL}` needs
  dmf_deploy installed where the server runs).

## How the three models fit together

1. `dmf_backbone`: `images` [B,3,{size},{size}] float32 (preprocessed exactly like `dmf_deploy.preprocess`:
   RGB, /255, mean/std normalised) -> `features` [B,{c},{s},{s}]. Triton batches these requests
   dynamically (max_batch_size {max_batch}).
2. `dmf_support`, at enrolment: `prototypes` [N,{c},{s},{s}] (the mean of each class's support features)
   -> the class bank {bank}. The client keeps the bank; the server keeps nothing.
3. `dmf_head`, per frame: `query_features` [Q,{c},{s},{s}] + the class bank -> `scores` [Q,N].
   max_batch_size 0 and no dynamic batching: the bank is part of each request, so any replica can
   answer any request (stateless, scales out), and banks of different clients are never merged.

## Request size

Every head request carries the class bank: 4 x (18*h*w + 9*G*k*k*h*w + C) bytes per class, here
{per_class:,} bytes = **{_human(per_class)} per class for {name}** ({size}x{size} input). At 100 classes a
request carries {_human(100 * per_class)}. For large galleries on the same host use Triton's system or CUDA
shared memory for the bank inputs instead of sending them with every request.

## Python client (tritonclient, HTTP)

```python
import numpy as np
import tritonclient.http as httpclient

client = httpclient.InferenceServerClient("localhost:8000")


def infer(model, inputs, outputs):
    requests = []
    for name, array in inputs.items():
        tensor = httpclient.InferInput(name, list(array.shape), "FP32")
        tensor.set_data_from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        requests.append(tensor)
    wanted = [httpclient.InferRequestedOutput(name) for name in outputs]
    result = client.infer(model, requests, outputs=wanted)
    return {{name: result.as_numpy(name) for name in outputs}}


# images: [B,3,{size},{size}] float32 from dmf_deploy.preprocess.preprocess_frames(frames, config.preprocess)
def features(images):
    return infer("dmf_backbone", {{"images": images}}, ["features"])["features"]


# enrolment: one prototype per class = mean of its support features
support = features(support_images)                       # [S,{c},{s},{s}]
prototypes = np.stack([support[labels == k].mean(0) for k in range(num_classes)])
bank = infer("dmf_support", {{"prototypes": prototypes}}, {list(CLASS_BANK)!r})

# recognition
scores = infer("dmf_head", {{"query_features": features(query_images), **bank}}, ["scores"])["scores"]
print(scores.argmax(1))                                  # [Q] class indices
```
"""
