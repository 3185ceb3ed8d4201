"""Content-addressed checkpoint store: results by request key, finished work items, and
exactly-once append-only output files ("sinks").

One SQLite file in WAL mode. All writes go through one writer thread fed by a queue and are
committed in batches. Lines for the sinks are written by that same thread inside the batch, and
the byte length of every sink is committed in the same transaction as the results and items that
produced those lines. On open, each sink is truncated back to its committed length, so a crash at
any moment loses only uncommitted work and never leaves a line twice or half a line.
"""

from __future__ import annotations

import os
import queue
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from engine.request import Result

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v BLOB);
CREATE TABLE IF NOT EXISTS results (id INTEGER PRIMARY KEY, key BLOB NOT NULL UNIQUE, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY, key BLOB NOT NULL UNIQUE, value BLOB);
"""


class StoreError(RuntimeError):
    """The store cannot be used (schema mismatch, disk full, corrupt sink). The run stops cleanly."""


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=60)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA cache_size=-65536")
    return conn


class Store:
    """Open with `Store.open(path)`; use as a context manager or call `close()`."""

    def __init__(self, path: Path, *, commit_every: int = 2000, commit_interval_s: float = 0.5) -> None:
        self.path = Path(path)
        self.commit_every = commit_every
        self.commit_interval_s = commit_interval_s
        self._init_db()
        self._reader = _connect(self.path)
        self._sinks: dict[str, Path] = {}
        self._recent: dict[bytes, bytes] = {}  # put but not yet committed: still visible to get()
        self._recent_items: set[bytes] = set()
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._writer = threading.Thread(target=self._write_loop, name="sysgen-store-writer", daemon=True)
        self._writer.start()
        self.commits = 0

    @classmethod
    def open(cls, path: str | os.PathLike, **kw) -> Store:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return cls(path, **kw)

    def _init_db(self) -> None:
        conn = _connect(self.path)
        try:
            conn.executescript(_SCHEMA)
            row = conn.execute("SELECT v FROM meta WHERE k='schema_version'").fetchone()
            if row is None:
                conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) != SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path}: store schema v{int(row[0])}, this sysgen reads v{SCHEMA_VERSION}. "
                    "Fix: write to a new --out directory, or run the sysgen version that made it."
                )
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path}: not a usable sysgen store ({e}). Fix: use a new --out directory.") from e
        finally:
            conn.close()

    # ---- reads (caller's thread) ----
    def get(self, key: bytes) -> Result | None:
        raw = self._recent.get(key)
        if raw is None:
            row = self._reader.execute("SELECT value FROM results WHERE key=?", (key,)).fetchone()
            if row is None:
                return None
            raw = row[0]
        return Result.from_json(raw)

    def has_item(self, key: bytes) -> bool:
        if key in self._recent_items:
            return True
        return self._reader.execute("SELECT 1 FROM items WHERE key=?", (key,)).fetchone() is not None

    def get_meta(self, k: str) -> bytes | None:
        row = self._reader.execute("SELECT v FROM meta WHERE k=?", (k,)).fetchone()
        return None if row is None else (row[0] if isinstance(row[0], bytes) else str(row[0]).encode())

    def count(self, table: str = "results") -> int:
        if table not in ("results", "items"):
            raise ValueError(table)
        return self._reader.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]

    def iter_results(self) -> Iterator[tuple[bytes, Result]]:
        for key, raw in self._reader.execute("SELECT key, value FROM results ORDER BY id"):
            yield key, Result.from_json(raw)

    # ---- writes (queued to the writer thread) ----
    def _check(self) -> None:
        if self._error is not None:
            raise StoreError(f"{self.path}: store writer failed: {self._error}") from self._error

    def put(self, key: bytes, result: Result) -> None:
        self._check()
        raw = result.to_json()
        self._recent[key] = raw
        self._q.put(("r", key, raw))

    def finish_item(self, key: bytes, value: bytes | None = None, lines: Iterable[tuple[str, bytes]] = ()) -> None:
        """Mark a work item done and append its output lines to sinks, atomically."""
        self._check()
        self._recent_items.add(key)
        self._q.put(("i", key, value, tuple(lines)))

    def set_meta(self, k: str, v: bytes | str) -> None:
        self._check()
        self._q.put(("m", k, v))

    def add_sink(self, name: str, path: str | os.PathLike) -> int:
        """Register an append-only output file; cut it back to its committed length. Returns that length."""
        path = Path(path)
        committed = int(self.get_meta(f"sink:{name}") or 0)
        size = path.stat().st_size if path.exists() else 0
        if size < committed:
            raise StoreError(
                f"{path}: {size} bytes on disk but {committed} were committed; the file was truncated or "
                "replaced outside sysgen. Fix: restore it, or delete the --out directory to start over."
            )
        with open(path, "ab") as f:
            f.truncate(committed)
        self._sinks[name] = path
        self._q.put(("s", name, path))
        return committed

    def reset_sinks(self) -> None:
        """Empty every registered sink (used when the run's configuration changed)."""
        for name in list(self._sinks):
            self._q.put(("t", name))
        self.flush()

    def flush(self, timeout: float | None = 60) -> None:
        self._check()
        done = threading.Event()
        self._q.put(("f", done))
        if not done.wait(timeout):
            raise StoreError(f"{self.path}: store flush did not finish in {timeout}s")
        self._check()

    def close(self) -> None:
        if self._writer.is_alive():
            self._q.put(("c",))
            self._writer.join()
        self._reader.close()
        self._check()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the writer thread ----
    def _write_loop(self) -> None:
        conn = _connect(self.path)
        files: dict[str, object] = {}
        sizes: dict[str, int] = {}
        pending: list[tuple] = []
        waiters: list[threading.Event] = []
        last = time.monotonic()
        closing = False
        try:
            while not closing:
                try:
                    op = self._q.get(timeout=self.commit_interval_s)
                except queue.Empty:
                    op = None
                if op is not None:
                    kind = op[0]
                    if kind == "s":
                        files[op[1]] = open(op[2], "ab")  # noqa: SIM115 - owned by this thread
                        sizes[op[1]] = files[op[1]].tell()
                        continue
                    if kind == "t":
                        files[op[1]].truncate(0)
                        files[op[1]].seek(0)
                        sizes[op[1]] = 0
                        pending.append(("m", f"sink:{op[1]}", "0"))
                    elif kind == "f":
                        waiters.append(op[1])
                    elif kind == "c":
                        closing = True
                    else:
                        pending.append(op)
                due = len(pending) >= self.commit_every or time.monotonic() - last >= self.commit_interval_s
                if pending and (due or waiters or closing):
                    self._commit(conn, pending, files, sizes)
                    pending = []
                    last = time.monotonic()
                for w in waiters:
                    w.set()
                waiters = []
        except BaseException as e:  # disk full, I/O error: stop accepting work, keep what was committed
            self._error = e
            for w in waiters:
                w.set()
            while True:  # release anyone waiting on a flush queued after the failure
                try:
                    op = self._q.get_nowait()
                except queue.Empty:
                    break
                if op[0] == "f":
                    op[1].set()
        finally:
            for f in files.values():
                f.close()
            conn.close()

    def _commit(self, conn: sqlite3.Connection, ops: list[tuple], files: dict, sizes: dict) -> None:
        results = [(op[1], op[2]) for op in ops if op[0] == "r"]
        items = [(op[1], op[2]) for op in ops if op[0] == "i"]
        metas = [(op[1], op[2]) for op in ops if op[0] == "m"]
        touched = set()
        for op in ops:
            if op[0] == "i":
                for name, line in op[3]:
                    files[name].write(line)
                    sizes[name] += len(line)
                    touched.add(name)
        for name in touched:
            files[name].flush()
            os.fsync(files[name].fileno())
            metas.append((f"sink:{name}", str(sizes[name])))
        try:
            conn.execute("BEGIN")
            conn.executemany("INSERT OR IGNORE INTO results(key, value) VALUES (?, ?)", results)
            conn.executemany("INSERT OR IGNORE INTO items(key, value) VALUES (?, ?)", items)
            conn.executemany("INSERT OR REPLACE INTO meta(k, v) VALUES (?, ?)", metas)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self.commits += 1
        for key, _ in results:
            self._recent.pop(key, None)
        for key, _ in items:
            self._recent_items.discard(key)
