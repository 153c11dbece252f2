"""RemoteRecognizer: the Recognizer API over HTTP, against `dmf_recognizer` served by `dmf-serve`.

rec = RemoteRecognizer("127.0.0.1:8000")        # instead of Recognizer.open(bundle, gallery=...)
rec.enroll("mug", frames)
print(rec.classify(frame))

The server holds the gallery and saves every change itself. Errors come back as the errors the local
Recognizer raises: InvalidFrame, InvalidClassName (a ValueError) for a bad name, KeyError for an unknown
class, GalleryError; a refused key as KeyRefused; anything else as RemoteError. Thread-safe: each thread
gets its own connection. Needs `tritonclient[http]` (the `serve` extra).

Every request carries the server's key (dmf_deploy/runtime/serve/key.py): `key=`, else DMF_SERVE_KEY,
else, for a server on this machine, the key file that `dmf-serve` made.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from pathlib import PurePath
from typing import Any

import numpy as np

from dmf_deploy.names import InvalidClassName, validate_class_name
from dmf_deploy.preprocess import InvalidFrame, check_frame
from dmf_deploy.runtime.gallery import GalleryError
from dmf_deploy.runtime.recognizer import Prediction
from dmf_deploy.runtime.serve.key import (
    ENVIRONMENT_VARIABLE,
    HEADER,
    ServeKeyError,
    client_key,
    is_loopback,
    key_file,
    url_host,
)

DEFAULT_URL = "127.0.0.1:8000"
MODEL = "dmf_recognizer"
OUTPUTS = ("scores", "score", "text")


class RemoteError(RuntimeError):
    """The server could not be reached, or failed in a way that has no local counterpart."""


class KeyRefused(RemoteError):
    """The server wants a key this client did not send, or sent wrong."""


# What Triton answers to a request without the key its restricted APIs expect: HTTP 403 and this.
RESTRICTED_ANSWER = "This API is restricted"


# The prefix of the server's error message (dmf_deploy/runtime/serve/triton_model.py) -> the local error.
ERRORS: dict[str, type[Exception]] = {
    "InvalidFrame": InvalidFrame,
    "InvalidClassName": InvalidClassName,
    "UnknownClass": KeyError,
    "GalleryError": GalleryError,
    "BadRequest": ValueError,
}


def _http():
    try:
        import tritonclient.http as http
        from tritonclient.utils import InferenceServerException
    except ImportError as exc:
        raise RemoteError('RemoteRecognizer needs tritonclient: pip install "dmf-deploy[serve]"') from exc
    return http, InferenceServerException


class RemoteRecognizer:
    """Recognizer API (enroll, classify, scores, classes, remove, rename, save) over Triton's HTTP API."""

    def __init__(
        self, url: str = DEFAULT_URL, model: str = MODEL, timeout: float = 60.0, key: str | None = None
    ) -> None:
        self.url, self.model, self.timeout = url, model, timeout
        try:
            key = client_key(url, key)
        except ServeKeyError as exc:
            raise KeyRefused(str(exc)) from None
        self._headers = {HEADER: key} if key else {}
        self._local = threading.local()
        self._clients: list[Any] = []  # every thread's, for close()
        self._clients_lock = threading.Lock()
        try:
            config = self._client().get_model_config(model, headers=self._headers)
        except Exception as exc:
            refused = self._refused(exc)
            if refused is not None:
                raise refused from None
            raise RemoteError(f"no model {model!r} ready at http://{url}: {exc}") from exc
        self.max_batch = int(config.get("max_batch_size", 1)) or 1
        # The server's frame bounds (dmf_deploy/runtime/serve/triton_model.py), checked before sending.
        bounds = config.get("parameters", {})
        self.max_side = int(bounds.get("max_frame_side", {}).get("string_value") or 0) or None
        self.max_pixels = int(bounds.get("max_frame_pixels", {}).get("string_value") or 0) or None

    # ----- reading ---------------------------------------------------------------------------------
    @property
    def classes(self) -> list[str]:
        return self._call("classes")[0]

    def scores(self, frames: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
        """Exact DMF scores [B, len(classes)], columns in `classes` order (as the server had them)."""
        return self.scores_and_classes(frames)[0]

    def scores_and_classes(self, frames: Sequence[np.ndarray] | np.ndarray) -> tuple[np.ndarray, list[str]]:
        """Exact scores and the class list they are over, read together on the server (per request)."""
        rows, classes = [], []
        for batch in self._batches(self._frame_list(frames)):
            classes, outputs = self._call("scores", frames=batch)
            rows.append(outputs["scores"])
        return np.concatenate(rows), classes

    def classify(self, frame: np.ndarray | Sequence[np.ndarray]) -> Prediction | list[Prediction]:
        """One frame -> Prediction; a list of frames (or a [B,H,W,3] array) -> list of Predictions."""
        single = isinstance(frame, np.ndarray) and frame.ndim != 4
        frames = self._frame_list([frame] if single else frame)
        predictions = []
        for batch in self._batches(frames):
            classes, out = self._call("classify", frames=batch)
            for r, text in enumerate(out["text"]):
                table = {name: float(s) for name, s in zip(classes, out["scores"][r]) if np.isfinite(s)}
                score = float(out["score"][r, 0])
                # An unknown frame's message is its reason (Recognizer._decide sets both alike).
                reason = text["message"] if text["label"] is None else ""
                predictions.append(Prediction(text["label"], score, table, text["message"], reason))
        return predictions[0] if single else predictions

    # ----- changing (the server saves each change) ------------------------------------------------
    def enroll(self, name: str, frames: Sequence[np.ndarray] | np.ndarray) -> None:
        """Add frames as shots of `name`; more than `max_batch` frames go in several requests."""
        if isinstance(frames, np.ndarray) and frames.ndim != 4:
            raise InvalidFrame("enroll takes a sequence of frames; wrap a single frame in a list")
        shots = self._frame_list(frames)
        if not shots:
            raise InvalidFrame(f"no frames given to enrol {name!r}")
        for batch in self._batches(shots):
            self._call("enroll", frames=batch, name=name)

    def remove(self, name: str) -> None:
        self._call("remove", name=name)

    def rename(self, old: str, new: str) -> None:
        self._call("rename", name=old, new_name=new)

    def save(self, path: str | os.PathLike[str] | None = None) -> PurePath:
        """Save the server's gallery (atomically, to its own file); returns that file's path on the server."""
        if path is not None:
            raise ValueError("the server saves its gallery to its own file; save() takes no path")
        _, out = self._call("save")
        return PurePath(out["text"][0]["message"])

    def close(self) -> None:
        """Close every thread's connection (an open keep-alive connection delays a server's shutdown)."""
        with self._clients_lock:
            clients, self._clients = self._clients, []
        for client in clients:
            client.close()
        self._local = threading.local()

    def __enter__(self) -> RemoteRecognizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----- transport -------------------------------------------------------------------------------
    def _client(self) -> Any:
        client = getattr(self._local, "client", None)
        if client is None:
            http, _ = _http()
            client = http.InferenceServerClient(
                self.url, connection_timeout=self.timeout, network_timeout=self.timeout
            )
            self._local.client = client
            with self._clients_lock:
                self._clients.append(client)
        return client

    def _refused(self, exc: Exception) -> KeyRefused | None:
        """KeyRefused, saying where a key comes from, if the server refused this client's key."""
        status = exc.status() if callable(getattr(exc, "status", None)) else None
        message = exc.message() if callable(getattr(exc, "message", None)) else ""
        if status != "403" or not str(message).startswith(RESTRICTED_ANSWER):
            return None
        if self._headers:
            return KeyRefused(f"the server at http://{self.url} refused this client's key")
        where = (
            f" (a server on this machine: {key_file()}, made by dmf-serve)"
            if is_loopback(url_host(self.url))
            else ""
        )
        return KeyRefused(
            f"the server at http://{self.url} needs its key: pass key= or set {ENVIRONMENT_VARIABLE}{where}"
        )

    def _frame_list(self, frames: Sequence[np.ndarray] | np.ndarray) -> list[np.ndarray]:
        """Each frame checked as the local Recognizer checks it (HxWx3 BGR uint8), and against the
        server's frame bounds, before anything is sent."""
        if isinstance(frames, np.ndarray) and frames.ndim != 4:
            raise InvalidFrame(
                f"expected a sequence of frames or a [B, H, W, C] array of them, got one array of shape "
                f"{frames.shape}; wrap a single frame in a list"
            )
        checked = [np.ascontiguousarray(check_frame(frame, i)) for i, frame in enumerate(frames)]
        for i, frame in enumerate(checked):
            height, width = frame.shape[:2]
            too_long = self.max_side is not None and max(height, width) > self.max_side
            if too_long or (self.max_pixels is not None and height * width > self.max_pixels):
                raise InvalidFrame(
                    f"frame {i} is {width}x{height} pixels; the server takes at most {self.max_side} a "
                    f"side and {self.max_pixels} pixels: resize it first (the model sees it far smaller)"
                )
        return checked

    def _batches(self, frames: list[np.ndarray]) -> list[np.ndarray]:
        """Runs of same-sized frames, at most max_batch each, as [B,H,W,3] arrays (one request each)."""
        batches: list[list[np.ndarray]] = []
        for frame in frames:
            last = batches[-1] if batches else None
            if last and last[0].shape == frame.shape and len(last) < self.max_batch:
                last.append(frame)
            else:
                batches.append([frame])
        return [np.stack(batch) for batch in batches]

    def _call(self, op: str, frames: np.ndarray | None = None, **names: str) -> tuple[list[str], dict]:
        http, server_error = _http()
        if frames is not None:
            tensor = http.InferInput("frames", list(frames.shape), "UINT8")
            tensor.set_data_from_numpy(np.ascontiguousarray(frames))
        else:
            tensor = http.InferInput("control", [1, 1], "UINT8")
            tensor.set_data_from_numpy(np.zeros((1, 1), np.uint8))
        parameters = {"op": op}
        for key, value in names.items():
            validate_class_name(value)  # as the local Recognizer does; the server checks again
            # The exact bytes, which the server reads (a string parameter would end at a NUL), and the
            # plain string, which models exported at 0.2 read.
            parameters.update({key: value, f"{key}_hex": value.encode("utf-8").hex()})
        wanted = [http.InferRequestedOutput(name) for name in OUTPUTS]
        try:
            result = self._client().infer(
                self.model,
                [tensor],
                outputs=wanted,
                parameters=parameters,
                headers=self._headers,
                timeout=None,
            )
        except server_error as exc:
            raise self._refused(exc) or _local_error(exc.message() or str(exc)) from None
        except Exception as exc:  # connection refused, timeout
            raise RemoteError(f"{op} request to http://{self.url} failed: {exc}") from exc
        out = {name: result.as_numpy(name) for name in OUTPUTS}
        try:
            out["text"] = [json.loads(bytes(row).decode("utf-8")) for row in out["text"]]
            classes = list(out["text"][0]["classes"])
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise RemoteError(f"the server's answer to {op} is malformed: {exc}") from None
        if out["scores"].shape != (len(out["text"]), len(classes)):
            raise RemoteError(f"the server sent scores {out['scores'].shape} for {len(classes)} classes")
        return classes, out


def _local_error(message: str) -> Exception:
    """The server's `Kind: text` error as the local exception of that kind."""
    kind, _, text = message.partition(": ")
    kind = kind.rsplit("] ", 1)[-1].strip()  # tritonclient may prefix the request id
    error = ERRORS.get(kind)
    if error is None:
        return RemoteError(message)
    return error(text)
