"""The bundle manifest: the contract between `dmf-export` and the torch-free runtime.

Graph I/O names (stable, documented in README.md):

- backbone.onnx: ``images`` [B,3,S,S] -> ``features`` [B,C,h,w]
- support.onnx:  ``prototypes`` [N,C,h,w] -> ``support_offset`` [N,2,h,w,9],
  ``tap_projections`` [N,9,h,w,G*k*k], ``class_weight`` [N,C] (the layouts the head samples in
  without transposing any per-class tensor: see `dmf_deploy.bundle_head`)
- head.onnx:     ``query_features`` [Q,C,h,w] + the three class-bank tensors -> ``scores`` [Q,N]

`Manifest` is the typed form: built at export (`Manifest.build`), written atomically (`write`), and
read with every field's presence and type checked (`Manifest.read`, BundleError naming the field).
Format version 2 adds precision, calibration, target (head form), optional graphs, open-set data and
tensor dtypes; a version-1 manifest (0.1.0's) reads as version 2 with their defaults.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dmf_deploy.config import ModelConfig

FORMAT = "dmf-bundle"
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)
MANIFEST_NAME = "manifest.json"
MAX_MANIFEST_BYTES = 1 << 20
MAX_MANIFEST_DEPTH = 16  # deepest real entry: engines.<graph>.profiles.<input>.<min|opt|max> = 6

BACKBONE, SUPPORT, HEAD = "backbone", "support", "head"
GRAPH_NAMES = (BACKBONE, SUPPORT, HEAD)
EXPLAIN = "explain"  # optional graph: what the head aligned (`explain_io`); bundles are valid without it
CLASS_BANK = ("support_offset", "tap_projections", "class_weight")
MIN_OPSET, MAX_OPSET, DEFAULT_OPSET = 17, 19, 18


def opset_problem(opset: int) -> str | None:
    """Why a bundle cannot use `opset` (None when it can): checked by dmf-export before any work."""
    if opset >= 20:
        return (
            f"opset {opset} is refused: opset 20 renamed GridSample's modes and TensorRT's parser then "
            f"silently samples with nearest (NVIDIA/TensorRT#4646); use {MIN_OPSET}..{MAX_OPSET}"
        )
    if opset < MIN_OPSET:
        return f"opset {opset} is too old: GridSample needs 16+, and bundles use {MIN_OPSET}..{MAX_OPSET}"
    return None


PRECISIONS = ("fp32", "int8")
TARGETS = ("gather", "gridsample")  # the head's sampling form
TENSOR_DTYPES = ("float32", "float16", "int8")
DEFAULT_DTYPE = "float32"

Shape = tuple[int | str, ...]


class BundleError(ValueError):
    """A bundle that is missing, corrupt, or of another format."""


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_fingerprint(
    weights_sha256: str,
    config: ModelConfig,
    precision: str = "fp32",
    calibration_sha256: str | None = None,
) -> str:
    """Identity of the function features and class banks come from.

    Weights, architecture and preprocessing (`architecture_dict` holds it), precision and calibration.
    Solver, steps, opset and head form are left out, so re-exporting with another solver keeps
    galleries valid. fp32 without calibration hashes exactly what 0.1.0 hashed, so its galleries open.
    """
    payload: dict[str, Any] = {"weights": weights_sha256, "architecture": config.architecture_dict()}
    if precision != "fp32" or calibration_sha256 is not None:
        payload["precision"] = precision
        payload["calibration"] = calibration_sha256
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def graph_io(
    config: ModelConfig, target: str = "gather", bank_dtype: str = DEFAULT_DTYPE
) -> dict[str, dict[str, Any]]:
    """Input/output names and shapes of each graph; strings are the dynamic axes.

    `target` is the head form: "gather" banks are channel-last (`dmf_deploy.bundle_head.bundle_bank`),
    "gridsample" banks keep the reference layout that GridSample reads (`dmf_deploy.head.ClassBank`).
    A float16 `bank_dtype` stores tap_projections, 96% of the bank, in half precision ("dtypes").
    """
    c, s, size = config.channels, config.feature_size, config.preprocess.image_size
    gk = config.filter_channels
    gridsample = target == "gridsample"
    bank = {
        "support_offset": ["N", 18, s, s] if gridsample else ["N", 2, s, s, 9],
        "tap_projections": ["N", 9, gk, s, s] if gridsample else ["N", 9, s, s, gk],
        "class_weight": ["N", c],
    }
    half = {"tap_projections": bank_dtype} if bank_dtype != DEFAULT_DTYPE else {}
    return {
        BACKBONE: {"inputs": {"images": ["B", 3, size, size]}, "outputs": {"features": ["B", c, s, s]}},
        SUPPORT: {"inputs": {"prototypes": ["N", c, s, s]}, "outputs": bank, "dtypes": dict(half)},
        HEAD: {
            "inputs": {"query_features": ["Q", c, s, s], **bank},
            "outputs": {"scores": ["Q", "N"]},
            "dtypes": dict(half),
        },
    }


def explain_io(config: ModelConfig) -> dict[str, dict[str, list]]:
    """I/O of the optional explain.onnx: the head's inputs -> what it aligned, per (query, class) pair.

    ``sampling_positions`` [Q,N,h*w,9,2]: (x, y) in feature cells where each position's taps read the
    class's maps (offsets included); ``contributions`` [Q,N,h,w]: per-position terms of the score (their
    mean is it); ``aligned`` [Q,N,h,w]: the L2 norm over channels of the aligned query feature X(1).
    """
    s = config.feature_size
    return {
        "inputs": graph_io(config)[HEAD]["inputs"],
        "outputs": {
            "sampling_positions": ["Q", "N", s * s, 9, 2],
            "contributions": ["Q", "N", s, s],
            "aligned": ["Q", "N", s, s],
        },
    }


# ----- the typed manifest ------------------------------------------------------------------------------


@dataclass(frozen=True)
class GraphSpec:
    """One ONNX graph of the bundle: its file, sha256 and I/O (strings in a shape are dynamic axes)."""

    file: str
    sha256: str
    inputs: Mapping[str, Shape]
    outputs: Mapping[str, Shape]
    dynamic_axes: tuple[str, ...]
    dtypes: Mapping[str, str] = field(default_factory=dict)  # tensor -> dtype; absent: float32

    def dtype(self, tensor: str) -> str:
        return self.dtypes.get(tensor, DEFAULT_DTYPE)

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "sha256": self.sha256,
            "inputs": {k: list(v) for k, v in self.inputs.items()},
            "outputs": {k: list(v) for k, v in self.outputs.items()},
            "dynamic_axes": list(self.dynamic_axes),
            "dtypes": dict(self.dtypes),
        }


def graph_spec(path: str | os.PathLike[str], io: Mapping[str, Mapping[str, list]]) -> GraphSpec:
    """The manifest entry of a freshly exported graph file with the I/O `io` (`graph_io`'s form)."""
    sections = (io["inputs"], io["outputs"])
    axes = {d for sec in sections for s in sec.values() for d in s if isinstance(d, str)}
    return GraphSpec(
        file=Path(path).name,
        sha256=sha256_file(path),
        inputs={k: tuple(v) for k, v in io["inputs"].items()},
        outputs={k: tuple(v) for k, v in io["outputs"].items()},
        dynamic_axes=tuple(sorted(axes)),
        dtypes=dict(io.get("dtypes", {})),
    )


@dataclass(frozen=True)
class EngineSpec:
    """A TensorRT plan built from one graph, and what it needs to load (version, GPU)."""

    file: str
    sha256: str
    tensorrt_version: str
    gpu: str
    compute_capability: str
    precision: str
    profiles: Mapping[str, Mapping[str, list[int]]]  # input -> {min, opt, max: shape}

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "sha256": self.sha256,
            "tensorrt_version": self.tensorrt_version,
            "gpu": self.gpu,
            "compute_capability": self.compute_capability,
            "precision": self.precision,
            "profiles": {k: {b: list(s) for b, s in v.items()} for k, v in self.profiles.items()},
        }


