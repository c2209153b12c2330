"""The disk reserve: space held back so that a full disk can still drain.

Configuration::

    outbox:
      disk_reserve: 8MiB    # 0: none (a full disk can then stop confirmations too)

SQLite in WAL mode appends every change to the WAL before it reaches the
database, deletions included: on a full disk a sink's confirmation cannot
commit, so nothing drains and nothing frees space. The outbox therefore keeps
a file of ``disk_reserve`` bytes (``outbox.db.reserve``, allocated, not
sparse) next to the database. When a commit fails with ``SQLITE_FULL`` the
outbox deletes it, refuses new readings, and commits the confirmations alone in
the space it freed; as sinks drain, the emptied pages go back to the filesystem
(``incremental_vacuum``) and the reserve is allocated again once the
filesystem has room for it *and* for new readings (:data:`INGEST_ROOM`, or
the reserve's size if larger; only :data:`DRAINED_ROOM` once the outbox is
empty; :meth:`DiskReserve.restore`). Only then are readings accepted again.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

INGEST_ROOM = 8 * 1024 * 1024
"""Free bytes, beyond the reserve itself (or its size, if larger), needed to
re-allocate the reserve and accept readings again: twice the WAL that SQLite
lets grow between checkpoints (1,000 pages of 4 KiB). With less, ingest would
fill the disk again at its next checkpoint."""

DRAINED_ROOM = 1024 * 1024
"""Free bytes beyond the reserve that suffice once the outbox is empty (every
record delivered): on a disk that other files keep nearly full, waiting for
:data:`INGEST_ROOM` would refuse readings for good, and an empty outbox can
only grow from here (if it fills the disk again, it refuses again)."""


class DiskReserve:
    """A preallocated file of ``size`` bytes that can be released on a full disk.

    All methods run on the outbox's writer thread (or before it starts).
    """

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size

    @property
    def held(self) -> bool:
        """The reserve file is there, at its full size."""
        try:
            return self.size > 0 and self.path.stat().st_size >= self.size
        except OSError:
            return False

    def free_bytes(self) -> int:
        """Bytes free for an unprivileged writer on the filesystem of the reserve."""
        st = os.statvfs(self.path.parent)
        return st.f_bavail * st.f_frsize

    def room(self, *, drained: bool = False) -> bool:
        """Enough free space to allocate the reserve and accept readings
        (``drained``: the outbox holds no record)."""
        extra = DRAINED_ROOM if drained else max(self.size, INGEST_ROOM)
        return self.free_bytes() >= self.size + extra

    def restore(self, *, drained: bool = False) -> bool:
        """Allocate the reserve if the filesystem has room for it and for new
        readings (:data:`INGEST_ROOM`, :data:`DRAINED_ROOM` if ``drained``);
        True if the reserve is held now (with no reserve configured: if there
        is that room)."""
        if self.size == 0:
            return self.room(drained=drained)
        if self.held:
            return True
        if not self.room(drained=drained):
            return False
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                _allocate(fd, self.size)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            return False
        return True

    def release(self) -> bool:
        """Delete the reserve; True if it was held (space was freed)."""
        if self.size == 0:
            return False
        held = self.held
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        return held


def _allocate(fd: int, size: int) -> None:
    """Give ``fd`` ``size`` bytes of real blocks (a sparse file would reserve nothing)."""
    fallocate = getattr(os, "posix_fallocate", None)  # not on macOS
    if fallocate is not None:
        try:
            fallocate(fd, 0, size)
            return
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
    block = b"\0" * (1024 * 1024)
    left = size
    while left > 0:
        left -= os.write(fd, block[: min(left, len(block))])
