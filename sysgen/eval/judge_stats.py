"""Counting judge verdicts: win rate of the new answer per order and combined, alignment rate.

Order "original_first" shows A = original, B = new, so the new answer wins on "B"; order
"new_first" shows A = new, so it wins on "A". A judge with position bias picks the same letter in
both orders, which the two per-order rates expose and the combined rate cancels.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sysgen.eval.judges import Judgement

NEW_WINS_ON = {"original_first": "B", "new_first": "A"}
ORIGINAL_WINS_ON = {"original_first": "A", "new_first": "B"}


@dataclass(slots=True)
class WinCount:
    wins: int = 0  # new answer judged better
    losses: int = 0  # original judged better
    ties: int = 0
    invalid: int = 0  # output with no verdict in it
    failed: int = 0  # request failed

    def add(self, j: Judgement) -> None:
        if j.verdict is None:
            if j.error == "unparseable":
                self.invalid += 1
            else:
                self.failed += 1
        elif j.verdict == "tie":
            self.ties += 1
        elif j.verdict == NEW_WINS_ON[j.kind]:
            self.wins += 1
        else:
            self.losses += 1

    @property
    def judged(self) -> int:
        return self.wins + self.losses + self.ties

    def to_dict(self) -> dict[str, Any]:
        n = self.judged
        return {
            "wins": self.wins,
            "losses": self.losses,
            "ties": self.ties,
            "invalid": self.invalid,
            "failed": self.failed,
            "judged": n,
            "win_rate": 100.0 * self.wins / n if n else None,
            "tie_rate": 100.0 * self.ties / n if n else None,
            "loss_rate": 100.0 * self.losses / n if n else None,
        }


def pairwise_summary(judgements: Iterable[Judgement]) -> dict[str, dict[str, Any]]:
    """Per source and "all": each order's counts, both combined, and how many instances got the
    same answer (not the same letter) picked in both orders."""
    counts: dict[str, dict[str, WinCount]] = {}
    by_instance: dict[tuple[str, str], dict[str, Judgement]] = {}
    for j in judgements:
        if j.kind == "alignment":
            continue
        for src in (j.source, "all"):
            group = counts.setdefault(
                src, {k: WinCount() for k in ("original_first", "new_first", "combined")}
            )
            group[j.kind].add(j)
            group["combined"].add(j)
        by_instance.setdefault((j.source, j.id), {})[j.kind] = j
    out: dict[str, dict[str, Any]] = {}
    for src, group in counts.items():
        pairs = [
            (w["original_first"], w["new_first"])
            for (s, _), w in by_instance.items()
            if src in (s, "all") and len(w) == 2
        ]
        out[src] = {k: v.to_dict() for k, v in group.items()}
        out[src]["instances_both_orders"] = len(pairs)
        # Same answer chosen in both orders: a verdict that survives the swap.
        out[src]["consistent"] = sum(1 for a, b in pairs if _winner(a) and _winner(a) == _winner(b))
        # Same letter in both orders: the judge followed the position, not the content.
        out[src]["same_letter"] = sum(
            1 for a, b in pairs if a.verdict in ("A", "B") and a.verdict == b.verdict
        )
    return _all_last(out)


def _winner(j: Judgement) -> str | None:
    if j.verdict is None:
        return None
    if j.verdict == "tie":
        return "tie"
    return "new" if j.verdict == NEW_WINS_ON[j.kind] else "original"


def alignment_summary(judgements: Iterable[Judgement]) -> dict[str, dict[str, Any]]:
    """Per source and "all": yes / no / invalid / failed and the yes rate over yes + no."""
    counts: dict[str, dict[str, int]] = {}
    for j in judgements:
        if j.kind != "alignment":
            continue
        key = j.verdict or ("invalid" if j.error == "unparseable" else "failed")
        for src in (j.source, "all"):
            c = counts.setdefault(src, {"yes": 0, "no": 0, "invalid": 0, "failed": 0})
            c[key] += 1
    out: dict[str, dict[str, Any]] = {}
    for src, c in counts.items():
        n = c["yes"] + c["no"]
        out[src] = {**c, "judged": n, "yes_rate": 100.0 * c["yes"] / n if n else None}
    return _all_last(out)


def _all_last(d: dict[str, Any]) -> dict[str, Any]:
    return {**{k: v for k, v in d.items() if k != "all"}, **({"all": d["all"]} if "all" in d else {})}


def summarize(judgements: Sequence[Judgement]) -> dict[str, Any]:
    return {"pairwise": pairwise_summary(judgements), "alignment": alignment_summary(judgements)}