@dataclass(frozen=True)
class Calibration:
    """The images an INT8 export was calibrated on: how many, and the sha256 over them."""

    images: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    format_version: int
    package_version: str
    created: str
    model: ModelConfig
    feature_shape: tuple[int, ...]
    solver: str
    steps: int
    training_solver: tuple[str, int]
    opset: int
    checkpoint_sha256: str
    weights_sha256: str
    fingerprint: str
    graphs: Mapping[str, GraphSpec]  # backbone, support, head; optional others (e.g. "explain")
    engines: Mapping[str, EngineSpec] = field(default_factory=dict)
    precision: str = "fp32"
    calibration: Calibration | None = None
    target: str = "gather"
    open_set: Mapping[str, Any] | None = None
    # The INT8 gate's figure: top-1 agreement with float32, its interval, query count and domain.
    int8_check: Mapping[str, Any] | None = None

    # ----- derived -----
    @property
    def bank_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of one class's bank tensors, as the support graph writes them."""
        outputs = self.graphs[SUPPORT].outputs
        return {k: tuple(int(d) for d in outputs[k][1:]) for k in CLASS_BANK}

    @property
    def bank_dtypes(self) -> dict[str, str]:
        return {k: self.graphs[SUPPORT].dtype(k) for k in CLASS_BANK}

    def files(self) -> list[str]:
        """The bundle's files this manifest names, besides itself: every graph, then the open-set record."""
        names = [spec.file for spec in self.graphs.values()]
        if self.open_set is not None and isinstance(self.open_set.get("file"), str):
            names.append(self.open_set["file"])
        return names

    def with_engines(self, engines: Mapping[str, EngineSpec]) -> Manifest:
        return replace(self, engines=dict(engines))

    # ----- building and writing -----
    @classmethod
    def build(
        cls,
        config: ModelConfig,
        graph_files: Mapping[str, Path],
        *,
        solver: str,
        steps: int,
        opset: int,
        checkpoint_sha256: str,
        weights_sha256: str,
        precision: str = "fp32",
        calibration: Calibration | None = None,
        target: str = "gather",
        io: Mapping[str, Mapping[str, Mapping[str, list]]] | None = None,
    ) -> Manifest:
        """The manifest of freshly exported graphs (`io`: their I/O, default `graph_io(config)`)."""
        from dmf_deploy import __version__

        io = graph_io(config) if io is None else io
        graphs = {name: graph_spec(path, io[name]) for name, path in graph_files.items()}
        calib_sha = calibration.sha256 if calibration else None
        return cls(
            format_version=FORMAT_VERSION,
            package_version=__version__,
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            model=config,
            feature_shape=(config.channels, config.feature_size, config.feature_size),
            solver=solver,
            steps=steps,
            training_solver=(config.solver, config.steps),
            opset=opset,
            checkpoint_sha256=checkpoint_sha256,
            weights_sha256=weights_sha256,
            fingerprint=model_fingerprint(weights_sha256, config, precision, calib_sha),
            graphs=graphs,
            precision=precision,
            calibration=calibration,
            target=target,
        )

    def to_dict(self) -> dict[str, Any]:
        """The version-2 JSON form."""
        model = self.model.to_dict()
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "package_version": self.package_version,
            "created": self.created,
            "model": model,
            "preprocess": model["preprocess"],
            "feature_shape": list(self.feature_shape),
            "solver": self.solver,
            "steps": self.steps,
            "training_solver": {"solver": self.training_solver[0], "steps": self.training_solver[1]},
            "opset": self.opset,
            "checkpoint_sha256": self.checkpoint_sha256,
            "weights_sha256": self.weights_sha256,
            "fingerprint": self.fingerprint,
            "precision": self.precision,
            "calibration": None
            if self.calibration is None
            else {"images": self.calibration.images, "sha256": self.calibration.sha256},
            "target": self.target,
            "open_set": None if self.open_set is None else dict(self.open_set),
            "int8_check": None if self.int8_check is None else dict(self.int8_check),
            "graphs": {k: g.to_dict() for k, g in self.graphs.items()},
            "engines": {k: e.to_dict() for k, e in self.engines.items()},
        }

    def write(self, bundle: str | os.PathLike[str]) -> Path:
        """Write manifest.json into the bundle folder atomically (version 2)."""
        from dmf_deploy.atomic import atomic_write_bytes

        path = Path(bundle) / MANIFEST_NAME
        atomic_write_bytes(path, (json.dumps(self.to_dict(), indent=2) + "\n").encode("utf-8"))
        return path

    # ----- reading -----
    @classmethod
    def read(cls, bundle: str | os.PathLike[str]) -> Manifest:
        """Load and validate a bundle's manifest; raise BundleError naming the problem."""
        root = Path(bundle)
        if root.is_file():
            raise BundleError(_not_a_folder(root))
        if not root.is_dir():
            raise BundleError(f"bundle folder {root} does not exist")
        path = root / MANIFEST_NAME
        if not path.is_file():
            raise BundleError(f"{root} is not a dmf bundle: {MANIFEST_NAME} is missing")
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise BundleError(f"{path} is larger than {MAX_MANIFEST_BYTES} bytes; refusing to parse it")
        try:
            text = path.read_bytes()[: MAX_MANIFEST_BYTES + 1].decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise BundleError(f"{path} is not readable UTF-8 text: {exc}") from exc
        return cls.from_json(text, str(path))

    @classmethod
    def from_json(cls, text: str, source: str = MANIFEST_NAME) -> Manifest:
        if len(text) > MAX_MANIFEST_BYTES:
            raise BundleError(f"{source} is larger than {MAX_MANIFEST_BYTES} bytes; refusing to parse it")
        depth = _nesting_depth(text)
        if depth > MAX_MANIFEST_DEPTH:
            raise BundleError(
                f"{source} nests {depth} levels deep; a manifest has at most {MAX_MANIFEST_DEPTH}"
            )
        try:
            raw = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise BundleError(f"{source} is not valid JSON: {exc}") from exc
        return _parse(raw, source)


