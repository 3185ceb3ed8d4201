"""Content-addressed checkpoint store: results by request key, finished work items, and
exactly-once append-only output files ("sinks").

One SQLite file in WAL mode. All writes go through one writer thread (engine/store_writer.py) fed
by a queue and committed in batches. Lines for the sinks are written by that same thread inside
the batch, and each sink's length and content digest are committed in the same transaction as the
results and items that produced those lines. On open, each sink is proved by content against what
was committed (engine/sink_log.py) and only bytes this store announced are cut, so a crash at any
moment loses only uncommitted work and never leaves a line twice or half a line, and a file edited
by hand, or a store.db of another run, is refused instead of cut.

If the writer fails (disk full, I/O error) it stops: nothing after the last commit is kept, every
later write raises StoreError, and a re-run resumes from the last commit.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from engine import sink_log
from engine.keyfilter import KeyFilter
from engine.request import Result
from engine.store_errors import SinkMismatch, StoreError
from engine.store_lock import StoreLock, StoreLocked
from engine.store_writer import (
    Close,
    DropLines,
    FinishItem,
    Flush,
    OpenSink,
    PutResult,
    ResetOutputs,
    SetMeta,
    StoreWriter,
    connect,
    finish_swap,
    swap_path,
)

__all__ = ["SCHEMA_VERSION", "SinkMismatch", "Store", "StoreError", "connect", "describe_failure"]
log = logging.getLogger(__name__)
SCHEMA_VERSION = 2
HOT_SIZE = 4096

_SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v BLOB);
CREATE TABLE IF NOT EXISTS results (id INTEGER PRIMARY KEY, key BLOB NOT NULL UNIQUE, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS items (key BLOB PRIMARY KEY, value BLOB) WITHOUT ROWID;
"""
    + sink_log.SCHEMA
)


def describe_failure(e: BaseException) -> str:
    if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "disk is full" in str(e):
        return f"the disk is full ({e})"
    return f"{type(e).__name__}: {e}"


