"""The console's one window onto the gallery: every read of class data goes through here.

The frame loop's thread takes a `ClassSnapshot` whenever the Session's version changes (an enrolment,
a rename, a removal, from the console, the terminal or the window); web requests read only snapshots,
so they never touch the live gallery, never wait for the loop, and page through thousands of classes
cheaply. Taking one costs a pass over the names (no image is decoded or copied).

The gallery accessors used, and only here: `Recognizer.gallery.names`, `.counts` and
`.thumbnail(name)` (JPEG bytes or None). A gallery with another storage needs only this module changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dmf_deploy.names import name_key
from dmf_deploy.runtime.recognizer import Recognizer


@dataclass(frozen=True)
class ClassSnapshot:
    version: int = -1  # the Session's version it was taken at
    names: tuple[str, ...] = ()  # enrolment order
    shots: tuple[int, ...] = ()
    _rows: dict[str, int] = field(default_factory=dict)
    _thumbnails: tuple[bytes | None, ...] = ()

    def __len__(self) -> int:
        return len(self.names)

    def page(self, offset: int, limit: int) -> list[tuple[str, int]]:
        return list(zip(self.names[offset : offset + limit], self.shots[offset : offset + limit]))

    def find(self, name: str) -> int | None:
        return self._rows.get(name_key(name))

    def thumbnail(self, name: str) -> bytes | None:
        row = self.find(name)
        return None if row is None else self._thumbnails[row]


def take_snapshot(rec: Recognizer, version: int) -> ClassSnapshot:
    """The classes as they are now. Call it on the frame loop's thread (the gallery's only writer)."""
    gallery = rec.gallery
    names = tuple(gallery.names)
    return ClassSnapshot(
        version,
        names,
        tuple(int(c) for c in gallery.counts),
        {name_key(n): i for i, n in enumerate(names)},
        tuple(gallery.thumbnail(n) for n in names),
    )
