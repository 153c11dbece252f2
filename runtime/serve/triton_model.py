"""The `dmf_recognizer` model of a Triton model repository (Python backend): a stateful Recognizer.

`dmf-export --triton REPO` copies this file to REPO/dmf_recognizer/1/model.py. Inside Triton it holds
one `Recognizer` (the bundle copied beside it, the gallery named by the config's `gallery` parameter)
and answers requests to the one model, so that the state lives in one place:

- request parameter ``op``: classify (the default), scores, enroll, remove, rename, save or classes;
  ``name_hex`` and ``new_name_hex`` carry class names (enroll, remove, rename) as the hex of their UTF-8
  bytes: Triton ends a string parameter at its first NUL, so "ring\\x00cross" would arrive as "ring".
  The hex arrives whole and is validated as the local Recognizer validates names. (RemoteRecognizer
  also sends ``name`` and ``new_name`` as plain strings, which only models exported at 0.2 read.)
- input ``frames`` [B,H,W,3] uint8 (BGR): classify, scores and enroll. Requests that carry no
  frames send the one-byte input ``control`` instead: Triton refuses a request without any input.
- bounds on what one request may cost: B <= max_batch_size (config.pbtxt), 3 channels (config.pbtxt),
  and, checked here before anything is copied, each frame at most ``max_frame_side`` pixels a side and
  ``max_frame_pixels`` in all (config.pbtxt's parameters, which RemoteRecognizer reads too).
- outputs, B rows each: ``scores`` [B,N] float32 over the class list (-inf for classes a shortlist
  left out), ``score`` [B,1] float32, and ``text`` [B,L] uint8: per row the UTF-8 JSON
  ``{"classes": [...], "label": ... or null, "message": ...}``, padded with spaces to one length.
  Requests without frames answer one row: the classes after the change.

Tensors cross the stub by DLPack and text as UTF-8 bytes, never through the stub's own numpy
conversions: Triton 2.51's Python stub is built against numpy 1.x, and with numpy 2 those read inputs as
zeros and send empty outputs, silently. DLPack works with either numpy.

Every change (enroll, remove, rename) is saved to the gallery file before it is answered: one SQLite
transaction holding only that change, durable when it commits, so its cost does not grow with the
gallery and a restart keeps every acknowledged class.
Errors are answered as Triton errors whose message starts with the name of the error
(``InvalidFrame: ...``), which `dmf_deploy.runtime.serve.remote.RemoteRecognizer` raises again as that error.
A client's mistake (a bad frame, name, op, or an unknown class) is an INVALID_ARG error (HTTP 400);
only the server's own failures are HTTP 500.
The model instance executes one batch at a time, so the requests of a batch are handled in arrival
order and nothing else changes the gallery in between.
"""

from __future__ import annotations

import os
import sys

# Triton's Python stub runs an isolated interpreter (PYTHONPATH is ignored): `dmf-serve` names the
# site-packages of its own environment here, put first so that numpy, OpenCV, onnxruntime and
# dmf_deploy come from there. It must happen before numpy is imported.
_SITE_DIRS_VARIABLE = "DMF_SERVE_SITE_DIRS"


def _use_serving_environment() -> None:
    import site

    dirs = [d for d in os.environ.get(_SITE_DIRS_VARIABLE, "").split(os.pathsep) if d]
    for directory in reversed(dirs):
        if directory not in sys.path:
            sys.path.insert(0, directory)
        site.addsitedir(directory)  # runs its .pth files (an editable install's finder)


_use_serving_environment()

import json  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

OPS = ("classify", "scores", "enroll", "remove", "rename", "save", "classes")
FRAME_OPS = ("classify", "scores", "enroll")
# Defaults of the config's parameters max_frame_side and max_frame_pixels (a config without them).
MAX_FRAME_SIDE = 4096
MAX_FRAME_PIXELS = 1920 * 1080
MAX_PARAMETER_CHARS = 1024  # a class name is at most 64 characters (256 UTF-8 bytes, 512 in hex)
# Errors that are the client's mistake, answered as INVALID_ARG (HTTP 400) rather than 500.
CLIENT_ERRORS = ("InvalidFrame", "InvalidClassName", "UnknownClass", "BadRequest")


class BadRequest(ValueError):
    """A request this model does not understand (unknown op, missing name, frames where none belong)."""


def error_kind(exc: BaseException) -> str:
    """The name the client maps back to an exception: see RemoteRecognizer."""
    from dmf_deploy.names import InvalidClassName
    from dmf_deploy.preprocess import InvalidFrame
    from dmf_deploy.runtime.gallery import GalleryError

    for kind, types in (
        ("InvalidFrame", (InvalidFrame,)),
        ("InvalidClassName", (InvalidClassName,)),
        ("UnknownClass", (KeyError,)),
        ("GalleryError", (GalleryError, OSError)),
        ("BadRequest", (BadRequest,)),
    ):
        if isinstance(exc, types):
            return kind
    return "ServerError"


