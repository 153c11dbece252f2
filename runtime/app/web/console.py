"""WebConsole: the web server (uvicorn, in a thread of dmf-run) and everything it serves from the loop.

    console = WebConsole(settings, rec, gallery_path, source_description)
    port = console.start()          # binds, serves; the loop's output is then Tee(output, console.output)
    ...
    console.stop()

The server runs in its own thread with its own event loop; the frame loop stays on the main thread.
They meet only in the hubs (hubs.py) and the operation queue (output.py).
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from pathlib import Path

import uvicorn

from dmf_deploy.manifest import EXPLAIN
from dmf_deploy.runtime.app.web.api import build_app
from dmf_deploy.runtime.app.web.guard import Guard
from dmf_deploy.runtime.app.web.hubs import EventHub, FrameHub
from dmf_deploy.runtime.app.web.inbox import UnknownInbox
from dmf_deploy.runtime.app.web.output import WebOutput
from dmf_deploy.runtime.app.web.settings import ConsoleSettings
from dmf_deploy.runtime.app.web.stream import StreamEncoder
from dmf_deploy.runtime.recognizer import Recognizer, describe_model

START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0


class WebConsoleError(RuntimeError):
    """The console cannot start (the port is taken, the TLS files are wrong); the message says why."""


class WebConsole:
    def __init__(
        self,
        settings: ConsoleSettings,
        rec: Recognizer,
        gallery_path: Path | None,
        source: str = "",
        shots: int = 5,
    ) -> None:
        self.settings, self.rec = settings, rec
        self.frames = FrameHub()
        self.events = EventHub()
        self.encoder = StreamEncoder(self.frames, rec)
        self.inbox = UnknownInbox()
        self.output = WebOutput(rec, self.events, self.encoder, self.inbox)
        self.explain_available = EXPLAIN in rec.manifest.graphs
        self.info = {
            "source": source,
            "bundle": str(rec.bundle),
            "model": describe_model(rec.manifest),
            "backend": rec.backend.name,
            "gallery": str(gallery_path) if gallery_path is not None else None,
            "shots": shots,  # the shots a press-and-hold takes (--shots)
        }
        self.port: int | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> int:
        """Bind, start serving in a thread, and return the port (the free one chosen for port 0)."""
        settings = self.settings
        family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
        try:
            sock = socket.create_server((settings.host, settings.port), family=family)
        except OSError as exc:
            raise WebConsoleError(
                f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}"
            ) from None
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            Guard(build_app(self), settings, self.port),
            log_config=None,
            log_level="warning",
            access_log=False,
            server_header=False,
            proxy_headers=False,
            ws="none",
            lifespan="on",
            timeout_graceful_shutdown=1,
            ssl_certfile=str(settings.certfile) if settings.certfile else None,
            ssl_keyfile=str(settings.keyfile) if settings.keyfile else None,
        )
        try:
            config.load()  # the TLS files are read here: a bad one is an error now, not in the thread
        except (ssl.SSLError, OSError) as exc:
            sock.close()
            raise WebConsoleError(f"cannot use the TLS certificate and key: {exc}") from None
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="dmf-run-web", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise WebConsoleError("the web console did not start (see the messages above)")
            time.sleep(0.02)
        return self.port

    def urls(self) -> list[str]:
        assert self.port is not None
        return self.settings.urls(self.port)

    def stop(self) -> None:
        """End the streams, stop the server and the encoder; bounded in time."""
        self.frames.close()
        self.events.close()
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT_S)
        self.encoder.stop()
