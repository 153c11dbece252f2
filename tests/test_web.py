"""The web console (dmf-run --web) over real HTTP: a real dmf-run, the packaged demo bundle, a real video
of dmf-demo's symbols, a real uvicorn server on a free loopback port. Nothing is mocked.

One console serves the module (starting one costs seconds); each test leaves its classes as it found
them or checks only what it changed. Every hostile request must get its 4xx and a JSON error, and the
gallery must be as it was before it.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import struct
import time
import zlib

import cv2
import numpy as np
import pytest

pytest.importorskip("starlette", reason="the web console needs the [web] extra")
pytest.importorskip("uvicorn", reason="the web console needs the [web] extra")

from web_client import (  # noqa: E402  (tests/web_client.py)
    SEGMENT,
    SYMBOLS,
    EventStream,
    demo_clip,
    mjpeg_parts,
    multipart,
    start_console,
    symbol_frame,
    symbol_png,
)

from dmf_deploy.runtime import Recognizer  # noqa: E402
from dmf_deploy.runtime.app.web.settings import (  # noqa: E402
    ConsoleSettings,
    allowed_host,
    parse_bind,
    resolve_settings,
)
from dmf_deploy.runtime.app.web.uploads import MAX_UPLOAD_BYTES, header_size  # noqa: E402

TOKEN = "test-token-0123456789"
PRED_KEYS = {"frame", "label", "score", "top", "latency_ms", "reason"}


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return demo_clip(tmp_path_factory.mktemp("web"))


@pytest.fixture(scope="module")
def console(clip, tmp_path_factory):
    gallery = tmp_path_factory.mktemp("gallery") / "g.dmfg"
    running = start_console(["--source", clip, "--loop", "--bundle", "demo", "--gallery", gallery], TOKEN)
    running.gallery = gallery
    yield running
    assert running.stop() == 0


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header says width x height (8-bit RGB), with one tiny data chunk: a decompression bomb's
    header without the bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def error_of(reply) -> str:
    body = reply.json()
    assert set(body) == {"error", "detail"} and body["detail"], body
    return body["error"]


# ----- the REST API ----------------------------------------------------------------------------------
def test_enrol_by_upload_rename_delete_undo_save_and_recognise(console):
    assert console.get("/api/health").json()["status"] == "ok"
    shots = [(f"R{i}.png", symbol_png("R", i)) for i in range(3)]
    reply = console.upload("/api/classes/R/shots", shots)
    assert reply.status == 201, reply.body
    assert reply.json()["name"] == "R" and reply.json()["shots"] == 3
    for symbol in SYMBOLS[1:]:
        assert (
            console.upload(f"/api/classes/{symbol}/shots", [("a.png", symbol_png(symbol, 7))]).status == 201
        )
    listed = console.get("/api/classes?offset=0&limit=2")
    assert listed.headers["x-total-count"] == str(len(SYMBOLS))
    assert [c["name"] for c in listed.json()] == ["R", "7"]
    assert [c["name"] for c in console.get("/api/classes?offset=2&limit=10").json()] == ["4", "9"]

    thumb = console.get(listed.json()[0]["thumbnail"])
    assert thumb.status == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert cv2.imdecode(np.frombuffer(thumb.body, np.uint8), cv2.IMREAD_COLOR).shape[2] == 3

    # Recognise a drawing of R the gallery has not seen (the demo model gets 40 of 40 such right).
    reply = console.upload("/api/recognize", [("q.png", symbol_png("R", 99))])
    assert reply.status == 200, reply.body
    result = reply.json()
    assert set(result) == {"label", "score", "reason", "scores"}
    assert result["label"] == "R" and result["reason"] is None
    assert max(result["scores"], key=result["scores"].get) == "R"

    assert console.send_json("PATCH", "/api/classes/R", {"name": "Rho"}).json()["name"] == "Rho"
    assert [c["name"] for c in console.classes()] == ["Rho", "7", "4", "9"]
    assert console.request("DELETE", "/api/classes/Rho").json() == {"deleted": "Rho", "can_undo": True}
    assert "Rho" not in [c["name"] for c in console.classes()]
    restored = console.request("POST", "/api/undo")
    assert restored.status == 200 and restored.json()["shots"] == 3
    assert console.request("DELETE", "/api/classes/Rho").status == 200

    saved = console.request("POST", "/api/save")
    assert saved.status == 200 and saved.json()["classes"] == 3
    assert Recognizer.open("demo", gallery=console.gallery).classes == ["7", "4", "9"]
    # Saving ends undo: deletions are final once saved.
    assert error_of(console.request("POST", "/api/undo")) == "nothing_to_undo"
    for symbol in SYMBOLS[1:]:
        assert console.request("DELETE", f"/api/classes/{symbol}").status == 200
    assert console.classes() == []


def test_the_stream_sends_frames_that_change(console):
    jpegs = mjpeg_parts(console, 3)
    images = [cv2.imdecode(np.frombuffer(j, np.uint8), cv2.IMREAD_COLOR) for j in jpegs]
    assert all(image.shape == (480, 480, 3) for image in images)  # square frames fit 640 x 480
    # Each frame of the clip is drawn anew: consecutive parts are different frames.
    assert all(np.abs(a.astype(int) - b).mean() > 0.5 for a, b in zip(images, images[1:]))


def test_events_carry_the_headless_lines_and_the_changes(console):
    events = EventStream(console)
    try:
        assert set(events.until(lambda r: "frame" in r)) == PRED_KEYS
        assert console.upload("/api/classes/seven/shots", [("7.png", symbol_png("7", 1))]).status == 201
        enrolled = events.until(lambda r: r.get("event") == "enrolled")
        assert enrolled["name"] == "seven" and enrolled["shots"] == 1
        # Once seven is enrolled, the clip's 7s are recognised, and the stream says so.
        seen = events.until(lambda r: r.get("label") == "seven")
        assert seen["top"][0][0] == "seven"
        assert console.request("DELETE", "/api/classes/seven").status == 200
        assert events.until(lambda r: r.get("event") == "removed")["name"] == "seven"
    finally:
        events.close()


def test_the_inbox_holds_unknown_frames_and_assigns_one(console):
    assert console.upload("/api/classes/R/shots", [("R.png", symbol_png("R", 3))]).status == 201
    deadline = time.monotonic() + 20
    while not (inbox := console.get("/api/unknowns").json()) and time.monotonic() < deadline:
        time.sleep(0.3)  # the clip's 7, 4 and 9 are unknown while only R is enrolled
    assert inbox, "no unknown frame reached the inbox"
    item = inbox[0]
    image = console.get(f"/api/unknowns/{item['id']}/image")
    assert image.status == 200 and image.headers["content-type"] == "image/jpeg"
    reply = console.send_json("POST", f"/api/unknowns/{item['id']}/assign", {"name": "from-inbox"})
    assert reply.status == 201 and reply.json()["shots"] == 1
    assert item["id"] not in [u["id"] for u in console.get("/api/unknowns").json()]
    for name in ("R", "from-inbox"):
        assert console.request("DELETE", f"/api/classes/{name}").status == 200


def test_live_shots_come_from_the_frames_on_screen(console):
    """What the page's press-and-hold sends: each /snap enrols the frame on screen as one shot."""
    import base64

    for expected in (1, 2):
        reply = console.request("POST", "/api/classes/live/snap")
        assert reply.status == 201, reply.body
        assert reply.json()["shots"] == expected
        head, _, data = reply.json()["shot"].partition(",")
        assert head == "data:image/jpeg;base64"
        shot = cv2.imdecode(np.frombuffer(base64.b64decode(data), np.uint8), cv2.IMREAD_COLOR)
        assert shot.shape == (96, 96, 3)  # the square frame, shown small
    assert console.send_json("PATCH", "/api/state", {"paused": True}).status == 200
    try:  # a held frame is not a new shot
        assert error_of(console.request("POST", "/api/classes/live/snap")) == "no_live_frame"
    finally:
        assert console.send_json("PATCH", "/api/state", {"paused": False}).status == 200
    assert console.request("DELETE", "/api/classes/live").status == 200


