"""Hostile stdin for headless dmf-run: floods, endless lines, bytes that are not text, and signals.

Regressions of issue "Hardening" items 4 and 5: dmf-run read all of stdin before the first frame, with
no limit and deaf to SIGTERM, and parsed a command line in time quadratic in its length. The command
reader (runtime/app/lines.py, CommandFeed) runs on real pipes and files; dmf-run runs as a real process on
a real video file; nothing is mocked. Every wait here is bounded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from bundles import CLIP_CLASSES, dmf_run_command  # tests/bundles.py
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmf_deploy.packaged import demo_bundle_installed
from dmf_deploy.runtime import Recognizer
from dmf_deploy.runtime.app.commands import USAGE, Command, CommandError, CommandFeed, Session, parse_command
from dmf_deploy.runtime.app.lines import MAX_LINE_BYTES, READ_CHUNK, LineReader, RefusedLine

CPU_BOUND_S = 1.0  # the bound per input; CPU time, so a busy 2-core CI machine does not inflate it
STOP_BOUND_S = 2.0  # the issue asks for 1 s; the other second covers saving the gallery and exiting
START_TIMEOUT_S = 60  # dmf-run's start (onnxruntime sessions) on a loaded CI machine
# A flood grows a reader that keeps what it reads by about the flood's size; one that reads a line only
# when due holds a pipe buffer (64 KB) and a chunk. 40 MB is far above the second, far below the first.
FLOOD_BYTES = 32 << 20
RSS_GROWTH_BOUND_MB = 40
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


# ------------------------------------------------------------------------------ the line reader


def lines_of(data: bytes, tmp_path: Path) -> list[str | RefusedLine]:
    path = tmp_path / "stdin.txt"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        reader, out = LineReader(fd), []
        while (line := reader.next()) is not None:
            out.append(line)
        return out
    finally:
        os.close(fd)


@FUZZ
@given(
    data=st.binary(max_size=3 * MAX_LINE_BYTES)
    | st.lists(st.text(max_size=60), max_size=20).map(
        lambda lines: "\n".join(lines).encode("utf-8", "surrogatepass")
    )
)
def test_any_bytes_give_lines_or_refusals(tmp_path_factory, data: bytes) -> None:
    lines = lines_of(data, tmp_path_factory.mktemp("lines"))
    for line in lines:
        assert isinstance(line, (str, RefusedLine))
        if isinstance(line, str):
            assert "\n" not in line and len(line.encode()) <= MAX_LINE_BYTES
    if not any(isinstance(line, RefusedLine) for line in lines):  # then nothing is lost or invented
        expected = data.decode().split("\n")
        if expected[-1] == "":
            expected.pop()
        assert lines == [e.removesuffix("\r") for e in expected]


def test_a_long_line_is_refused_without_being_held() -> None:
    """A 4 MB line, then a command: the line is refused as soon as it passes 4 KB, its rest is dropped
    chunk by chunk, and the command after it runs. Real pipe; the writer is a thread."""
    read_fd, write_fd = os.pipe()
    payload = b"enroll " + b"x" * (4 << 20) + b"\nlist\n"  # made before memory is traced

    def write() -> None:
        with os.fdopen(write_fd, "wb") as pipe:
            pipe.write(payload)

    writer = threading.Thread(target=write)
    writer.start()
    feed = CommandFeed(read_fd, on_demand=True)
    tracemalloc.start()
    cpu = time.process_time()
    try:
        refused = feed.poll()  # it comes when 4 KB are seen, not at the newline
        assert isinstance(refused, RefusedLine) and refused.start.startswith("enroll xxx")
        assert "longer than 4096 bytes" in refused.reason
        assert feed.poll() == "list"  # the rest of the long line was dropped, the next line is whole
        assert feed.poll() is None
    finally:
        cpu = time.process_time() - cpu
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        writer.join(timeout=10)
        os.close(read_fd)
    # Held at most: one chunk and one line (plus the bytes objects they are copied into).
    assert peak < 4 * (READ_CHUNK + MAX_LINE_BYTES), peak
    assert cpu < CPU_BOUND_S, cpu


# ----------------------------------------------------------------------------- the command parser


def command_lines() -> st.SearchStrategy[str]:
    word = st.text(max_size=12) | st.integers(-(2**70), 2**70).map(str) | st.sampled_from(["'", '"', "#"])
    verb = st.sampled_from([*USAGE, "enrol", "rm", "ls", "ENROLL", ""])
    structured = st.tuples(verb, st.lists(word, max_size=4)).map(lambda t: " ".join([t[0], *t[1]]))
    return st.text() | structured | st.text(min_size=MAX_LINE_BYTES - 2, max_size=MAX_LINE_BYTES + 2)


@FUZZ
@given(line=command_lines())
def test_any_line_parses_to_a_command_or_a_command_error(line: str) -> None:
    cpu = time.process_time()
    try:
        command = parse_command(line, default_shots=5)
    except CommandError as exc:
        assert str(exc)
    else:
        assert command is None or (isinstance(command, Command) and command.verb in USAGE)
    assert time.process_time() - cpu < CPU_BOUND_S


@pytest.fixture(scope="module")
def demo_recognizer() -> Recognizer:
    if not demo_bundle_installed():
        pytest.skip("the demo bundle is not installed")
    return Recognizer.open("demo", backend="onnxruntime")


@FUZZ
@given(lines=st.lists(command_lines(), max_size=5))
def test_any_line_run_by_a_session_gives_events_never_a_traceback(
    demo_recognizer: Recognizer, tmp_path_factory, lines: list[str]
) -> None:
    events: list[dict] = []
    gallery = tmp_path_factory.getbasetemp() / "fuzz.dmfg"
    session = Session(demo_recognizer, gallery, events.append)
    for line in lines:
        session.run_line(line)
    assert all(isinstance(e, dict) and isinstance(e.get("event"), str) for e in events)
    assert not demo_recognizer.gallery.missing_banks  # nothing half-done


# ------------------------------------------------------------------------------- dmf-run processes


def vm_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


class Run:
    """A headless dmf-run with stdin a pipe the test keeps open, and its stdout read line by line."""

    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen(
            [*dmf_run_command(), "--headless", *map(str, args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.records: list[dict] = []
        self._drain = threading.Thread(target=self._read_stdout, daemon=True)
        self._drain.start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if len(self.records) < 10_000:  # a flood of `list` answers: keep the first ones
                self.records.append(json.loads(line))

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def wait_for(self, event: str, timeout: float = START_TIMEOUT_S) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for record in list(self.records):
                if record.get("event") == event:
                    return record
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no {event!r} event within {timeout} s; got {self.records[-5:]}")

    def stop(self, signum: int) -> tuple[int, float]:
        """Send the signal; (exit status, seconds until the process ended)."""
        start = time.monotonic()
        self.proc.send_signal(signum)
        try:
            code = self.proc.wait(timeout=30)
        finally:
            self.proc.kill()
        seconds = time.monotonic() - start
        self._drain.join(timeout=10)
        return code, seconds

    def stderr(self) -> str:
        assert self.proc.stderr is not None
        return self.proc.stderr.read().decode()


@pytest.fixture()
def run() -> Iterator[list[Run]]:
    runs: list[Run] = []
    yield runs
    for r in runs:
        r.proc.kill()
        r.proc.wait()


def start(runs: list[Run], args: list) -> Run:
    r = Run(args)
    runs.append(r)
    r.wait_for("started")
    return r


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_a_signal_while_waiting_for_a_command_stops_within_a_second_and_saves(
    bundle, clip, tmp_path, run, signum: int, status: int
) -> None:
    """File source, stdin open and silent after one command: the loop waits for the next command (so
    runs are reproducible), and a signal ends that wait; the class enrolled so far is saved."""
    gallery = tmp_path / "g.dmfg"
    r = start(run, ["--source", clip, "--loop", "--bundle", bundle, "--gallery", gallery])
    r.send(f"enroll {CLIP_CLASSES[0]} 2\n")  # answered before stdin ends: no read to EOF first
    assert r.wait_for("enrolled")["shots"] == 2
    code, seconds = r.stop(signum)
    assert code == status, r.stderr()
    assert seconds < STOP_BOUND_S
    assert [e["event"] for e in r.records if "event" in e][-2:] == ["saved", "stopped"]
    assert Recognizer.open(bundle, gallery=gallery).classes == [CLIP_CLASSES[0]]


def flood(r: Run, stop: threading.Event) -> threading.Thread:
    """`yes list` for at most FLOOD_BYTES, until the pipe closes or `stop` is set."""

    def write() -> None:
        assert r.proc.stdin is not None
        block, sent = b"list\n" * 8192, 0
        try:
            while sent < FLOOD_BYTES and not stop.is_set():
                r.proc.stdin.write(block)
                sent += len(block)
        except (BrokenPipeError, ValueError, OSError):
            pass

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    return thread


def rss_growth_while_flooding(r: Run, seconds: float) -> float:
    base = peak = vm_rss_mb(r.proc.pid)
    stop = threading.Event()
    writer = flood(r, stop)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and writer.is_alive():
        peak = max(peak, vm_rss_mb(r.proc.pid))
        time.sleep(0.05)
    stop.set()
    return peak - base


def test_a_flood_on_stdin_is_read_only_as_commands_are_due(bundle, clip, tmp_path, run) -> None:
    gallery = tmp_path / "g.dmfg"
    r = start(run, ["--source", clip, "--loop", "--bundle", bundle, "--gallery", gallery])
    growth = rss_growth_while_flooding(r, seconds=3.0)
    assert growth < RSS_GROWTH_BOUND_MB, f"dmf-run grew {growth:.0f} MB while stdin was flooded"
    assert r.wait_for("list", timeout=5)["classes"] == []  # commands were run as they came
    code, seconds = r.stop(signal.SIGTERM)
    assert code == 0 and seconds < STOP_BOUND_S, r.stderr()


def test_a_flood_with_a_live_source_fills_a_bounded_queue(bundle, http_clip, tmp_path, run) -> None:
    _, url, _ = http_clip
    r = start(run, ["--source", url, "--retries", 100, "--bundle", bundle, "--gallery", tmp_path / "g.dmfg"])
    growth = rss_growth_while_flooding(r, seconds=3.0)
    assert growth < RSS_GROWTH_BOUND_MB, f"dmf-run grew {growth:.0f} MB while stdin was flooded"
    code, seconds = r.stop(signal.SIGTERM)
    assert code == 0 and seconds < STOP_BOUND_S, r.stderr()


def test_a_long_line_is_refused_and_the_next_command_runs(bundle, clip, tmp_path, run) -> None:
    r = start(run, ["--source", clip, "--loop", "--bundle", bundle, "--gallery", tmp_path / "g.dmfg"])
    r.send("rename " + "x" * (2 << 20) + " y\nlist\n")  # 2 MB: 53 s of shlex before the fix
    assert r.wait_for("list", timeout=10)["classes"] == []
    errors = [e for e in r.records if e.get("event") == "error"]
    assert len(errors) == 1 and "longer than 4096 bytes" in errors[0]["message"]
    code, _ = r.stop(signal.SIGTERM)
    assert code == 0


def test_the_source_ending_during_wait_is_its_own_event(bundle, clip, tmp_path, run) -> None:
    """The clip (60 frames) ends during `wait 100`: end_of_source is reported on its own, the `list`
    after it succeeds (no error pinned on it), and the commands after it still run."""
    r = Run(["--source", clip, "--bundle", bundle, "--gallery", tmp_path / "g.dmfg"])
    run.append(r)
    assert r.proc.stdin is not None
    r.proc.stdin.write(b"wait 100\nlist\nremove nobody\nlist\n")
    r.proc.stdin.close()
    assert r.proc.wait(timeout=START_TIMEOUT_S) == 0, r.stderr()
    r._drain.join(timeout=10)
    events = [e for e in r.records if "event" in e]
    assert [e["event"] for e in events] == ["started", "end_of_source", "list", "error", "list", "stopped"]
    assert events[1]["frames"] == 60
    assert events[3]["command"] == "remove nobody"


def test_stdin_that_never_ends_does_not_delay_a_live_source(bundle, http_clip, tmp_path, run) -> None:
    """A live source predicts frames while stdin is open and silent (no read to EOF first)."""
    _, url, _ = http_clip
    r = start(run, ["--source", url, "--retries", 100, "--bundle", bundle, "--gallery", tmp_path / "g.dmfg"])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not any("frame" in rec for rec in r.records):
        time.sleep(0.05)
    assert any("frame" in rec for rec in r.records)
    code, seconds = r.stop(signal.SIGTERM)
    assert code == 0 and seconds < STOP_BOUND_S, r.stderr()
