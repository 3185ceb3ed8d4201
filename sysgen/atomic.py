"""Files written whole or not at all: a reader (or `datasets.load_dataset` on the folder) never sees
half a file, and a failed write (a full disk, a read-only folder) leaves nothing behind.

The temporary file is hidden (`.NAME.tmp` beside NAME): if the process is killed mid-write it stays,
but nothing that lists a folder's data files picks it up (`datasets` skips hidden files), and the
next write of NAME overwrites it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path


def temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yields the temporary path to write; on success it replaces `path`, on any failure it is removed."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        yield tmp
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path | str, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)
