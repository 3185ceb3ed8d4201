"""turns.p4_cached_ratio_by_turn: P4 cached / prompt tokens per turn, read from the store for the
P4 request keys the kept and dropped records name; shown in the report."""

from __future__ import annotations

import orjson

from engine.request import Result
from engine.store import Store
from sysgen.run import stats


def test_cached_ratio_is_summed_per_turn_over_kept_and_dropped_records(tmp_path):
    keys = {name: bytes([i]) * 16 for i, name in enumerate(["a1", "a2", "b1", "c1", "c2"], 1)}
    counts = {"a1": (100, 50), "a2": (300, 240), "b1": (100, 30), "c1": (200, 120), "c2": (500, 460)}
    with Store.open(tmp_path / "store.db") as st:
        for name, (prompt, cached) in counts.items():
            st.put(keys[name], Result("x", "stop", prompt_tokens=prompt, cached_tokens=cached))
    rec = {"source": "s", "messages": [], "kept_tags": [], "tags": {}}
    kept = [
        {**rec, "id": "a", "request_keys": {"p4": [keys["a1"].hex(), keys["a2"].hex()]}},
        {**rec, "id": "b", "request_keys": {"p4": [keys["b1"].hex()]}},
    ]
    dropped = [
        {
            "id": "c",
            "source": "s",
            "phase": "p4",
            "reason": "truncated@turn2",
            "request_keys": {"p4": [keys["c1"].hex(), keys["c2"].hex()]},
        },
        {"id": "d", "source": "s", "phase": "p1", "reason": "truncated", "request_keys": {"p1": "00"}},
    ]
    (tmp_path / "data.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in kept))
    (tmp_path / "dropped.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in dropped))
    ratios = stats.compute(tmp_path)["turns"]["p4_cached_ratio_by_turn"]
    assert ratios == [round(200 / 400, 3), round(700 / 800, 3)]


def test_no_store_or_no_p4_gives_an_empty_list(tmp_path):
    (tmp_path / "data.jsonl").write_bytes(b"")
    assert stats.compute(tmp_path)["turns"]["p4_cached_ratio_by_turn"] == []


def test_report_shows_the_ratio_per_turn():
    from sysgen.publish.report import turns_section

    text = "\n".join(turns_section({"p4_cached_ratio_by_turn": [0.25, 0.875, None]}, {}))
    assert "| 1 | 25.0% |" in text and "| 2 | 87.5% |" in text and "| 3 | n/a |" in text
    # write_report counts turns from the records; the ratio comes from stats.json
    text = "\n".join(turns_section({}, {"turns": {"p4_cached_ratio_by_turn": [0.1, 0.6]}}))
    assert "| 2 | 60.0% |" in text
