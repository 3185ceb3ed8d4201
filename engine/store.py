"""Content-addressed checkpoint store: results by request key, finished work items, and
exactly-once append-only output files ("sinks").

One SQLite file in WAL mode. All writes go through one writer thread fed by a queue and are
committed in batches. Lines for the sinks are written by that same thread inside the batch, and
the byte length of every sink is committed in the same transaction as the results and items that
produced those lines. On open, each sink is cut back to its committed length, so a crash at any
moment loses only uncommitted work and never leaves a line twice or half a line.

If the writer fails (disk full, I/O error) it stops: nothing after the last commit is kept, every
later write raises StoreError, and a re-run resumes from the last commit.
"""

from __future__ import annotations

import errno
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from engine.keyfilter import KeyFilter
from engine.request import Result
from engine.store_lock import StoreLock, StoreLocked
from engine.store_writer import Op, commit_batch, finish_swap, rewrite_sink, swap_path

SCHEMA_VERSION = 2
HOT_SIZE = 4096

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v BLOB);
CREATE TABLE IF NOT EXISTS results (id INTEGER PRIMARY KEY, key BLOB NOT NULL UNIQUE, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS items (key BLOB PRIMARY KEY, value BLOB) WITHOUT ROWID;
"""


class StoreError(RuntimeError):
    """The store cannot be used (schema mismatch, disk full, corrupt sink). The run stops cleanly."""


def connect(path: Path, cache_mb: int = 64) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=60)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(f"PRAGMA cache_size=-{cache_mb * 1024}")
    conn.execute("PRAGMA journal_size_limit=67108864")  # truncate the WAL after checkpoints
    return conn


def describe_failure(e: BaseException) -> str:
    if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "disk is full" in str(e):
        return f"the disk is full ({e})"
    return f"{type(e).__name__}: {e}"


class Store:
    """Open with `Store.open(path)`; use as a context manager or call `close()`. Reads and writes
    are called from one thread (the event loop's); the store's own thread does the writing."""

    def __init__(self, path: Path, *, commit_every: int = 10_000, commit_interval_s: float = 1.0) -> None:
        self.path = Path(path)
        self.commit_every = commit_every
        self.commit_interval_s = commit_interval_s
        self.commits = 0
        self._lock = StoreLock(self.path)
        try:
            self._lock.acquire()
        except StoreLocked as e:
            raise StoreError(str(e)) from None
        except OSError as e:  # a read-only folder: the lock file cannot even be created
            raise StoreError(f"{self.path.parent}: cannot write the store there ({e.strerror or e}). "
                             "Fix: give a writable output directory, or fix its permissions") from None
        try:
            self._init_db()
        except BaseException:
            self._lock.release()
            raise
        self._reader = connect(self.path, cache_mb=16)  # misses never reach it: the key filter answers
        self._sinks: dict[str, Path] = {}
        self._recent: dict[bytes, bytes] = {}  # put but not yet committed: still visible to get()
        self._recent_items: set[bytes] = set()
        self._filter: KeyFilter | None = None  # built at the first get/put, then kept current
        self._hot: dict[bytes, bytes] = {}  # recently read values: repeated prompts skip SQLite
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._error_raised = False
        self._writer = threading.Thread(target=self._write_loop, name="store-writer", daemon=True)
        self._writer.start()

    @classmethod
    def open(cls, path: str | os.PathLike, **kw) -> Store:
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"{path.parent}: cannot create the output directory ({e.strerror or e}). "
                             "Fix: give a writable location") from None
        return cls(path, **kw)

    def _value(self, sql: str, params: tuple = ()) -> Any:
        """The value of an aggregate query (one row, always)."""
        row = self._one(sql, params)
        return None if row is None else row[0]

    def _one(self, sql: str, params: tuple = ()) -> tuple | None:
        """One row from the reader; a damaged database file (pages corrupted under a running
        store) is a StoreError, which stops the run cleanly, not a traceback."""
        try:
            return self._reader.execute(sql, params).fetchone()
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path}: cannot read the store ({e}); the file is damaged or was "
                             "changed by another program. Fix: restore it, or start a new --out") from e

    def _init_db(self) -> None:
        fix = "Fix: write to a new --out directory, or run the sysgen version that made it."
        try:
            conn = connect(self.path)
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path}: not a usable store ({e}). {fix}") from e
        try:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if tables and "meta" not in tables:
                raise StoreError(f"{self.path}: an SQLite file that is not a sysgen store. {fix}")
            conn.executescript(_SCHEMA)
            row = conn.execute("SELECT v FROM meta WHERE k='schema_version'").fetchone()
            if row is None:
                conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) != SCHEMA_VERSION:
                raise StoreError(f"{self.path}: store schema v{int(row[0])}, this version reads "
                                 f"v{SCHEMA_VERSION}. {fix}")
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path}: not a usable store ({e}). {fix}") from e
        finally:
            conn.close()

    # ---- reads ----
    def _key_filter(self) -> KeyFilter:
        if self._filter is None:
            n = self._value("SELECT max(id) FROM results") or 0
            f = KeyFilter(max(1 << 20, 2 * n))
            try:
                f.add_many(k for (k,) in self._reader.execute("SELECT key FROM results"))
            except sqlite3.DatabaseError as e:
                raise StoreError(f"{self.path}: cannot read the store ({e}). Fix: restore it, "
                                 "or start a new --out") from e
            self._filter = f
        return self._filter

    def get(self, key: bytes) -> Result | None:
        raw = self._recent.get(key)
        if raw is None:
            if key not in (self._filter or self._key_filter()):
                return None
            raw = self._hot.get(key)
            if raw is None:
                row = self._one("SELECT value FROM results WHERE key=?", (key,))
                if row is None:
                    return None
                raw = row[0]
                if len(self._hot) >= HOT_SIZE:  # first in, first out: cheap, and enough for repeats
                    del self._hot[next(iter(self._hot))]
                self._hot[key] = raw
        return Result(**orjson.loads(raw))

    def has_item(self, key: bytes) -> bool:
        if key in self._recent_items:
            return True
        return self._one("SELECT 1 FROM items WHERE key=?", (key,)) is not None

    def last_item(self, lo: bytes, hi: bytes) -> bytes | None:
        """The greatest committed item key in [lo, hi), or None."""
        sql = "SELECT max(key) FROM items WHERE key >= ? AND key < ?"
        return self._value(sql, (lo, hi))

    def get_meta(self, k: str) -> bytes | None:
        row = self._one("SELECT v FROM meta WHERE k=?", (k,))
        return None if row is None else (row[0] if isinstance(row[0], bytes) else str(row[0]).encode())

    def count(self, table: str = "results") -> int:
        if table not in ("results", "items"):
            raise ValueError(f"count(): no table {table!r}; use 'results' or 'items'")
        return self._value(f"SELECT COUNT(*) FROM {table}")

    def iter_results(self) -> Iterator[tuple[bytes, Result]]:
        for key, raw in self._reader.execute("SELECT key, value FROM results ORDER BY id"):
            yield key, Result(**orjson.loads(raw))

    @property
    def backlog(self) -> int:
        """Writes queued and not yet taken by the writer: callers slow down when it grows."""
        return self._q.qsize()

    # ---- writes (queued to the writer thread) ----
    def _check(self) -> None:
        if self._error is not None:
            self._error_raised = True
            raise StoreError(f"{self.path}: the store's writer stopped: {describe_failure(self._error)}. "
                             "Everything committed before that is intact.") from self._error

    def put(self, key: bytes, result: Result) -> None:
        self._check()
        raw = orjson.dumps(result)  # a dataclass: same bytes as Result.to_json, without asdict()
        self._recent[key] = raw
        self._hot.pop(key, None)
        (self._filter or self._key_filter()).add(key)
        self._q.put(("r", key, raw))

    def finish_item(self, key: bytes, value: bytes | None = None,
                    lines: tuple[tuple[str, bytes], ...] = ()) -> None:
        """Mark a work item done and append its output lines to sinks, atomically."""
        self._check()
        self._recent_items.add(key)
        self._q.put(("i", key, value, lines))

    def set_meta(self, k: str, v: bytes | str) -> None:
        self._check()
        self._q.put(("m", k, v))

    def add_sink(self, name: str, path: str | os.PathLike) -> int:
        """Register an append-only output file; cut it back to its committed length. Returns that length."""
        path = Path(path)
        if self.get_meta(f"swap:{name}"):  # a rewrite committed before its rename: finish it
            finish_swap(path)
            self.set_meta(f"swap:{name}", "")
        else:
            swap_path(path).unlink(missing_ok=True)  # a rewrite that never committed
        known = self.get_meta(f"sink:{name}")
        committed = int(known or 0)
        if path.is_dir():
            raise StoreError(f"{path} is a directory, where the output file belongs. "
                             "Fix: move it away, or give another --out")
        size = path.stat().st_size if path.exists() else 0
        if known is None and size > 0:  # never cut a file this store did not write
            raise StoreError(
                f"{path} holds {size:,} bytes that this store did not write (store.db deleted or replaced, "
                "or a file of another program). Fix: move the file away to keep it (or delete it to start "
                "over), or give another --out")
        if size < committed:
            raise StoreError(
                f"{path}: {size} bytes on disk but {committed} were committed; the file was truncated or "
                "replaced outside sysgen. Fix: restore it, or delete the --out directory to start over."
            )
        with open(path, "ab") as f:
            f.truncate(committed)
        self._sinks[name] = path
        self._q.put(("s", name, path))
        if known is None:  # committed before any line is written: the file is then always ours
            self.set_meta(f"sink:{name}", "0")
            self.flush()
        return committed

    def drop_lines(self, name: str, drop: Callable[[bytes], bool], items: list[bytes],
                   meta_keys: tuple[str, ...] = ()) -> int:
        """Remove the committed lines of sink `name` that `drop` picks and forget the done markers
        `items` (and meta `meta_keys`), atomically: re-opened work items, whose next outcome is
        appended as usual. `drop` runs on the writer thread. Returns the lines removed."""
        self._check()
        box: list[int] = []
        self._q.put(("rewrite", name, drop, items, meta_keys, box))
        self.flush()  # returns once the writer has done it, or raises what stopped it
        return box[0]

    def reset_outputs(self) -> None:
        """Forget every finished item and empty every sink, atomically (the run's configuration
        changed, so earlier outputs are not comparable). Stored results stay: they are still valid."""
        self._check()
        self._q.put(("reset",))
        self.flush()

    def flush(self, timeout: float | None = 120) -> None:
        """Commit everything queued so far; raises StoreError if the writer has failed."""
        self._check()
        done = threading.Event()
        self._q.put(("f", done))
        deadline = None if timeout is None else time.monotonic() + timeout
        while not done.wait(0.05):
            if not self._writer.is_alive():  # failed after our flush was queued
                break
            if deadline is not None and time.monotonic() > deadline:
                raise StoreError(f"{self.path}: store flush did not finish in {timeout}s")
        self._check()

    def close(self) -> None:
        """Commit what is queued and stop the writer. Raises a writer failure not yet reported."""
        if self._writer.is_alive():
            self._q.put(("c",))
            self._writer.join()
        self._reader.close()
        self._lock.release()
        if self._error is not None and not self._error_raised:
            self._check()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the writer thread ----
    def _open_sink(self, path: Path) -> BinaryIO:
        return open(path, "ab")  # noqa: SIM115 - owned by the writer thread until it exits

    def _write_loop(self) -> None:
        conn = connect(self.path)
        files: dict[str, BinaryIO] = {}
        pending: list[Op] = []
        waiters: list[threading.Event] = []
        due: float | None = None  # when the oldest pending write must be committed
        closing = False
        try:
            while not closing:
                try:
                    op = self._q.get(timeout=self.commit_interval_s if due is None
                                     else max(0.0, due - time.monotonic()))
                except queue.Empty:
                    op = None
                while op is not None:  # take whatever is queued without waiting again
                    kind = op[0]
                    if kind == "f":
                        waiters.append(op[1])
                    elif kind == "c":
                        closing = True
                    elif kind == "s":
                        files[op[1]] = self._open_sink(op[2])
                    elif kind == "rewrite":
                        commit_batch(conn, pending, files, self)
                        pending = []
                        _, name, drop, items, metas, box = op
                        box.append(rewrite_sink(conn, files, name, self._sinks[name], drop, items, metas))
                        self._recent_items.difference_update(items)
                    elif kind == "reset":
                        commit_batch(conn, pending, files, self)
                        pending = []
                        self._reset(conn, files)
                    else:
                        pending.append(op)
                        if due is None:
                            due = time.monotonic() + self.commit_interval_s
                    if closing or len(pending) >= self.commit_every:
                        break
                    try:
                        op = self._q.get_nowait()
                    except queue.Empty:
                        op = None
                if pending and (waiters or closing or len(pending) >= self.commit_every
                                or (due is not None and time.monotonic() >= due)):
                    commit_batch(conn, pending, files, self)
                    pending, due = [], None
                for w in waiters:
                    w.set()
                waiters = []
        except BaseException as e:  # disk full, I/O error: stop; the last commit stands
            self._error = e
            for w in waiters:
                w.set()
            self._release_waiters()
        finally:
            for f in files.values():
                try:
                    f.close()
                except OSError:
                    pass
            conn.close()

    def _reset(self, conn: sqlite3.Connection, files: dict[str, BinaryIO]) -> None:
        # Commit first, truncate after: a crash in between leaves files longer than committed,
        # which the next open cuts back. The other order would look like outside tampering.
        conn.execute("BEGIN")
        conn.execute("DELETE FROM items")
        conn.executemany("INSERT OR REPLACE INTO meta(k, v) VALUES (?, '0')", [(f"sink:{n}",) for n in files])
        conn.execute("COMMIT")
        for f in files.values():
            f.truncate(0)
            f.seek(0)
        self._recent_items.clear()

    def _release_waiters(self) -> None:
        while True:  # anyone waiting on a flush queued after the failure
            try:
                op = self._q.get_nowait()
            except queue.Empty:
                return
            if op[0] == "f":
                op[1].set()
