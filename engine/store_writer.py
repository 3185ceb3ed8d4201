"""The store's writer thread: it owns the SQLite connection, the open sink files and the operations
not yet committed, and commits them in batches. Operations arrive on a queue as small typed records.

A batch: the sinks' coming byte ranges are announced (`pending:NAME`), the lines appended and
synced, then one SQLite transaction holds the results, the done items, each sink's new length and
the digest that chains its new bytes to the old (engine/sink_log.py). A crash before that commit
leaves bytes past the committed length that the next open may cut, because they were announced.
"""

from __future__ import annotations

import os
import queue
import sqlite3
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from engine import sink_log


def connect(path: Path, cache_mb: int = 64) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=60)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(f"PRAGMA cache_size=-{cache_mb * 1024}")
    conn.execute("PRAGMA journal_size_limit=67108864")  # truncate the WAL after checkpoints
    return conn


# ---- the operations ----
@dataclass(slots=True)
class PutResult:
    key: bytes
    value: bytes


@dataclass(slots=True)
class FinishItem:
    key: bytes
    value: bytes | None
    lines: tuple[tuple[str, bytes], ...]  # (sink name, one line with its newline)


@dataclass(slots=True)
class SetMeta:
    key: str
    value: bytes | str


@dataclass(slots=True)
class OpenSink:
    name: str
    path: Path


@dataclass(slots=True)
class DropLines:
    name: str
    drop: Callable[[bytes], bool]
    items: list[bytes]
    meta_keys: tuple[str, ...]
    removed: list[int] = field(default_factory=list)  # the answer, read once the flush after it returns


@dataclass(slots=True)
class ResetOutputs:
    sinks: tuple[str, ...]  # emptied even when not open (their files moved aside by `repair`)
    meta_keys: tuple[str, ...]


@dataclass(slots=True)
class Flush:
    done: threading.Event


@dataclass(slots=True)
class Close:
    pass


Op = PutResult | FinishItem | SetMeta | OpenSink | DropLines | ResetOutputs | Flush | Close
Batched = PutResult | FinishItem | SetMeta  # what waits for the next commit

# Many rows per INSERT statement: executemany() releases and re-takes the GIL once per row, and
# with the event loop holding it every re-take can wait a switch interval (5 ms). One statement
# per chunk keeps the writer from starving. 2 x 4096 parameters is under SQLite's 32766 limit.
# Chunks are powers of two so that at most 13 statement texts exist per table: the connection
# caches prepared statements, and one per remainder size would cache ~100 MB of them.
_CHUNK = 4096


def _insert_rows(conn: sqlite3.Connection, head: str, tail: str, rows: list[tuple]) -> None:
    if not rows:
        return
    width = len(rows[0])
    group = "(" + ",".join("?" * width) + ")"
    i = 0
    while i < len(rows):
        size = min(_CHUNK, 1 << ((len(rows) - i).bit_length() - 1))
        chunk = rows[i : i + size]
        conn.execute(f"{head} VALUES {','.join([group] * size)} {tail}", [x for row in chunk for x in row])
        i += size


def _transaction(conn: sqlite3.Connection, work: Callable[[], object]) -> None:
    conn.execute("BEGIN")
    try:
        work()
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
        raise


def _set_metas(conn: sqlite3.Connection, metas: Sequence[tuple[str, bytes | str]]) -> None:
    conn.executemany("INSERT OR REPLACE INTO meta(k, v) VALUES (?, ?)", metas)


OnCommit = Callable[[dict[bytes, bytes], list[bytes]], None]


