"""The progress line's completion estimate: from rows read and bytes consumed, exact at the end."""

from __future__ import annotations

import io

from engine.metrics import Metrics
from engine.progress import Progress, fmt_eta
from sysgen.datasets.instance import Instance, Rejected, Turn
from sysgen.run.pipeline import InputFraction


def _rows(path, n: int) -> list[Instance]:
    lines = [f'{{"instruction": "q{i}", "output": "a{i}"}}\n' for i in range(n)]
    path.write_text("".join(lines))
    offsets, acc = [], 0
    for line in lines:
        offsets.append(acc)
        acc += len(line)
    return [
        Instance(
            id=f"s:{i + 1}",
            source="s",
            fmt="alpaca",
            turns=(Turn("user", "q"),),
            path=str(path),
            line=i + 1,
            offset=o,
        )
        for i, o in enumerate(offsets)
    ]


def test_total_is_estimated_from_bytes_then_exact_when_input_is_exhausted(tmp_path):
    rows = _rows(tmp_path / "in.jsonl", 10)
    frac = InputFraction((str(tmp_path / "in.jsonl"),))
    assert frac() is None
    for r in rows[:5]:
        frac.update(r)
    assert 8 <= frac() <= 12  # equal-sized rows: half the bytes after five rows
    for r in rows[5:]:
        frac.update(r)
    frac.update(Rejected(str(tmp_path / "in.jsonl"), 11, "bad"))
    frac.exhausted = True
    assert frac() == 11.0


def test_progress_reaches_100_percent_when_every_item_is_done(tmp_path):
    rows = _rows(tmp_path / "in.jsonl", 4)
    frac = InputFraction((str(tmp_path / "in.jsonl"),))
    buf = io.StringIO()
    prog = Progress(Metrics(), frac, stream=buf)
    for r in rows:
        frac.update(r)
    frac.exhausted = True
    prog.done = 2
    assert prog.line().startswith("[ 50.0%] 2 done")
    prog.done = 4
    prog.tick(force=True)
    assert buf.getvalue().startswith("[100.0%] 4 done")
    assert "ETA 0:00:00" in buf.getvalue()


def test_unknown_total_prints_no_percentage_or_eta():
    prog = Progress(Metrics(), lambda: None, stream=io.StringIO())
    prog.done = 3
    assert prog.line().startswith("[  ?  ] 3 done")
    assert prog.line().endswith("ETA --:--:--")
    assert fmt_eta(3725) == "1:02:05"