def _message(exc: BaseException) -> str:
    # KeyError's str() is the repr of its argument; the client wants the sentence.
    return str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)


def _text_parameter(params: dict[str, Any], key: str) -> str:
    value = params.get(key)
    if not isinstance(value, str):
        raise BadRequest(f"the request parameter {key!r} must be a string, got {type(value).__name__}")
    if len(value) > MAX_PARAMETER_CHARS:
        raise BadRequest(f"the request parameter {key!r} is longer than {MAX_PARAMETER_CHARS} characters")
    return value


def _name_parameter(params: dict[str, Any], key: str) -> str:
    """The class name in the parameter `key`_hex, decoded from the exact bytes the client sent."""
    from dmf_deploy.names import InvalidClassName, validate_class_name

    if f"{key}_hex" not in params and key in params:
        raise BadRequest(
            f"send the class name as {key}_hex, the hex of its UTF-8 bytes: Triton ends a string "
            f"parameter at its first NUL character, so {key!r} may not be what the client sent"
        )
    text = _text_parameter(params, f"{key}_hex")
    try:
        name = bytes.fromhex(text).decode("utf-8")
    except ValueError:  # not hex, or not UTF-8 (UnicodeDecodeError is a ValueError)
        raise InvalidClassName(f"the request parameter {key}_hex is not the hex of a UTF-8 name") from None
    validate_class_name(name)  # NUL and every other name the local Recognizer refuses
    return name


