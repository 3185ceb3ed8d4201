"""Issue 21, items 1, 2, 6 and 8: quoted globs never read a run's outputs, every numeric flag is
refused by the parser before anything is touched, OS errors are one line, and the choices made for
a lowered --limit and a stray export temporary file."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

try:
    from tests.sysgen.pipeline_helpers import ids_once, write_rows
except ImportError:  # tests/sysgen is not a package: pytest put its folder on sys.path
    from pipeline_helpers import ids_once, write_rows

from sysgen.cli import main

STANDIN = ["--engine", "standin", "--no-progress", "--no-report"]


def sg(inputs, out: Path, *extra: str) -> int:
    return main(["run", *(str(p) for p in inputs), "--out", str(out), *STANDIN, *extra])


# ---- item 1: a quoted glob pointing at a run's own folder ----

def test_a_quoted_glob_never_reads_the_runs_outputs_after_a_file_is_added(tmp_path, caplog):
    d = tmp_path / "d"
    d.mkdir()
    write_rows(d / "a.jsonl", 30)
    pattern = str(d / "*.jsonl")  # quoted: sysgen expands it, after the outputs exist
    assert sg([pattern], d) == 0
    write_rows(d / "b.jsonl", 30, start=100)
    with caplog.at_level(logging.INFO, logger="sysgen"):
        assert sg([pattern], d) == 0
    ids = ids_once(d)
    assert len(ids) == 60 and set(ids.values()) == {1}
    assert Counter(i.split(":")[0] for i in ids) == {"a": 30, "b": 30}
    assert any("left out" in r.getMessage() and "data.jsonl" in r.getMessage() for r in caplog.records)


def test_a_glob_over_several_run_folders_skips_every_runs_outputs(tmp_path):
    from sysgen.datasets.inputs import resolve_inputs

    for name in ("r1", "r2"):
        (tmp_path / name).mkdir()
        write_rows(tmp_path / name / "in.jsonl", 2)
        (tmp_path / name / "data.jsonl").write_text("{}\n")
    (tmp_path / "r1" / "store.db").write_bytes(b"")
    (tmp_path / "r2" / "stats.json").write_text("{}")
    (tmp_path / "plain").mkdir()
    write_rows(tmp_path / "plain" / "data.jsonl", 2)  # not a run folder: a user's file of that name
    got = sorted(Path(s.path).relative_to(tmp_path).as_posix()
                 for s in resolve_inputs([str(tmp_path / "*" / "*.jsonl")]))
    assert got == ["plain/data.jsonl", "r1/in.jsonl", "r2/in.jsonl"]
