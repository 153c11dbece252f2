"""TensorRT engines for a bundle: one plan per graph on this GPU, recorded in the manifest.

`build_engines` is the orchestration (which graphs, FP16 casting, profiles, file names, manifest
entries); the TensorRT calls sit behind the `PlanBuilder` interface, so the orchestration can be given
another builder. `TensorRTPlanBuilder` is the real one and the only export code that imports
`tensorrt`, inside its constructor: everything else here works on machines without TensorRT.

Written against the TensorRT 10+ name-based Python API, and kept valid on TensorRT 11: networks are
created STRONGLY_TYPED (required for FP16 on 10.x; on 11.x always on, the flag deprecated and read only
where it still exists), never with EXPLICIT_BATCH (deprecated and implicit since 10.0), and
`BuilderFlag.FP16` (removed in 11) is never used: FP16 means an FP16-cast ONNX graph (`export/fp16.py`).

A rebuild is a transaction: every plan is built into a staging folder, and the plans and the manifest
move into the bundle together only after all graphs have built, so a failed rebuild leaves the working
engines and their manifest entries as they were.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from dmf_deploy.atomic import atomic_write_bytes, remove_stale
from dmf_deploy.export.engine_names import engine_file_name, timing_cache_name
from dmf_deploy.export.fp16 import cast_onnx_to_fp16
from dmf_deploy.export.profiles import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_CLASSES,
    DEFAULT_OPT_BATCH,
    ProfileShapes,
    profile_shapes,
    profiles_json,
)
from dmf_deploy.manifest import GRAPH_NAMES, EngineSpec, Manifest, bundle_graph_io, sha256_file, verify_graph
from dmf_deploy.tensorrt_support import gpu_identity, tensorrt_import_reason, tensorrt_logger

log = logging.getLogger("dmf_deploy.export")

DEFAULT_WORKSPACE_MB = 1024
# Plans are built into `<bundle>/.trt-staging-*` (same filesystem, so moving them in is a rename). A
# killed build leaves one behind; the next build removes it once it is a day old (builds take minutes).
STAGING_PREFIX = ".trt-staging-"
_STALE_STAGING = re.compile(re.escape(STAGING_PREFIX) + r"[A-Za-z0-9_]+\Z")
STALE_STAGING_SECONDS = 24 * 3600.0


class EngineBuildError(RuntimeError):
    """TensorRT could not turn a bundle graph into an engine (parse, profile or build failure)."""


class PlanBuilder(Protocol):
    """Turns one ONNX graph into a serialized engine for the machine it names."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str

    def build(self, graph: str, onnx_path: Path, shapes: ProfileShapes) -> bytes:
        """The serialized engine of `onnx_path` with one optimization profile of `shapes`."""
        ...

    def finish(self) -> None:
        """Called once after every graph is built (the TensorRT builder saves its timing cache)."""
        ...


def network_creation_flags(flag_enum: Any) -> int:
    """`create_network` flags: STRONGLY_TYPED where `trt.NetworkDefinitionCreationFlag` still has it, else 0.

    TensorRT 10 needs the flag for strongly typed (FP16-cast) networks; 11.x deprecates it (every network
    is strongly typed, the flag is ignored) and may drop it, so it is read, not assumed.
    """
    flag = getattr(flag_enum, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def check_profile_index(index: int, graph: str, shapes: ProfileShapes) -> int:
    """`add_optimization_profile`'s return value: the profile's index, or -1 when TensorRT rejected it."""
    if int(index) < 0:
        listed = "; ".join(f"{name} min {lo} opt {opt} max {hi}" for name, (lo, opt, hi) in shapes.items())
        raise EngineBuildError(
            f"TensorRT rejected the optimization profile of the {graph} graph ({listed}); its log above "
            "says which input (check --max-batch, --opt-batch and --max-classes)"
        )
    return int(index)


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


class TensorRTPlanBuilder:
    """The real `PlanBuilder`: TensorRT on the current GPU, with a timing cache kept on disk.

    The timing cache (default: `timing.<trt>.<sm>.<gpu>.cache` in the bundle) makes rebuilds on the
    same GPU fast; `finish` writes it back.
    """

    def __init__(
        self,
        bundle: Path,
        *,
        fp16: bool,
        workspace_mb: int = DEFAULT_WORKSPACE_MB,
        timing_cache_path: str | os.PathLike[str] | None = None,
    ) -> None:
        reason = tensorrt_import_reason()
        if reason:
            raise RuntimeError(f"cannot build TensorRT engines: {reason}")
        import tensorrt as trt

        self._trt = trt
        self.tensorrt_version = trt.__version__
        self.gpu_name, self.compute_capability = gpu_identity()
        self._fp16 = fp16
        self._workspace_mb = int(workspace_mb)
        self._cache_path = (
            Path(timing_cache_path)
            if timing_cache_path
            else bundle / timing_cache_name(self.tensorrt_version, self.gpu_name, self.compute_capability)
        )
        self._cache_bytes = self._cache_path.read_bytes() if self._cache_path.is_file() else b""
        self._logger = tensorrt_logger()
        self._builder = trt.Builder(self._logger)

    def build(self, graph: str, onnx_path: Path, shapes: ProfileShapes) -> bytes:
        trt, builder = self._trt, self._builder
        # Strongly typed in both precisions: the ONNX types are the engine's types, so "fp32" is
        # float32 end to end and "fp16" is exactly the cast graph (TensorRT 11 types this way anyway).
        network = builder.create_network(network_creation_flags(trt.NetworkDefinitionCreationFlag))
        parser = trt.OnnxParser(network, self._logger)
        # parse_from_file, not parse(bytes): the parser then resolves external data next to the file.
        if not parser.parse_from_file(str(onnx_path)):
            raise EngineBuildError(f"TensorRT cannot parse {onnx_path.name}:\n  {_parser_errors(parser)}")

        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self._workspace_mb << 20)
        if not self._fp16 and hasattr(trt.BuilderFlag, "TF32"):
            # TF32 would silently round float32 convolutions/matmuls to 10-bit mantissas; an engine
            # labelled fp32 should match onnxruntime's float32 numbers.
            config.clear_flag(trt.BuilderFlag.TF32)
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        check_profile_index(config.add_optimization_profile(profile), graph, shapes)
        try:
            cache = config.create_timing_cache(self._cache_bytes)
        except Exception:  # a truncated or foreign cache file: TensorRT raises its own types
            cache = None
        if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
            log.warning(
                "timing cache %s does not match this GPU/TensorRT; starting a fresh one", self._cache_path
            )
            cache = config.create_timing_cache(b"")
            config.set_timing_cache(cache, ignore_mismatch=False)

        precision = "fp16" if self._fp16 else "fp32"
        log.info(
            "building the %s engine (%s, %s, %s)", graph, precision, self.gpu_name, self.tensorrt_version
        )
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise EngineBuildError(
                f"TensorRT failed to build the {graph} engine; its log above says why "
                "(a larger --workspace or smaller --max-batch/--max-classes may help)"
            )
        self._cache_bytes = bytes(config.get_timing_cache().serialize())
        return bytes(plan)

    def finish(self) -> None:
        if self._cache_bytes:
            atomic_write_bytes(self._cache_path, self._cache_bytes)


