"""What an adversarial trial broke (issue 13): ordinary things done around a run must never lose
data, and every error is one line, given before anything in --out is touched."""

from __future__ import annotations

import json
import os
from pathlib import Path

import orjson
import pytest

try:
    from tests.sysgen.pipeline_helpers import ids_once, records, write_rows
except ImportError:  # tests/sysgen is not a package: pytest put its folder on sys.path
    from pipeline_helpers import ids_once, records, write_rows

from sysgen.cli import main

STANDIN = ["--engine", "standin", "--no-progress", "--no-report"]


def sg(inputs, out: Path, *extra: str) -> int:
    return main(["run", *(str(p) for p in inputs), "--out", str(out), *STANDIN, *extra])


def snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file() and p.suffix == ".jsonl"}


# ---- 1, 2: inputs that are the run's own outputs ----


def test_an_input_named_like_a_sink_inside_out_is_refused_and_left_intact(tmp_path, capsys):
    t = tmp_path / "t"
    t.mkdir()
    rows = write_rows(t / "data.jsonl", 5)
    assert sg([t / "data.jsonl"], t) == 2
    err = capsys.readouterr().err
    assert "where this run writes its data.jsonl" in err and "Traceback" not in err
    assert (t / "data.jsonl").read_bytes() == b"\n".join(rows) + b"\n"


def test_a_foreign_file_named_like_a_sink_is_never_truncated(tmp_path, capsys):
    write_rows(tmp_path / "in.jsonl", 3)
    out = tmp_path / "out"
    out.mkdir()
    (out / "dropped.jsonl").write_bytes(b"someone else's file\n")
    assert sg([tmp_path / "in.jsonl"], out) == 2
    assert "has no store.db" in capsys.readouterr().err
    assert (out / "dropped.jsonl").read_bytes() == b"someone else's file\n"


