"""One writer per store: an exclusive advisory lock beside the database, held while a Store is open.

Two processes appending to one store's output files would each cut the other's lines back on open
and duplicate work, so the second one is refused with the first one's pid. The operating system
drops the lock when its holder exits in any way (kill -9 included), so a crashed run never leaves a
stale lock behind. Where `fcntl` does not exist (Windows) no lock is taken.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


log = logging.getLogger(__name__)


class StoreLocked(RuntimeError):
    def __init__(self, message: str, holder: str) -> None:
        super().__init__(message)
        self.holder = holder  # the pid written by the process holding the lock, or "?"


class StoreLock:
    def __init__(self, db: Path) -> None:
        self.path = db.with_name(db.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        if fcntl is None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StoreLocked(
                f"{self.path.parent} is in use by another sysgen process (pid {holder}). Two runs writing "
                "one output directory would duplicate work. Fix: wait for that run to finish or stop it "
                "(it resumes later), or give this one another --out",
                holder,
            ) from None
        except OSError as e:  # a file system without locks (e.g. Lustre mounted without -o flock)
            os.close(fd)
            log.warning(
                "%s: cannot lock (%s); nothing stops a second run from writing here too", self.path, e
            )
            return
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the lock; the file stays, harmless and reused
            self._fd = None