def check_frames(frames: np.ndarray, max_side: int, max_pixels: int) -> None:
    """Refuse frames beyond this model's bounds, from their shape alone (before they are copied)."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or len(frames) == 0:
        raise BadRequest(f"'frames' must be [B,H,W,3] uint8 with B >= 1, got {frames.dtype} {frames.shape}")
    height, width, channels = frames.shape[1:]
    if channels != 3:
        raise _invalid_frame(f"frames have {channels} channels; expected 3 (BGR)")
    if min(height, width) < 2 or max(height, width) > max_side or height * width > max_pixels:
        raise _invalid_frame(
            f"frames of {width}x{height} pixels are outside this server's bounds: 2 to {max_side} pixels a "
            f"side and at most {max_pixels} pixels; resize them first (the model sees them far smaller)"
        )


def _frames(frames: np.ndarray | None, op: str) -> list[np.ndarray]:
    if frames is None:
        raise BadRequest(f"{op} needs the input 'frames'")
    return list(frames)


def _invalid_frame(text: str) -> Exception:
    from dmf_deploy.preprocess import InvalidFrame

    return InvalidFrame(text)


class Rows:
    """The outputs of one request: one row per frame (or one row for requests without frames)."""

    def __init__(self, classes: list[str], count: int) -> None:
        self.classes = classes
        self.scores = np.zeros((count, len(classes)), np.float32)
        self.label: list[str | None] = [None] * count
        self.score = np.full((count, 1), np.nan, np.float32)
        self.message = [""] * count

    def arrays(self) -> dict[str, np.ndarray]:
        rows = [
            json.dumps({"classes": self.classes, "label": label, "message": message}).encode("utf-8")
            for label, message in zip(self.label, self.message)
        ]
        width = max(len(row) for row in rows)
        padded = bytearray(b"".join(row.ljust(width) for row in rows))  # writable: DLPack refuses read-only
        text = np.frombuffer(padded, np.uint8).reshape(len(rows), width)
        return {"scores": self.scores, "score": self.score, "text": text}


def c_order(array: np.ndarray) -> np.ndarray:
    """`array` in C order, with the strides the stub's DLPack import checks for.

    numpy gives an empty array strides of 0 (an empty gallery's scores are [B, 0]), which the stub
    refuses as "not contiguous"; its check wants each stride to be the product of the later dimensions.
    """
    array = np.ascontiguousarray(array)
    if array.size:
        return array
    strides = [array.itemsize] * array.ndim
    for axis in range(array.ndim - 2, -1, -1):
        strides[axis] = strides[axis + 1] * array.shape[axis + 1]
    return np.lib.stride_tricks.as_strided(array, strides=strides)  # no element to read: any stride is safe


def _quiet_consumed_capsules(unraisable: Any, default: Any = sys.unraisablehook) -> None:
    """The stub renames the DLPack capsules it takes over to a name numpy's capsule destructor does not
    expect, which then reports (and otherwise ignores) this ValueError for every output tensor."""
    if isinstance(unraisable.exc_value, ValueError) and "PyCapsule_GetPointer" in str(unraisable.exc_value):
        return
    default(unraisable)


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        import triton_python_backend_utils as pb_utils

        sys.unraisablehook = _quiet_consumed_capsules

        from dmf_deploy.runtime.recognizer import Recognizer

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        model_dir = Path(args["model_repository"]).resolve()
        version_dir = model_dir / args["model_version"]
        bundle = version_dir / params.get("bundle", "bundle")
        gallery = model_dir / params.get("gallery", "gallery.dmfg")
        threads = int(params["threads"]) if params.get("threads") else None
        backend = params.get("backend", "auto")
        self.max_side = int(params.get("max_frame_side") or MAX_FRAME_SIDE)
        self.max_pixels = int(params.get("max_frame_pixels") or MAX_FRAME_PIXELS)
        self.recognizer = Recognizer.open(bundle, backend=backend, gallery=gallery, threads=threads)
        self.gallery_path = gallery

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        pending: list[tuple[int, list[np.ndarray]]] = []  # classify requests, run as one batch
        for i, request in enumerate(requests):
            try:
                op, params, frames = self._parse(request)
                if op == "classify":
                    pending.append((i, _frames(frames, op)))
                    continue
                self._classify(pending, responses)
                pending = []
                responses[i] = self._respond(self._apply(op, params, frames))
            except Exception as exc:  # answered as a Triton error, never a crashed model
                responses[i] = self._error(exc)
        self._classify(pending, responses)
        return responses

    # ----- requests --------------------------------------------------------------------------------
    def _parse(self, request: Any) -> tuple[str, dict[str, Any], np.ndarray | None]:
        params = json.loads(request.parameters() or "{}")
        op = params.get("op", "classify")
        if op not in OPS:
            raise BadRequest(f"unknown op {op!r}; expected one of {', '.join(OPS)}")
        tensor = self.pb.get_input_tensor_by_name(request, "frames")
        if tensor is None:
            return op, params, None
        if op not in FRAME_OPS:
            raise BadRequest(f"{op} takes no frames")
        view = np.from_dlpack(tensor)
        check_frames(view, self.max_side, self.max_pixels)
        # A copy: the DLPack view is of the request's memory, which Triton frees after the response.
        return op, params, np.array(view)

    def _classify(self, pending: list[tuple[int, list[np.ndarray]]], responses: list[Any]) -> None:
        """Classify the frames of several requests in one Recognizer call (one backbone batch)."""
        if not pending:
            return
        frames = [frame for _, group in pending for frame in group]
        try:
            predictions = self.recognizer.classify(frames)
        except Exception:
            # One bad request must not fail the others of its batch: answer each on its own.
            for i, group in pending:
                try:
                    responses[i] = self._respond(self._predictions(self.recognizer.classify(group)))
                except Exception as exc:
                    responses[i] = self._error(exc)
            return
        start = 0
        for i, group in pending:
            try:
                responses[i] = self._respond(self._predictions(predictions[start : start + len(group)]))
            except Exception as exc:  # an answer that cannot be sent is an error, not a crashed batch
                responses[i] = self._error(exc)
            start += len(group)

    def _predictions(self, predictions: list[Any]) -> Rows:
        # classify and the class list are read on this one thread, with no change in between.
        rows = Rows(self.recognizer.classes, len(predictions))
        for r, p in enumerate(predictions):
            rows.scores[r] = [p.scores.get(name, -np.inf) for name in rows.classes]
            rows.label[r] = p.label
            rows.score[r, 0] = p.score
            rows.message[r] = p.message
        return rows

    def _apply(self, op: str, params: dict[str, Any], frames: np.ndarray | None) -> Rows:
        rec = self.recognizer
        if op == "scores":
            batch = _frames(frames, op)
            classes = rec.classes
            rows = Rows(classes, len(batch))
            rows.scores[:] = rec.scores(batch)
            return rows
        if op == "enroll":
            rec.enroll(_name_parameter(params, "name"), _frames(frames, op))
        elif op == "remove":
            rec.remove(_name_parameter(params, "name"))
        elif op == "rename":
            rec.rename(_name_parameter(params, "name"), _name_parameter(params, "new_name"))
        if op != "classes":
            rec.save()  # this change alone, in one durable transaction
        rows = Rows(rec.classes, 1)
        if op == "save":
            rows.message[0] = str(self.gallery_path)
        return rows

    # ----- responses -------------------------------------------------------------------------------
    def _respond(self, rows: Rows) -> Any:
        arrays = rows.arrays().items()
        tensors = [self.pb.Tensor.from_dlpack(name, c_order(a)) for name, a in arrays]
        return self.pb.InferenceResponse(output_tensors=tensors)

    def _error(self, exc: BaseException) -> Any:
        kind = error_kind(exc)
        client = kind in CLIENT_ERRORS or (kind == "GalleryError" and not isinstance(exc, OSError))
        code = self.pb.TritonError.INVALID_ARG if client else self.pb.TritonError.INTERNAL
        return self.pb.InferenceResponse(error=self.pb.TritonError(f"{kind}: {_message(exc)}", code))
