"""bench.crash on a small input: SIGKILLs at random moments, then exactly-once output."""

from __future__ import annotations

import pytest

from bench import crash


@pytest.mark.kill
def test_kills_then_resume_lose_and_duplicate_nothing(tmp_path):
    # Slow enough (~3 s of work) that kills in the first 1.5 s land mid-run, after some commits.
    slow = {"SYSGEN_STANDIN_DELAY": "0.05:0.15", "SYSGEN_STANDIN_FAULTS": "error=0.05,truncate=0.05"}
    res = crash.measure(500, 3, tmp_path, window=(0.8, 1.6), seed=1, variants={"slow": slow}, timeout_s=120)
    assert res["kills"] == 3
    assert (res["lost"], res["duplicated"], res["corrupt"]) == (0, 0, 0)
    assert res["accounted"]
    v = res["variants"][0]
    assert v["kept"] + sum(v["dropped"].values()) == 500
    assert v["dropped"]["input:unreadable_row"] == 500 // crash.BAD_EVERY


def test_check_finds_lost_duplicated_and_corrupt_lines(tmp_path):
    inp = tmp_path / "x.jsonl"
    expected = crash.expected_ids(inp, 4)
    (tmp_path / "data.jsonl").write_bytes(b'{"id":"x:1"}\n{"id":"x:1"}\n{"id":"x:2"}\nnot json\n')
    (tmp_path / "dropped.jsonl").write_bytes(b'{"id":"elsewhere:7"}\n')
    res = crash.check(tmp_path, expected)
    assert (res["lost"], res["duplicated"], res["corrupt"]) == (2, 2, 1)


@pytest.mark.kill
def test_kills_during_merge_and_export_lose_and_duplicate_nothing(tmp_path):
    res = crash.measure(
        3000,
        0,
        tmp_path,
        window=(0.1, 0.2),
        seed=2,
        variants={"zero-latency": {}},
        timeout_s=120,
        merge_kills=3,
        export_kills=3,
    )
    by = {v["variant"]: v for v in res["variants"]}
    assert by["merge"]["kills"] == 3 and by["export"]["kills"] == 3
    assert (res["lost"], res["duplicated"], res["corrupt"]) == (0, 0, 0) and res["accounted"]
    assert by["merge"]["kept"] + sum(by["merge"]["dropped"].values()) == 3000
