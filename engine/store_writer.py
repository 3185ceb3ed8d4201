"""One batch of the store's writes: sink lines appended and synced, then one SQLite transaction
with the results, the items and the new sink lengths. Runs on the store's writer thread."""

from __future__ import annotations

import os
import sqlite3
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    from engine.store import Store

Op = tuple  # ("r", key, value) | ("i", key, value, ((sink, line), ...)) | ("m", k, v)

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


def commit_batch(conn: sqlite3.Connection, ops: list[Op], files: dict[str, BinaryIO], store: Store) -> None:
    """Write `ops` durably. Raises on any failure; the caller then stops writing for good, and
    lines written past the last committed sink length are cut off at the next open."""
    if not ops:
        return
    results: dict[bytes, bytes] = {}
    items: list[tuple[bytes, bytes | None]] = []
    metas: list[tuple[str, bytes | str]] = []
    chunks: dict[str, list[bytes]] = defaultdict(list)
    for op in ops:
        kind = op[0]
        if kind == "r":
            results[op[1]] = op[2]
        elif kind == "i":
            items.append((op[1], op[2]))
            for name, line in op[3]:
                chunks[name].append(line)
        else:
            metas.append((op[1], op[2]))
    for name, parts in chunks.items():
        f = files[name]
        f.write(b"".join(parts))
        f.flush()
        os.fsync(f.fileno())  # the lines must be on disk before the length that covers them
        metas.append((f"sink:{name}", str(f.tell())))
    try:
        conn.execute("BEGIN")
        # Sorted keys walk the index in order: neighbouring inserts share B-tree pages.
        _insert_rows(conn, "INSERT INTO results(key, value)",
                     "ON CONFLICT(key) DO UPDATE SET value=excluded.value", sorted(results.items()))
        _insert_rows(conn, "INSERT OR IGNORE INTO items(key, value)", "", items)
        conn.executemany("INSERT OR REPLACE INTO meta(k, v) VALUES (?, ?)", metas)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
        raise
    store.commits += 1
    recent, recent_items = store._recent, store._recent_items
    for key, raw in results.items():
        if recent.get(key) is raw:  # a newer put of the same key stays visible until its commit
            recent.pop(key, None)
    for key, _ in items:
        recent_items.discard(key)


def swap_path(path: Path) -> Path:
    return path.with_name(path.name + ".rewrite")


def rewrite_sink(conn: sqlite3.Connection, files: dict[str, BinaryIO], name: str, path: Path,
                 drop: Callable[[bytes], bool], items: list[bytes], meta_keys: tuple[str, ...]) -> int:
    """Remove the lines `drop` picks from sink `name`, forget the done markers `items` and the
    meta keys, as one step: the filtered copy is written and synced first, then one transaction
    records its length and a swap:NAME mark, then the copy replaces the file. A crash before the
    commit leaves the old file (the copy is discarded at the next open); after it, the next open
    finishes the rename (Store.add_sink). Returns the number of lines removed."""
    f = files[name]
    committed = f.tell()  # the writer commits before calling: the file is exactly its committed bytes
    tmp = swap_path(path)
    removed = 0
    with open(path, "rb") as src, open(tmp, "wb") as dst:
        left = committed
        for line in src:
            if left <= 0:
                break
            line = line[:left]
            left -= len(line)
            if drop(line):
                removed += 1
            else:
                dst.write(line)
        dst.flush()
        os.fsync(dst.fileno())
        length = dst.tell()
    conn.execute("BEGIN")
    try:
        conn.executemany("DELETE FROM items WHERE key=?", [(k,) for k in items])
        conn.executemany("DELETE FROM meta WHERE k=?", [(k,) for k in meta_keys])
        conn.executemany("INSERT OR REPLACE INTO meta(k, v) VALUES (?, ?)",
                         [(f"sink:{name}", str(length)), (f"swap:{name}", tmp.name)])
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    f.close()
    finish_swap(path)
    files[name] = open(path, "ab")  # noqa: SIM115 - owned by the writer thread until it exits
    conn.execute("DELETE FROM meta WHERE k=?", (f"swap:{name}",))
    return removed


def finish_swap(path: Path) -> None:
    tmp = swap_path(path)
    if tmp.exists():
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)  # the rename itself must survive a power cut before swap:NAME is cleared
        finally:
            os.close(dfd)
