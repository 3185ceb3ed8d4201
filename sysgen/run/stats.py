"""stats.json from a run's own output files, so it covers every run that wrote to the directory.

The funnel counts instances that reached each stage: input → read (a parseable row) → P1 (the
model produced a complete system message) → P2 kept (at least one valid tag) → P3 kept (at least
one Good tag) → P4 kept (a complete new answer). input = kept + dropped, always.
"""

from __future__ import annotations

import dataclasses
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import orjson

from engine.backend import Backend
from sysgen import prompts
from sysgen.atomic import write_atomic
from sysgen.config import RunConfig
from sysgen.copies import copied_tags
from sysgen.run.turn_cache import P4TurnCache
from sysgen.tags import TAGS

STAGES = ("input", "read", "p1", "p2_kept", "p3_kept", "p4_kept")
# The stage an instance dropped in a given phase still reached.
_REACHED = {"input": 1, "p1": 2, "p2": 3, "p3": 4, "p4": 5}


def _iter_jsonl(path: Path):
    if not path.exists():
        return
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                yield orjson.loads(line)


class _Tally:
    def __init__(self) -> None:
        self.funnel = Counter()
        self.dropped = Counter()
        self.tags_p2 = Counter()
        self.tags_kept = Counter()
        self.p2_drop_reasons = Counter()
        self.p2_drops_by_tag: dict[str, Counter] = defaultdict(Counter)
        self.copied = Counter()  # tag -> phrases copied from the P1 prompt's examples
        self.copied_instances = 0
        self.p1_total = 0
        self.p1_well_formed = 0

    def add_kept(self, rec: dict) -> None:
        for stage in STAGES:
            self.funnel[stage] += 1
        self.tags_p2.update(list(rec.get("tags", {})))
        self.tags_kept.update(rec.get("kept_tags", []))
        self._p1(rec)

    def add_dropped(self, rec: dict) -> None:
        reached = _REACHED.get(rec["phase"], 1)
        for stage in STAGES[:reached]:
            self.funnel[stage] += 1
        self.dropped[f"{rec['phase']}:{rec['reason']}"] += 1
        self._p1(rec)

    def _p1(self, rec: dict) -> None:
        if "p1_well_formed" in rec:
            self.p1_total += 1
            self.p1_well_formed += bool(rec["p1_well_formed"])
            self.p2_drop_reasons.update(rec.get("p2_dropped", {}).values())
            for tag, reason in (rec.get("p2_dropped") or {}).items():
                # A malformed line is named by its first characters: those share one key.
                self.p2_drops_by_tag[tag if tag in TAGS else "other"][reason] += 1
            copied = copied_tags(rec)
            self.copied.update(copied)
            self.copied_instances += bool(copied)

    def to_dict(self) -> dict[str, Any]:
        n = self.funnel["input"]
        return {
            "input": n,
            "kept": self.funnel["p4_kept"],
            "funnel": {s: self.funnel[s] for s in STAGES},
            "funnel_pct": {s: round(100 * self.funnel[s] / n, 2) if n else 0.0 for s in STAGES},
            "dropped": dict(sorted(self.dropped.items())),
            "p1_parse_rate": round(self.p1_well_formed / self.p1_total, 4) if self.p1_total else None,
            "p2_tag_drops": dict(sorted(self.p2_drop_reasons.items())),
            "p2_tag_drops_by_tag": {
                t: dict(sorted(c.items())) for t, c in sorted(self.p2_drops_by_tag.items())
            },
            # Phrases that copy the P1 prompt's worked examples, per tag, over every instance P1 answered
            # (removed as copied_example, or kept and marked p2_copied with --keep-copies).
            "p2_copied": {
                "instances": self.copied_instances,
                "phrases": sum(self.copied.values()),
                "by_tag": {t: self.copied[t] for t in TAGS},
            },
            "tag_counts": {t: self.tags_p2[t] for t in TAGS},
            "tag_counts_kept": {t: self.tags_kept[t] for t in TAGS},
        }


