"""Headless control of dmf-run: text commands (from stdin) and the session that applies them.

One command a line; names with spaces are quoted shell-style (``enroll "coffee mug" 5``); blank lines
and ``#`` comments are ignored.

    enroll NAME [K]   take the next K frames (default --shots) as shots of NAME (new or existing);
                      a frame the model sees as blank is skipped (a ``skipped`` event)
    remove NAME       forget a class
    rename OLD NEW    rename a class
    list              report the classes and their shot counts
    save              write the gallery now (it is also written at exit)
    wait N            let N frames be predicted before the next command runs
    quit              stop (the gallery is saved)

The Session applies commands, keys and enrolments to a Recognizer and reports each outcome as an event
(a dict with an ``event`` key). A bad command yields an ``error`` event; it never stops the run.
When the source ends, the Session reports it once (``end_of_source``), enrols what a pending
``enroll`` collected, and from then on answers ``enroll`` and ``wait`` with an error.
"""

from __future__ import annotations

import queue
import shlex
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from dmf_deploy.names import InvalidClassName, validate_class_name
from dmf_deploy.runtime.app.lines import MAX_LINE_BYTES, LineReader, RefusedLine
from dmf_deploy.runtime.recognizer import Enrollment, Recognizer, RemovedClass

MAX_SHOTS = 1000  # per enroll command: a typo like "enroll mug 50000" must not swallow a whole video
# A pending `enroll` skips frames the model sees as blank (the card moved out of view, a blur), each
# reported as a `skipped` event, and gives up after this many: max(MIN_SKIPS, SKIPS_PER_SHOT x K).
MIN_SKIPS, SKIPS_PER_SHOT = 30, 3
QUEUE_LINES = 1000  # command lines a live source's reader holds before it stops reading stdin
Event = dict[str, Any]


class CommandError(ValueError):
    """A command line that cannot be parsed; the message says what the right form is."""


@dataclass(frozen=True)
class Command:
    verb: str
    args: tuple[Any, ...] = ()
    line: str = ""


USAGE = {
    "enroll": "enroll NAME [K]",
    "remove": "remove NAME",
    "rename": "rename OLD NEW",
    "list": "list",
    "save": "save",
    "wait": "wait N",
    "quit": "quit",
}
ALIASES = {
    "enrol": "enroll",
    "add": "enroll",
    "delete": "remove",
    "rm": "remove",
    "exit": "quit",
    "ls": "list",
}


def parse_command(line: str, default_shots: int) -> Command | None:
    """Parse one line; None for a blank line or a comment; CommandError for anything malformed."""
    if len(line) > MAX_LINE_BYTES or len(line.encode("utf-8", "surrogatepass")) > MAX_LINE_BYTES:
        raise CommandError(f"line longer than {MAX_LINE_BYTES} bytes; refused")
    try:
        words = shlex.split(line, comments=True)
    except ValueError as exc:  # an unbalanced quote
        raise CommandError(f"cannot parse {line.strip()!r}: {exc}") from None
    if not words:
        return None
    verb = ALIASES.get(words[0].lower(), words[0].lower())
    args = words[1:]
    if verb not in USAGE:
        raise CommandError(f"unknown command {words[0]!r}; commands: {', '.join(USAGE)}")
    form = USAGE[verb]
    if verb == "enroll":
        if len(args) not in (1, 2):
            raise CommandError(f'usage: {form} (quote a name with spaces: enroll "coffee mug" 5)')
        shots = _positive_int(args[1], "K", form) if len(args) == 2 else default_shots
        if shots > MAX_SHOTS:
            raise CommandError(f"K = {shots} is more than {MAX_SHOTS} shots for one command")
        return Command(verb, (_name(args[0]), shots), line.strip())
    if verb == "remove":
        if len(args) != 1:
            raise CommandError(f"usage: {form}")
        return Command(verb, (args[0],), line.strip())
    if verb == "rename":
        if len(args) != 2:
            raise CommandError(f"usage: {form}")
        return Command(verb, (args[0], _name(args[1])), line.strip())
    if verb == "wait":
        if len(args) != 1:
            raise CommandError(f"usage: {form}")
        return Command(verb, (_positive_int(args[0], "N", form),), line.strip())
    if args:
        raise CommandError(f"usage: {form} (no arguments)")
    return Command(verb, (), line.strip())


