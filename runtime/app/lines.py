"""Lines of text from a file descriptor (dmf-run's stdin), in bounded memory and bounded waits.

Input is read in chunks of at most READ_CHUNK bytes, so at most one chunk and one line are held. A line
longer than MAX_LINE_BYTES is refused as soon as it is seen (a `RefusedLine`), and the rest of it is read
and dropped chunk by chunk up to its newline, never gathered. A line that is not UTF-8 is refused too.
Waits for input last at most POLL_S at a time, so a `stop` event (set by a signal handler) is seen
within that time.
"""

from __future__ import annotations

import os
import select
import threading
from dataclasses import dataclass

MAX_LINE_BYTES = 4096  # far more than any command needs; bounds what one line can cost to parse
READ_CHUNK = 64 * 1024  # one read; big enough to drop a long line quickly
POLL_S = 0.1  # longest wait before a stop request is noticed
PREVIEW_CHARS = 40  # how much of a refused line its error event quotes


@dataclass(frozen=True)
class RefusedLine:
    """A line that is not taken as a command: its start (for the error message) and why."""

    start: str
    reason: str


class LineReader:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buffer = bytearray()  # at most MAX_LINE_BYTES + READ_CHUNK bytes
        self._dropping = False  # inside a refused long line: drop bytes up to its newline
        self._eof = False

    def next(self, stop: threading.Event | None = None) -> str | RefusedLine | None:
        """The next line (no line ending), a RefusedLine, or None at the end of input or once `stop` is
        set. Blocks until one of those."""
        while True:
            newline = self._buffer.find(b"\n")
            if newline >= 0:
                raw = bytes(self._buffer[:newline])
                del self._buffer[: newline + 1]
                if self._dropping:  # the end of a line already refused
                    self._dropping = False
                    continue
                return _decode(raw)
            if self._dropping:
                self._buffer.clear()
            elif len(self._buffer) > MAX_LINE_BYTES:
                return self._refuse_long_line()
            if self._eof:
                if self._buffer and not self._dropping:  # a last line without a newline
                    raw = bytes(self._buffer)
                    self._buffer.clear()
                    return _decode(raw)
                return None
            chunk = self._read(stop)
            if chunk is None:
                return None
            if chunk:
                self._buffer += chunk
            else:
                self._eof = True

    def _refuse_long_line(self) -> RefusedLine:
        refused = _too_long(bytes(self._buffer))
        self._buffer.clear()
        self._dropping = True
        return refused

    def _read(self, stop: threading.Event | None) -> bytes | None:
        """One chunk (b"" at the end of input), or None once `stop` is set."""
        try:
            while stop is not None:
                if stop.is_set():
                    return None
                ready, _, _ = select.select([self.fd], [], [], POLL_S)
                if ready:
                    break
            return os.read(self.fd, READ_CHUNK)
        except (OSError, ValueError):  # stdin closed under us: the end of input
            return b""


def _too_long(raw: bytes) -> RefusedLine:
    start = raw[: 4 * PREVIEW_CHARS].decode("utf-8", "replace")[:PREVIEW_CHARS]
    return RefusedLine(start, f"line longer than {MAX_LINE_BYTES} bytes; refused")


def _decode(raw: bytes) -> str | RefusedLine:
    if len(raw) > MAX_LINE_BYTES:
        return _too_long(raw)
    try:
        return raw.decode("utf-8").rstrip("\r")
    except UnicodeDecodeError:
        return RefusedLine(raw[:PREVIEW_CHARS].decode("utf-8", "replace"), "line is not UTF-8 text")