def test_pause_holds_the_frame_and_resume_goes_on(console):
    reply = console.send_json("PATCH", "/api/state", {"paused": True})
    assert reply.status == 200 and reply.json()["paused"] is True
    time.sleep(0.3)
    held = console.get("/api/state").json()["frames"]
    time.sleep(0.6)  # at the clip's 15 fps, 9 frames would have come
    assert console.get("/api/state").json()["frames"] == held
    assert console.send_json("PATCH", "/api/state", {"paused": False}).json()["paused"] is False
    time.sleep(0.6)
    assert console.get("/api/state").json()["frames"] > held
    assert error_of(console.send_json("PATCH", "/api/state", {"sensitivity": 2})) == "bad_field"
    assert error_of(console.send_json("PATCH", "/api/state", {"paused": "yes"})) == "bad_field"


def test_explain_draws_the_points_on_the_live_view(console):
    assert console.upload("/api/classes/R/shots", [("R.png", symbol_png("R", 2))]).status == 201
    try:
        plain = mjpeg_parts(console, 8)
        assert console.send_json("PATCH", "/api/state", {"explain": True}).json()["explain"] is True
        explained = mjpeg_parts(console, len(SYMBOLS) * SEGMENT + 2)  # a whole pass of the clip: its Rs
    finally:
        assert console.send_json("PATCH", "/api/state", {"explain": False}).status == 200
        assert console.request("DELETE", "/api/classes/R").status == 200

    def colour(jpeg: bytes) -> float:  # the clip is grey ink on white; the heat map is coloured
        image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR).astype(int)
        h, w = image.shape[:2]
        drawing = image[h // 3 : 2 * h // 3, w // 3 : 2 * w // 3]  # the symbol: the card's middle third
        return float((drawing.max(axis=2) - drawing.min(axis=2)).mean())

    # The recognised R frames get the heat map over the drawing; nothing else there is coloured.
    assert max(map(colour, explained)) > 10 * max(map(colour, plain))


# ----- hostile requests: each its 4xx and a JSON error; the gallery as it was ------------------------
@pytest.fixture()
def unchanged(console):
    """One class enrolled before; after the test, the same classes and shots."""
    assert console.upload("/api/classes/keep/shots", [("k.png", symbol_png("4", 5))]).status == 201
    before = console.classes()
    yield
    assert console.classes() == before
    assert console.request("DELETE", "/api/classes/keep").status == 200


def test_no_token_and_a_wrong_token_are_refused(console, unchanged):
    upload = [("R.png", symbol_png("R", 1))]
    for token in (None, "wrong-token-000000"):
        for reply in (
            console.get("/api/classes", token=token),
            console.get("/stream.mjpg", token=token),
            console.get("/api/events", token=token),
            console.get("/", token=token),
            console.upload("/api/classes/R/shots", upload, token=token),
            console.request("DELETE", "/api/classes/keep", token=token),
        ):
            assert reply.status == 401 and error_of(reply) == "unauthorized"
    cookie = {"Cookie": "dmf_web_token=wrong-token-000000"}
    assert console.get("/api/classes", token=None, headers=cookie).status == 401


def test_the_printed_link_sets_a_strict_http_only_cookie(console, unchanged):
    login = console.get(f"/?token={TOKEN}", token=None)
    assert login.status == 303 and login.headers["location"] == "/"
    cookie = login.headers["set-cookie"]
    assert cookie.startswith(f"dmf_web_token={TOKEN};")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Secure" not in cookie  # plain HTTP
    with_cookie = {"Cookie": f"dmf_web_token={TOKEN}"}
    page = console.get("/", token=None, headers=with_cookie)
    assert page.status == 200 and b"/stream.mjpg" in page.body
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert console.get(f"/?token=not-{TOKEN}", token=None).status == 401


def test_cross_origin_requests_that_change_state_are_refused(console, unchanged):
    evil = {"Origin": "http://evil.example"}
    upload = [("R.png", symbol_png("R", 1))]
    for reply in (
        console.upload("/api/classes/R/shots", upload, headers=evil),
        console.send_json("PATCH", "/api/classes/keep", {"name": "taken"}, headers=evil),
        console.request("DELETE", "/api/classes/keep", headers=evil),
        console.request("POST", "/api/save", headers=evil),
        # The console's own address on another port is another origin.
        console.request("DELETE", "/api/classes/keep", headers={"Origin": "http://127.0.0.1:1"}),
        # A page fetching from another site, with the victim's cookie: refused even for reads.
        console.get("/api/classes", headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "cors"}),
        # Another port of this host is the same site, not the same origin: the stream is not for it.
        console.get("/stream.mjpg", headers={"Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "no-cors"}),
    ):
        assert reply.status == 403 and error_of(reply) == "cross_origin"
    same = {"Origin": f"http://{console.host}"}
    assert console.get("/api/classes", headers=same).status == 200


def test_a_foreign_host_header_is_refused(console, unchanged):
    for host in ("evil.example", f"evil.example:{console.port}", "127.0.0.1:1", "localhost.evil.example"):
        reply = console.get("/api/classes", headers={"Host": host})
        assert reply.status == 403 and error_of(reply) == "foreign_host"
        reply = console.request("DELETE", "/api/classes/keep", headers={"Host": host})
        assert reply.status == 403
    assert console.get("/api/health", headers={"Host": f"localhost:{console.port}"}).status == 200


def test_a_bomb_header_is_refused_before_decoding(console, unchanged):
    bomb = png_claiming(100_000, 100_000)
    assert header_size(bomb) == (100_000, 100_000)
    for path in ("/api/classes/R/shots", "/api/recognize"):
        reply = console.upload(path, [("bomb.png", bomb)])
        assert reply.status == 422 and error_of(reply) == "image_too_large"
        assert "100000 x 100000" in reply.json()["detail"]


def test_a_text_file_is_not_an_image(console, unchanged):
    for path in ("/api/classes/R/shots", "/api/recognize"):
        reply = console.upload(path, [("notes.png", b"just some text, not a picture\n" * 10)])
        assert reply.status == 415 and error_of(reply) == "not_an_image"
    # A good image beside a bad one: nothing of the request is enrolled.
    mixed = [("R.png", symbol_png("R", 1)), ("notes.jpg", b"\xff\xd8 not really a JPEG")]
    assert console.upload("/api/classes/keep/shots", mixed).status == 415
    reply = console.request(
        "POST", "/api/classes/R/shots", b"{}", headers={"Content-Type": "application/json"}
    )
    assert reply.status == 415 and error_of(reply) == "not_multipart"


def test_an_upload_over_the_bound_is_refused(console, unchanged):
    assert MAX_UPLOAD_BYTES == 20 << 20  # the bound docs/web.md states
    # Declared too large: refused from the header, before a byte of the body is read.
    body, content_type = multipart([("big.png", b"\0" * 16)])
    conn = http.client.HTTPConnection("127.0.0.1", console.port, timeout=30)
    conn.putrequest("POST", "/api/classes/R/shots", skip_host=True)
    for key, value in {
        "Host": console.host,
        "Authorization": f"Bearer {console.token}",
        "Content-Type": content_type,
        "Content-Length": str(MAX_UPLOAD_BYTES + 1),
    }.items():
        conn.putheader(key, value)
    conn.endheaders()
    reply = conn.getresponse()
    assert reply.status == 413 and json.loads(reply.read())["error"] == "upload_too_large"
    conn.close()
    # Sent without a length (chunked): refused once the count passes the bound.
    png = symbol_png("R", 1)
    filler = b"\0" * (1 << 20)
    body, content_type = multipart([("R.png", png), ("big.png", png + filler * 21)])
    conn = http.client.HTTPConnection("127.0.0.1", console.port, timeout=30)
    headers = {"Host": console.host, "Authorization": f"Bearer {console.token}", "Content-Type": content_type}
    # The server may answer and close before the whole body went.
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        conn.request(
            "POST",
            "/api/classes/R/shots",
            body=iter([body[i : i + 65536] for i in range(0, len(body), 65536)]),
            headers=headers,
            encode_chunked=True,
        )
    reply = conn.getresponse()
    assert reply.status == 413 and json.loads(reply.read())["error"] == "upload_too_large"
    conn.close()


def test_a_shot_blank_to_the_model_is_a_400_and_changes_nothing(console, unchanged):
    """Issue [R]: blank paper is refused as a shot (it was enrolled as a class of nothing), all or nothing."""
    blank = cv2.imencode(".png", np.full((112, 112, 3), 230, np.uint8))[1].tobytes()
    for name in ("keep", "paper"):  # more shots of a class, or a new one
        for shots, bad in (([("b.png", blank)], 0), ([("R.png", symbol_png("R", 3)), ("b.png", blank)], 1)):
            reply = console.upload(f"/api/classes/{name}/shots", shots)
            assert reply.status == 400 and error_of(reply) == "enroll_failed", reply.body
            assert f"frame {bad} is blank to the model (contrast" in reply.json()["detail"]


def test_a_path_in_a_class_name_is_refused(console, unchanged):
    upload = [("R.png", symbol_png("R", 1))]
    for path in (
        "/api/classes/..%2F..%2Fescape/shots",
        "/api/classes/..%2Fkeep",
        "/api/classes/%2E%2E/shots",
    ):
        reply = console.upload(path, upload)
        assert reply.status == 400 and error_of(reply) == "invalid_name", path
    for new in ("../escape", "a/b", "..", "", "x" * 65, "bell\x07"):
        reply = console.send_json("PATCH", "/api/classes/keep", {"name": new})
        assert reply.status == 400 and error_of(reply) == "invalid_name", new
    reply = console.send_json("POST", "/api/unknowns/1/assign", {"name": "../x"})
    assert reply.status in (400, 404)
    assert error_of(console.send_json("PATCH", "/api/classes/missing", {"name": "fine"})) == "no_such_class"
    assert error_of(console.get("/api/no-such-route")) == "not_found"
    assert error_of(console.send_json("PATCH", "/api/classes/keep", [1, 2])) == "bad_json"


# ----- settings, without a server ------------------------------------------------------------------
def test_with_a_guide_box_the_live_view_shows_it_and_a_shot_outside_it_is_refused(clip, tmp_path):
    """dmf-run --web --roi: the live view draws the box the model sees, and a live shot whose drawing lies
    outside it (the clip's symbols are in the middle, the box in the top-left corner) is refused."""
    from dmf_deploy.preprocess import Roi
    from dmf_deploy.runtime.app.overlay import GUIDE, GUIDE_LINE, guide_box_pixels

    roi = Roi(0.0, 0.0, 0.2, 0.2)
    args = ["--source", clip, "--loop", "--bundle", "demo", "--gallery", tmp_path / "g.dmfg"]
    running = start_console([*args, "--roi", "0,0,0.2,0.2"], TOKEN)
    try:
        image = cv2.imdecode(np.frombuffer(mjpeg_parts(running, 1)[0], np.uint8), cv2.IMREAD_COLOR)
        shape = symbol_frame("R", 0).shape  # the clip's frames' size
        left, top, right, bottom = guide_box_pixels(roi, shape, image.shape[1], image.shape[0])
        guide = np.abs(image.astype(int) - GUIDE).max(axis=2) <= 60  # the colour, through JPEG
        # The box's right side, below the label band drawn over the top of the view.
        assert guide[bottom - 40 : bottom - 4, right - GUIDE_LINE : right].mean() > 0.8
        assert guide[bottom + 10 :, right + 10 :].mean() < 0.01  # nothing of it elsewhere
        deadline = time.monotonic() + 10
        reply = running.request("POST", "/api/classes/A/snap")
        while reply.status == 409 and time.monotonic() < deadline:  # no frame on screen yet
            time.sleep(0.2)
            reply = running.request("POST", "/api/classes/A/snap")
        assert reply.status == 400 and error_of(reply) == "enroll_failed", reply.body
        assert "blank to the model" in reply.json()["detail"]
        assert "hold the drawing inside the guide box" in reply.json()["detail"]
        assert running.classes() == []
    finally:
        assert running.stop() == 0


def test_a_non_loopback_bind_gets_a_token_and_loopback_does_not(monkeypatch):
    monkeypatch.delenv("DMF_WEB_TOKEN", raising=False)
    assert resolve_settings("8080").host == "127.0.0.1" and resolve_settings("8080").token is None
    wide = resolve_settings("0.0.0.0:8080")
    assert wide.token_generated and len(wide.token) >= 32
    assert all(url.endswith(f":8080/?token={wide.token}") for url in wide.urls(8080))
    monkeypatch.setenv("DMF_WEB_TOKEN", "from-the-environment")
    assert resolve_settings("0.0.0.0:8080").token == "from-the-environment"
    with pytest.raises(ValueError, match="at least"):
        resolve_settings("0.0.0.0:8080", token="short")
    with pytest.raises(ValueError, match="IP address"):
        parse_bind("example.com:80")
    assert parse_bind("[::1]:9000") == ("::1", 9000)


def test_the_host_names_a_console_answers_to():
    loop = ConsoleSettings("127.0.0.1", 8080)
    assert allowed_host(loop, 8080, "127.0.0.1:8080") and allowed_host(loop, 8080, "LOCALHOST:8080")
    assert not allowed_host(loop, 8080, "127.0.0.1:8081") and not allowed_host(
        loop, 8080, "evil.example:8080"
    )
    assert not allowed_host(loop, 8080, None) and not allowed_host(loop, 8080, "127.0.0.1:80x")
    wide = ConsoleSettings("0.0.0.0", 80)
    assert allowed_host(wide, 80, "192.168.1.20") and allowed_host(wide, 80, "[fe80::1]:80")
    assert not allowed_host(wide, 80, "rebind.evil.example")
    one = ConsoleSettings("192.168.1.20", 8080)
    assert allowed_host(one, 8080, "192.168.1.20:8080") and not allowed_host(one, 8080, "10.0.0.1:8080")


def test_image_headers_are_read_without_decoding():
    frame = np.zeros((30, 50, 3), np.uint8)
    for ext in (".png", ".jpg", ".bmp", ".webp"):
        ok, data = cv2.imencode(ext, frame)
        if ok:
            assert header_size(data.tobytes()) == (50, 30), ext
    assert header_size(b"plain text, not an image") is None and header_size(b"") is None


# ----- TLS, in process (no frame loop needed for these routes) ---------------------------------------
def test_tls_serves_https_and_marks_the_cookie_secure(tmp_path):
    import shutil
    import ssl
    import subprocess

    from dmf_deploy.runtime.app.web.console import WebConsole

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: no certificate to test TLS with")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    settings = resolve_settings("127.0.0.1:0", TOKEN, cert, key)
    web = WebConsole(settings, Recognizer.open("demo"), None)
    port = web.start()
    try:
        assert web.urls() == [f"https://127.0.0.1:{port}/?token={TOKEN}"]
        context = ssl.create_default_context(cafile=str(cert))
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
        conn.request("GET", f"/?token={TOKEN}")
        reply = conn.getresponse()
        assert reply.status == 303 and "; Secure" in reply.getheader("Set-Cookie")
        reply.read()
        conn.request("GET", "/api/health", headers={"Authorization": f"Bearer {TOKEN}"})
        assert json.loads(conn.getresponse().read())["status"] == "ok"
        conn.close()
        plain = http.client.HTTPConnection("127.0.0.1", port, timeout=10)  # no TLS: no answer
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            plain.request("GET", "/api/health")
            plain.getresponse()
        plain.close()
    finally:
        web.stop()


def test_web_options_are_checked_before_anything_opens(clip):
    import subprocess

    from bundles import dmf_run_command

    for extra, message in (
        (["--web-token", "abcdefghijkl"], "need --web"),
        (["--web", "0.0.0.0:0", "--web-token", "short"], "at least 8"),
        (["--web", "example.com:80"], "give an IP address"),
        (["--web", "127.0.0.1:0", "--web-cert", "missing.pem"], "both --web-cert and --web-key"),
        (["--webhook", "file:///etc/passwd"], "http:// or https://"),
    ):
        done = subprocess.run(
            [*dmf_run_command(), "--source", str(clip), "--headless", *extra],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 2 and message in done.stderr, (extra, done.stderr)


def coordinate_frame(width: int, height: int) -> np.ndarray:
    """A frame whose every pixel holds its own (x, y): a cut of it says where it lies in the frame."""
    ys, xs = np.mgrid[0:height, 0:width]
    return np.stack([xs % 256, ys % 256, xs // 256 * 16 + ys // 256], axis=2).astype(np.uint8)


def coordinates(pixel: np.ndarray) -> tuple[int, int]:
    """(x, y) of a coordinate_frame pixel."""
    blue, green, red = (int(v) for v in pixel)
    return red // 16 * 256 + blue, red % 16 * 256 + green


def region_seen(frame: np.ndarray, rec: Recognizer) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) frame pixels of the region `rec.classify` takes from the frame."""
    from dmf_deploy.preprocess import model_views

    cut = model_views([frame], rec.config.preprocess, rec.roi)[0][0]
    (left, top), (last_x, last_y) = coordinates(cut[0, 0]), coordinates(cut[-1, -1])
    return left, top, last_x + 1, last_y + 1


def border_of(image: np.ndarray, colour: tuple[int, int, int]) -> tuple[list[int], list[int]]:
    """The rows and the columns that a box drawn in `colour` fills from one side to the other."""
    mask = np.all(image == colour, axis=2)
    return np.flatnonzero(mask.sum(axis=1) > 100).tolist(), np.flatnonzero(mask.sum(axis=0) > 100).tolist()


@pytest.mark.parametrize("frame_size", [(640, 480), (320, 240)])  # shown 1:1, and scaled 2x
def test_the_live_view_draws_the_region_the_model_sees(frame_size):
    """Issue [R]'s guide box: the live view's box is the region the model sees, pixel for pixel, drawn by
    the window's own function. (The live view had arithmetic of its own, a pixel off the model's region
    on the right and bottom edges, and it drew a box the window did not.)"""
    from dmf_deploy.runtime.app.overlay import GUIDE, GUIDE_LINE, View, render
    from dmf_deploy.runtime.app.web.stream import StreamItem, draw_stream

    rec = Recognizer.open("demo", backend="onnxruntime", roi=(0.25, 0.3, 0.5, 0.5))
    frame = coordinate_frame(*frame_size)
    left, top, right, bottom = region_seen(frame, rec)
    assert (right - left, bottom - top) == (frame_size[0] // 2, frame_size[1] // 2)
    view = draw_stream(StreamItem(frame, None, 0.0, guide_box=rec.roi))
    assert view.shape == (480, 640, 3)  # the live view fits 640 x 480
    s = 640 // frame_size[0]  # view pixels per frame pixel
    rows, columns = border_of(view, GUIDE)
    # The border lies just inside the region: its outer edge is the model's first and last pixels.
    line = list(range(GUIDE_LINE))
    assert rows == [s * top + i for i in line] + [s * bottom - GUIDE_LINE + i for i in line]
    assert columns == [s * left + i for i in line] + [s * right - GUIDE_LINE + i for i in line]
    # The window (and its screenshot) draws that very box on the same frame.
    window = render(frame, View(roi=rec.roi))[:480, :640]
    assert border_of(window, GUIDE) == (rows, columns)
