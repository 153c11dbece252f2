"""The console's routes (a Starlette app): the page, the live view, the events and the REST API.

docs/web.md documents every route. Reads (classes, thumbnails, state) come from the snapshots the
frame loop leaves (output.py); changes are queued for the loop's thread and awaited. Every error is
a JSON body {"error": NAME, "detail": TEXT} with its status code; there is no debug mode.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import math
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import cv2
import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from dmf_deploy.names import InvalidClassName, name_key, validate_class_name
from dmf_deploy.open_set import check_sensitivity
from dmf_deploy.runtime.app.commands import Session
from dmf_deploy.runtime.app.web.guard import BodyTooLarge, too_large_detail
from dmf_deploy.runtime.app.web.output import OP_TIMEOUT_S, ApiError, Operation
from dmf_deploy.runtime.app.web.uploads import MAX_UPLOAD_FILES, UploadError, decode_upload

if TYPE_CHECKING:
    from dmf_deploy.runtime.app.web.console import WebConsole

log = logging.getLogger("dmf_deploy.runtime")

PAGE_LIMIT = 50  # classes per page by default
MAX_PAGE_LIMIT = 500
RECOGNIZE_SCORES = 10  # classes /api/recognize lists in "scores", the best first
SHOT_PREVIEW = 96  # pixels: the live shot /snap sends back for the page to show
STATIC = {  # file -> content type; read from the package once, at start
    "index.html": "text/html; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
}


def build_app(console: WebConsole) -> Starlette:
    output = console.output
    assets = {name: resources.files(__package__).joinpath("static", name).read_bytes() for name in STATIC}

    # ----- helpers ------------------------------------------------------------------------------------
    async def run_op(operation: Operation) -> Any:
        future = output.submit(operation)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), OP_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise ApiError(503, "busy", "the frame loop did not take the request in time") from None

    def class_record(name: str) -> dict[str, Any]:
        snapshot = output.snapshot
        row = snapshot.find(name)
        if row is None:
            raise ApiError(404, "no_such_class", f"no class named {name!r} is enrolled")
        real = snapshot.names[row]
        return {
            "name": real,
            "shots": snapshot.shots[row],
            "thumbnail": f"/api/classes/{quote(real, safe='')}/thumbnail?v={snapshot.version}",
        }

    def checked_name(text: Any) -> str:
        try:
            return validate_class_name(text)
        except InvalidClassName as exc:
            raise ApiError(400, "invalid_name", str(exc)) from None

    def failed(event: dict[str, Any], status: int, name: str) -> None:
        if event["event"] == "error":
            raise ApiError(status, name, event["message"])

    async def json_body(request: Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "bad_json", "the body is not JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "bad_json", "the body must be a JSON object")
        return body

    async def uploaded_images(request: Request) -> list[np.ndarray]:
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise ApiError(415, "not_multipart", "send the images as multipart/form-data, field 'image'")
        form = await request.form(max_files=MAX_UPLOAD_FILES, max_fields=8)
        try:
            files = [f for f in form.getlist("image") if isinstance(f, UploadFile)]
            if not files:
                raise ApiError(400, "no_image", "the form has no file in the field 'image'")
            blobs = [(await f.read(), f.filename or f"image {i + 1}") for i, f in enumerate(files)]
        finally:
            await form.close()
        return await run_in_threadpool(lambda: [decode_upload(data, what) for data, what in blobs])

    # ----- the page --------------------------------------------------------------------------------
    def asset(name: str) -> Response:
        return Response(assets[name], media_type=STATIC[name], headers={"Cache-Control": "no-cache"})

    async def index(request: Request) -> Response:
        return asset("index.html")

    async def static(request: Request) -> Response:
        name = request.path_params["file"]
        if name not in STATIC or name == "index.html":
            raise ApiError(404, "not_found", f"no file {name!r}")
        return asset(name)

    # ----- status and controls ---------------------------------------------------------------------
    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "classes": len(output.snapshot), "frames": output.state.frames})

    def state_record() -> dict[str, Any]:
        state, rec = output.state, console.rec
        sensitivity = rec.sensitivity if rec.sensitivity is not None else rec.open_set.default_sensitivity
        latency = sorted(console.frames.sent_latency)[-200:] if console.frames.sent_latency else []
        return {
            **console.info,
            "paused": output.paused,
            "explain": output.explain,
            "explain_available": console.explain_available,
            "sensitivity": sensitivity,
            "threshold": rec.threshold,
            "fps": round(state.fps, 2),
            "classify_ms": round(state.classify_ms, 2),
            "stream_latency_ms": round(1000 * float(np.median(latency)), 1) if latency else None,
            "frames": state.frames,
            "classes": len(output.snapshot),
            "version": output.snapshot.version,
            "unsaved": state.dirty,
            "can_undo": state.can_undo,
            "source_ended": state.source_ended,
            "viewers": console.frames.viewers,
        }

    async def get_state(request: Request) -> Response:
        return JSONResponse(state_record())

    async def patch_state(request: Request) -> Response:
        body = await json_body(request)
        unknown = set(body) - {"paused", "explain", "sensitivity"}
        if unknown:
            raise ApiError(
                400, "bad_field", f"unknown fields {sorted(unknown)}; use paused, explain, sensitivity"
            )
        for key in ("paused", "explain"):
            if key in body and not isinstance(body[key], bool):
                raise ApiError(400, "bad_field", f"{key} must be true or false")
        if body.get("explain") and not console.explain_available:
            raise ApiError(409, "explain_unavailable", "the bundle has no explain.onnx")
        sensitivity = body.get("sensitivity")
        if "sensitivity" in body:
            if console.rec.threshold is not None:
                raise ApiError(409, "threshold_set", "--threshold is set: the sensitivity has no effect")
            try:
                check_sensitivity(sensitivity)
            except ValueError as exc:
                raise ApiError(400, "bad_field", str(exc)) from None

        def apply(session: Session, frame: np.ndarray | None) -> None:
            if "sensitivity" in body:
                console.rec.sensitivity = float(sensitivity)
            output.paused = body.get("paused", output.paused)
            output.explain = body.get("explain", output.explain)

        await run_op(apply)
        output.changed()
        return JSONResponse(state_record())

    async def save(request: Request) -> Response:
        event = await run_op(lambda session, frame: session.save())
        failed(event, 409, "save_failed")
        return JSONResponse({"path": event["path"], "classes": event["classes"]})

    async def undo(request: Request) -> Response:
        def restore(session: Session, frame: np.ndarray | None) -> str:
            if not session.undoable:
                raise ApiError(409, "nothing_to_undo", "no deletion to undo (deletions are final once saved)")
            event = session.undo()
            failed(event, 409, "undo_failed")
            return event["name"]

        name = await run_op(restore)
        return JSONResponse(class_record(name))

    # ----- classes ---------------------------------------------------------------------------------
    async def list_classes(request: Request) -> Response:
        offset = _int_param(request, "offset", 0)
        limit = min(_int_param(request, "limit", PAGE_LIMIT), MAX_PAGE_LIMIT)
        snapshot = output.snapshot
        page = [class_record(name) for name, _ in snapshot.page(offset, limit)]
        return JSONResponse(page, headers={"X-Total-Count": str(len(snapshot))})

    async def get_class(request: Request) -> Response:
        return JSONResponse(class_record(request.path_params["name"]))

    async def thumbnail(request: Request) -> Response:
        name = request.path_params["name"]
        class_record(name)  # 404 if there is no such class
        jpeg = output.snapshot.thumbnail(name)
        if jpeg is None:
            raise ApiError(404, "no_thumbnail", f"the class {name!r} has no thumbnail")
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    async def add_shots(request: Request) -> Response:
        name = checked_name(request.path_params["name"])
        images = await uploaded_images(request)

        def enrol(session: Session, frame: np.ndarray | None) -> str:
            failed(session.enroll(name, images), 400, "enroll_failed")
            return name

        return JSONResponse(class_record(await run_op(enrol)), status_code=201)

    async def snap(request: Request) -> Response:
        """One shot from the live view: the frame on screen now (the page's press-and-hold)."""
        name = checked_name(request.path_params["name"])

        def take(session: Session, frame: np.ndarray | None) -> tuple[str, np.ndarray]:
            if frame is None or output.paused or session.frames_over:
                raise ApiError(409, "no_live_frame", "no live frame to take (paused, or the source ended)")
            failed(session.enroll(name, [frame]), 400, "enroll_failed")
            return name, frame

        real, frame = await run_op(take)
        record = class_record(real)
        record["shot"] = await run_in_threadpool(_data_url, frame)
        return JSONResponse(record, status_code=201)

    async def rename(request: Request) -> Response:
        old = request.path_params["name"]
        new = checked_name((await json_body(request)).get("name"))

        def apply(session: Session, frame: np.ndarray | None) -> str:
            snapshot = output.snapshot
            if snapshot.find(old) is None:
                raise ApiError(404, "no_such_class", f"no class named {old!r} is enrolled")
            if snapshot.find(new) is not None and name_key(new) != name_key(old):
                raise ApiError(409, "name_taken", f"a class named {new!r} exists already")
            failed(session.rename(old, new), 409, "rename_failed")
            return new

        return JSONResponse(class_record(await run_op(apply)))

    async def delete(request: Request) -> Response:
        name = request.path_params["name"]

        def remove(session: Session, frame: np.ndarray | None) -> dict[str, Any]:
            if output.snapshot.find(name) is None:
                raise ApiError(404, "no_such_class", f"no class named {name!r} is enrolled")
            event = session.remove(name)
            failed(event, 404, "no_such_class")
            return {"deleted": event["name"], "can_undo": True}

        return JSONResponse(await run_op(remove))

    async def bad_class_path(request: Request) -> Response:
        """What the routes above do not match: a name with a path separator (../ decoded from %2F), or
        no such route."""
        rest = request.path_params["rest"]
        segments = rest.split("/")
        if len(segments) > 2 or ".." in segments or "." in segments:
            raise ApiError(400, "invalid_name", f"a class name cannot contain a path separator ({rest!r})")
        raise ApiError(404, "not_found", f"no route for /api/classes/{rest}")

    # ----- recognition and the inbox ---------------------------------------------------------------
    async def recognize(request: Request) -> Response:
        images = await uploaded_images(request)
        if len(images) != 1:
            raise ApiError(400, "one_image", f"send one image to recognise, not {len(images)}")
        prediction = await run_in_threadpool(console.rec.classify, images[0])
        best = prediction.top(RECOGNIZE_SCORES)
        return JSONResponse(
            {
                "label": prediction.label,
                "score": _finite(prediction.score),
                "reason": prediction.reason or None,
                "scores": {name: _finite(score) for name, score in best},
            }
        )

    async def unknowns(request: Request) -> Response:
        return JSONResponse(console.inbox.records())

    def inbox_item(request: Request):
        item_id = request.path_params["id"]
        item = console.inbox.get(item_id)
        if item is None:
            raise ApiError(404, "no_such_frame", f"no unknown frame {item_id} (the inbox keeps the newest)")
        return item

    async def unknown_image(request: Request) -> Response:
        item = inbox_item(request)
        jpeg = await run_in_threadpool(console.inbox.jpeg, item)
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    async def assign_unknown(request: Request) -> Response:
        item = inbox_item(request)
        name = checked_name((await json_body(request)).get("name"))

        def enrol(session: Session, frame: np.ndarray | None) -> str:
            failed(session.enroll(name, [item.frame]), 400, "enroll_failed")
            console.inbox.discard(item.id)
            return name

        return JSONResponse(class_record(await run_op(enrol)), status_code=201)

    async def discard_unknown(request: Request) -> Response:
        item = inbox_item(request)
        console.inbox.discard(item.id)
        return JSONResponse({"discarded": item.id})

    # ----- streams ---------------------------------------------------------------------------------
    async def stream(request: Request) -> Response:
        async def parts():
            async for frame in console.frames.frames():
                head = f"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: {len(frame.jpeg)}\r\n\r\n"
                yield head.encode() + frame.jpeg + b"\r\n"

        return StreamingResponse(
            parts(),
            media_type="multipart/x-mixed-replace; boundary=frame",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    async def events(request: Request) -> Response:
        async def lines():
            yield "retry: 2000\n\n"
            async for text in console.events.stream():
                yield f"data: {text}\n\n" if text else ": keep-alive\n\n"

        return StreamingResponse(
            lines(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    # ----- errors ----------------------------------------------------------------------------------
    def error(status: int, name: str, detail: str) -> JSONResponse:
        return JSONResponse({"error": name, "detail": detail}, status_code=status)

    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, (ApiError, UploadError))
        return error(exc.status, exc.name, exc.detail)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        names = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "upload_too_large"}
        return error(exc.status_code, names.get(exc.status_code, "http_error"), str(exc.detail))

    async def on_too_large(request: Request, exc: Exception) -> Response:
        return error(413, "upload_too_large", too_large_detail())

    async def on_crash(request: Request, exc: Exception) -> Response:
        log.error("web console: %s on %s %s", type(exc).__name__, request.method, request.url.path)
        return error(500, "internal", f"{type(exc).__name__}; dmf-run's log has more")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        loop = asyncio.get_running_loop()  # the hubs publish to it from the loop's and encoder's threads
        console.frames.attach(loop)
        console.events.attach(loop)
        yield

    routes = [
        Route("/", index),
        Route("/static/{file}", static),
        Route("/api/health", health),
        Route("/api/state", get_state),
        Route("/api/state", patch_state, methods=["PATCH"]),
        Route("/api/save", save, methods=["POST"]),
        Route("/api/undo", undo, methods=["POST"]),
        Route("/api/classes", list_classes),
        Route("/api/classes/{name}", get_class),
        Route("/api/classes/{name}", rename, methods=["PATCH"]),
        Route("/api/classes/{name}", delete, methods=["DELETE"]),
        Route("/api/classes/{name}/thumbnail", thumbnail),
        Route("/api/classes/{name}/shots", add_shots, methods=["POST"]),
        Route("/api/classes/{name}/snap", snap, methods=["POST"]),
        Route("/api/classes/{rest:path}", bad_class_path, methods=["GET", "POST", "PATCH", "DELETE"]),
        Route("/api/recognize", recognize, methods=["POST"]),
        Route("/api/unknowns", unknowns),
        Route("/api/unknowns/{id:int}/image", unknown_image),
        Route("/api/unknowns/{id:int}/assign", assign_unknown, methods=["POST"]),
        Route("/api/unknowns/{id:int}", discard_unknown, methods=["DELETE"]),
        Route("/stream.mjpg", stream),
        Route("/api/events", events),
    ]
    return Starlette(
        debug=False,
        routes=routes,
        exception_handlers={
            ApiError: on_api_error,
            UploadError: on_api_error,
            HTTPException: on_http_error,
            BodyTooLarge: on_too_large,
            Exception: on_crash,
        },
        lifespan=lifespan,
    )


def _int_param(request: Request, key: str, default: int) -> int:
    text = request.query_params.get(key)
    if text is None or text == "":
        return default
    if not text.isdigit() or len(text) > 9:
        raise ApiError(400, "bad_query", f"{key} must be a whole number from 0 up")
    return int(text)


def _finite(value: float) -> float | None:
    return round(float(value), 6) if math.isfinite(value) else None  # JSON has no NaN


def _data_url(frame: np.ndarray) -> str:
    h, w = frame.shape[:2]
    scale = min(1.0, SHOT_PREVIEW / max(h, w))
    small = cv2.resize(
        frame, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA
    )
    jpeg = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 85])[1].tobytes()
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