class Store:
    """Open with `Store.open(path)`; use as a context manager or call `close()`. Reads and writes
    are called from one thread (the event loop's); the store's own thread does the writing."""

    def __init__(self, path: Path, *, commit_every: int = 10_000, commit_interval_s: float = 1.0) -> None:
        self.path = Path(path)
        self._lock = StoreLock(self.path)
        try:
            self._lock.acquire()
        except StoreLocked as e:
            raise StoreError(str(e)) from None
        except OSError as e:  # a read-only folder: the lock file cannot even be created
            raise StoreError(
                f"{self.path.parent}: cannot write the store there ({e.strerror or e}). "
                "Fix: give a writable output directory, or fix its permissions"
            ) from None
        try:
            self._init_db()
            self._reader = connect(self.path, cache_mb=16)  # misses never reach it: the key filter answers
        except BaseException:
            self._lock.release()
            raise
        self._recent: dict[bytes, bytes] = {}  # put but not yet committed: still visible to get()
        self._recent_items: set[bytes] = set()
        self._filter: KeyFilter | None = None  # built at the first get/put, then kept current
        self._hot: dict[bytes, bytes] = {}  # recently read values: repeated prompts skip SQLite
        self._error_raised = False
        try:
            self._writer = StoreWriter(
                self.path,
                commit_every=commit_every,
                commit_interval_s=commit_interval_s,
                on_commit=self._committed,
            )
        except sqlite3.DatabaseError as e:
            self._reader.close()
            self._lock.release()
            raise self._unusable(e) from e
        except BaseException:
            self._reader.close()
            self._lock.release()
            raise

    @property
    def commits(self) -> int:
        return self._writer.commits

    def _committed(self, results: dict[bytes, bytes], items: list[bytes]) -> None:
        """Runs on the writer thread after each commit: those writes are now readable from SQLite."""
        recent = self._recent
        for key, raw in results.items():
            if recent.get(key) is raw:  # a newer put of the same key stays visible until its commit
                recent.pop(key, None)
        self._recent_items.difference_update(items)

    @classmethod
    def open(cls, path: str | os.PathLike, **kw) -> Store:
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(
                f"{path.parent}: cannot create the output directory ({e.strerror or e}). "
                "Fix: give a writable location"
            ) from None
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
            raise StoreError(
                f"{self.path}: cannot read the store ({e}); the file is damaged or was "
                "changed by another program. Fix: restore it, or start a new --out"
            ) from e

    def _unusable(self, e: BaseException) -> StoreError:
        """A store.db sqlite cannot open or read, with the advice that fits why."""
        p = self.path
        if p.exists() and not os.access(p, os.R_OK | os.W_OK):
            return StoreError(
                f"{p}: cannot read and write the store ({e}). Fix: give this user read and "
                f"write permission (chmod u+rw {p}), or run as the user who owns it"
            )
        if not os.access(p.parent, os.W_OK):
            return StoreError(
                f"{p}: the folder {p.parent} is not writable ({e}), and SQLite needs its "
                "journal beside the store. Fix: make the folder writable"
            )
        return StoreError(
            f"{p}: not a usable store ({e}): the file is damaged, or not a sysgen store. "
            f"Fix: restore it from a copy; or move it away and run again to start a new store "
            f"(the outputs beside it cannot be proved then: move them away too)"
        )

    def _init_db(self) -> None:
        fix = "Fix: write to a new --out directory, or run the sysgen version that made it."
        try:
            conn = connect(self.path)
        except sqlite3.DatabaseError as e:
            raise self._unusable(e) from e
        try:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if tables and "meta" not in tables:
                raise StoreError(
                    f"{self.path}: an SQLite file that is not a sysgen store. "
                    "Fix: write to a new --out directory, or move the file away"
                )
            conn.executescript(_SCHEMA)
            row = conn.execute("SELECT v FROM meta WHERE k='schema_version'").fetchone()
            if row is None:
                conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) != SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path}: store schema v{int(row[0])}, this version reads v{SCHEMA_VERSION}. {fix}"
                )
        except sqlite3.DatabaseError as e:
            raise self._unusable(e) from e
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
                raise StoreError(
                    f"{self.path}: cannot read the store ({e}). Fix: restore it, or start a new --out"
                ) from e
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

    @property
    def backlog(self) -> int:
        """Writes queued and not yet taken by the writer: callers slow down when it grows."""
        return self._writer.backlog

    # ---- writes (queued to the writer thread) ----
    def _check(self) -> None:
        error = self._writer.error
        if error is not None:
            self._error_raised = True
            raise StoreError(
                f"{self.path}: the store's writer stopped: {describe_failure(error)}. "
                "Everything committed before that is intact."
            ) from error

    def put(self, key: bytes, result: Result) -> None:
        self._check()
        raw = orjson.dumps(result)  # a dataclass: same bytes as Result.to_json, without asdict()
        self._recent[key] = raw
        self._hot.pop(key, None)
        (self._filter or self._key_filter()).add(key)
        self._writer.submit(PutResult(key, raw))

    def finish_item(
        self, key: bytes, value: bytes | None = None, lines: tuple[tuple[str, bytes], ...] = ()
    ) -> None:
        """Mark a work item done and append its output lines to sinks, atomically."""
        self._check()
        self._recent_items.add(key)
        self._writer.submit(FinishItem(key, value, lines))

    def set_meta(self, k: str, v: bytes | str) -> None:
        self._check()
        self._writer.submit(SetMeta(k, v))

    def check_sink(self, name: str, path: str | os.PathLike, *, full: bool = False) -> tuple[int, int]:
        """(committed length, size on disk) of sink `name` at `path` once its bytes are proved to
        be the committed ones (engine/sink_log.py); SinkMismatch, changing nothing, if they are not."""
        path = Path(path)
        if path.is_dir():
            raise SinkMismatch(
                f"{path} is a directory, where the output file belongs. "
                "Fix: move it away, or give another --out"
            )
        try:
            return sink_log.check(self._reader, name, path, full=full)
        except sqlite3.DatabaseError as e:
            raise self._unusable(e) from e

    def add_sink(self, name: str, path: str | os.PathLike) -> int:
        """Register an append-only output file once its committed bytes are proved to be the ones
        this store wrote; cut off what a killed write left after them. Returns the committed length."""
        path = Path(path)
        if self.get_meta(f"swap:{name}"):  # a rewrite committed before its rename: finish it
            finish_swap(path)
            self.set_meta(f"swap:{name}", "")
        else:
            swap_path(path).unlink(missing_ok=True)  # a rewrite that never committed
        known = self.get_meta(f"sink:{name}")
        committed, size = self.check_sink(name, path)
        if size > committed:  # only then: a truncate to the same size would change the file's mtime
            log.warning(
                "%s: %d bytes a stopped run wrote after its last commit are removed", path, size - committed
            )
            with open(path, "ab") as f:
                f.truncate(committed)
        elif not path.exists():
            path.touch()
        stat = sink_log.file_stat(path)
        if known is not None and (self.get_meta(f"sinkstat:{name}") or b"").decode() != stat:
            self.set_meta(f"sinkstat:{name}", stat)  # proved in full just now: the next open need not
        self._writer.submit(OpenSink(name, path))
        if known is None:  # committed before any line is written: the file is then always ours
            self.set_meta(f"sink:{name}", "0")
        self.flush()  # the writer has read the sink's digest before anything is appended
        return committed

    def sink_names(self) -> tuple[str, ...]:
        """Every sink this store has committed a length for (open or not)."""
        try:
            rows = self._reader.execute("SELECT k FROM meta WHERE k LIKE 'sink:%'").fetchall()
        except sqlite3.DatabaseError as e:
            raise self._unusable(e) from e
        return tuple(sorted(k.removeprefix("sink:") for (k,) in rows))

    def drop_lines(
        self, name: str, drop: Callable[[bytes], bool], items: list[bytes], meta_keys: tuple[str, ...] = ()
    ) -> int:
        """Remove the committed lines of sink `name` that `drop` picks and forget the done markers
        `items` (and meta `meta_keys`), atomically: re-opened work items, whose next outcome is
        appended as usual. `drop` runs on the writer thread. Returns the lines removed."""
        self._check()
        op = DropLines(name, drop, items, meta_keys)
        self._writer.submit(op)
        self.flush()  # returns once the writer has done it, or raises what stopped it
        self._recent_items.difference_update(items)
        return op.removed[0]

    def reset_outputs(self, meta_keys: tuple[str, ...] = ()) -> None:
        """Forget every finished item (and meta `meta_keys`) and empty every sink, open or not,
        atomically (the run's configuration changed, or `repair` moved the outputs aside). Stored
        results stay: they are still valid."""
        self._check()
        self._writer.submit(ResetOutputs(self.sink_names(), meta_keys))
        self.flush()
        self._recent_items.clear()

    def flush(self, timeout: float | None = 120) -> None:
        """Commit everything queued so far; raises StoreError if the writer has failed."""
        self._check()
        done = threading.Event()
        self._writer.submit(Flush(done))
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
            self._writer.submit(Close())
            self._writer.join()
        self._reader.close()
        self._lock.release()
        if self._writer.error is not None and not self._error_raised:
            self._check()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