class StoreWriter:
    """Fed through `submit`; `on_commit(results, item_keys)` runs on this thread after each commit
    so the store can stop holding those writes in memory. A failure stops it for good: `error`."""

    def __init__(self, db: Path, *, commit_every: int, commit_interval_s: float, on_commit: OnCommit) -> None:
        self.db = db
        self.commit_every = commit_every
        self.commit_interval_s = commit_interval_s
        self.on_commit = on_commit
        self.commits = 0
        self.error: BaseException | None = None
        self._q: queue.SimpleQueue[Op] = queue.SimpleQueue()
        self._conn = connect(db)  # used by the thread alone from here on
        self._files: dict[str, BinaryIO] = {}
        self._paths: dict[str, Path] = {}
        self._tails: dict[str, tuple[int, bytes]] = {}  # sink -> (committed length, its digest)
        self._pending: list[Batched] = []
        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self._thread.start()

    def submit(self, op: Op) -> None:
        self._q.put(op)

    @property
    def backlog(self) -> int:
        return self._q.qsize()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def join(self) -> None:
        self._thread.join()

    # ---- the thread ----
    def _open_sink(self, path: Path) -> BinaryIO:
        return open(path, "ab")  # owned by the writer thread until it exits

    def _run(self) -> None:
        waiters: list[threading.Event] = []
        due: float | None = None  # when the oldest pending write must be committed
        closing = False
        try:
            while not closing:
                try:
                    op: Op | None = self._q.get(
                        timeout=self.commit_interval_s if due is None else max(0.0, due - time.monotonic())
                    )
                except queue.Empty:
                    op = None
                while op is not None:  # take whatever is queued without waiting again
                    if isinstance(op, (PutResult, FinishItem, SetMeta)):
                        self._pending.append(op)
                        if due is None:
                            due = time.monotonic() + self.commit_interval_s
                    elif isinstance(op, Flush):
                        waiters.append(op.done)
                    elif isinstance(op, Close):
                        closing = True
                    elif isinstance(op, OpenSink):
                        self._open(op)
                    elif isinstance(op, DropLines):
                        self._commit()
                        op.removed.append(self._rewrite(op))
                    elif isinstance(op, ResetOutputs):
                        self._commit()
                        self._reset(op)
                    if closing or len(self._pending) >= self.commit_every:
                        break
                    try:
                        op = self._q.get_nowait()
                    except queue.Empty:
                        op = None
                if self._pending and (
                    waiters
                    or closing
                    or len(self._pending) >= self.commit_every
                    or (due is not None and time.monotonic() >= due)
                ):
                    self._commit()
                    due = None
                for w in waiters:
                    w.set()
                waiters = []
        except BaseException as e:  # disk full, I/O error: stop; the last commit stands
            self.error = e
            for w in waiters:
                w.set()
            self._release_waiters()
        finally:
            for f in self._files.values():
                try:
                    f.close()
                except OSError:
                    pass
            self._conn.close()

    def _release_waiters(self) -> None:
        while True:  # anyone waiting on a flush queued after the failure
            try:
                op = self._q.get_nowait()
            except queue.Empty:
                return
            if isinstance(op, Flush):
                op.done.set()

    def _open(self, op: OpenSink) -> None:
        f = self._files[op.name] = self._open_sink(op.path)
        self._paths[op.name] = op.path
        end, digest = sink_log.tail(self._conn, op.name)
        committed = f.tell()  # the store cut the file to its committed length before this
        if end != committed:  # a store written before digests existed: vouch for what it holds now
            with open(op.path, "rb") as src:
                digest = sink_log.hash_range(src, 0, committed, sink_log.ZERO)
            _transaction(
                self._conn,
                lambda: self._conn.execute(
                    "INSERT OR REPLACE INTO sink_log VALUES (?, ?, ?)", (op.name, committed, digest)
                ),
            )
            end = committed
        self._tails[op.name] = (end, digest)

    def _commit(self) -> None:
        """Write the pending operations durably. Raises on any failure; the caller then stops
        writing for good, and announced bytes past the last commit are cut at the next open."""
        ops, self._pending = self._pending, []
        if not ops:
            return
        conn = self._conn
        results: dict[bytes, bytes] = {}
        items: list[tuple[bytes, bytes | None]] = []
        metas: list[tuple[str, bytes | str]] = []
        chunks: dict[str, list[bytes]] = defaultdict(list)
        for op in ops:
            if isinstance(op, PutResult):
                results[op.key] = op.value
            elif isinstance(op, FinishItem):
                items.append((op.key, op.value))
                for name, line in op.lines:
                    chunks[name].append(line)
            else:
                metas.append((op.key, op.value))
        data = {name: b"".join(parts) for name, parts in chunks.items()}
        if data:  # announced first: a kill after the write leaves bytes the next open knows are ours
            starts = {n: self._tails[n][0] for n in data}
            _transaction(
                conn,
                lambda: _set_metas(
                    conn, [(f"pending:{n}", f"{starts[n]}:{starts[n] + len(b)}") for n, b in data.items()]
                ),
            )
        log: list[tuple[str, int, bytes]] = []
        for name, blob in data.items():
            f = self._files[name]
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())  # the lines must be on disk before the length that covers them
            end, digest = f.tell(), sink_log.chain(self._tails[name][1], blob)
            log.append((name, end, digest))
            metas += [(f"sink:{name}", str(end)), (f"sinkstat:{name}", sink_log.file_stat(f.fileno()))]

        def work() -> None:
            # Sorted keys walk the index in order: neighbouring inserts share B-tree pages.
            _insert_rows(
                conn,
                "INSERT INTO results(key, value)",
                "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                sorted(results.items()),
            )
            _insert_rows(conn, "INSERT OR IGNORE INTO items(key, value)", "", items)
            _set_metas(conn, metas)
            conn.executemany("INSERT OR REPLACE INTO sink_log VALUES (?, ?, ?)", log)

        _transaction(conn, work)
        for name, end, digest in log:
            self._tails[name] = (end, digest)
        self.commits += 1
        self.on_commit(results, [k for k, _ in items])

    def _reset(self, op: ResetOutputs) -> None:
        # Commit first, truncate after: the bytes being removed are announced (pending 0:size), so a
        # crash in between leaves a longer file that the next open cuts back, knowing it is ours.
        conn = self._conn
        names = set(op.sinks) | set(self._files)
        sizes = {n: self._files[n].tell() if n in self._files else 0 for n in names}

        def work() -> None:
            conn.execute("DELETE FROM items")
            conn.executemany("DELETE FROM sink_log WHERE sink=?", [(n,) for n in names])
            conn.executemany("DELETE FROM meta WHERE k=?", [(k,) for k in op.meta_keys])
            _set_metas(
                conn,
                [(f"sink:{n}", "0") for n in names] + [(f"pending:{n}", f"0:{s}") for n, s in sizes.items()],
            )

        _transaction(conn, work)
        for f in self._files.values():
            f.truncate(0)
            f.seek(0)
        for name in names:
            self._tails[name] = (0, sink_log.ZERO)

    def _rewrite(self, op: DropLines) -> int:
        """Remove the lines `op.drop` picks from sink `op.name`, forget the done markers and the
        meta keys, as one step: the filtered copy is written and synced first, then one transaction
        records its length, digest and a swap:NAME mark, then the copy replaces the file. A crash
        before the commit leaves the old file (the copy is discarded at the next open); after it,
        the next open finishes the rename (Store.add_sink). Returns the number of lines removed."""
        conn, name = self._conn, op.name
        path = self._paths[name]
        f = self._files[name]
        committed = f.tell()  # committed just before: the file is exactly its committed bytes
        tmp = swap_path(path)
        removed = 0
        h = sink_log.hasher(sink_log.ZERO)
        with open(path, "rb") as src, open(tmp, "wb") as dst:
            left = committed
            for line in src:
                if left <= 0:
                    break
                line = line[:left]
                left -= len(line)
                if op.drop(line):
                    removed += 1
                else:
                    dst.write(line)
                    h.update(line)
            dst.flush()
            os.fsync(dst.fileno())
            length, digest = dst.tell(), h.digest()
            stat = sink_log.file_stat(dst.fileno())  # a rename keeps inode and mtime

        def work() -> None:
            conn.executemany("DELETE FROM items WHERE key=?", [(k,) for k in op.items])
            conn.executemany("DELETE FROM meta WHERE k=?", [(k,) for k in op.meta_keys])
            conn.execute("DELETE FROM sink_log WHERE sink=?", (name,))
            conn.execute("INSERT INTO sink_log VALUES (?, ?, ?)", (name, length, digest))
            _set_metas(
                conn, [(f"sink:{name}", str(length)), (f"sinkstat:{name}", stat), (f"swap:{name}", tmp.name)]
            )

        _transaction(conn, work)
        f.close()
        finish_swap(path)
        self._files[name] = self._open_sink(path)
        self._tails[name] = (length, digest)
        conn.execute("DELETE FROM meta WHERE k=?", (f"swap:{name}",))
        return removed


def swap_path(path: Path) -> Path:
    return path.with_name(path.name + ".rewrite")


def finish_swap(path: Path) -> None:
    tmp = swap_path(path)
    if tmp.exists():
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)  # the rename itself must survive a power cut before swap:NAME is cleared
        finally:
            os.close(dfd)
