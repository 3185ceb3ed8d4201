"""`sysgen repair DIR`: when an output file is not what its store committed (edited by hand, cut,
or store.db copied from another run), move it aside and let the next `sysgen run` rebuild it.

Nothing is deleted: each output the store cannot prove it wrote is renamed NAME.jsonl.unverified
(then .unverified.1, ...). The store then forgets which items are done and where the run stood, in
one commit; its stored results stay, so the same `sysgen run` command rebuilds data.jsonl and
dropped.jsonl answering every request it holds without the engine (requests it does not hold, as
after a store.db of another run, go to the engine). Outputs that check out are left alone.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from engine.store import SinkMismatch, Store, StoreError

# Where a run re-reads its inputs from: forgotten with the done markers, so the rebuild starts at row 1.
RUN_POSITION = ("watermark",)


def _aside(path: Path) -> Path:
    aside = path.with_name(path.name + ".unverified")
    n = 0
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.unverified.{n}")
    return aside


def repair(run_dir: str | os.PathLike) -> list[tuple[Path, Path | None, str]]:
    """Check every output of `run_dir` against its store, in full; move the ones that fail aside
    and reset the store's outputs. Returns (output, where it went or None if missing, why)."""
    run_dir = Path(run_dir)
    db = run_dir / "store.db"
    if not db.is_file():
        raise ValueError(
            f"{db} does not exist: without its store a run's outputs cannot be checked or "
            "rebuilt. Fix: pass the --out directory of a sysgen run"
        )
    moved: list[tuple[Path, Path | None, str]] = []
    with Store.open(db) as store:
        for name in store.sink_names():
            path = run_dir / f"{name}.jsonl"
            try:
                store.check_sink(name, path, full=True)
            except SinkMismatch as e:
                aside = _aside(path) if path.exists() else None
                if aside is not None:
                    os.replace(path, aside)
                moved.append((path, aside, str(e).partition(" Fix:")[0]))
        if moved:  # after the renames: a crash between leaves a missing file, which repair handles again
            store.reset_outputs(meta_keys=RUN_POSITION)
    return moved


def cmd_repair(args: argparse.Namespace) -> int:
    try:
        moved = repair(args.dir)
    except (ValueError, StoreError) as e:
        print(f"sysgen repair: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(
            f"sysgen repair: error: {e.filename or args.dir}: {e.strerror or e}. Nothing was changed in "
            "the store. Fix: the cause (permissions, disk space), then run repair again",
            file=sys.stderr,
        )
        return 2
    if not moved:
        print(
            f"sysgen repair: {args.dir}: every output is what its store committed; nothing to do",
            file=sys.stderr,
        )
        return 0
    for path, aside, why in moved:
        where = f"moved to {aside.name}" if aside else "missing"
        print(f"sysgen repair: {path.name}: {where} ({why})", file=sys.stderr)
    print(
        f"sysgen repair: {args.dir}: now run the same `sysgen run` command again: it rebuilds the outputs, "
        "answering every request its store holds without the engine",
        file=sys.stderr,
    )
    return 0


def add_repair_parser(sub) -> None:
    p = sub.add_parser(
        "repair",
        help="move outputs that do not match their store aside, to be rebuilt",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("dir", help="the --out directory of a sysgen run")
    p.set_defaults(func=cmd_repair)