def _not_a_folder(path: Path) -> str:
    """Why a file given as a bundle is refused, and for a checkpoint how to make the bundle from it."""
    if _looks_like_checkpoint(path):
        return (
            f"{path} is a checkpoint (what training writes), not a bundle folder: export it first with "
            f"`dmf-export --ckpt {path} --out bundle/`, then use bundle/"
        )
    return f"{path} is a file, not a bundle folder (dmf-export writes a bundle folder)"


def _looks_like_checkpoint(path: Path) -> bool:
    """torch.save's output without torch: a zip holding a data.pkl, or a legacy pickle (0x80)."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                return any(name.endswith("data.pkl") for name in archive.namelist())
        with open(path, "rb") as handle:
            return handle.read(1) == b"\x80"
    except (OSError, zipfile.BadZipFile):
        return False


def read_manifest(bundle: str | os.PathLike[str]) -> Manifest:
    """`Manifest.read` (the name 0.1.0's callers use)."""
    return Manifest.read(bundle)


def bundle_graph_io(manifest: Manifest) -> dict[str, dict[str, dict[str, list]]]:
    """The graph I/O a bundle was written with, as its manifest records it (`graph_io`'s form)."""
    return {
        name: {
            "inputs": {k: list(v) for k, v in spec.inputs.items()},
            "outputs": {k: list(v) for k, v in spec.outputs.items()},
        }
        for name, spec in manifest.graphs.items()
        if name in GRAPH_NAMES
    }


def verify_graph(bundle: str | os.PathLike[str], manifest: Manifest, name: str) -> Path:
    """Return the graph's path after checking that it exists and its sha256 matches the manifest."""
    spec = manifest.graphs[name]
    path = Path(bundle) / spec.file
    if path.name != spec.file or not path.is_file():
        raise BundleError(f"bundle graph {spec.file!r} ({name}) is missing from {bundle}")
    actual = sha256_file(path)
    if actual != spec.sha256:
        raise BundleError(
            f"{path} is corrupt or was modified: sha256 {actual[:12]}... does not match the manifest's "
            f"{spec.sha256[:12]}..."
        )
    return path


# ----- validation --------------------------------------------------------------------------------------

_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = re.compile(r"[\[\]{}]")


def _nesting_depth(text: str) -> int:
    """The deepest bracket nesting of a JSON text, found without recursion (strings skipped)."""
    depth = deepest = 0
    for bracket in _BRACKETS.findall(_STRINGS.sub("", text)):
        depth += 1 if bracket in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


_REQUIRED = object()
_KINDS = {
    str: "a string",
    int: "an integer",
    bool: "true or false",
    dict: "a mapping",
    list: "a list",
}


class _Reader:
    """Typed field access on parsed JSON; every error names the field by its dotted path."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, name: str, problem: str) -> BundleError:
        return BundleError(f"{self.source}: manifest field {name!r} {problem}")

    def get(self, obj: Mapping[str, Any], key: str, where: str, kind: type, default: Any = _REQUIRED) -> Any:
        name = f"{where}.{key}" if where else key
        if key not in obj or (obj[key] is None and default is None):
            if default is _REQUIRED:
                raise self.fail(name, "is missing")
            return default
        value = obj[key]
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if not ok:
            raise self.fail(name, f"must be {_KINDS[kind]}, not {type(value).__name__}")
        return value

    def choice(
        self, obj: Mapping[str, Any], key: str, where: str, choices: tuple[str, ...], default: str
    ) -> str:
        value = self.get(obj, key, where, str, default)
        if value not in choices:
            name = f"{where}.{key}" if where else key
            raise self.fail(name, f"must be one of {', '.join(choices)}, not {value!r}")
        return value

    def shape(self, value: Any, name: str) -> Shape:
        if not isinstance(value, list) or not value:
            raise self.fail(name, "must be a non-empty list of dimensions")
        for dim in value:
            if isinstance(dim, bool) or not (
                (isinstance(dim, int) and dim >= 1) or (isinstance(dim, str) and dim.isidentifier())
            ):
                raise self.fail(name, f"has a dimension {dim!r}: not a positive integer or an axis name")
        return tuple(value)

    def shapes(self, obj: Mapping[str, Any], key: str, where: str) -> dict[str, Shape]:
        table = self.get(obj, key, where, dict)
        return {k: self.shape(v, f"{where}.{key}.{k}") for k, v in table.items()}


def _parse(raw: Any, source: str) -> Manifest:
    r = _Reader(source)
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise BundleError(f"{source} is not a {FORMAT} manifest")
    version = raw.get("format_version")
    if isinstance(version, bool) or version not in READ_VERSIONS:
        raise BundleError(
            f"{source} has format version {version!r}; this runtime reads versions "
            f"{' and '.join(map(str, READ_VERSIONS))}"
        )
    try:
        model = ModelConfig.from_dict(r.get(raw, "model", "", dict))
    except (TypeError, ValueError) as exc:
        raise r.fail("model", f"is not a valid model config: {exc}") from exc
    preprocess = r.get(raw, "preprocess", "", dict, None)
    if preprocess is not None and preprocess != model.to_dict()["preprocess"]:
        raise r.fail("preprocess", "differs from model.preprocess, the preprocessing the runtime applies")
    feature_shape = r.shape(r.get(raw, "feature_shape", "", list), "feature_shape")
    if len(feature_shape) != 3 or not all(isinstance(d, int) for d in feature_shape):
        raise r.fail("feature_shape", "must be three positive integers [C, h, w]")
    training = r.get(raw, "training_solver", "", dict, {})
    graphs_raw = r.get(raw, "graphs", "", dict)
    graphs = {}
    for name, entry in graphs_raw.items():
        graphs[name] = _graph(r, entry, f"graphs.{name}")
    for name in GRAPH_NAMES:
        if name not in graphs:
            raise r.fail(f"graphs.{name}", "is missing")
    for tensor in CLASS_BANK:
        if tensor not in graphs[SUPPORT].outputs:
            raise r.fail(f"graphs.support.outputs.{tensor}", "is missing")
    _check_backbone_io(r, model, tuple(int(d) for d in feature_shape), graphs[BACKBONE])
    engines_raw = r.get(raw, "engines", "", dict, {})
    engines = {name: _engine(r, entry, f"engines.{name}") for name, entry in engines_raw.items()}
    calibration = None
    calib_raw = r.get(raw, "calibration", "", dict, None)
    if calib_raw is not None:
        images = r.get(calib_raw, "images", "calibration", int)
        if images < 1:
            raise r.fail("calibration.images", "must be at least 1")
        calibration = Calibration(images, r.get(calib_raw, "sha256", "calibration", str))
    precision = r.choice(raw, "precision", "", PRECISIONS, "fp32")
    weights = r.get(raw, "weights_sha256", "", str)
    fingerprint = r.get(raw, "fingerprint", "", str)
    expected = model_fingerprint(weights, model, precision, calibration.sha256 if calibration else None)
    if fingerprint != expected:
        raise r.fail(
            "fingerprint", "does not match the weights, model, precision and calibration the manifest records"
        )
    steps = r.get(raw, "steps", "", int)
    opset = r.get(raw, "opset", "", int)
    return Manifest(
        format_version=version,
        package_version=r.get(raw, "package_version", "", str, "?"),
        created=r.get(raw, "created", "", str, ""),
        model=model,
        feature_shape=tuple(int(d) for d in feature_shape),
        solver=r.get(raw, "solver", "", str),
        steps=steps,
        training_solver=(
            r.get(training, "solver", "training_solver", str, model.solver),
            r.get(training, "steps", "training_solver", int, model.steps),
        ),
        opset=opset,
        checkpoint_sha256=r.get(raw, "checkpoint_sha256", "", str, ""),
        weights_sha256=weights,
        fingerprint=fingerprint,
        graphs=graphs,
        engines=engines,
        precision=precision,
        calibration=calibration,
        target=r.choice(raw, "target", "", TARGETS, "gather"),
        open_set=r.get(raw, "open_set", "", dict, None),
        int8_check=r.get(raw, "int8_check", "", dict, None),
    )


def _check_backbone_io(
    r: _Reader, model: ModelConfig, feature_shape: tuple[int, ...], spec: GraphSpec
) -> None:
    """The model's image size is the backbone's input, its feature maps are the backbone's output and
    `feature_shape`: a manifest that says otherwise lies (the sessions then check the graph itself)."""
    size = model.preprocess.image_size
    expected = (model.channels, model.feature_size, model.feature_size)
    images = spec.inputs.get("images")
    if images is None or tuple(images[1:]) != (3, size, size):
        raise r.fail(
            "graphs.backbone.inputs.images",
            f"is {None if images is None else list(images)}; model.preprocess.image_size {size} "
            f"needs [B, 3, {size}, {size}]",
        )
    if feature_shape != expected:
        raise r.fail("feature_shape", f"is {list(feature_shape)}; the model computes {list(expected)}")
    features = spec.outputs.get("features")
    if features is None or tuple(features[1:]) != feature_shape:
        raise r.fail(
            "graphs.backbone.outputs.features",
            f"is {None if features is None else list(features)}; feature_shape is {list(feature_shape)}",
        )


def _graph(r: _Reader, entry: Any, where: str) -> GraphSpec:
    if not isinstance(entry, dict):
        raise r.fail(where, f"must be a mapping, not {type(entry).__name__}")
    dtypes = r.get(entry, "dtypes", where, dict, {})
    for tensor, dtype in dtypes.items():
        if dtype not in TENSOR_DTYPES:
            choices = ", ".join(TENSOR_DTYPES)
            raise r.fail(f"{where}.dtypes.{tensor}", f"must be one of {choices}, not {dtype!r}")
    axes = r.get(entry, "dynamic_axes", where, list, [])
    if not all(isinstance(a, str) for a in axes):
        raise r.fail(f"{where}.dynamic_axes", "must be a list of strings")
    return GraphSpec(
        file=r.get(entry, "file", where, str),
        sha256=r.get(entry, "sha256", where, str),
        inputs=r.shapes(entry, "inputs", where),
        outputs=r.shapes(entry, "outputs", where),
        dynamic_axes=tuple(axes),
        dtypes=dict(dtypes),
    )


def _engine(r: _Reader, entry: Any, where: str) -> EngineSpec:
    if not isinstance(entry, dict):
        raise r.fail(where, f"must be a mapping, not {type(entry).__name__}")
    profiles = r.get(entry, "profiles", where, dict)
    for name, bounds in profiles.items():
        if not isinstance(bounds, dict):
            raise r.fail(f"{where}.profiles.{name}", "must be a mapping of min, opt and max shapes")
        for bound, shape in bounds.items():
            ints = isinstance(shape, list) and all(type(d) is int for d in shape)
            if not ints:
                raise r.fail(f"{where}.profiles.{name}.{bound}", "must be a list of integers")
    return EngineSpec(
        file=r.get(entry, "file", where, str),
        sha256=r.get(entry, "sha256", where, str),
        tensorrt_version=r.get(entry, "tensorrt_version", where, str),
        gpu=r.get(entry, "gpu", where, str),
        compute_capability=r.get(entry, "compute_capability", where, str),
        precision=r.get(entry, "precision", where, str),
        profiles=profiles,
    )