def build_engines(
    bundle_dir: str | os.PathLike[str],
    manifest: Manifest,
    plan_dir: str | os.PathLike[str],
    *,
    fp16: bool = False,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_classes: int = DEFAULT_MAX_CLASSES,
    opt_batch: int = DEFAULT_OPT_BATCH,
    workspace_mb: int = DEFAULT_WORKSPACE_MB,
    timing_cache_path: str | os.PathLike[str] | None = None,
    builder: PlanBuilder | None = None,
) -> dict[str, EngineSpec]:
    """Build one engine per bundle graph into `plan_dir` and return the manifest's engine entries.

    Nothing in the bundle changes but the timing cache (see `build_trt_for_bundle`, which moves the
    plans in). `builder` defaults to a `TensorRTPlanBuilder` on this GPU (`workspace_mb` and
    `timing_cache_path` are its settings). `opt_batch` is the batch (B, Q) TensorRT tunes kernels for.
    """
    bundle, plans = Path(bundle_dir), Path(plan_dir)
    if not 1 <= int(opt_batch) <= int(max_batch):
        raise ValueError(f"opt_batch must be between 1 and max_batch {max_batch}, got {opt_batch}")
    if builder is None:
        builder = TensorRTPlanBuilder(
            bundle, fp16=fp16, workspace_mb=workspace_mb, timing_cache_path=timing_cache_path
        )
    precision = "fp16" if fp16 else "fp32"
    io = bundle_graph_io(manifest)
    engines: dict[str, EngineSpec] = {}
    with tempfile.TemporaryDirectory(prefix="dmf-trt-") as scratch:
        for graph in GRAPH_NAMES:
            onnx_path = verify_graph(bundle, manifest, graph)
            if fp16:
                fp16_path = Path(scratch) / f"{graph}.fp16.onnx"
                cast_onnx_to_fp16(onnx_path, fp16_path)
                onnx_path = fp16_path
            shapes = profile_shapes(io, graph, max_batch, max_classes, opt_batch=opt_batch)
            plan = builder.build(graph, onnx_path, shapes)
            file_name = engine_file_name(
                graph, builder.tensorrt_version, builder.gpu_name, builder.compute_capability, precision
            )
            atomic_write_bytes(plans / file_name, plan)
            engines[graph] = EngineSpec(
                file=file_name,
                sha256=sha256_file(plans / file_name),
                tensorrt_version=builder.tensorrt_version,
                gpu=builder.gpu_name,
                compute_capability=builder.compute_capability,
                precision=precision,
                profiles=profiles_json(shapes),
            )
    builder.finish()
    return engines


def build_trt_for_bundle(
    bundle_dir: str | os.PathLike[str],
    *,
    fp16: bool = False,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_classes: int = DEFAULT_MAX_CLASSES,
    opt_batch: int = DEFAULT_OPT_BATCH,
    workspace_mb: int = DEFAULT_WORKSPACE_MB,
    builder: PlanBuilder | None = None,
) -> dict[str, EngineSpec]:
    """`dmf-export --trt`: build the engines, record them in manifest.json, return them.

    All or nothing: the plans are built into a staging folder inside the bundle and moved in, with the
    new manifest, only once every graph has built. If any build fails, the bundle's plans and manifest
    are untouched (a rebuild with the same TensorRT, GPU and precision reuses the file names, so
    writing each plan as it finished would break the working engines' sha256). Plan files that the
    previous manifest named and the new one does not (another GPU or TensorRT version) are removed.
    """
    bundle = Path(bundle_dir)
    manifest = Manifest.read(bundle)
    remove_stale(bundle, _STALE_STAGING, STALE_STAGING_SECONDS, folders=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=bundle))
    try:
        engines = build_engines(
            bundle,
            manifest,
            staging,
            fp16=fp16,
            max_batch=max_batch,
            max_classes=max_classes,
            opt_batch=opt_batch,
            workspace_mb=workspace_mb,
            builder=builder,
        )
        # Every build succeeded: the only window left is these renames and one manifest write.
        for entry in engines.values():
            os.replace(staging / entry.file, bundle / entry.file)
        write_engines_to_manifest(bundle, engines)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
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
