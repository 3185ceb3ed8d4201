"""The finishing job (`sysgen slurm --finish RUN_DIR`, run by Slurm after every array task ended):
merge into RUN/merged only when every shard is a finished `--shard i/N` run of this submission, then
write the report and the export; otherwise record which shards to resubmit, and how."""

from __future__ import annotations

import time
from pathlib import Path

import orjson

from engine.store import StoreError
from sysgen.run.merge import merge, shard_problems
from sysgen.slurm import settings
from sysgen.slurm.status import FINISH, MERGED


def unfinished_shards(run_dir: Path, n: int) -> tuple[list[int], list[str]]:
    """(shards that are not finished runs, what is wrong with each). Call only when no task runs:
    it opens the shards' stores (read-only)."""
    bad, why = [], []
    for i in range(n):
        d = run_dir / "shards" / str(i)
        if not (d / "data.jsonl").exists() and not (d / "dropped.jsonl").exists():
            bad.append(i)
            why.append(f"shard {i} has no outputs (never ran)")
            continue
        own = [p for p in shard_problems([d])[0] if p.startswith(str(d))]
        if own:
            bad.append(i)
            why += own
    return bad, why


def _record(run_dir: Path, rec: dict) -> None:
    tmp = run_dir / (FINISH + ".tmp")
    tmp.write_bytes(orjson.dumps({**rec, "at": time.time()}, option=orjson.OPT_INDENT_2))
    tmp.replace(run_dir / FINISH)


def finish(run_dir: Path) -> int:
    """0 when merged, reported and exported; 1 when shards must be resubmitted first."""
    from sysgen.cli import main

    s = settings.load(run_dir)
    if s is None:
        print(f"sysgen slurm --finish: error: {run_dir} has no {settings.FILE}")
        return 2
    bad, why = unfinished_shards(run_dir, s.shards)
    dirs = [run_dir / "shards" / str(i) for i in range(s.shards)]
    if not bad:
        why = shard_problems(dirs)[0]  # the shards together: one N, the same settings and inputs
    if bad or why:
        resubmit = f"sysgen slurm --resubmit {run_dir}"
        msg = (
            f"not merged: {len(bad)} of {s.shards} shards unfinished ({', '.join(map(str, bad))}): "
            f"{'; '.join(why)}. Fix: {resubmit} (runs only those shards, each resuming from its store, "
            "then this finishing job again)"
        )
        _record(
            run_dir,
            {"merged": False, "unfinished": bad, "problems": why, "resubmit": resubmit, "message": msg},
        )
        print(f"sysgen slurm: {msg}")
        return 1
    out = run_dir / MERGED
    try:
        st = merge(out, dirs)
    except (ValueError, StoreError, OSError) as e:  # e.g. a shard still locked, a full disk
        msg = f"merge into {out} failed: {e}. Fix the cause, then: sysgen slurm --finish {run_dir}"
        _record(run_dir, {"merged": False, "unfinished": [], "problems": [str(e)], "message": msg})
        print(f"sysgen slurm: {msg}")
        return 1
    m = st["merge"]
    msg = (
        f"merged {s.shards} shards into {out}: {m['data']:,} kept, {m['dropped']:,} dropped, "
        f"{m['duplicates']:,} duplicate ids, accounted={st['accounted']}"
    )
    print(f"sysgen slurm: {msg}", flush=True)
    codes = {"report": main(["report", str(out)]), "export": main(["export", str(out)])}
    _record(
        run_dir,
        {
            "merged": True,
            "path": str(out),
            "message": msg,
            "kept": m["data"],
            "dropped": m["dropped"],
            "duplicates": m["duplicates"],
            "accounted": st["accounted"],
            "exit_codes": codes,
        },
    )
    return 0 if not any(codes.values()) else 1
