"""Checks of a `sysgen run` command that need the file system, done before the store is opened
(so before anything in --out is created, truncated or emptied).

An input that is one of the run's own output files would be emptied before it is read (the store
cuts a sink back to its committed length) or, on a re-run of `run data/*.jsonl --out data`, read
while it is appended to. Such an input is left out, with a warning, when --out already holds a
sysgen run (the shell's glob picked up its outputs) and other inputs remain; otherwise refused.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

SINK_FILES = ("data.jsonl", "dropped.jsonl")
STORE_FILES = ("store.db", "store.db-wal", "store.db-shm", "store.db.lock", "stats.json")


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop (Python < 3.13); preflight names it
        return False


def check_out(out: Path) -> None:
    """ValueError naming the path and the fix when --out cannot hold a run's outputs."""
    if out.exists() and not out.is_dir():
        raise ValueError(
            f"--out {out} is an existing file, not a directory. Fix: give a directory "
            "(it is created if missing)"
        )
    for name in SINK_FILES:
        if (out / name).is_dir():
            raise ValueError(
                f"{out / name} is a directory, where the run writes its output file. "
                "Fix: move it away, or give another --out"
            )
    if out.is_dir() and not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(
            f"--out {out} is not writable (the run keeps its store and outputs there). "
            "Fix: give a writable directory, or fix its permissions"
        )


def own_outputs_left_out(inputs: tuple[str, ...], out: Path) -> list[str]:
    """The inputs without those that are this run's outputs (with a warning), or ValueError naming
    the path and the fix."""
    is_run = (out / "store.db").exists()
    keep: list[str] = []
    for p in inputs:
        path = Path(p)
        if any(_same(path, out / name) for name in STORE_FILES):
            raise ValueError(
                f"input {p} is a file of the run's own state in --out {out}. "
                "Fix: pass only data files as inputs"
            )
        sink = next((name for name in SINK_FILES if _same(path, out / name)), None)
        if sink is None:
            keep.append(p)
            continue
        if not is_run:
            raise ValueError(
                f"input {p} is where this run writes its {sink} (--out {out}), so it would "
                "be overwritten before it is read. Fix: give another --out, or move the input"
            )
        print(
            f"sysgen: warning: input {p} is this run's own output (--out {out}): left out of the inputs",
            file=sys.stderr,
        )
    if not keep:
        raise ValueError(
            f"every input is one of this run's outputs in {out}. "
            "Fix: pass the data files the run was made from"
        )
    return keep


def check_no_foreign_outputs(out: Path) -> None:
    """ValueError when --out holds output files but no store: the store would cut them to nothing,
    and it never empties a file it did not write."""
    if (out / "store.db").exists():
        return
    for name in SINK_FILES:
        size = (out / name).stat().st_size if (out / name).is_file() else 0
        if size:
            raise ValueError(
                f"{out / name} holds {size:,} bytes but {out} has no store.db (deleted, or "
                "not a sysgen run), so the run would empty it. Fix: move the file away to keep "
                "it (or delete it to start over), or give another --out"
            )
