"""Checkpoints: our own format, and the official chmxu/Dynamic-Meta-filter `.pth.tar` files.

Loading always uses `torch.load(..., weights_only=True)`: a checkpoint is data, never code.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import struct
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dmf_deploy.atomic import atomic_write_with
from dmf_deploy.config import ModelConfig
from dmf_deploy.manifest import MANIFEST_NAME
from dmf_deploy.model import DMFNet
from dmf_deploy.packaged import DEMO_CHECKPOINT, DEMO_NAME, is_demo_name

FORMAT = "dmf-deploy-checkpoint"
FORMAT_VERSION = 1
DEMO_PATH = DEMO_CHECKPOINT
WANTED = f'a checkpoint file (ours, or an official .pth.tar) or "{DEMO_NAME}"'

# Official key -> our key. Everything under `base.` keeps its name.
_OFFICIAL_RENAMES = {
    "global_clasifier.": "global_classifier.",  # sic, the official spelling
    "dw_gen.off_conv.": "head.off_conv.",
    "dw_gen.kernel_conv.": "head.kernel_conv.",
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with the reason."""


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """Map the reserved name "demo" to the packaged demo checkpoint; check the file exists."""
    if is_demo_name(path):
        if not DEMO_PATH.is_file():
            raise CheckpointError(
                f"the demo checkpoint is not installed (expected {DEMO_PATH}); reinstall dmf-deploy"
            )
        return DEMO_PATH
    resolved = Path(path)
    if resolved.is_dir():
        what = "a bundle folder (an exported model)" if (resolved / MANIFEST_NAME).is_file() else "a folder"
        raise CheckpointError(f"{resolved} is {what}, not a checkpoint: --ckpt wants {WANTED}")
    if not resolved.is_file():
        raise CheckpointError(f"checkpoint {resolved} does not exist")
    return resolved


def weights_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """A digest of the weights that matter for inference (names, shapes, values; counters excluded)."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key]
        if not tensor.is_floating_point():
            continue
        data = tensor.detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{key}:{tuple(data.shape)};".encode())
        digest.update(data.numpy().tobytes())
    return digest.hexdigest()


def save_checkpoint(model: DMFNet, path: str | os.PathLike[str], **metadata: Any) -> Path:
    """Write config + weights + metadata atomically. Metadata values must be plain JSON-like data."""
    from dmf_deploy import __version__

    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "metadata": {"package_version": __version__, **metadata},
    }
    atomic_write_with(path, lambda handle: torch.save(payload, handle))
    return Path(path)


def _unreadable(path: Path, exc: BaseException) -> CheckpointError:
    # torch's messages may advise weights_only=False, which would run code from the file: never pass it on.
    detail = "" if "weights_only" in str(exc) else f": {exc}"
    return CheckpointError(f"{path} is not a readable checkpoint (corrupt or truncated){detail}")


def _read(path: Path) -> Any:
    if zipfile.is_zipfile(path):
        pass  # torch.save's format since PyTorch 1.6
    elif tarfile.is_tarfile(path):
        raise CheckpointError(
            f"{path} is in PyTorch's legacy tar format, which safe loading (weights_only=True) cannot "
            "read; re-save it with a current PyTorch from a source you trust"
        )
    elif not _starts_like_torch_save(path):
        raise CheckpointError(
            f"{path} is not a checkpoint: PyTorch writes a zip archive (or, before 1.6, a pickle), and "
            f"this file starts as neither; --ckpt wants {WANTED}"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights_only" in str(exc) or "Weights only" in str(exc):
            raise CheckpointError(
                f"{path} holds Python objects that safe loading (weights_only=True) refuses to run "
                "(or it is truncated mid-record); only tensors and plain containers are accepted"
            ) from exc
        raise _unreadable(path, exc) from exc
    except (
        EOFError,
        RuntimeError,
        zipfile.BadZipFile,
        ValueError,
        OSError,
        LookupError,
        struct.error,
    ) as exc:
        raise _unreadable(path, exc) from exc


def _starts_like_torch_save(path: Path) -> bool:
    """Whether the file starts as torch.save's output does: a zip entry (a truncated zip still does) or
    the PROTO opcode 0x80 of a protocol-2+ pickle (the legacy format). Text, images and the like do not,
    and torch.load would fail on them with unrelated errors (KeyError: 101, pop from empty list)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError as exc:
        raise _unreadable(path, exc) from exc
    return head == b"PK\x03\x04" or head[:1] == b"\x80"


def load_checkpoint(path: str | os.PathLike[str]) -> DMFNet:
    """Load our checkpoint or an official DMF one; returns the model in eval mode, on the CPU."""
    model, _ = load_checkpoint_with_metadata(path)
    return model


def load_checkpoint_with_metadata(path: str | os.PathLike[str]) -> tuple[DMFNet, dict[str, Any]]:
    resolved = resolve_checkpoint(path)
    payload = _read(resolved)
    if not isinstance(payload, dict) or "state_dict" not in payload:
        raise CheckpointError(f"{resolved} is not a DMF checkpoint: no 'state_dict' entry")
    if payload.get("format") == FORMAT:
        if payload.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(
                f"{resolved} has checkpoint format version {payload.get('format_version')}; "
                f"this dmf-deploy reads {FORMAT_VERSION}"
            )
        try:
            config = ModelConfig.from_dict(payload["config"])
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{resolved} has an invalid model config: {exc}") from exc
        _check_config_bounds(config, resolved)
        state = _checked_state(payload["state_dict"], resolved)
        metadata = payload.get("metadata", {})
        if not isinstance(metadata, dict):
            raise CheckpointError(f"{resolved} has metadata that is not a dict")
        metadata = dict(metadata)
    else:
        state = _official_state(_checked_state(payload["state_dict"], resolved))
        config = _official_config(state, resolved)
        metadata = {"source": "official", "acc": payload.get("acc"), "epoch": payload.get("epoch")}
    try:
        model = DMFNet(config)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{resolved} describes a model that cannot be built: {exc}") from exc
    _load_state(model, state, resolved, spell=str if payload.get("format") == FORMAT else _official_key)
    metadata.setdefault("weights_sha256", weights_sha256(model.state_dict()))
    return model.eval(), metadata


