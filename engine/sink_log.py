"""What the store proves about each output file ("sink"): its bytes, by content, not by length.

Every commit that appends to a sink records one row (sink, end, digest) where digest chains the
previous one with the bytes appended: d_k = xxh3_128(d_{k-1} || bytes[end_{k-1}:end_k]). The last
row therefore vouches for the whole committed prefix, and each row for one segment of it.

Checking a sink when a run opens it (`check`):
- always the last segment (a few MB at most): a cut, an inserted or removed line anywhere before
  it, or a store.db that belongs to another run's files shifts or changes those bytes;
- the whole committed prefix, segment by segment, when the file's (inode, size, mtime) is not the
  one recorded at the last commit, i.e. something other than this store touched it since (an
  editor, a copy, a killed run that left uncommitted bytes). A file nobody touched is not re-read,
  so a resume over a multi-GB data.jsonl stays fast; one that was touched costs one read at
  hashing speed;
- bytes past the committed prefix are cut only when this store announced them: before a batch is
  written (and before outputs are emptied) the writer commits `pending:NAME = start:end`, so a run
  killed mid-write leaves bytes inside that range, and anything else is refused, never cut.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import xxhash

from engine.store_errors import SinkMismatch

ZERO = b"\0" * 16
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS sink_log "
    "(sink TEXT, end INTEGER, digest BLOB, PRIMARY KEY(sink, end)) WITHOUT ROWID;"
)
_READ = 8 << 20
FIX = (
    "Fix: restore the file (or the store.db that belongs to it), or run `sysgen repair {dir}`: it moves "
    "the outputs aside and the next `sysgen run` rebuilds them, answering every request the store holds "
    "without the engine"
)


def hasher(prev: bytes) -> xxhash.xxh3_128:
    h = xxhash.xxh3_128()
    h.update(prev)
    return h


def chain(prev: bytes, data: bytes) -> bytes:
    h = hasher(prev)
    h.update(data)
    return h.digest()


def file_stat(fd_or_path: int | Path) -> str:
    st = os.fstat(fd_or_path) if isinstance(fd_or_path, int) else os.stat(fd_or_path)
    return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def _meta(conn: sqlite3.Connection, k: str) -> str | None:
    row = conn.execute("SELECT v FROM meta WHERE k=?", (k,)).fetchone()
    if row is None:
        return None
    return row[0].decode() if isinstance(row[0], bytes) else str(row[0])


def segments(conn: sqlite3.Connection, name: str) -> list[tuple[int, bytes]]:
    """The logged (end, digest) of sink `name`, in order; none for a store written before digests
    (opened read-only, as merge and export do, it has no sink_log table: its length alone is checked)."""
    try:
        return conn.execute("SELECT end, digest FROM sink_log WHERE sink=? ORDER BY end", (name,)).fetchall()
    except sqlite3.OperationalError as e:
        if "no such table" in str(e):
            return []
        raise


def tail(conn: sqlite3.Connection, name: str) -> tuple[int, bytes]:
    """(committed end, its digest) of the last logged segment; (0, ZERO) before any."""
    row = conn.execute(
        "SELECT end, digest FROM sink_log WHERE sink=? ORDER BY end DESC LIMIT 1", (name,)
    ).fetchone()
    return (row[0], row[1]) if row else (0, ZERO)


def hash_range(f, start: int, end: int, prev: bytes) -> bytes:
    f.seek(start)
    h, left = hasher(prev), end - start
    while left > 0:
        chunk = f.read(min(_READ, left))
        if not chunk:
            break  # shorter than expected: the digest will not match
        h.update(chunk)
        left -= len(chunk)
    return h.digest()


def _line_at(path: Path, offset: int) -> int:
    """The 1-based line holding byte `offset` (for messages; read in chunks, not all at once)."""
    lines, left = 1, offset
    with open(path, "rb") as f:
        while left > 0 and (chunk := f.read(min(_READ, left))):
            lines += chunk.count(b"\n")
            left -= len(chunk)
    return lines


def _first_bad(path: Path, segs: list[tuple[int, bytes]], start_at: int = 0) -> tuple[int, int] | None:
    """(start, end) offsets of the first segment (from index start_at) whose bytes do not match."""
    prev_end, prev = (segs[start_at - 1][0], segs[start_at - 1][1]) if start_at else (0, ZERO)
    with open(path, "rb") as f:
        for end, digest in segs[start_at:]:
            if hash_range(f, prev_end, end, prev) != digest:
                return prev_end, end
            prev_end, prev = end, digest
    return None


def check(conn: sqlite3.Connection, name: str, path: Path, *, full: bool = False) -> tuple[int, int]:
    """Prove that `path` holds exactly what the store committed for sink `name`, plus at most the
    uncommitted bytes of a killed write. Returns (committed length, size on disk); raises
    SinkMismatch naming the file, what differs and how to recover."""
    fix = FIX.format(dir=path.parent)
    known = _meta(conn, f"sink:{name}")
    size = path.stat().st_size if path.exists() else 0
    if known is None:
        if size > 0:
            raise SinkMismatch(
                f"{path} holds {size:,} bytes that this store did not write (store.db deleted or replaced, "
                "or a file of another program). Fix: move the file away to keep it (or delete it to start "
                "over), or give another --out"
            )
        return 0, size
    committed = int(known)
    if size < committed:
        raise SinkMismatch(
            f"{path}: {size:,} bytes on disk but store.db committed {committed:,}: lines "
            "were removed or the file was truncated or replaced outside sysgen, or store.db "
            f"belongs to another run. {fix}"
        )
    segs = segments(conn, name)
    if segs and segs[-1][0] != committed:
        raise SinkMismatch(
            f"{path}: store.db's digests end at byte {segs[-1][0]:,} but its length says "
            f"{committed:,}: store.db was edited or mixed from two runs. {fix}"
        )
    if segs:
        bad = _first_bad(path, segs, len(segs) - 1)
        if bad is None and (full or _meta(conn, f"sinkstat:{name}") != file_stat(path)):
            bad = _first_bad(path, segs)
        if bad is not None:
            first, last = _line_at(path, bad[0]), _line_at(path, min(bad[1], size) - 1)
            raise SinkMismatch(
                f"{path}: lines {first:,}-{last:,} (bytes {bad[0]:,}-{bad[1]:,}, one commit) are not the "
                "ones store.db committed: the file was edited (a line inserted, removed or changed), or "
                f"store.db belongs to another run. Nothing was changed. {fix}"
            )
    if size > committed:
        pending = _meta(conn, f"pending:{name}")
        start, _, end = (pending or "").partition(":")
        if not (pending and int(start) == committed and size <= int(end)):
            raise SinkMismatch(
                f"{path}: {size - committed:,} bytes after the {committed:,} that store.db committed, which "
                "this store did not write (lines appended by hand, or store.db belongs to another run). "
                f"Nothing was changed. {fix}"
            )
    return committed, size


@contextmanager
def _read_only(db: Path) -> Iterator[sqlite3.Connection]:
    """A read-only connection to `db` (the readers write nothing to the store)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        yield conn
    finally:
        conn.close()


def check_file(db: Path, name: str, path: Path) -> int:
    """`check` in full through a read-only connection (merge writes nothing to a shard's store).
    Returns the committed length; sqlite3.DatabaseError when `db` cannot be read."""
    with _read_only(db) as conn:
        return check(conn, name, path, full=True)[0]


def committed_lengths(db: Path, names: tuple[str, ...]) -> dict[str, int] | None:
    """For a store that has committed outputs (a run's), each of `names`' committed length once
    every committed byte of NAME.jsonl beside `db` is proved (`check_file`); None for a store that
    has committed none (`sysgen eval`'s judgement cache beside records copied from elsewhere).
    Raises SinkMismatch, or sqlite3.DatabaseError when `db` cannot be read."""
    with _read_only(db) as conn:
        if all(_meta(conn, f"sink:{name}") is None for name in names):
            return None
        return {name: check(conn, name, db.parent / f"{name}.jsonl", full=True)[0] for name in names}
