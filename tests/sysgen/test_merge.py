"""--shard i/N runs merged with `sysgen merge` equal one unsharded run."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

try:
    from tests.sysgen.pipeline_helpers import ids_once, records, run, write_rows
except ImportError:  # tests/sysgen is not a package: pytest put its folder on sys.path
    from pipeline_helpers import ids_once, records, run, write_rows

from engine.store import Store, StoreError
from sysgen.run.merge import merge

REPO = Path(__file__).resolve().parents[2]


def _input(tmp_path: Path) -> Path:
    inp = tmp_path / "in.jsonl"
    rows = write_rows(inp, 60)
    rows[7:7] = [b'{"broken": ', b"[1]"]  # unreadable rows are split between shards too
    inp.write_bytes(b"\n".join(rows) + b"\n")
    return inp


def _by_id(out: Path) -> dict[str, dict]:
    return {r["id"]: r for sink in records(out).values() for r in sink}


def test_shards_merged_equal_an_unsharded_run(tmp_path):
    inp = _input(tmp_path)
    run([inp], tmp_path / "whole")
    shards = []
    for i in range(3):
        shards.append(tmp_path / f"shard{i}")
        run([inp], shards[-1], shard=f"{i}/3")
    sizes = [len(ids_once(s)) for s in shards]
    assert sum(sizes) == 62 and all(sizes)  # disjoint and covering
    st = merge(tmp_path / "merged", shards)
    assert _by_id(tmp_path / "merged") == _by_id(tmp_path / "whole")
    assert st["accounted"] and st["input"] == 62 and st["merge"]["duplicates"] == 0
    whole = sqlite3.connect(tmp_path / "whole" / "store.db")
    assert st["merge"]["stored_results"] == whole.execute("SELECT COUNT(*) FROM results").fetchone()[0]


def test_a_rerun_into_the_merged_directory_is_answered_by_the_store(tmp_path):
    inp = _input(tmp_path)
    shards = [tmp_path / f"shard{i}" for i in range(2)]
    for i, s in enumerate(shards):
        run([inp], s, shard=f"{i}/2")
    merge(tmp_path / "merged", shards)
    counters = run([inp], tmp_path / "merged")
    assert counters["scheduler"]["engine_calls"] == 0 and len(ids_once(tmp_path / "merged")) == 62


def _announce(run_dir: Path, sink: str, start: int, end: int) -> None:
    """What the store's writer commits before it appends bytes [start, end) to a sink."""
    with sqlite3.connect(run_dir / "store.db") as db:
        db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (f"pending:{sink}", f"{start}:{end}"))


def test_merge_skips_duplicate_ids_and_uncommitted_bytes(tmp_path):
    inp = _input(tmp_path)
    shard = tmp_path / "shard0"
    run([inp], shard, shard="0/2")
    committed, n = (shard / "data.jsonl").read_bytes(), len(ids_once(shard))
    with open(shard / "data.jsonl", "ab") as f:  # a kill -9 after the write, before the commit
        f.write(b'{"id": "in:9999", "half written')
    _announce(shard, "data", len(committed), len(committed) + 100)
    st = merge(tmp_path / "merged", [shard, shard], allow_partial=True)  # shard 0/2 twice, 1/2 missing
    assert (tmp_path / "merged" / "data.jsonl").read_bytes() == committed
    assert st["merge"]["duplicates"] == n
    assert not st["accounted"] and any("given twice" in p for p in st["partial"])


@pytest.mark.slow
def test_merge_cli_and_its_errors(tmp_path):
    inp = _input(tmp_path)
    run([inp], tmp_path / "s0", shard="0/2")
    run([inp], tmp_path / "s1", shard="1/2")
    cmd = [
        sys.executable,
        "-m",
        "sysgen",
        "merge",
        str(tmp_path / "m"),
        str(tmp_path / "s0"),
        str(tmp_path / "s1"),
    ]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0 and "accounted=True" in done.stderr
    assert len(ids_once(tmp_path / "m")) == 62
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no data.jsonl or dropped.jsonl"):
        merge(tmp_path / "m2", [tmp_path / "empty"])


def test_a_shard_still_being_written_is_refused_with_its_pid(tmp_path):
    inp = _input(tmp_path)
    run([inp], tmp_path / "s0", shard="0/2")
    run([inp], tmp_path / "s1", shard="1/2")
    running = Store.open(tmp_path / "s1" / "store.db")  # as a shard job that has not finished
    try:
        with pytest.raises(
            StoreError,
            match=rf"s1 is still being written by another sysgen process "
            rf"\(pid {os.getpid()}\)\. Fix: wait",
        ):
            merge(tmp_path / "m", [tmp_path / "s0", tmp_path / "s1"])
        assert not (tmp_path / "m" / "data.jsonl").exists()
    finally:
        running.close()
    merge(tmp_path / "m", [tmp_path / "s0", tmp_path / "s1"])  # once the shard has finished
    assert len(ids_once(tmp_path / "m")) == 62


def test_a_merge_killed_before_its_store_had_tables_is_redone(tmp_path):
    """A merge killed just after it created OUT's store.db (no tables yet) left OUT holding the merge
    marker and an empty database: the next merge is that merge's redo, not a refusal."""
    from sysgen.run.merge import MARKER

    inp = _input(tmp_path)
    shards = [tmp_path / f"shard{i}" for i in range(2)]
    for i, s in enumerate(shards):
        run([inp], s, shard=f"{i}/2")
    out = tmp_path / "merged"
    out.mkdir()
    (out / MARKER).write_bytes(b"written by sysgen merge\n")
    sqlite3.connect(out / "store.db").execute("PRAGMA user_version=0").connection.close()
    assert (out / "store.db").exists()
    st = merge(out, shards)
    assert st["accounted"] and st["input"] == 62 and len(ids_once(out)) == 62
