"""The console's one window onto the gallery: every read of class data goes through here.

The frame loop's thread takes a `ClassSnapshot` whenever the Session's version changes (an enrolment,
a rename, a removal, from the console, the terminal or the window); web requests page through
snapshots, so they never wait for the loop and page through thousands of classes cheaply. Taking one
costs a pass over the names and shot counts. Thumbnails are read when a page asks for one
(`Recognizer.thumbnails`, under the recogniser's lock; the gallery file is SQLite and keeps them on
disk), so a gallery of 10,000 classes is not read whole at every change.

The gallery accessors used, and only here: `Recognizer.gallery.names`, `.counts` and
`Recognizer.thumbnails(name)`. A gallery with another storage needs only this module changed.
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
    _rec: Recognizer | None = None  # where thumbnails are read from

    def __len__(self) -> int:
        return len(self.names)

    def page(self, offset: int, limit: int) -> list[tuple[str, int]]:
        return list(zip(self.names[offset : offset + limit], self.shots[offset : offset + limit]))

    def find(self, name: str) -> int | None:
        return self._rows.get(name_key(name))

    def thumbnail(self, name: str) -> bytes | None:
        """The class's first thumbnail (JPEG), or None: no such class (any more), or no thumbnail."""
        row = self.find(name)
        if row is None or self._rec is None:
            return None
        try:
            thumbnails = self._rec.thumbnails(self.names[row])
        except KeyError:  # removed or renamed since the snapshot
            return None
        return thumbnails[0] if thumbnails else None


def take_snapshot(rec: Recognizer, version: int) -> ClassSnapshot:
    """The classes as they are now. Call it on the frame loop's thread (the gallery's only writer)."""
    gallery = rec.gallery
    names = tuple(gallery.names)
    return ClassSnapshot(
        version,
        names,
        tuple(int(c) for c in gallery.counts),
        {name_key(n): i for i, n in enumerate(names)},
        rec,
    )
