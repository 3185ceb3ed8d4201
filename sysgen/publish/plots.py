"""The report's figures as PNGs: retention funnel, tag counts, multi-turn conversations and (after eval)
judge results.

One panel per source plus one for all sources, numbers printed on every bar so the picture can
be read without the table beside it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from sysgen.atomic import atomic_path
from sysgen.eval.funnel import ALL, STAGE_LABELS, STAGES, Funnel, TagStats

FUNNEL_PNG = "funnel.png"
TAGS_PNG = "tags.png"
JUDGES_PNG = "judges.png"
TURNS_PNG = "turns.png"
_STAGE_COLORS = ["#9e9e9e", "#b0bec5", "#90caf9", "#42a5f5", "#1e88e5", "#0d47a1"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    return plt


def _grid(n: int, width: float, height: float):
    plt = _pyplot()
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return plt, fig, list(axes.flat[:n])


def _int_ticks():
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)  # counts: never a tick at 2.5 instances


def _title(group: str) -> str:
    return "All sources" if group == ALL else group


def funnel_png(funnels: dict[str, Funnel], path: Path) -> Path:
    """Survivors per stage, one panel per source, each bar labelled "count (percent of original)"."""
    plt, fig, axes = _grid(len(funnels), 5.6, 3.9)
    for ax, (group, f) in zip(axes, funnels.items(), strict=True):
        counts = f.counts
        labels = [STAGE_LABELS[s].replace(" ", "\n") for s in STAGES]
        bars = ax.bar(labels, [counts[s] for s in STAGES], color=_STAGE_COLORS)
        ax.bar_label(bars, labels=[f"{counts[s]:,}\n{f.pct(s):.1f}%" for s in STAGES], fontsize=8, padding=2)
        ax.set_title(f"{_title(group)} (n={f.original:,})", fontsize=11)
        ax.set_ylabel("instances remaining")
        ax.yaxis.set_major_locator(_int_ticks())
        ax.set_ylim(0, max(1, f.original) * 1.3)  # head-room for the labels
        ax.tick_params(axis="x", labelsize=8)
        ax.spines[["top", "right"]].set_visible(False)
    fig.suptitle("Retention per phase (as the paper's Table 2)", fontsize=13)
    fig.tight_layout()
    with atomic_path(path) as tmp:  # a full disk leaves no 0-byte figure
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def tags_png(tag_stats: dict[str, TagStats], path: Path) -> Path:
    """Per tag: present after P2 and kept (judged Good at P3) over kept instances, and phrases copied
    from the P1 prompt's examples over every instance P1 answered; one panel per source."""
    plt, fig, axes = _grid(len(tag_stats), 6.2, 3.9)
    for ax, (group, ts) in zip(axes, tag_stats.items(), strict=True):
        tags = ts.tags
        x = range(len(tags))
        w = 0.28
        gen = ax.bar(
            [i - w for i in x], [ts.generated[t] for t in tags], w, label="after P2", color="#90caf9"
        )
        kept = ax.bar(list(x), [ts.kept[t] for t in tags], w, label="kept (P3 Good)", color="#1565c0")
        copied = ax.bar(
            [i + w for i in x],
            [ts.copied[t] for t in tags],
            w,
            label="copied from P1 examples (all answered)",
            color="#e53935",
        )
        for bars in (gen, kept, copied):
            ax.bar_label(bars, fontsize=7, padding=1)
        ax.set_xticks(list(x), tags, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel("instances with tag")
        ax.yaxis.set_major_locator(_int_ticks())
        ax.set_ylim(0, max(1, ts.instances, *ts.copied.values()) * 1.2)
        ax.set_title(
            f"{_title(group)} ({ts.instances:,} kept instance{'' if ts.instances == 1 else 's'})", fontsize=11
        )
        ax.spines[["top", "right"]].set_visible(False)
    # One legend for the figure, above the panels: inside a panel it would cover the tallest bars.
    fig.legend(*axes[0].get_legend_handles_labels(), loc="upper right", ncols=3, frameon=False, fontsize=9)
    fig.suptitle("Tag counts over kept instances (as the paper's Table 8)", fontsize=13)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    with atomic_path(path) as tmp:  # a full disk leaves no 0-byte figure
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def has_turns_figure(turns: dict[str, Any]) -> bool:
    """Whether turns_png draws: some conversation has more than one user turn."""
    return any(int(k) > 1 for k in turns.get("user_turns_histogram") or {})


def turns_png(turns: dict[str, Any], path: Path) -> Path | None:
    """User turns per conversation, and per turn j: conversations reaching j and kept records with turn
    j answered. None (nothing drawn) unless has_turns_figure."""
    if not has_turns_figure(turns):
        return None
    hist = {int(k): v for k, v in turns["user_turns_histogram"].items()}
    retention = turns.get("retention_by_turn") or {}
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    counts = sorted(hist)
    bars = left.bar(range(len(counts)), [hist[k] for k in counts], color="#64b5f6")
    left.bar_label(bars, labels=[f"{hist[k]:,}" for k in counts], fontsize=8, padding=1)
    left.set_xticks(range(len(counts)), [str(k) for k in counts])
    left.set_xlabel("user turns in the conversation")
    left.set_ylabel("instances")
    left.set_title("User turns per conversation", fontsize=11)
    turn_ids = sorted(retention, key=int)
    x = range(len(turn_ids))
    w = 0.4
    reached = [retention[j]["instances"] for j in turn_ids]
    answered = [retention[j]["answered"] for j in turn_ids]
    right.bar([i - w / 2 for i in x], reached, w, label="conversations with turn j", color="#90caf9")
    got = right.bar([i + w / 2 for i in x], answered, w, label="kept with turn j answered", color="#0d47a1")
    right.bar_label(got, labels=[f"{retention[j]['pct']:.0f}%" for j in turn_ids], fontsize=8, padding=1)
    right.set_xticks(list(x), turn_ids)
    right.set_xlabel("turn j")
    right.set_ylabel("conversations")
    right.set_ylim(0, max(1, *reached) * 1.25)
    right.set_title("Retention per turn (P4)", fontsize=11)
    right.legend(fontsize=8, frameon=False, loc="upper right")
    for ax in (left, right):
        ax.yaxis.set_major_locator(_int_ticks())
        ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    with atomic_path(path) as tmp:  # a full disk leaves no 0-byte figure
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def judges_png(judges: dict[str, Any], path: Path) -> Path | None:
    """Win rate of the new answer per source and order (Fig. 3) and alignment yes-rate (Fig. 4)."""
    pairwise, alignment = judges.get("pairwise") or {}, judges.get("alignment") or {}
    if not pairwise and not alignment:
        return None
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    groups = list(pairwise)
    orders = [
        ("original_first", "A=original, B=new", "#90caf9"),
        ("new_first", "A=new, B=original", "#64b5f6"),
        ("combined", "both orders", "#0d47a1"),
    ]
    w = 0.27
    for k, (key, label, color) in enumerate(orders):
        vals = [pairwise[g][key]["win_rate"] or 0.0 for g in groups]
        bars = left.bar([i + (k - 1) * w for i in range(len(groups))], vals, w, label=label, color=color)
        left.bar_label(bars, labels=[f"{v:.0f}" for v in vals], fontsize=7, padding=1)
    left.axhline(50, color="#c62828", lw=1, ls="--", label="50%")
    left.set_xticks(range(len(groups)), [_title(g) for g in groups], rotation=20, ha="right", fontsize=8)
    left.set_ylim(0, 128)  # head-room above 100% holds the legend, clear of the bars
    left.set_yticks(range(0, 101, 20))
    left.set_ylabel("new answer judged better (%)")
    left.set_title("Pairwise judge: new vs original (Fig. 3)", fontsize=11)
    left.legend(fontsize=7, loc="upper center", ncols=4, frameon=False)
    agroups = list(alignment)
    avals = [alignment[g]["yes_rate"] or 0.0 for g in agroups]
    bars = right.bar([_title(g) for g in agroups], avals, color="#2e7d32")
    right.bar_label(
        bars,
        labels=[f"{v:.0f}% (n={alignment[g]['judged']})" for v, g in zip(avals, agroups, strict=True)],
        fontsize=7,
        padding=1,
    )
    right.set_ylim(0, 115)
    right.set_yticks(range(0, 101, 20))
    right.set_ylabel("answers following the system message (%)")
    right.set_title("Alignment judge (Fig. 4)", fontsize=11)
    right.tick_params(axis="x", rotation=20, labelsize=8)
    for ax in (left, right):
        ax.spines[["top", "right"]].set_visible(False)
    fig.suptitle(f"LLM judge: {judges.get('model', '?')}", fontsize=12)
    fig.tight_layout()
    with atomic_path(path) as tmp:  # a full disk leaves no 0-byte figure
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