# The largest model a checkpoint's config may describe, field by field: far beyond any DMF model
# (ResNet-12 at 84 px has widths up to 640), yet small enough that building the model it names costs at
# most about a gigabyte. Checked before the model is built: a 3 KB file cannot ask for 240 GB.
CONFIG_BOUNDS = {
    "preprocess.image_size": 1024,
    "preprocess.crop_from": 2048,
    "widths": 2048,
    "groups": 2048,
    "num_classes": 10_000,
    "steps": 1000,
    "dropblock_size": 64,
}


def _check_config_bounds(config: ModelConfig, path: Path) -> None:
    values = {
        "preprocess.image_size": [config.preprocess.image_size],
        "preprocess.crop_from": [config.preprocess.crop_from or 0],
        "widths": list(config.widths),
        "groups": [config.groups],
        "num_classes": [config.num_classes],
        "steps": [config.steps],
        "dropblock_size": [config.dropblock_size],
    }
    for field, numbers in values.items():
        top = CONFIG_BOUNDS[field]
        if any(not 0 <= n <= top for n in numbers):
            shown = numbers[0] if len(numbers) == 1 else numbers
            raise CheckpointError(
                f"{path}: its model config asks for {field} = {shown}; at most {top} is read (the model it "
                "describes would take more memory than any DMF model)"
            )


def _checked_state(state: Any, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: 'state_dict' is a {type(state).__name__}, not a dict of tensors")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{path}: 'state_dict' entry {str(key)[:80]!r} is a {type(value).__name__}, not a tensor"
            )
    return state


def _official_key(key: str) -> str:
    """Our key as the official file spells it (for error messages)."""
    for old, new in _OFFICIAL_RENAMES.items():
        if key.startswith(new):
            return old + key[len(new) :]
    return key


def _official_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    renamed = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        for old, new in _OFFICIAL_RENAMES.items():
            if key.startswith(old):
                key = new + key[len(old) :]
        renamed[key] = value
    return renamed


def _official_config(state: dict[str, torch.Tensor], path: Path) -> ModelConfig:
    """Infer the official model's config from its weights.

    G and k come from kernel_conv's out_channels: k = 1 if they divide C, else k = 3 if a ninth of them
    does (unique because C = 640 has no factor 3).
    """
    needed = ("head.kernel_conv.weight", "global_classifier.weight", "base.layer4.0.conv1.weight")
    missing = [_official_key(k) for k in needed if k not in state]
    if missing:
        raise CheckpointError(
            f"{path} is neither a dmf-deploy nor an official DMF checkpoint; missing keys: {missing}"
        )
    layers = [k for k in state if k.startswith("base.layer") and k.endswith(".0.conv1.weight")]
    for key in (*needed, *layers):
        shape = tuple(state[key].shape)
        if len(shape) not in (2, 4) or min(shape) < 1 or (key == needed[0] and len(shape) != 4):
            raise CheckpointError(
                f"{path}: {_official_key(key)} has shape {shape}, which is not a convolution kernel "
                "(or linear weight) with non-empty axes"
            )
    kernel_out, channels = state["head.kernel_conv.weight"].shape[:2]
    if channels % kernel_out == 0:
        groups, kernel = kernel_out, 1
    elif kernel_out % 9 == 0 and channels % (kernel_out // 9) == 0:
        groups, kernel = kernel_out // 9, 3
    else:
        raise CheckpointError(
            f"{path}: dw_gen.kernel_conv.weight has {kernel_out} output channels, which matches neither "
            f"G (k = 1) nor 9G (k = 3) for {channels} feature channels"
        )
    widths = tuple(
        int(state[f"base.layer{i}.0.conv1.weight"].shape[0])
        for i in range(1, 5)
        if f"base.layer{i}.0.conv1.weight" in state
    )
    try:
        return _official_model_config(state, groups, kernel, widths)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: its weights do not describe a valid DMF model: {exc}") from exc


def _official_model_config(
    state: dict[str, torch.Tensor], groups: int, kernel: int, widths: tuple[int, ...]
) -> ModelConfig:
    return ModelConfig(
        backbone="resnet12",
        widths=widths,
        groups=groups,
        kernel=kernel,
        num_classes=int(state["global_classifier.weight"].shape[0]),
        solver="rk4-38",  # odeint(method='rk4') with no step size: one 3/8-rule step
        steps=1,
        official_score_scale=True,
        official_filter_order=kernel == 3,
    )


def _load_state(
    model: DMFNet, state: dict[str, torch.Tensor], path: Path, spell: Callable[[str], str] = str
) -> None:
    """Load strictly; errors name keys as the file spells them (`spell` maps our names back)."""
    expected = model.state_dict()
    missing = sorted(spell(k) for k in set(expected) - set(state))
    unexpected = sorted(spell(k) for k in set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match the {model.config.backbone} DMF layout; "
            f"missing keys: {missing[:8]}{' ...' if len(missing) > 8 else ''}; "
            f"unexpected keys: {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )
    wrong = [
        f"{spell(k)}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if tuple(state[k].shape) != tuple(v.shape)
    ]
    if wrong:
        raise CheckpointError(f"{path} has tensors of the wrong shape: {'; '.join(wrong[:5])}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: its weights cannot be loaded: {exc}") from exc
