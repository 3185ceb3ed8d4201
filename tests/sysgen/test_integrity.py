"""Outputs are trusted by content, not by length (issue 21, items 3-5): a store.db of another run,
a line inserted or changed by hand, a shard that lost lines are refused with one line, nothing is
cut, and `sysgen repair` plus the same run rebuilds the outputs from the store."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import orjson
import pytest

try:
    from tests.sysgen.pipeline_helpers import ids_once, records, write_rows
except ImportError:  # tests/sysgen is not a package: pytest put its folder on sys.path
    from pipeline_helpers import ids_once, records, write_rows

from sysgen.cli import main

STANDIN = ["--engine", "standin", "--no-progress", "--no-report"]


def sg(inp: Path, out: Path, *extra: str) -> int:
    return main(["run", str(inp), "--out", str(out), *STANDIN, *extra])


def outputs(d: Path) -> dict[str, bytes]:
    return {n: (d / n).read_bytes() for n in ("data.jsonl", "dropped.jsonl") if (d / n).exists()}


def _refused(inp: Path, out: Path, capsys, *words: str) -> None:
    """The run exits 2 with one line naming the problem and `sysgen repair`, twice, touching nothing."""
    before = outputs(out)
    for _ in range(2):
        assert sg(inp, out) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and "sysgen repair" in err, err
        assert all(w in err for w in words), err
        assert outputs(out) == before


@pytest.fixture
def finished(tmp_path):
    inp, out = tmp_path / "a.jsonl", tmp_path / "a"
    write_rows(inp, 60)
    assert sg(inp, out) == 0
    return inp, out


# ---- 3: a store.db from another run ----


def test_a_store_db_of_another_run_never_cuts_the_outputs(tmp_path, finished, capsys):
    inp, out = finished
    write_rows(tmp_path / "b.jsonl", 5)
    assert sg(tmp_path / "b.jsonl", tmp_path / "b") == 0
    for f in out.glob("store.db*"):
        f.unlink()
    shutil.copy(tmp_path / "b" / "store.db", out / "store.db")
    _refused(inp, out, capsys, "data.jsonl", "store.db")


# ---- 4: a line inserted, or a byte changed, by hand ----


def test_a_line_inserted_by_hand_is_refused_not_cut(finished, capsys):
    inp, out = finished
    lines = (out / "data.jsonl").read_bytes().splitlines(keepends=True)
    lines.insert(10, b'{"note":1}\n')
    (out / "data.jsonl").write_bytes(b"".join(lines))
    _refused(inp, out, capsys, "lines 1-", "not the ones store.db committed")


def test_a_byte_changed_inside_a_committed_record_is_refused(finished, capsys):
    inp, out = finished
    data = (out / "data.jsonl").read_bytes()
    at = data.index(b'"id":"a:2"') + len('"id":"')
    (out / "data.jsonl").write_bytes(data[:at] + b"b" + data[at + 1 :])  # same size, one id changed
    _refused(inp, out, capsys, "not the ones store.db committed")
    # Nor is the edited record exported, reported or judged as it stands.
    for cmd in (
        ["export", str(out)],
        ["report", str(out)],
        ["eval", str(out), "--no-judges", "--no-bertscore"],
    ):
        assert main(cmd) == 2, cmd
        err = capsys.readouterr().err
        assert "not the ones store.db committed" in err and "sysgen repair" in err, (cmd, err)
    assert not (out / "export" / "messages.jsonl").exists()
    assert not (out / "report.md").exists() and not (out / "eval.json").exists()


def test_report_reads_a_live_run_as_of_its_last_commit(finished, capsys):
    """Bytes a run has written but not yet committed (announced in store.db's pending range, as a
    writer does before each batch) are not reported: the report counts what the store vouches for."""
    import sqlite3

    _, out = finished
    assert main(["report", str(out)]) == 0
    committed = (out / "report.md").read_text()
    data = out / "data.jsonl"
    size = data.stat().st_size
    extra = data.read_bytes().splitlines(keepends=True)[0].replace(b'"id":"', b'"id":"in-flight-')
    with sqlite3.connect(out / "store.db") as db:  # what the writer announces before a batch
        db.execute(
            "INSERT OR REPLACE INTO meta VALUES (?, ?)", ("pending:data", f"{size}:{size + len(extra)}")
        )
    with open(data, "ab") as f:
        f.write(extra)
    assert main(["report", str(out)]) == 0
    assert (out / "report.md").read_text() == committed


def test_a_line_appended_by_hand_is_refused_not_cut(finished, capsys):
    inp, out = finished
    with open(out / "data.jsonl", "ab") as f:
        f.write(b'{"id": "mine", "messages": []}\n')
    _refused(inp, out, capsys, "did not write")


def test_repair_moves_the_edited_file_aside_and_the_run_rebuilds_it_from_the_store(finished, capsys):
    inp, out = finished
    good = outputs(out)
    lines = good["data.jsonl"].splitlines(keepends=True)
    del lines[3]
    (out / "data.jsonl").write_bytes(b"".join(lines))
    assert sg(inp, out) == 2
    assert main(["repair", str(out)]) == 0
    err = capsys.readouterr().err
    assert "data.jsonl: moved to data.jsonl.unverified" in err and "dropped.jsonl" not in err.split("\n")[0]
    assert (out / "data.jsonl.unverified").read_bytes() == b"".join(lines)  # kept, never deleted
    assert sg(inp, out) == 0
    by_id = {r["id"]: r for r in records(out)["data"]}
    assert by_id == {r["id"]: r for r in map(orjson.loads, good["data.jsonl"].splitlines())}
    assert set(ids_once(out).values()) == {1} and sum(ids_once(out).values()) == 60
    assert main(["repair", str(out)]) == 0
    assert "nothing to do" in capsys.readouterr().err


# ---- 5: merge of a shard that lost lines ----


def test_merge_of_a_shard_that_lost_ten_lines_is_refused(tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    write_rows(inp, 80)
    shards = [tmp_path / f"s{i}" for i in range(2)]
    for i, s in enumerate(shards):
        assert sg(inp, s, "--shard", f"{i}/2") == 0
    lines = (shards[0] / "data.jsonl").read_bytes().splitlines(keepends=True)
    (shards[0] / "data.jsonl").write_bytes(b"".join(lines[:-10]))
    assert main(["merge", str(tmp_path / "m"), *map(str, shards)]) == 2
    err = capsys.readouterr().err
    assert "s0" in err and "data.jsonl" in err and "Traceback" not in err
    assert not (tmp_path / "m" / "data.jsonl").exists()


# ---- an unreadable store.db: advice that fits ----


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files of mode 000")
def test_an_unreadable_store_db_says_to_fix_its_permissions(finished, capsys):
    inp, out = finished
    os.chmod(out / "store.db", 0)
    try:
        assert sg(inp, out) == 2
        assert "chmod u+rw" in capsys.readouterr().err
    finally:
        os.chmod(out / "store.db", 0o644)


def test_a_store_db_this_user_cannot_open_says_to_fix_its_permissions(finished, capsys, monkeypatch):
    import sqlite3

    from engine import store

    inp, out = finished
    db = out / "store.db"

    def denied(path, *a, **kw):  # what sqlite3 says for a file of mode 000 (root is never denied)
        raise sqlite3.OperationalError("unable to open database file")

    monkeypatch.setattr(store, "connect", denied)
    monkeypatch.setattr(store.os, "access", lambda p, mode: Path(p) != db)
    assert sg(inp, out) == 2
    err = capsys.readouterr().err
    assert f"chmod u+rw {db}" in err and "new --out" not in err


def test_a_damaged_store_db_says_what_to_do(finished, capsys):
    inp, out = finished
    for f in out.glob("store.db*"):
        f.unlink()
    (out / "store.db").write_bytes(b"garbage" * 1000)
    before = outputs(out)
    assert sg(inp, out) == 2
    err = capsys.readouterr().err
    assert "damaged" in err and "restore it" in err and "new --out" not in err
    assert outputs(out) == before


def test_repair_of_a_folder_without_a_store_is_one_line(tmp_path, capsys):
    (tmp_path / "data.jsonl").write_bytes(b'{"id": "x"}\n')
    assert main(["repair", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "store.db does not exist" in err and "Traceback" not in err
    assert (tmp_path / "data.jsonl").read_bytes() == b'{"id": "x"}\n'