def _positive_int(text: str, what: str, form: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise CommandError(f"{what} must be a positive integer, got {text!r} (usage: {form})") from None
    if value < 1:
        raise CommandError(f"{what} must be a positive integer, got {value} (usage: {form})")
    return value


def _name(text: str) -> str:
    try:
        return validate_class_name(text)
    except InvalidClassName as exc:
        raise CommandError(str(exc)) from None


class CommandFeed:
    """Command lines from a file descriptor (stdin), never read further ahead than a bounded amount.

    `on_demand=True` (file sources with piped stdin): `poll` reads the next line only when the loop is
    ready to run it, and waits for it (or the end of input), so commands run at the same frames on
    every run. Otherwise (live sources, a person typing) a thread reads lines as they arrive into a
    queue of QUEUE_LINES, and blocks (so the writer blocks) while the queue is full; `poll` never waits.
    Either way `stop` ends any wait within `lines.POLL_S`.
    """

    def __init__(self, stream: IO[Any] | int, on_demand: bool) -> None:
        self._stream = stream  # held: a file object that is collected closes its descriptor
        self._reader = LineReader(stream if isinstance(stream, int) else stream.fileno())
        self._stop = threading.Event()
        self.on_demand = on_demand
        self._lines: queue.Queue[str | RefusedLine] = queue.Queue(maxsize=QUEUE_LINES)
        if not on_demand:
            threading.Thread(target=self._pump, name="dmf-run-stdin", daemon=True).start()

    def _pump(self) -> None:
        while (line := self._reader.next(self._stop)) is not None:
            self._lines.put(line)  # blocks while the queue is full

    def poll(self) -> str | RefusedLine | None:
        """The next line, or None: the input ended, `stop` was called, or (live) no line is waiting."""
        if self.on_demand:
            return self._reader.next(self._stop)
        try:
            return self._lines.get_nowait()
        except queue.Empty:
            return None

    def stop(self) -> None:
        self._stop.set()


@dataclass
class PendingEnrollment:
    """An `enroll NAME K` collecting frames: their features are summed as they come (no frame is kept)."""

    enrollment: Enrollment
    wanted: int
    skipped: int = 0
    taken: list[int] = field(default_factory=list)  # the source's numbers of the frames enrolled

    @property
    def gives_up(self) -> bool:
        return self.skipped >= max(MIN_SKIPS, SKIPS_PER_SHOT * self.wanted)


class Session:
    """Applies commands and enrolments to a Recognizer; reports every outcome through `emit`."""

    def __init__(
        self,
        rec: Recognizer,
        gallery_path: Path,
        emit: Callable[[Event], None],
        default_shots: int = 5,
        commands: CommandFeed | None = None,
    ) -> None:
        self.rec, self.gallery_path, self.emit = rec, gallery_path, emit
        self.default_shots = default_shots
        self.commands = commands
        self.dirty = False  # the gallery changed since it was loaded or last saved
        self.version = 0  # bumps on every change, so views can refresh cached thumbnails
        self.pending: PendingEnrollment | None = None
        self.undoable: list[RemovedClass] = []  # deletions `undo` reverts, newest last; saving clears
        self.waiting = 0
        self.stopped = False
        self.frames_over = False  # the source ended (or --max-frames was reached): no more frames

    def stop(self) -> None:
        """End the run (quit, a signal): the loop stops before the next frame; a command wait ends."""
        self.stopped = True
        if self.commands is not None:
            self.commands.stop()

    @property
    def busy(self) -> bool:
        """True while an enrolment collects frames or a `wait` runs: later commands must wait."""
        return self.pending is not None or self.waiting > 0

    # ----- commands ---------------------------------------------------------------------------------
    def run_due_commands(self) -> None:
        """Run the commands due before the next frame: in order, until one needs frames (enroll,
        wait), `quit`, or no command is waiting. The one place the frame loop takes commands."""
        while self.commands is not None and not self.busy and not self.stopped:
            line = self.commands.poll()
            if line is None:
                return
            self.run_line(line)

    def run_line(self, line: str | RefusedLine) -> None:
        if isinstance(line, RefusedLine):
            self.emit({"event": "error", "command": f"{line.start}...", "message": line.reason})
            return
        try:
            command = parse_command(line, self.default_shots)
        except CommandError as exc:
            self.emit({"event": "error", "command": line.strip(), "message": str(exc)})
            return
        if command is not None:
            self.run(command)

    def run(self, command: Command) -> None:
        verb, args = command.verb, command.args
        if verb in ("enroll", "wait") and self.frames_over:
            self.emit({"event": "error", "command": command.line, "message": "the source has ended"})
        elif verb == "enroll":
            self.pending = PendingEnrollment(self.rec.enrollment(args[0]), args[1])
        elif verb == "wait":
            self.waiting = args[0]
        elif verb == "remove":
            self.remove(args[0], command.line)
        elif verb == "rename":
            self.rename(args[0], args[1], command.line)
        elif verb == "list":
            self.emit({"event": "list", "classes": self.class_list()})
        elif verb == "save":
            self.save()
        elif verb == "quit":
            self.stopped = True

    def take_frame(self, frame: np.ndarray, number: int | None = None) -> bool:
        """Give a frame (the source's frame `number`) to a pending enrolment; True if it was used (and so
        is not to be predicted)."""
        if self.pending is None:
            if self.waiting:
                self.waiting -= 1
            return False
        pending = self.pending
        try:
            pending.enrollment.add(frame, number)
        except ValueError as exc:  # InvalidFrame: blank to the model; the shots taken so far are kept
            pending.skipped += 1
            event: Event = {"event": "skipped", "command": f"enroll {pending.enrollment.name}"}
            if number is not None:
                event["frame"] = number
            self.emit({**event, "message": str(exc)})
            if pending.gives_up:
                self.finish_enrollment(f"{pending.skipped} frames were blank to the model")
            return True
        if number is not None:
            pending.taken.append(number)
        if pending.enrollment.shots >= pending.wanted:
            self.finish_enrollment()
        return True

    def end_of_frames(self, frames: int, source_ended: bool) -> None:
        """No frame will come any more: the source ended (reported once, as `end_of_source`) or the
        run reached its frame limit. A pending `enroll` keeps the frames it got; a `wait` ends."""
        if self.frames_over:
            return
        self.frames_over = True
        if source_ended:
            self.emit({"event": "end_of_source", "frames": frames})
        self.waiting = 0
        self.finish_enrollment("the source ended" if source_ended else "the run stopped")

    def finish_enrollment(self, cut_short: str = "") -> None:
        """Enrol what a pending `enroll` collected: fewer frames than asked when it was `cut_short`
        (why: the source ended, too many blank frames)."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        enrollment = pending.enrollment
        if not enrollment.shots:
            self.emit(
                {
                    "event": "error",
                    "command": f"enroll {enrollment.name}",
                    "message": f"{cut_short} before any frame could be enrolled: nothing was enrolled; "
                    "show the drawing to the camera and enrol again",
                }
            )
            return
        try:
            enrollment.commit()
        except ValueError as exc:
            self._error(f"enroll {enrollment.name}", exc)
            return
        details: Event = {}
        if pending.taken:  # which frames became shots: a card shown late may not be the one meant
            details["first_frame"], details["last_frame"] = pending.taken[0], pending.taken[-1]
        if pending.skipped:
            details["skipped"] = pending.skipped
        self._enrolled(enrollment.name, enrollment.shots, pending.wanted, details)

    # ----- operations (also used by the window's keys) ----------------------------------------------
    def enroll(self, name: str, frames: list[np.ndarray]) -> Event:
        try:
            self.rec.enroll(name, frames)
        except ValueError as exc:  # InvalidClassName, InvalidFrame, GalleryError are all ValueErrors
            return self._error(f"enroll {name}", exc)
        return self._enrolled(name, len(frames), len(frames))

    def _enrolled(self, name: str, shots: int, requested: int, details: Event | None = None) -> Event:
        self._changed()
        event: Event = {
            "event": "enrolled",
            "name": name,
            "shots": shots,
            "total_shots": self.shots(name),
            "classes": self.rec.classes,
        }
        if requested != shots:
            event["requested"] = requested
        event.update(details or {})
        self.emit(event)
        return event

    def remove(self, name: str, line: str = "") -> Event:
        try:
            self.undoable.append(self.rec.remove(name))
        except KeyError as exc:
            return self._error(line or f"remove {name}", exc)
        self._changed()
        event: Event = {"event": "removed", "name": name, "classes": self.rec.classes}
        self.emit(event)
        return event

    def rename(self, old: str, new: str, line: str = "") -> Event:
        try:
            self.rec.rename(old, new)
        except (KeyError, ValueError) as exc:
            return self._error(line or f"rename {old} {new}", exc)
        self._changed()
        event: Event = {"event": "renamed", "old": old, "new": new, "classes": self.rec.classes}
        self.emit(event)
        return event

    def save(self) -> Event:
        try:
            path = self.rec.save(self.gallery_path)
        except (OSError, ValueError) as exc:
            return self._error("save", exc)
        self.dirty = False
        self.undoable.clear()
        event: Event = {"event": "saved", "path": str(path), "classes": len(self.rec.gallery)}
        self.emit(event)
        return event

    def undo(self) -> Event:
        """Put back the last class deleted since the gallery was last saved."""
        if not self.undoable:
            return self._error("undo", ValueError("nothing to undo (deletions are final once saved)"))
        removed = self.undoable.pop()
        try:
            self.rec.restore(removed)
        except ValueError as exc:
            return self._error(f"undo (restore {removed.name})", exc)
        self._changed()
        event: Event = {"event": "restored", "name": removed.name, "classes": self.rec.classes}
        self.emit(event)
        return event

    # ----- reading ----------------------------------------------------------------------------------
    def shots(self, name: str) -> int:
        gallery = self.rec.gallery
        return int(gallery.counts[gallery.index(name)])

    def class_list(self) -> list[dict[str, Any]]:
        gallery = self.rec.gallery
        return [{"name": n, "shots": int(c)} for n, c in zip(gallery.names, gallery.counts)]

    def _changed(self) -> None:
        self.dirty = True
        self.version += 1

    def _error(self, command: str, exc: Exception) -> Event:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        event: Event = {"event": "error", "command": command, "message": str(message)}
        self.emit(event)
        return event
