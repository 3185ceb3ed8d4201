"""`sysgen merge OUT DIR...`: combine the output directories of `--shard i/N` runs into one.

data.jsonl and dropped.jsonl are concatenated, each id once (a kept record wins over a drop of
the same id); only the bytes each shard's store committed are read, so a shard killed mid-write
contributes no half line. The stores' results are merged with INSERT OR IGNORE, so a later
`sysgen run` over the same inputs into OUT answers every request from the store. stats.json is
recomputed from the merged files.

Before anything is written, every shard must be a finished `--shard i/N` run, 0..N-1 each present
once, with one N and the same settings, inputs and limit; otherwise the merge is refused with the
list of problems (`--allow-partial` merges anyway and marks stats.json and the report partial).
OUT must be new, empty or an earlier merge's output (marked by MARKER, written first): a shard's
directory given as OUT by mistake is refused, not replaced.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import xxhash

from engine import sink_log
from engine.store import SCHEMA_VERSION, SinkMismatch, Store, StoreError, describe_failure
from engine.store_lock import StoreLock, StoreLocked
from sysgen.run import stats

log = logging.getLogger(__name__)
SINKS = ("data", "dropped")
MARKER = ".sysgen-merge"  # in OUT: written before anything else, so a killed merge can be redone


def _committed_length(shard: Path, sink: str) -> int | None:
    """The sink length the shard's store committed, once the file's bytes are proved to be the ones
    it committed (engine/sink_log.py, in full), or None without a store (read it all)."""
    db = shard / "store.db"
    if not db.exists():
        return None
    try:
        return sink_log.check_file(db, sink, shard / f"{sink}.jsonl")
    except sqlite3.DatabaseError as e:
        raise StoreError(f"{db}: not a readable store ({e}). Fix: merge only sysgen output dirs") from e
    except SinkMismatch as e:
        raise SinkMismatch(f"shard {shard}: {e}; then run that shard's command again and merge") from None


def _lines(path: Path, limit: int | None) -> Iterator[bytes]:
    if not path.exists():
        return
    left = limit if limit is not None else os.path.getsize(path)
    with open(path, "rb", buffering=1 << 20) as f:
        for line in f:
            if left <= 0:
                return
            line = line[:left]
            left -= len(line)
            if not line.endswith(b"\n"):
                log.warning("%s: last line is incomplete (the run was cut off); skipped", path)
                return
            yield line


def _merge_sinks(
    out: Path,
    shards: list[Path],
    limits: dict[tuple[Path, str], int | None],
) -> tuple[dict[str, int], dict[str, tuple[bytes, str]]]:
    """Write OUT's sinks from the proved bytes of each shard's (`limits`); returns the counts and
    each sink's (digest, file stat) for OUT's store."""
    digests: dict[str, tuple[bytes, str]] = {}
    seen: set[int] = set()  # 128-bit hashes of ids: ~50 bytes an instance, not the records
    counts = {"duplicates": 0}
    for sink in SINKS:  # data first: a kept record wins over a drop of the same id
        tmp = out / f"{sink}.jsonl.merging"
        n = 0
        digest = sink_log.hasher(sink_log.ZERO)  # OUT's store vouches for each merged file as one segment
        try:
            with open(tmp, "wb", buffering=1 << 20) as w:
                for shard in shards:
                    for line in _lines(shard / f"{sink}.jsonl", limits[shard, sink]):
                        h = xxhash.xxh3_128_intdigest(orjson.loads(line)["id"].encode())
                        if h in seen:
                            counts["duplicates"] += 1
                            continue
                        seen.add(h)
                        w.write(line)
                        digest.update(line)
                        n += 1
                w.flush()
                os.fsync(w.fileno())
                counts[f"{sink}_bytes"] = w.tell()
                digests[sink] = (digest.digest(), sink_log.file_stat(w.fileno()))
        except BaseException:
            tmp.unlink(missing_ok=True)  # e.g. a full disk: give the space back
            raise
        tmp.replace(out / f"{sink}.jsonl")
        counts[sink] = n
    return counts, digests


def _check_schema(db: Path) -> None:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT v FROM meta WHERE k='schema_version'").fetchone()
    except sqlite3.DatabaseError as e:
        raise StoreError(f"{db}: not a sysgen store ({e}). Fix: merge only sysgen output directories") from e
    finally:
        conn.close()
    if row is None or int(row[0]) != SCHEMA_VERSION:
        found = row[0] if row else "?"
        raise StoreError(
            f"{db}: store schema v{found}, this version reads v{SCHEMA_VERSION}. "
            "Fix: merge with the sysgen version that wrote the shards"
        )


def _merge_stores(
    out: Path, shards: list[Path], counts: dict[str, int], digests: dict[str, tuple[bytes, str]]
) -> int:
    dbs = [s / "store.db" for s in shards if (s / "store.db").exists()]
    for db in dbs:
        _check_schema(db)
    with Store.open(out / "store.db"):
        pass  # creates the schema
    conn = sqlite3.connect(out / "store.db", isolation_level=None)
    try:
        for db in dbs:
            conn.execute("ATTACH DATABASE ? AS shard", (f"file:{db}?mode=ro",))
            conn.execute("BEGIN")
            conn.execute(
                "INSERT OR IGNORE INTO results(key, value) SELECT key, value FROM shard.results ORDER BY id"
            )
            conn.execute("COMMIT")
            conn.execute("DETACH DATABASE shard")
        # The merged files' lengths, so the store knows them (a run into OUT then starts them afresh,
        # and OUT can be merged again).
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT OR REPLACE INTO meta(k, v) VALUES (?, ?)",
            [(f"sink:{s}", str(counts[f"{s}_bytes"])) for s in SINKS]
            + [(f"sinkstat:{s}", digests[s][1]) for s in SINKS]
            + [("merge", "1")],
        )
        conn.executemany(
            "INSERT OR REPLACE INTO sink_log VALUES (?, ?, ?)",
            [(s, counts[f"{s}_bytes"], digests[s][0]) for s in SINKS if counts[f"{s}_bytes"]],
        )
        conn.execute("COMMIT")
        return conn.execute("SELECT COUNT(*) FROM results").fetchone()[0]
    finally:
        conn.close()


def _lock(db: Path, what: str) -> StoreLock:
    lock = StoreLock(db)
    try:
        lock.acquire()
    except StoreLocked as e:
        raise StoreError(
            f"{db.parent} is {what} by another sysgen process (pid {e.holder}). "
            "Fix: wait for it to finish, or stop it (it resumes later), then merge"
        ) from None
    return lock


def _meta(shard: Path, key: str) -> bytes | None:
    db = shard / "store.db"
    if not db.exists():
        return None
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT v FROM meta WHERE k=?", (key,)).fetchone()
    except sqlite3.DatabaseError as e:
        raise StoreError(f"{db}: not a readable store ({e}). Fix: merge only sysgen output dirs") from e
    finally:
        conn.close()
    return None if row is None else (row[0] if isinstance(row[0], bytes) else str(row[0]).encode())


def shard_problems(dirs: list[Path]) -> tuple[list[str], int | None]:
    """(what makes this set of shards incomplete or inconsistent, the rows the shards read in
    all, None when not known for every shard)."""
    problems: list[str] = []
    infos: list[tuple[Path, dict]] = []
    for d in dirs:
        raw = _meta(d, "run")
        if raw is None:
            problems.append(f"{d} has no record of a sysgen run (no store.db, or an older sysgen)")
        else:
            infos.append((d, orjson.loads(raw)))
    for d, info in infos:
        if not info.get("finished"):
            problems.append(
                f"{d} is unfinished (interrupted, or still running): resume it with its own command first"
            )
    sharded = [(d, info) for d, info in infos if info.get("shard")]
    problems += [f"{d} is not a --shard i/N run" for d, info in infos if not info.get("shard")]
    if sharded:
        first, ref = sharded[0]
        ns = {info["shard"][1] for _, info in sharded}
        if len(ns) > 1:
            problems.append(
                "shards of different N: "
                + ", ".join(f"{d} is {i['shard'][0]}/{i['shard'][1]}" for d, i in sharded)
            )
        for key, what in (("settings", "run settings"), ("inputs", "inputs"), ("limit", "--limit")):
            for d, info in sharded:
                if info.get(key) != ref.get(key):
                    problems.append(f"{d} has other {what} than {first}")
        if len(ns) == 1:
            n = ns.pop()
            seen: dict[int, Path] = {}
            for d, info in sharded:
                i = info["shard"][0]
                if i in seen:
                    problems.append(f"shard {i}/{n} given twice ({seen[i]} and {d})")
                seen[i] = d
            missing = sorted(set(range(n)) - seen.keys())
            if missing:
                problems.append(
                    f"shard{'s' if len(missing) > 1 else ''} {', '.join(f'{i}/{n}' for i in missing)} missing"
                )
    rows = [info.get("rows_read") for _, info in infos]
    total = sum(rows) if len(infos) == len(dirs) and all(r is not None for r in rows) else None
    return problems, total


def _merge_made(out: Path) -> bool:
    """OUT (holding the merge marker) holds no run's store: none, one without a fingerprint, or one a
    killed merge left before its tables were made (a merge starts OUT's store afresh anyway)."""
    try:
        return _meta(out, "fingerprint") is None
    except StoreError:
        return True


def _check_out(out: Path) -> None:
    """OUT must be new, empty, or an earlier merge's output: never a run's own directory."""
    if out.exists() and not out.is_dir():
        raise ValueError(
            f"OUT {out} is an existing file. Fix: name a new directory as OUT (the first argument)"
        )
    if not out.is_dir():
        return
    held = [n for n in ("store.db", "data.jsonl", "dropped.jsonl") if (out / n).exists()]
    if (out / MARKER).exists() and _merge_made(out):
        return  # an earlier merge's output (that no run has written into since)
    if held:
        raise ValueError(
            f"OUT {out} holds a sysgen run ({', '.join(held)}), which a merge would replace. "
            f"Fix: name a new directory first: sysgen merge MERGED {out} ..."
        )


def merge(out: str | os.PathLike, shards: list[str | os.PathLike], allow_partial: bool = False) -> dict:
    """Merge shard output directories into `out` (created if needed, its outputs replaced).
    Returns the stats.json written."""
    out, dirs = Path(out), [Path(s) for s in shards]
    for d in dirs:
        if not (d / "data.jsonl").exists() and not (d / "dropped.jsonl").exists():
            raise ValueError(
                f"{d}: no data.jsonl or dropped.jsonl. Fix: pass the --out directories of the shard runs"
            )
        if d.resolve() == out.resolve():
            raise ValueError(f"{d}: is the merge output too. Fix: merge into a new directory")
    _check_out(out)
    problems, rows_read = shard_problems(dirs)
    if problems and not allow_partial:
        raise ValueError(
            "refused, the shards are not one complete run: "
            + "; ".join(problems)
            + ". Fix: finish or add the missing shards, or pass --allow-partial to merge anyway "
            "(marked partial in stats.json)"
        )
    out.mkdir(parents=True, exist_ok=True)
    with open(out / MARKER, "wb") as f:
        f.write(b"written by sysgen merge; this directory may be merged into again\n")
        os.fsync(f.fileno())
    # A shard still being written would merge half-done (and its stats could not tell); OUT in use
    # by a run would lose its store under it. Both are refused, naming the process.
    with contextlib.ExitStack() as shard_locks:
        for d in {d.resolve(): d for d in dirs if (d / "store.db").exists()}.values():
            shard_locks.callback(_lock(d / "store.db", "still being written").release)
        # Every shard's outputs proved against its store before OUT is touched.
        limits = {(d, s): _committed_length(d, s) for d in dirs for s in SINKS}
        out_lock = _lock(out / "store.db", "in use")
        try:
            if (out / "store.db").exists():  # a merge replaces OUT's outputs: start its store afresh too
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{out / 'store.db'}{suffix}").unlink(missing_ok=True)
            counts, digests = _merge_sinks(out, dirs, limits)
        finally:
            out_lock.release()  # _merge_stores opens OUT as a Store, which takes the lock itself
        results = _merge_stores(out, dirs, counts, digests)
    extra = {"merged_from": [str(d) for d in dirs], "merge": {**counts, "stored_results": results}}
    if problems:
        extra["partial"] = problems
    return stats.write(out, extra, rows_read=None if problems else rows_read, partial=bool(problems))


def cmd_merge(args: argparse.Namespace) -> int:
    try:
        st = merge(args.out, args.shards, allow_partial=args.allow_partial)
    except (ValueError, StoreError) as e:
        print(f"sysgen merge: error: {e}", file=sys.stderr)
        return 2
    except (OSError, sqlite3.Error) as e:  # e.g. a full disk: OUT is incomplete, the shards untouched
        print(
            f"sysgen merge: error: writing {args.out} failed: {describe_failure(e)}. The shards are "
            "untouched. Fix: free space (or fix the cause) and run the same merge again",
            file=sys.stderr,
        )
        return 1
    m = st["merge"]
    print(
        f"sysgen merge: {len(args.shards)} shards → {args.out}: {m['data']:,} kept, "
        f"{m['dropped']:,} dropped, "
        f"{m['duplicates']:,} duplicate ids skipped, {m['stored_results']:,} stored results; "
        f"accounted={st['accounted']}",
        file=sys.stderr,
    )
    if st.get("partial"):
        print(
            f"sysgen merge: WARNING: PARTIAL merge (--allow-partial): {'; '.join(st['partial'])}",
            file=sys.stderr,
        )
    return 0


def add_merge_parser(sub) -> None:
    p = sub.add_parser(
        "merge",
        help="combine the output directories of --shard runs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("out", help="merged output directory")
    p.add_argument("shards", nargs="+", help="the --out directories of the shard runs")
    p.add_argument(
        "--allow-partial",
        action="store_true",
        help="merge even unfinished, missing or mismatched shards (marked partial in stats.json)",
    )
    p.set_defaults(func=cmd_merge)
