"""The new input shapes through whole runs (stand-in engine): same-name files in two folders resume
and merge right; bad files are recorded and the run goes on; stats.json names unused text."""

from __future__ import annotations

import gzip
import json

import orjson
import pytest

try:
    from tests.sysgen.pipeline_helpers import ids_once, records, run
except ImportError:  # tests/sysgen is not a package: pytest put its folder on sys.path
    from pipeline_helpers import ids_once, records, run

from sysgen.cli import main
from sysgen.run.merge import merge


def jsonl(path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))


def two_benches(tmp_path):
    """mt_bench/question.jsonl and vicuna_bench/question.jsonl, as their projects ship them."""
    jsonl(
        tmp_path / "data" / "mt_bench" / "question.jsonl",
        [
            {"question_id": i, "category": "writing", "turns": [f"Write about topic {i}.", "Now shorter."]}
            for i in range(1, 13)
        ],
    )
    jsonl(
        tmp_path / "data" / "vicuna_bench" / "question.jsonl",
        [
            {"question_id": i, "category": "generic", "turns": [f"How do I learn skill {i}?"]}
            for i in range(1, 9)
        ],
    )
    return tmp_path / "data"


def _by_id(out):
    return {r["id"]: r for sink in records(out).values() for r in sink}


def test_same_name_files_in_two_folders_run_resume_and_merge(tmp_path):
    data = two_benches(tmp_path)
    whole = tmp_path / "whole"
    run([data], whole)
    ids = ids_once(whole)
    assert len(ids) == 20 and set(ids.values()) == {1}
    assert {i.rsplit(":", 1)[0] for i in ids} == {"mt_bench/question", "vicuna_bench/question"}
    kept = records(whole)["data"]
    assert kept and all(set(r["original_answers"]) == {None} for r in kept)  # prompt-only: nothing to compare
    # an interrupted run (here: cut by --limit) resumed: every row once, same records
    part = tmp_path / "part"
    run([data], part, limit=7)
    first = run([data], part)
    assert first["already_done"] == 7
    assert _by_id(part) == _by_id(whole)
    # shards merged equal the unsharded run
    shards = [tmp_path / f"s{i}" for i in range(2)]
    for i, s in enumerate(shards):
        run([data], s, shard=f"{i}/2")
    merge(tmp_path / "merged", shards)
    assert _by_id(tmp_path / "merged") == _by_id(whole)


def test_source_names_stay_when_a_same_name_file_is_added(tmp_path):
    a = tmp_path / "a" / "train.jsonl"
    jsonl(a, [{"prompt": f"p{i}"} for i in range(5)])
    out = tmp_path / "out"
    run([a], out)
    b = tmp_path / "b" / "train.jsonl"
    jsonl(b, [{"prompt": f"b{i}"} for i in range(3)])
    counters = run([a, b], out)
    assert counters["already_done"] == 5  # a's rows are not redone under a new name
    ids = ids_once(out)
    assert set(ids.values()) == {1} and {i.rsplit(":", 1)[0] for i in ids} == {"train", "b/train"}


def _cli(*args: str) -> int:
    return main(["run", *args, "--engine", "standin", "--no-progress", "--no-report"])


@pytest.mark.slow
def test_bad_files_are_recorded_and_the_run_goes_on(tmp_path, capsys):
    blob = gzip.compress(b"".join(orjson.dumps({"prompt": f"p{i}"}) + b"\n" for i in range(3000)))
    (tmp_path / "cut.jsonl.gz").write_bytes(blob[: len(blob) // 2])
    (tmp_path / "empty.parquet").write_bytes(b"")
    jsonl(tmp_path / "good.jsonl", [{"question": "q", "answer": "a"}])
    out = tmp_path / "out"
    args = [
        str(tmp_path / "cut.jsonl.gz"),
        str(tmp_path / "empty.parquet"),
        str(tmp_path / "good.jsonl"),
        "--out",
        str(out),
    ]
    assert _cli(*args) == 0
    drops = {r["source"]: r for r in records(out)["dropped"] if r["phase"] == "input"}
    assert set(drops) == {"cut", "empty"} and {r["reason"] for r in drops.values()} == {"unreadable_file"}
    st = json.loads((out / "stats.json").read_text())
    assert st["accounted"] and set(st["by_source"]) == {"cut", "empty", "good"}
    assert _cli(*args) == 0  # the same command again finishes, redoing nothing
    assert "engine calls 0" in capsys.readouterr().err
    # with --strict: stopped, with advice about the file, not about a row
    assert _cli(*args[:-1], str(tmp_path / "strict"), "--strict") == 2
    err = capsys.readouterr().err
    assert "once the file is fixed" in err and "once the row is fixed" not in err


@pytest.mark.slow
def test_stats_name_each_source_and_its_unused_text(tmp_path):
    data = two_benches(tmp_path)
    jsonl(tmp_path / "odd.jsonl", [{"task": {"text": f"Explain {i}.", "hint": "think"}} for i in range(4)])
    out = tmp_path / "out"
    assert _cli(str(data), "--out", str(out)) == 0
    st = json.loads((out / "stats.json").read_text())
    mt = st["sources"]["mt_bench/question"]
    assert mt["path"].endswith("mt_bench/question.jsonl")
    assert mt["unused_fields"] == {"keys": {"category": 12}, "example": "mt_bench/question:1"}
    assert main(["report", str(out)]) == 0
    assert (
        "text not read (no format or --columns mapping uses it): `category` (12 rows); e.g. row "
        "`mt_bench/question:1`" in (out / "report.md").read_text()
    )
    # a mapping for the odd shape; what it leaves is reported too
    out2 = tmp_path / "out2"
    assert _cli(str(tmp_path / "odd.jsonl"), "--columns", "user=task.text", "--out", str(out2)) == 0
    st2 = json.loads((out2 / "stats.json").read_text())
    assert st2["input"] == 4 and st2["by_source"]["odd"]["funnel"]["read"] == 4
    assert st2["config"]["columns"] == "user=task.text"
    # task.hint is under the mapped top-level key 'task': not reported (the key is in use)
    assert "unused_fields" not in st2["sources"]["odd"]


def test_argument_errors_before_anything_runs(tmp_path, capsys):
    jsonl(tmp_path / "odd.jsonl", [{"task": "t"}])
    out = tmp_path / "out"
    assert _cli(str(tmp_path / "odd.jsonl"), "--columns", "user=nope", "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert "its fields are: task" in err and "committed" not in err
    assert not (out / "store.db").exists()
    loop = tmp_path / "loop.jsonl"
    loop.symlink_to(loop)
    assert _cli(str(loop), "--out", str(out)) == 2
    assert "symbolic link loop" in capsys.readouterr().err


def test_a_save_to_disk_folder_rewritten_restarts_its_outputs(tmp_path, caplog):
    import datasets

    def save(prefix: str) -> None:
        datasets.Dataset.from_list([{"prompt": f"{prefix} {i}"} for i in range(4)]).save_to_disk(
            str(tmp_path / "saved")
        )

    save("first")
    out = tmp_path / "out"
    run([tmp_path / "saved"], out)
    assert run([tmp_path / "saved"], out)["already_done"] == 4  # unchanged: nothing redone
    save("second")
    with caplog.at_level("WARNING"):
        run([tmp_path / "saved"], out)
    assert "changed since the last run" in caplog.text
    users = [r["messages"][1]["content"] for r in records(out)["data"]]
    assert users == [f"second {i}" for i in range(4)]
