"""Hand-over from the frame loop's thread to the web server's event loop, never waiting on a viewer.

`FrameHub` holds the newest JPEG of the live view; each viewer sends the newest frame when it is ready
for one, so a slow viewer gets fewer frames and the loop never waits for it. `EventHub` fans the JSON
events out to the event-stream clients, each with a bounded queue (a client more than EVENT_QUEUE
behind loses the oldest). Both publish from any thread with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

EVENT_QUEUE = 256  # events one slow client may fall behind before it loses the oldest
KEEPALIVE_S = 15.0  # an idle event stream gets a comment line this often (proxies close silent ones)
LATENCY_SAMPLES = 2000  # capture-to-sent times kept for the status strip and the benchmark


@dataclass(frozen=True)
class EncodedFrame:
    seq: int
    jpeg: bytes
    captured: float  # time.perf_counter() when the frame was read from the source


class _Publisher:
    """The server's event loop, once it runs; publishing before (or after) is a no-op."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.closed = False

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def call(self, callback, *args) -> None:
        loop = self.loop
        if loop is None or self.closed:
            return
        with contextlib.suppress(RuntimeError):  # the event loop has closed (the server stopped)
            loop.call_soon_threadsafe(callback, *args)


class FrameHub(_Publisher):
    def __init__(self) -> None:
        super().__init__()
        self.latest: EncodedFrame | None = None
        self.viewers = 0
        self.on_viewer: list[Callable[[], None]] = []  # run when a viewer connects (the encoder wakes)
        self._new = asyncio.Event()
        self._lock = threading.Lock()
        self.sent_latency: deque[float] = deque(maxlen=LATENCY_SAMPLES)  # seconds, capture to sent
        self.sent = 0

    def publish(self, frame: EncodedFrame) -> None:
        """From the encoder's thread: the newest frame replaces the last."""
        self.call(self._arrived, frame)

    def _arrived(self, frame: EncodedFrame) -> None:
        self.latest = frame
        self._new.set()
        self._new = asyncio.Event()

    def close(self) -> None:
        self.call(self._ended)
        self.closed = True

    def _ended(self) -> None:
        self._new.set()

    async def frames(self):
        """The frames one viewer sends: the newest each time it is ready; ends when the hub closes."""
        self.viewers += 1
        for wake in self.on_viewer:
            wake()
        last = -1
        try:
            while not self.closed:
                frame = self.latest
                if frame is None or frame.seq == last:
                    await self._new.wait()
                    continue
                last = frame.seq
                yield frame
                # Back here once the previous part was handed to the connection: it was sent.
                self.sent_latency.append(time.perf_counter() - frame.captured)
                self.sent += 1
        finally:
            self.viewers -= 1


class EventHub(_Publisher):
    def __init__(self) -> None:
        super().__init__()
        self._clients: set[asyncio.Queue[str | None]] = set()

    @property
    def listening(self) -> bool:
        """Whether any client is connected (with none, the loop need not even write the JSON)."""
        return bool(self._clients)

    def publish(self, text: str) -> None:
        """From any thread: one JSON text to every client."""
        if self._clients:
            self.call(self._fan_out, text)

    def _fan_out(self, text: str | None) -> None:
        for queue in self._clients:
            if queue.full():
                queue.get_nowait()  # the oldest goes: a slow client must not hold the others up
            queue.put_nowait(text)

    def close(self) -> None:
        self.call(self._fan_out, None)
        self.closed = True

    async def stream(self):
        """One client's events as they come ("" after KEEPALIVE_S of silence); ends when the hub closes."""
        queue: asyncio.Queue[str | None] = asyncio.Queue(maxsize=EVENT_QUEUE)
        self._clients.add(queue)
        try:
            while not self.closed:
                try:
                    text = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
                except asyncio.TimeoutError:
                    text = ""
                if text is None:
                    return
                yield text
        finally:
            self._clients.discard(queue)
