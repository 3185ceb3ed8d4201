"""What the real-engine tests read back from a run's output: the stored P1 answers checked against
the P1 regex, the ids written once, the stats."""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from pathlib import Path

import regex  # the third-party module: partial matching tells a valid prefix of a cut answer

from sysgen.tags import p1_regex


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def stats(out: Path) -> dict:
    return json.loads((out / "stats.json").read_text())


def ids_once(out: Path) -> Counter:
    return Counter(r["id"] for sink in ("data", "dropped") for r in lines(out / f"{sink}.jsonl"))


def stored_p1(out: Path) -> list[dict]:
    """Every P1 result in the run's store (the request keys the records name)."""
    keys = {
        r["request_keys"]["p1"]
        for sink in ("data", "dropped")
        for r in lines(out / f"{sink}.jsonl")
        if (r.get("request_keys") or {}).get("p1")
    }
    with sqlite3.connect(out / "store.db") as db:
        rows = db.execute("SELECT key, value FROM results").fetchall()
    return [json.loads(v) for k, v in rows if bytes(k).hex() in keys]


def p1_violations(results: list[dict]) -> list[str]:
    """P1 texts the regex does not admit: a finished answer must match whole; one cut at the token
    budget must be a prefix of something the regex matches."""
    pattern = regex.compile(p1_regex())
    bad = []
    for r in results:
        text, reason = r["text"], r["finish_reason"]
        whole = pattern.fullmatch(text) is not None
        prefix = pattern.fullmatch(text, partial=True) is not None
        if not (whole if reason == "stop" else prefix):
            bad.append(f"{reason}: {text[:200]!r}")
    return bad
