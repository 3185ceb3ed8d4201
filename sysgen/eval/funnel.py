"""Retention per phase (the paper's Table 2) and tag counts (its Table 8), from the records alone.

Every input row ends in exactly one place: data.jsonl (kept) or dropped.jsonl with the phase that
dropped it. So the survivors of a phase are the rows minus the drops of that phase and the ones
before it, which works on any output directory and per source, whatever stats.json says.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sysgen.copies import copied_tags
from sysgen.tags import TAGS, VERDICTS

ALL = "all"  # the key of the overall row next to per-source rows
PHASES: tuple[str, ...] = ("input", "p1", "p2", "p3", "p4")  # the order a row is dropped in
# Survivors after each phase; "original" is every row the run saw.
STAGES: tuple[str, ...] = ("original", "read", "p1", "p2", "p3", "p4")
STAGE_LABELS = {
    "original": "Original",
    "read": "Readable",
    "p1": "P1 generated",
    "p2": "P2 filtered",
    "p3": "P3 verified",
    "p4": "P4 answered",
}


@dataclass(slots=True)
class Funnel:
    """Survivors per stage and drops by "phase:reason" for one source (or all of them)."""

    kept: int = 0
    drops_by_phase: Counter[str] = field(default_factory=Counter)
    drops_by_reason: Counter[str] = field(default_factory=Counter)

    @property
    def original(self) -> int:
        return self.kept + sum(self.drops_by_phase.values())

    @property
    def counts(self) -> dict[str, int]:
        left = self.original
        out = {"original": left}
        for phase, stage in zip(PHASES, STAGES[1:], strict=True):
            left -= self.drops_by_phase.get(phase, 0)
            out[stage] = left
        return out

    def pct(self, stage: str) -> float:
        """Survivors of a stage as a percentage of the original rows (0 when there were none)."""
        return 100.0 * self.counts[stage] / self.original if self.original else 0.0


@dataclass(slots=True)
class TagStats:
    """Per tag: present after P2 (`generated`), judged Good and kept (`kept`), P3 verdicts, P2 drops."""

    generated: Counter[str] = field(default_factory=Counter)
    kept: Counter[str] = field(default_factory=Counter)
    verdicts: dict[str, Counter[str]] = field(default_factory=lambda: {t: Counter() for t in TAGS})
    p2_dropped: dict[str, Counter[str]] = field(default_factory=lambda: {t: Counter() for t in TAGS})
    instances: int = 0
    # Over every instance P1 answered, dropped ones too: P2 removals by reason, and phrases copied from
    # the P1 prompt's examples (removed as copied_example, or kept and marked with --keep-copies).
    p2_removed: dict[str, Counter[str]] = field(default_factory=lambda: {t: Counter() for t in TAGS})
    copied: Counter[str] = field(default_factory=Counter)
    p1_answered: int = 0

    @property
    def tags(self) -> list[str]:
        """The fixed eight, then any unknown tag names a run produced (so nothing is hidden)."""
        extra = sorted(set(self.generated) - set(TAGS))
        return [*TAGS, *extra]


@dataclass(slots=True)
class Summary:
    """Funnel and tag counts per source plus ALL (sources in first-seen order, ALL last), and the
    ids found more than once: every row should end in exactly one place, so any such id means a
    resume wrote twice."""

    funnels: dict[str, Funnel]
    tags: dict[str, TagStats]
    duplicates: list[str]

    @property
    def sources(self) -> list[str]:
        return [s for s in self.funnels if s != ALL]


def _source(row: dict[str, Any]) -> str:
    return str(row.get("source") or "unknown")


def _add_tags(ts: TagStats, rec: dict[str, Any]) -> None:
    ts.instances += 1
    ts.generated.update(k for k, v in (rec.get("tags") or {}).items() if v)
    ts.kept.update(rec.get("kept_tags") or [])
    for tag, verdict in (rec.get("verdicts") or {}).items():
        ts.verdicts.setdefault(tag, Counter())[str(verdict)] += 1
    for tag, reason in (rec.get("p2_dropped") or {}).items():
        ts.p2_dropped.setdefault(tag, Counter())[str(reason)] += 1
    _add_p2(ts, rec)


def _add_p2(ts: TagStats, row: dict[str, Any]) -> None:
    """P2's per-tag outcome of any row P1 answered (kept records and rows dropped at P2 or later)."""
    if "p1_well_formed" not in row:
        return
    ts.p1_answered += 1
    for tag, reason in (row.get("p2_dropped") or {}).items():
        ts.p2_removed.setdefault(tag, Counter())[str(reason)] += 1
    ts.copied.update(copied_tags(row))


def _add_drop(f: Funnel, row: dict[str, Any]) -> None:
    phase = str(row.get("phase") or "unknown")
    # An unknown phase still counts as a drop; it is put at the last phase so the totals stay
    # exact, and its own name stays in the reasons.
    f.drops_by_phase[phase if phase in PHASES else PHASES[-1]] += 1
    f.drops_by_reason[f"{phase}:{row.get('reason') or 'unspecified'}"] += 1


def summarize(records: Iterable[dict[str, Any]], dropped: Iterable[dict[str, Any]]) -> Summary:
    """One pass over each file. Tag counts cover the kept records: the pipeline does not write the
    tags of dropped rows, and the paper's Table 8 counts the final data too. P2's removals and copies
    cover every row P1 answered (dropped rows carry them)."""
    funnels: dict[str, Funnel] = {}
    tags: dict[str, TagStats] = {}
    ids: Counter[str] = Counter()
    total_f, total_t = Funnel(), TagStats()
    for rec in records:
        ids[str(rec.get("id"))] += 1
        funnels.setdefault(_source(rec), Funnel()).kept += 1
        total_f.kept += 1
        _add_tags(tags.setdefault(_source(rec), TagStats()), rec)
        _add_tags(total_t, rec)
    for row in dropped:
        ids[str(row.get("id"))] += 1
        _add_drop(funnels.setdefault(_source(row), Funnel()), row)
        _add_drop(total_f, row)
        if "p1_well_formed" in row:  # P1 answered it: count its P2 outcome
            _add_p2(tags.setdefault(_source(row), TagStats()), row)
            _add_p2(total_t, row)
    funnels[ALL], tags[ALL] = total_f, total_t
    return Summary(funnels, tags, sorted(i for i, n in ids.items() if n > 1))


def funnels(records: Iterable[dict[str, Any]], dropped: Iterable[dict[str, Any]]) -> dict[str, Funnel]:
    """Funnel per source plus ALL."""
    return summarize(records, dropped).funnels


def tag_stats(records: Iterable[dict[str, Any]]) -> dict[str, TagStats]:
    """Tag counts per source plus ALL, over kept records."""
    return summarize(records, ()).tags


__all__ = [
    "ALL",
    "STAGES",
    "STAGE_LABELS",
    "VERDICTS",
    "Funnel",
    "Summary",
    "TagStats",
    "funnels",
    "summarize",
    "tag_stats",
]
