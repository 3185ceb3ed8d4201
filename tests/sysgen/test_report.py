"""report.md and figures from a hand-written run directory."""

from __future__ import annotations

import struct
from pathlib import Path

import orjson
import pytest

try:
    from tests.sysgen.eval_fixtures import DROPPED, RECORDS, build_run
except ImportError:  # tests/sysgen is not a package: pytest put its folder on sys.path
    from eval_fixtures import DROPPED, RECORDS, build_run

from sysgen.cli_eval import report_after_run
from sysgen.eval import funnel as fn
from sysgen.eval.rundir import RunDirError, load_run
from sysgen.publish.report import write_report


def test_funnel_counts_per_source_and_overall():
    f = fn.funnels(RECORDS, DROPPED)
    assert list(f) == ["capybara_test", "gsm_prompts", "all"]
    # capybara: 2 kept, one dropped at P2, one at P4.
    assert f["capybara_test"].counts == {"original": 4, "read": 4, "p1": 4, "p2": 3, "p3": 3, "p4": 2}
    # gsm: 1 kept, one unreadable row, one dropped at P3.
    assert f["gsm_prompts"].counts == {"original": 3, "read": 2, "p1": 2, "p2": 2, "p3": 1, "p4": 1}
    assert f["all"].counts == {"original": 7, "read": 6, "p1": 6, "p2": 5, "p3": 4, "p4": 3}
    assert f["all"].pct("p4") == pytest.approx(300 / 7)
    assert f["all"].drops_by_reason["p2:no_valid_tags"] == 1
    assert f["all"].drops_by_reason["input:bad_json"] == 1


def test_tag_counts_generated_kept_and_verdicts():
    t = fn.tag_stats(RECORDS)
    assert t["all"].instances == 3
    assert {k: t["all"].generated[k] for k in ("Role", "Task", "Style", "Format", "Tool")} == {
        "Role": 2,
        "Task": 2,
        "Style": 2,
        "Format": 1,
        "Tool": 0,
    }
    assert {k: t["all"].kept[k] for k in ("Role", "Task", "Style", "Format")} == {
        "Role": 2,
        "Task": 2,
        "Style": 0,
        "Format": 1,
    }
    assert t["capybara_test"].generated["Style"] == 1 and t["gsm_prompts"].generated["Role"] == 0
    assert t["all"].verdicts["Style"] == {"Bad": 1, "None": 1}
    assert t["all"].p2_dropped["Tool"] == {"empty": 1}


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


@pytest.mark.slow
def test_write_report_tables_and_pngs(tmp_path):
    out = build_run(tmp_path / "run")
    path = write_report(out)
    md = path.read_text()
    assert "7 → 5 (71.4%) → 3 (42.9%)" in md  # overall Original → P2 → P4
    assert "4 → 3 (75.0%) → 2 (50.0%)" in md  # capybara_test
    assert "806,796 → 602,750 (74.7%) → 586,831 (72.7%)" in md  # the paper's, labelled as such
    assert "the paper's numbers" in md
    assert "| Role | 2 / 2 | 0 / 0 | 2 / 2 |" in md
    assert "p1 `aaaa`" in md and "sysgen eval DIR" in md
    for name in ("funnel.png", "tags.png"):
        w, h = _png_size(out / name)
        assert w > 400 and h > 300
    assert not (out / "turns.png").exists() and "turns.png" not in md  # single-turn records: no figure


@pytest.mark.slow
def test_report_without_stats_and_after_run_hook(tmp_path):
    out = build_run(tmp_path / "run", stats=None)
    path = report_after_run(out)
    md = path.read_text()
    assert "model: `HuggingFaceTB/SmolLM2-135M-Instruct@test`" in md  # from the records
    assert (out / "funnel.png").exists()


@pytest.mark.slow
def test_duplicate_ids_are_flagged(tmp_path):
    dup = {**DROPPED[0], "id": RECORDS[0]["id"]}
    out = build_run(tmp_path / "run", dropped=[*DROPPED, dup])
    md = write_report(out).read_text()
    assert "**warning**: 1 ids appear more than once" in md


def test_bad_line_names_file_and_line(tmp_path):
    out = build_run(tmp_path / "run")
    with (out / "data.jsonl").open("ab") as fh:
        fh.write(b'{"id": "x", "messa\n')
    run = load_run(out)  # opens lazily: the bad line surfaces when read
    with pytest.raises(RunDirError, match=r"data\.jsonl:4: not valid JSON"):
        _ = run.records
    with pytest.raises(RunDirError, match=r"data\.jsonl:4: not valid JSON"):
        write_report(out)


def test_missing_dir_says_what_to_pass(tmp_path):
    with pytest.raises(RunDirError, match="--out directory"):
        load_run(tmp_path / "nope")


def test_empty_run_still_reports(tmp_path):
    out = build_run(
        tmp_path / "run",
        records=[],
        dropped=[{"id": "a:1", "source": "a", "phase": "p1", "reason": "unparseable", "detail": ""}],
    )
    md = write_report(out).read_text()
    assert "1 → 0 (0.0%) → 0 (0.0%)" in md
    assert orjson.loads((out / "stats.json").read_bytes())["funnel"]["p4_kept"] == 3
    assert "stats.json says p4_kept=3" in md
