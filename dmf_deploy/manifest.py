"""The bundle manifest: the contract between `dmf-export` and the torch-free runtime.

Graph I/O names (stable, documented in README.md):

- backbone.onnx: ``images`` [B,3,S,S] -> ``features`` [B,C,h,w]
- support.onnx:  ``prototypes`` [N,C,h,w] -> ``support_offset`` [N,2,h,w,9],
  ``tap_projections`` [N,9,h,w,G*k*k], ``class_weight`` [N,C] (the layouts the head samples in
  without transposing any per-class tensor: see `dmf_deploy.bundle_head`)
- head.onnx:     ``query_features`` [Q,C,h,w] + the three class-bank tensors -> ``scores`` [Q,N]
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from dmf_deploy.config import ModelConfig

FORMAT = "dmf-bundle"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
MAX_MANIFEST_BYTES = 1 << 20

BACKBONE, SUPPORT, HEAD = "backbone", "support", "head"
GRAPH_NAMES = (BACKBONE, SUPPORT, HEAD)
CLASS_BANK = ("support_offset", "tap_projections", "class_weight")
MIN_OPSET, MAX_OPSET, DEFAULT_OPSET = 17, 19, 18


class BundleError(ValueError):
    """A bundle that is missing, corrupt, or of another format."""


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_fingerprint(weights_sha256: str, config: ModelConfig) -> str:
    """Identity of the function features and class banks come from.

    Solver, steps and opset are left out so that re-exporting with another solver keeps galleries valid.
    """
    payload = json.dumps(
        {"weights": weights_sha256, "architecture": config.architecture_dict()}, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def graph_io(config: ModelConfig) -> dict[str, dict[str, dict[str, list]]]:
    """Input/output names and shapes of each graph; strings are the dynamic axes."""
    c, s, size = config.channels, config.feature_size, config.preprocess.image_size
    bank = {
        "support_offset": ["N", 2, s, s, 9],
        "tap_projections": ["N", 9, s, s, config.filter_channels],
        "class_weight": ["N", c],
    }
    return {
        BACKBONE: {"inputs": {"images": ["B", 3, size, size]}, "outputs": {"features": ["B", c, s, s]}},
        SUPPORT: {"inputs": {"prototypes": ["N", c, s, s]}, "outputs": bank},
        HEAD: {"inputs": {"query_features": ["Q", c, s, s], **bank}, "outputs": {"scores": ["Q", "N"]}},
    }


def bundle_graph_io(manifest: dict[str, Any]) -> dict[str, dict[str, dict[str, list]]]:
    """The graph I/O a bundle was written with, as its manifest records it (`graph_io`'s form).

    Consumers of an existing bundle read this rather than `graph_io(config)`, so that a bundle written
    by an earlier version (e.g. with a channel-first class bank) is served as it is.
    """
    io = {}
    for name in GRAPH_NAMES:
        entry = manifest["graphs"][name]
        if not isinstance(entry.get("inputs"), dict) or not isinstance(entry.get("outputs"), dict):
            raise BundleError(f"the manifest does not record the inputs and outputs of the {name} graph")
        io[name] = {"inputs": entry["inputs"], "outputs": entry["outputs"]}
    return io


def read_manifest(bundle: str | os.PathLike[str]) -> dict[str, Any]:
    """Load and validate a bundle's manifest; raise BundleError naming the problem."""
    root = Path(bundle)
    if not root.is_dir():
        raise BundleError(f"bundle folder {root} does not exist")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"{root} is not a dmf bundle: {MANIFEST_NAME} is missing")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{path} is larger than {MAX_MANIFEST_BYTES} bytes; refusing to parse it")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{path} is not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{path} has format version {manifest.get('format_version')}; this runtime reads {FORMAT_VERSION}"
        )
    for key in ("model", "fingerprint", "graphs", "solver", "steps", "opset"):
        if key not in manifest:
            raise BundleError(f"{path} lacks the field {key!r}")
    try:
        manifest["model_config"] = ModelConfig.from_dict(manifest["model"])
    except (TypeError, ValueError) as exc:
        raise BundleError(f"{path} has an invalid model config: {exc}") from exc
    for name in GRAPH_NAMES:
        entry = manifest["graphs"].get(name)
        if not isinstance(entry, dict) or "file" not in entry or "sha256" not in entry:
            raise BundleError(f"{path} does not describe the {name} graph")
    return manifest


def verify_graph(bundle: str | os.PathLike[str], manifest: dict[str, Any], name: str) -> Path:
    """Return the graph's path after checking that it exists and its sha256 matches the manifest."""
    entry = manifest["graphs"][name]
    path = Path(bundle) / entry["file"]
    if path.name != entry["file"] or not path.is_file():
        raise BundleError(f"bundle graph {entry['file']!r} ({name}) is missing from {bundle}")
    actual = sha256_file(path)
    if actual != entry["sha256"]:
        raise BundleError(
            f"{path} is corrupt or was modified: sha256 {actual[:12]}... does not match the manifest's "
            f"{entry['sha256'][:12]}..."
        )
    return path