def test_a_glob_that_matches_the_outputs_does_not_feed_on_itself(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    write_rows(data / "a.jsonl", 20)
    assert sg(sorted(data.glob("*.jsonl")), data) == 0
    assert sorted(p.name for p in data.glob("*.jsonl")) == ["a.jsonl", "data.jsonl", "dropped.jsonl"]
    assert sg(sorted(data.glob("*.jsonl")), data) == 0  # the same command again: a normal resume
    ids = ids_once(data)
    assert len(ids) == 20 and set(ids.values()) == {1}
    assert "left out of the inputs" in capsys.readouterr().err


# ---- 3, 4: merge ----


def _shards(tmp_path: Path, n: int, **kw) -> list[Path]:
    inp = tmp_path / "in.jsonl"
    if not inp.exists():
        write_rows(inp, 30)
    dirs = []
    for i in range(n):
        d = tmp_path / f"shard-{i}-of-{n}"
        assert sg([inp], d, "--shard", f"{i}/{n}", *kw.get("extra", ())) == 0
        dirs.append(d)
    return dirs


def test_merge_with_out_forgotten_leaves_the_first_shard_alone(tmp_path, capsys):
    shards = _shards(tmp_path, 3)
    before = snapshot(shards[0])
    assert main(["merge", *(str(s) for s in shards)]) == 2
    err = capsys.readouterr().err
    assert "holds a sysgen run" in err and "Traceback" not in err
    assert snapshot(shards[0]) == before and (shards[0] / "store.db").exists()


@pytest.mark.slow
def test_an_incomplete_or_mismatched_shard_set_is_refused(tmp_path, capsys):
    from sysgen.run.merge import merge

    s0, s1, s2 = _shards(tmp_path, 3)
    with pytest.raises(ValueError, match=r"shard 1/3 missing.*--allow-partial"):
        merge(tmp_path / "m", [s0, s2])
    (tmp_path / "x").mkdir()
    other = _shards(tmp_path / "x", 2)[0]
    with pytest.raises(ValueError, match="shards of different N"):
        merge(tmp_path / "m", [s0, s1, s2, other])
    diff = tmp_path / "diff"
    assert sg([tmp_path / "in.jsonl"], diff, "--shard", "1/3", "--p4-max-tokens", "64") == 0
    with pytest.raises(ValueError, match="other run settings"):
        merge(tmp_path / "m", [s0, diff, s2])
    assert not (tmp_path / "m").exists()
    # --allow-partial merges anyway, and says so in stats.json and on stderr.
    assert main(["merge", str(tmp_path / "m"), str(s0), str(s2), "--allow-partial"]) == 0
    assert "PARTIAL merge" in capsys.readouterr().err
    st = json.loads((tmp_path / "m" / "stats.json").read_text())
    assert st["partial"] and not st["accounted"] and not st["finished"]
    # The complete set merges, accounted against the rows the shards read.
    assert main(["merge", str(tmp_path / "m"), str(s0), str(s1), str(s2)]) == 0  # into a merge: allowed
    st = json.loads((tmp_path / "m" / "stats.json").read_text())
    assert st["accounted"] and st["rows_read"] == 30 and "partial" not in st


def test_an_interrupted_shard_is_refused(tmp_path, monkeypatch, capsys):
    from sysgen.run.merge import merge

    s0, s1 = _shards(tmp_path, 2)
    write_rows(tmp_path / "in.jsonl", 40)  # grown: shard 1 runs again, and its engine dies midway
    monkeypatch.setenv("SYSGEN_STANDIN_FAULTS", "die=0.3")
    assert sg([tmp_path / "in.jsonl"], s1, "--shard", "1/2") == 1
    with pytest.raises(ValueError, match=r"shard-1-of-2 is unfinished"):
        merge(tmp_path / "m", [s0, s1])


# ---- 5: --retry-failed ----


def test_retry_failed_reprocesses_engine_failures_exactly_once(tmp_path, monkeypatch, capsys):
    write_rows(tmp_path / "in.jsonl", 60)
    out = tmp_path / "out"
    monkeypatch.setenv("SYSGEN_STANDIN_FAULTS", "error=0.5")
    assert sg([tmp_path / "in.jsonl"], out, "--max-retries", "0") == 0
    failed = [r for r in records(out)["dropped"] if r["reason"] == "engine_error"]
    assert len(failed) > 10
    monkeypatch.delenv("SYSGEN_STANDIN_FAULTS")  # the engine is healthy again
    assert sg([tmp_path / "in.jsonl"], out, "--max-retries", "0") == 0  # without the flag: kept as is
    assert len([r for r in records(out)["dropped"] if r["reason"] == "engine_error"]) == len(failed)
    assert sg([tmp_path / "in.jsonl"], out, "--max-retries", "0", "--retry-failed") == 0
    recs = records(out)
    assert not [r for r in recs["dropped"] if r["reason"] == "engine_error"]
    ids = ids_once(out)
    assert len(ids) == 60 and set(ids.values()) == {1}
    st = json.loads((out / "stats.json").read_text())
    assert st["accounted"] and st["this_run"]["scheduler"]["engine_calls"] > 0


# ---- 6: the store deleted ----


def test_deleting_the_store_does_not_silently_empty_the_outputs(tmp_path, capsys):
    write_rows(tmp_path / "in.jsonl", 10)
    out = tmp_path / "out"
    assert sg([tmp_path / "in.jsonl"], out) == 0
    before = snapshot(out)
    for f in out.glob("store.db*"):
        f.unlink()
    assert sg([tmp_path / "in.jsonl"], out) == 2
    assert "has no store.db" in capsys.readouterr().err
    assert snapshot(out) == before


# ---- 7, 8: inputs changed under a run ----


def test_a_row_appended_to_a_file_without_a_final_newline_is_not_lost(tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out"
    rows = write_rows(inp, 6)
    inp.write_bytes(b"\n".join(rows))  # no final newline: the last row is complete anyway
    assert sg([inp], out) == 0
    with open(inp, "ab") as f:
        f.write(b'{"instruction": "appended row", "output": "x"}\n')  # glued onto row 6
    assert sg([inp], out) == 0
    ids = ids_once(out)
    assert set(ids.values()) == {1} and len(ids) == 6
    # Row 6 is now the glued text, which cannot be read: it must say so, not keep the old record.
    sixth = [r for r in records(out)["dropped"] if r["id"].endswith(":6")]
    assert len(sixth) == 1 and sixth[0]["reason"] == "unreadable_row"


def test_a_same_size_edit_with_the_mtime_restored_is_detected(tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out"
    write_rows(inp, 8)
    assert sg([inp], out) == 0
    st = os.stat(inp)
    data = inp.read_bytes()
    edited = data.replace(b"Question number 3:", b"Question NUMBER 3:")
    assert len(edited) == len(data) and edited != data
    inp.write_bytes(edited)
    os.utime(inp, ns=(st.st_atime_ns, st.st_mtime_ns))  # as touch -r / rsync -t / tar x do
    assert sg([inp], out) == 0
    users = {r["id"]: r["messages"][1]["content"] for r in records(out)["data"]}
    assert any("NUMBER 3" in u for u in users.values())
    assert set(ids_once(out).values()) == {1}


# ---- 11, 12: errors, one line, before anything is touched ----


@pytest.mark.parametrize(
    "flag",
    [
        ["--temperature", "-1"],
        ["--temperature", "nan"],
        ["--max-inflight", "0"],
        ["--timeout-s", "0"],
        ["--max-retries", "-1"],
    ],
)
def test_a_bad_flag_on_a_finished_run_touches_nothing(tmp_path, capsys, flag):
    write_rows(tmp_path / "in.jsonl", 6)
    out = tmp_path / "out"
    assert sg([tmp_path / "in.jsonl"], out) == 0
    before = snapshot(out)
    capsys.readouterr()
    assert sg([tmp_path / "in.jsonl"], out, *flag) == 2
    err = capsys.readouterr().err
    assert flag[0] in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert snapshot(out) == before


def test_out_that_is_a_file_or_a_sink_that_is_a_folder_is_one_line(tmp_path, capsys):
    write_rows(tmp_path / "in.jsonl", 2)
    (tmp_path / "file").write_text("x")
    assert sg([tmp_path / "in.jsonl"], tmp_path / "file") == 2
    assert "is an existing file" in capsys.readouterr().err
    (tmp_path / "out" / "data.jsonl").mkdir(parents=True)
    assert sg([tmp_path / "in.jsonl"], tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "is a directory" in err and "Traceback" not in err


def test_a_lock_file_that_cannot_be_created_is_a_store_error(tmp_path, monkeypatch):
    from engine import store_lock
    from engine.store import Store, StoreError

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(store_lock.os, "open", refuse)
    with pytest.raises(StoreError, match="cannot write the store there"):
        Store.open(tmp_path / "store.db")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_a_read_only_output_folder_is_one_line(tmp_path, capsys):
    write_rows(tmp_path / "in.jsonl", 2)
    out = tmp_path / "out"
    assert sg([tmp_path / "in.jsonl"], out) == 0
    out.chmod(0o555)
    try:
        assert sg([tmp_path / "in.jsonl"], out) == 2
        assert "not writable" in capsys.readouterr().err
    finally:
        out.chmod(0o755)


def test_corrupt_store_pages_mid_run_stop_cleanly(tmp_path, capsys, monkeypatch):
    import sqlite3

    write_rows(tmp_path / "in.jsonl", 10)
    out = tmp_path / "out"
    assert sg([tmp_path / "in.jsonl"], out) == 0
    write_rows(tmp_path / "in.jsonl", 20)
    from engine import store as store_mod

    real = store_mod.connect

    class Damaged:  # reads of the results table hit a damaged page
        def __init__(self, conn):
            self._conn = conn

        def execute(self, sql, *a):
            if "FROM results" in sql:
                raise sqlite3.DatabaseError("database disk image is malformed")
            return self._conn.execute(sql, *a)

        def __getattr__(self, name):
            return getattr(self._conn, name)

    monkeypatch.setattr(store_mod, "connect", lambda *a, **k: Damaged(real(*a, **k)))
    assert sg([tmp_path / "in.jsonl"], out) == 1
    err = capsys.readouterr().err
    assert "cannot read the store" in err and "Traceback" not in err


def test_merge_on_a_full_disk_is_one_line(tmp_path, capsys, monkeypatch):
    import errno

    from sysgen.run import merge as merge_mod

    shards = _shards(tmp_path, 2)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(merge_mod, "_merge_sinks", full)
    assert main(["merge", str(tmp_path / "m"), *(str(s) for s in shards)]) == 1
    err = capsys.readouterr().err
    assert "the disk is full" in err and "run the same merge again" in err and "Traceback" not in err


# ---- 13: true messages ----


def test_stats_are_marked_unfinished_when_a_run_stops(tmp_path, monkeypatch):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out"
    write_rows(inp, 10)
    assert sg([inp], out) == 0
    write_rows(inp, 40)
    monkeypatch.setenv("SYSGEN_STANDIN_FAULTS", "die=0.2")
    assert sg([inp], out) == 1
    st = json.loads((out / "stats.json").read_text())
    assert st["finished"] is False and st["accounted"] is False and "stale" in st


def test_accounted_compares_the_outputs_with_the_rows_read(tmp_path, capsys):
    out = tmp_path / "out"
    write_rows(tmp_path / "a.jsonl", 10)
    write_rows(tmp_path / "b.jsonl", 5)
    assert sg([tmp_path / "a.jsonl"], out) == 0
    assert sg([tmp_path / "b.jsonl"], out) == 0
    err = capsys.readouterr().err
    assert "also holds outputs of other inputs (a)" in err
    st = json.loads((out / "stats.json").read_text())
    assert st["rows_read"] == 5 and st["input"] == 15 and not st["accounted"] and st["other_sources"] == ["a"]


def test_a_whole_file_error_does_not_speak_of_a_row(tmp_path, capsys):
    # Two files named alike now get distinct source names (x/a, y/a); an input that is not there is
    # the file-level error left to check: one line about that file, nothing about a row.
    (tmp_path / "x").mkdir()
    write_rows(tmp_path / "x" / "a.jsonl", 2)
    assert sg([tmp_path / "x" / "a.jsonl", tmp_path / "y" / "a.jsonl"], tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "y/a.jsonl" in err and "that row" not in err
    assert not (tmp_path / "out").exists()  # refused before the output folder was created


def test_store_rewrite_survives_a_crash_between_commit_and_rename(tmp_path, monkeypatch):
    from engine import store_writer
    from engine.store import Store, StoreError

    with Store.open(tmp_path / "store.db") as st:
        st.add_sink("dropped", tmp_path / "dropped.jsonl")
        for i in range(6):
            st.finish_item(i.to_bytes(2, "big"), None, (("dropped", orjson.dumps({"n": i}) + b"\n"),))
        st.flush()

    def crash(path):
        raise OSError("killed before the rename")

    monkeypatch.setattr(store_writer, "finish_swap", crash)
    st = Store.open(tmp_path / "store.db")
    st.add_sink("dropped", tmp_path / "dropped.jsonl")
    with pytest.raises(StoreError):
        st.drop_lines("dropped", lambda line: orjson.loads(line)["n"] % 2 == 0, [b"\x00\x00", b"\x00\x02"])
    st.close()  # the writer stopped: as a process killed between commit and rename
    monkeypatch.undo()
    assert (tmp_path / "dropped.jsonl.rewrite").exists()
    with Store.open(tmp_path / "store.db") as st:
        st.add_sink("dropped", tmp_path / "dropped.jsonl")  # finishes the rename
        assert not st.has_item(b"\x00\x00") and st.has_item(b"\x00\x01")
    lines = (tmp_path / "dropped.jsonl").read_bytes().splitlines()
    assert [orjson.loads(x)["n"] for x in lines] == [1, 3, 5]
    assert not (tmp_path / "dropped.jsonl.rewrite").exists()
