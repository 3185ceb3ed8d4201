"""A small run output directory written by hand, for the report/eval/export tests.

Two sources: `capybara_test` (with original answers) and `gsm_prompts` (prompt-only: no
original answer), some rows dropped at each phase and one unreadable input row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct@test"


def record(
    rid: str,
    source: str,
    user: str,
    new: str,
    original: str | None,
    tags: dict[str, str],
    verdicts: dict[str, str],
    p2_dropped: dict[str, str] | None = None,
) -> dict:
    kept = [t for t in tags if verdicts.get(t) == "Good"]
    system = " ".join(tags[t] for t in kept)
    return {
        "id": rid,
        "source": source,
        "fmt": "capybara" if original else "question",
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": user},
            {"role": "assistant", "content": new},
        ],
        "original_answer": original,
        "tags": tags,
        "verdicts": verdicts,
        "kept_tags": kept,
        "p2_dropped": p2_dropped or {},
        "model": MODEL,
        "request_keys": {"p1": "00", "p3": "11", "p4": "22"},
    }


RECORDS = [
    record(
        "capybara_test:1",
        "capybara_test",
        "What is the capital of France?",
        "The capital of France is Paris.",
        "Paris is the capital of France.",
        {"Role": "You are a geography tutor.", "Task": "Answer the question.", "Style": "Be brief."},
        {"Role": "Good", "Task": "Good", "Style": "Bad"},
        {"Tool": "empty"},
    ),
    record(
        "capybara_test:2",
        "capybara_test",
        "Name a red fruit.",
        "An apple is a red fruit that many people enjoy.",
        "Strawberries are red.",
        {"Role": "You are a helpful grocer.", "Format": "Use one sentence."},
        {"Role": "Good", "Format": "Good"},
    ),
    record(
        "gsm_prompts:1",
        "gsm_prompts",
        "What is 2 + 3?",
        "2 + 3 = 5.",
        None,
        {"Task": "Solve the arithmetic problem.", "Style": "Show the result."},
        {"Task": "Good", "Style": "None"},
    ),
]


def drop(rid: str, source: str, phase: str, reason: str) -> dict:
    return {"id": rid, "source": source, "phase": phase, "reason": reason, "detail": ""}


DROPPED = [
    drop("capybara_test:3", "capybara_test", "p2", "no_valid_tags"),
    drop("capybara_test:4", "capybara_test", "p4", "truncated"),
    drop("gsm_prompts:2", "gsm_prompts", "p3", "no_good_tags"),
    drop("gsm.jsonl:7", "gsm_prompts", "input", "bad_json"),
]

STATS = {
    "model": MODEL,
    "prompts": {"p1": "aaaa", "p3": "bbbb", "p4": "cccc"},
    "sources": {
        "capybara_test": {"path": "data/capybara_test.jsonl", "fmt": "capybara"},
        "gsm_prompts": {"path": "data/gsm8k_test_first300.jsonl", "fmt": "question"},
    },
    "funnel": {"p4_kept": 3},
}


def build_run(
    root: Path,
    records: list[dict[str, Any]] | None = None,
    dropped: list[dict[str, Any]] | None = None,
    stats: dict[str, Any] | None = STATS,
) -> Path:
    """Write data.jsonl, dropped.jsonl and (unless stats is None) stats.json under root."""
    root.mkdir(parents=True, exist_ok=True)
    rows = RECORDS if records is None else records
    (root / "data.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    drops = DROPPED if dropped is None else dropped
    (root / "dropped.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in drops))
    if stats is not None:
        (root / "stats.json").write_bytes(orjson.dumps(stats))
    return root