class _Turns:
    """Multi-turn counts: user turns per conversation, how many were answered, loops resampled."""

    def __init__(self) -> None:
        self.hist = Counter()  # user turns -> instances (read instances whose turns are known)
        self.answered = Counter()  # answered turns -> kept records
        self.resampled = 0
        self.resample_kept = 0
        self.partial = 0

    def add_kept(self, rec: dict) -> None:
        msgs = rec.get("messages") or []
        answered = rec.get("answered_turns", sum(m.get("role") == "assistant" for m in msgs))
        self.hist[rec.get("user_turns", sum(m.get("role") == "user" for m in msgs))] += 1
        self.answered[answered] += 1
        looped = rec.get("p4_resampled_turns") or []
        self.resampled += len(looped)
        self.resample_kept += sum(1 for t in looped if t <= answered)
        self.partial += "partial" in rec

    def add_dropped(self, rec: dict) -> None:
        if rec.get("user_turns"):
            self.hist[rec["user_turns"]] += 1
        self.resampled += len(rec.get("p4_resampled_turns") or [])

    def to_dict(self) -> dict[str, Any]:
        most = max(self.hist, default=0)
        retention = {}
        for j in range(1, most + 1):
            reached = sum(n for t, n in self.hist.items() if t >= j)
            got = sum(n for t, n in self.answered.items() if t >= j)
            retention[str(j)] = {
                "instances": reached,
                "answered": got,
                "pct": round(100 * got / reached, 2) if reached else 0.0,
            }
        return {
            "user_turns_histogram": {str(k): self.hist[k] for k in sorted(self.hist)},
            "retention_by_turn": retention,
            "answered_turns": sum(t * n for t, n in self.answered.items()),
            "p4_resampled": self.resampled,
            "p4_resample_kept": self.resample_kept,
            "partial_records": self.partial,
        }


def turn_stats(records, dropped) -> dict[str, Any]:
    """The `turns` section from record and dropped-line iterables (for the report)."""
    t = _Turns()
    for rec in records:
        t.add_kept(rec)
    for rec in dropped:
        t.add_dropped(rec)
    return t.to_dict()


def compute(out: Path) -> dict[str, Any]:
    overall = _Tally()
    turns = _Turns()
    by_source: dict[str, _Tally] = defaultdict(_Tally)
    p4_cache = P4TurnCache(out / "store.db")
    for rec in _iter_jsonl(out / "data.jsonl"):
        overall.add_kept(rec)
        turns.add_kept(rec)
        by_source[rec["source"]].add_kept(rec)
        p4_cache.add(rec)
    for rec in _iter_jsonl(out / "dropped.jsonl"):
        overall.add_dropped(rec)
        turns.add_dropped(rec)
        by_source[rec["source"]].add_dropped(rec)
        p4_cache.add(rec)
    stats = overall.to_dict()
    stats["accounted"] = stats["kept"] + sum(overall.dropped.values()) == stats["input"]
    stats["by_source"] = {s: t.to_dict() for s, t in sorted(by_source.items())}
    stats["turns"] = turns.to_dict()
    stats["turns"]["p4_cached_ratio_by_turn"] = p4_cache.ratios()
    return stats


def write(
    out: Path,
    extra: dict[str, Any],
    rows_read: int | None = None,
    partial: bool = False,
    sources: set[str] | None = None,
) -> dict[str, Any]:
    """stats.json from the outputs. `rows_read`: the input rows the finished run (or the shards)
    went through; `accounted` is true only when the outputs hold exactly that many lines, so an
    interrupted run, a partial merge or outputs mixed from other inputs never read as complete.
    `sources`: the run's own source names; others found in the outputs are listed as other_sources."""
    stats = compute(out)
    consistent = stats["accounted"]
    stats.update(extra)
    if sources is not None:
        other = sorted(set(stats["by_source"]) - sources)
        if other:
            stats["other_sources"] = other
    stats["rows_read"] = rows_read
    stats["finished"] = rows_read is not None and not partial
    stats["accounted"] = consistent and stats["finished"] and stats["input"] == rows_read
    _dump(out, stats)
    return stats


def write_run(
    out: Path,
    cfg: RunConfig,
    backend: Backend,
    counters: dict[str, Any],
    rows_read: int | None,
    wall_s: float,
) -> dict[str, Any]:
    """stats.json after `sysgen run` (finished, or stopped with `rows_read` None): the outputs'
    figures with the run's engine, model, prompts, configuration and this run's counters."""
    counters = dict(counters)
    sources = counters.pop("sources", {})
    config = {**dataclasses.asdict(cfg), "engine": backend.name}  # the resolved engine, never "auto"
    extra = {
        "model": backend.model_id,
        "engine": backend.name,
        "prompts": prompts.digests(),
        "config": config,
        "sources": sources,
        "constrained": cfg.constrain and backend.capabilities.regex,
        "this_run": counters,
        "wall_s": round(wall_s, 2),
    }
    return write(out, extra, rows_read=rows_read, sources=set(sources) or None)


def mark_stale(out: Path, why: str) -> None:
    """A run is starting (or stopped) in `out`: figures written by an earlier one no longer
    describe the outputs until this one finishes and rewrites them."""
    path = out / "stats.json"
    try:
        stats = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return
    if isinstance(stats, dict):
        stats.update({"finished": False, "accounted": False, "stale": why})
        _dump(out, stats)


def _dump(out: Path, stats: dict[str, Any]) -> None:
    write_atomic(out / "stats.json", orjson.dumps(stats, option=orjson.OPT_INDENT_2))
