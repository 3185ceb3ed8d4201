"""`sysgen report DIR`: report.md and PNG figures from any run's output directory.

Funnel and tag counts are recomputed from data.jsonl + dropped.jsonl (so the report is right
even for a directory stats.json does not describe); stats.json adds model and prompt hashes;
eval.json, when `sysgen eval` has run, adds the answer metrics and judge results.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sysgen.atomic import write_atomic
from sysgen.eval import funnel as fn
from sysgen.eval import paper
from sysgen.eval.evaluate import read_eval
from sysgen.eval.rundir import RunDir, load_run
from sysgen.publish import plots
from sysgen.run import stats

REPORT_MD = "report.md"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; the first column left-aligned, the rest right-aligned."""
    align = [":--"] + ["--:"] * (len(headers) - 1)
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _num(v: Any, digits: int = 1) -> str:
    return "n/a" if v is None or (isinstance(v, float) and v != v) else f"{v:.{digits}f}"


def _group(name: str) -> str:
    return "**all**" if name == fn.ALL else name


def funnel_section(funnels: dict[str, fn.Funnel]) -> list[str]:
    rows2 = []
    for g, f in funnels.items():
        c = f.counts
        rows2.append(
            [
                _group(g),
                f"{c['original']:,} → {c['p2']:,} ({f.pct('p2'):.1f}%) → {c['p4']:,} ({f.pct('p4'):.1f}%)",
            ]
        )
    full = [
        [_group(g)] + [f"{f.counts[s]:,} ({f.pct(s):.1f}%)" for s in fn.STAGES] for g, f in funnels.items()
    ]
    reasons = Counter[str]()
    for g, f in funnels.items():
        if g != fn.ALL:
            reasons.update(f.drops_by_reason)
    groups = [g for g in funnels if g != fn.ALL]
    drop_rows = [
        [r] + [funnels[g].drops_by_reason.get(r, 0) for g in groups] + [n]
        for r, n in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))
    ]
    out = [
        "## Retention (the paper's Table 2)",
        "",
        "Instances: Original → P2 filtering → P4 answer generation (percent of original).",
        "",
        table(["source", "Original → P2 → P4"], rows2),
        "",
        "Every stage (survivors after each phase, percent of original):",
        "",
        table(["source", *[fn.STAGE_LABELS[s] for s in fn.STAGES]], full),
        "",
        "![retention funnel](funnel.png)",
        "",
    ]
    out += ["### Why instances were dropped", ""]
    out += [table(["phase:reason", *groups, "all"], drop_rows) if drop_rows else "Nothing was dropped.", ""]
    return out


def copies_line(tag_stats: dict[str, fn.TagStats]) -> list[str]:
    """The funnel's note on copied example phrases (`p2:copied_example` above: every tag was one)."""
    total = tag_stats[fn.ALL]
    n = sum(total.copied.values())
    if not total.p1_answered:
        return []
    per_tag = ", ".join(f"{t} {c:,}" for t, c in total.copied.items() if c) or "none"
    return [
        f"P2 found {n:,} tag phrase{'' if n == 1 else 's'} copied from the P1 prompt's worked examples "
        f"in {total.p1_answered:,} instances P1 answered (per tag: {per_tag}); see *P2 removals* "
        "below.",
        "",
    ]


def turns_section(turns: dict[str, Any], run_stats: dict[str, Any]) -> list[str]:
    """Conversations: user turns per instance, retention per turn, loops, and prefix reuse per phase."""
    out = ["## Conversations (multi-turn P4)", ""]
    hist = turns.get("user_turns_histogram") or {}
    if hist:
        out += [
            "User turns per conversation (instances whose turns are known):",
            "",
            table(["user turns", "instances"], [[k, f"{v:,}"] for k, v in hist.items()]),
            "",
            "Retention per turn: conversations that have turn j, and kept records with turn j answered:",
            "",
            table(
                ["turn", "conversations", "answered", "retention"],
                [
                    [j, f"{r['instances']:,}", f"{r['answered']:,}", f"{r['pct']:.1f}%"]
                    for j, r in (turns.get("retention_by_turn") or {}).items()
                ],
            ),
            "",
        ]
        if plots.has_turns_figure(turns):
            out += [f"![conversations]({plots.TURNS_PNG})", ""]
    out += [
        f"- turns resampled after a repetition loop: {turns.get('p4_resampled', 0):,} "
        f"({turns.get('p4_resample_kept', 0):,} of them kept)",
        f"- records kept partial (--keep-partial): {turns.get('partial_records', 0):,}",
        "",
    ]
    by_phase = ((run_stats.get("this_run") or {}).get("scheduler") or {}).get("by_phase") or {}
    if by_phase:
        rows = [
            [
                ph,
                f"{d.get('prompt_tokens', 0):,}",
                f"{d.get('cached_tokens', 0):,}",
                f"{d.get('completion_tokens', 0):,}",
                f"{100 * d['cached_tokens'] / d['prompt_tokens']:.1f}%" if d.get("prompt_tokens") else "n/a",
            ]
            for ph, d in sorted(by_phase.items())
        ]
        out += [
            "Engine tokens by phase in the last run (cached = prompt tokens the engine's prefix cache "
            "served; P4's later turns reuse their whole history):",
            "",
            table(["phase", "prompt", "cached", "completion", "cached / prompt"], rows),
            "",
        ]
    # stats.json's figure (read from the store); the report's own turn counts come from the records.
    by_turn = (
        turns.get("p4_cached_ratio_by_turn")
        or (run_stats.get("turns") or {}).get("p4_cached_ratio_by_turn")
        or []
    )
    if by_turn:
        out += [
            "P4 prompt tokens served from the prefix cache, per turn (all runs into these outputs; "
            "turn 2 and later should be mostly cached):",
            "",
            table(
                ["turn", "cached / prompt"],
                [[j, "n/a" if r is None else f"{100 * r:.1f}%"] for j, r in enumerate(by_turn, 1)],
            ),
            "",
        ]
    return out


def tags_section(tag_stats: dict[str, fn.TagStats]) -> list[str]:
    groups = list(tag_stats)
    tags = tag_stats[fn.ALL].tags
    rows = [[t] + [f"{tag_stats[g].generated[t]:,} / {tag_stats[g].kept[t]:,}" for g in groups] for t in tags]
    rows.append(["instances"] + [f"{tag_stats[g].instances:,}" for g in groups])
    total = tag_stats[fn.ALL]
    vrows = [[t] + [total.verdicts.get(t, Counter()).get(v, 0) for v in fn.VERDICTS] for t in tags]
    return [
        "## Tags (the paper's Table 8)",
        "",
        "Over kept instances: cells are *present after P2 / kept (judged Good at P3)*.",
        "",
        table(["tag", *[_group(g) for g in groups]], rows),
        "",
        "P3 verdicts per tag, kept instances, all sources:",
        "",
        table(["tag", *fn.VERDICTS], vrows),
        "",
        *p2_section(tag_stats),
        "![tag counts](tags.png)",
        "",
    ]


def p2_section(tag_stats: dict[str, fn.TagStats]) -> list[str]:
    """P2 removals per tag and reason, and phrases copied from the P1 prompt's examples per tag and
    source, over every instance P1 answered (a record full of copies is often dropped, so counting
    kept records alone would hide them)."""
    total, groups = tag_stats[fn.ALL], list(tag_stats)
    tags = total.tags
    # P2 names a malformed line by its first characters, not a tag: those share one row.
    other = sum((c for k, c in total.p2_removed.items() if k not in tags), Counter())
    reasons = sorted({r for c in total.p2_removed.values() for r in c} - {"copied_example"})
    rows = [[t, *(total.p2_removed.get(t, Counter())[r] for r in reasons), total.copied[t]] for t in tags]
    if other:
        rows.append(["other lines", *(other[r] for r in reasons), 0])
    crows = [[t] + [tag_stats[g].copied[t] for g in groups] for t in tags]
    crows.append(["instances P1 answered"] + [f"{tag_stats[g].p1_answered:,}" for g in groups])
    return [
        f"P2 removals per tag and reason, all sources ({total.p1_answered:,} instances P1 answered, "
        "kept or not). *copied* counts phrases that copy a phrase of the P1 prompt's worked examples "
        "(reason `copied_example`; with `--keep-copies` they are kept and only marked):",
        "",
        table(["tag", *reasons, "copied"], rows),
        "",
        "Phrases copied from the P1 prompt's examples, per tag and source:",
        "",
        table(["tag", *[_group(g) for g in groups]], crows),
        "",
    ]


def paper_section() -> list[str]:
    t2 = [
        [m, f"{o:,} → {p2:,} ({p2_pct}%) → {p4:,} ({p4_pct}%)"]
        for m, o, p2, p2_pct, p4, p4_pct in paper.TABLE2
    ]
    t8 = [[t, *(f"{v:,}" for v in vals)] for t, vals in paper.TABLE8.items()]
    t1 = [[row[0], *row[1:]] for row in paper.TABLE1]
    return [
        "## Reference: the paper's numbers (Jeong et al. 2025, arXiv 2502.11330)",
        "",
        "Not ours: the SYSGEN paper's tables, for comparison. Its runs used 806,796 instances "
        "from five datasets and 8B-14B models.",
        "",
        "Paper, Table 2:",
        "",
        table(["model", "Original → P2 → P4"], t2),
        "",
        "Paper, Table 8 (generated tags):",
        "",
        table(["tag", *paper.TABLE8_MODELS], t8),
        "",
        "Paper, Table 1 (its BERTScore and BLEURT models differ from ours: compare trends, not values):",
        "",
        table(["model", "R1", "R2", "RL", "BERTScore", "BLEURT", "GLEU", "Len."], t1),
        "",
    ]


def metrics_section(ev: dict[str, Any]) -> list[str]:
    m = ev.get("metrics") or {}
    by_source = m.get("by_source") or {}
    if not by_source:
        return []
    rows = []
    for g, r in by_source.items():
        ln = r.get("length", {})
        rows.append(
            [
                _group(g),
                r["with_original"],
                r["without_original"],
                _num(r.get("rouge1")),
                _num(r.get("rouge2")),
                _num(r.get("rougeL")),
                _num(r.get("bertscore_f1")),
                _num(r.get("bleurt")),
                _num(r.get("gleu_corpus")),
                _num(r.get("gleu_sentence_mean")),
                f"{_num(ln.get('original_words'), 0)} → {_num(ln.get('new_words'), 0)}",
                _num(ln.get("ratio_words"), 2),
                _num(ln.get("ratio_chars"), 2),
            ]
        )
    bs, bl = m.get("bertscore", {}), m.get("bleurt", {})
    notes = [f"- {k}: {v}" for k, v in (m.get("conventions") or {}).items()]
    if bs.get("status") == "ok":
        notes.append(
            f"- BERTScore: F1 with model `{bs.get('model')}`, {bs.get('detail')}, no baseline rescaling"
        )
    else:
        notes.append(f"- BERTScore: skipped ({bs.get('reason')})")
    notes.append(
        "- BLEURT: "
        + (
            f"`{bl.get('model')}` ({bl.get('detail')})"
            if bl.get("status") == "ok"
            else f"skipped ({bl.get('reason')})"
        )
    )
    notes.append(
        "- n/a: no instance in that group has an original answer (prompt-only data); "
        "'no orig.' counts them, they only enter the new-answer length."
    )
    every = (m.get("all_turns") or {}).get("by_source") or {}
    if every:
        rows_all = [
            [
                _group(g),
                r["with_original"],
                _num(r.get("rouge1")),
                _num(r.get("rouge2")),
                _num(r.get("rougeL")),
                _num(r.get("gleu_corpus")),
                _num((r.get("length") or {}).get("ratio_words"), 2),
            ]
            for g, r in every.items()
        ]
        notes += [
            "",
            "Every answered turn pair (multi-turn records; the table above is first turns only, "
            "as in the paper):",
            "",
            table(["source", "turn pairs", "R1", "R2", "RL", "GLEU", "Len. (words)"], rows_all),
        ]
    cp = m.get("copied_examples")
    if cp:
        notes.append(
            f"- System messages holding a phrase of the P1 prompt's worked examples word for word: "
            f"{cp['with_example_phrase']:,} of {cp['records']:,} kept records ({cp['pct']:.1f}%; "
            "0 is the goal)" + (f"; {cp['note']}" if cp.get("note") else "")
        )
    return [
        "## Answer quality: new vs original (the paper's Table 1)",
        "",
        table(
            [
                "source",
                "pairs",
                "no orig.",
                "R1",
                "R2",
                "RL",
                "BERTScore",
                "BLEURT",
                "GLEU",
                "sent. GLEU",
                "words orig → new",
                "Len. (words)",
                "Len. (chars)",
            ],
            rows,
        ),
        "",
        *notes,
        "",
    ]


def _rate(d: dict[str, Any] | None) -> str:
    if not d or d.get("win_rate") is None:
        return "n/a"
    return f"{d['win_rate']:.1f}% ({d['wins']}/{d['judged']})"


def _bias_note(d: dict[str, Any] | None) -> list[str]:
    if not d or not d["instances_both_orders"]:
        return []
    share = d.get("same_letter", 0) / d["instances_both_orders"]
    if share <= 0.5:
        return []
    return [
        f"**Position bias**: the judge picked the same letter in both orders for {100 * share:.0f}% of "
        "instances, so the per-order rates mostly reflect the position; only the combined rate means "
        "something, and a stronger judge (`--judge-engine`, `--judge-model`) would mean more.",
        "",
    ]


def judges_section(ev: dict[str, Any]) -> list[str]:
    j = ev.get("judges") or {}
    if j.get("status") != "ok":
        return ["## LLM judges", "", f"Not run: {j.get('reason', 'run `sysgen eval DIR`')}.", ""] if j else []
    pw, al = j.get("pairwise") or {}, j.get("alignment") or {}
    prow = [
        [
            _group(g),
            _rate(d["original_first"]),
            _rate(d["new_first"]),
            _rate(d["combined"]),
            d["combined"]["ties"],
            f"{d['consistent']}/{d['instances_both_orders']}",
            f"{d.get('same_letter', 0)}/{d['instances_both_orders']}",
            d["combined"]["invalid"],
            d["combined"]["failed"],
        ]
        for g, d in pw.items()
    ]
    arow = [
        [
            _group(g),
            _num(d["yes_rate"]) + "%" if d["yes_rate"] is not None else "n/a",
            d["yes"],
            d["no"],
            d["invalid"],
            d["failed"],
        ]
        for g, d in al.items()
    ]
    out = [
        "## LLM judges (the paper's Fig. 3 and Fig. 4)",
        "",
        f"Judge: `{j.get('model')}` via {j.get('engine')}, temperature 0, "
        f"{'regex-constrained verdicts' if j.get('regex') else 'verdicts parsed from free text'}; "
        f"{j.get('instances')} instances judged"
        + (f" (--judge-limit {j['limit']}, round-robin over sources)" if j.get("limit") else "")
        + ". "
        f"Prompt hashes: {', '.join(f'{k} `{v}`' for k, v in (j.get('prompts') or {}).items())}.",
        "",
        "Win rate of the new answer over the original, per order and combined (ties count as not a win; "
        "*same pick* = instances whose two orders chose the same answer, *same letter* = chose the same "
        "position):",
        "",
        table(
            [
                "source",
                "A=original, B=new",
                "A=new, B=original",
                "both orders",
                "ties",
                "same pick",
                "same letter",
                "invalid",
                "failed",
            ],
            prow,
        )
        if prow
        else "No instance had an original answer to compare.",
        "",
        *_bias_note(pw.get("all")),
        "Does the new answer follow its system message?",
        "",
        table(["source", "yes rate", "yes", "no", "invalid", "failed"], arow)
        if arow
        else "No alignment judgements.",
        "",
    ]
    if (Path(ev.get("_dir", ".")) / plots.JUDGES_PNG).exists():
        out += ["![judges](judges.png)", ""]
    return out


def header(run: RunDir, summary: fn.Summary) -> list[str]:
    st, total = run.stats, summary.funnels[fn.ALL]
    out = [
        f"# SYSGEN run report: `{run.path.name}`",
        "",
        f"- model: `{run.model}`",
        f"- instances: {total.original:,} read, {total.kept:,} kept, {total.original - total.kept:,} dropped",
    ]
    for name, info in (st.get("sources") or {}).items():
        fmt = f" ({info['fmt']})" if info.get("fmt") else ""
        out.append(f"- source `{name}`: `{info.get('path')}`{fmt}")
        unused = info.get("unused_fields")
        if unused:  # the user's data held more text than was read: say where
            keys = ", ".join(f"`{k}` ({n:,} rows)" for k, n in unused["keys"].items())
            out.append(
                f"  - text not read (no format or --columns mapping uses it): {keys}; "
                f"e.g. row `{unused['example']}`"
            )
    if st.get("prompts"):
        out.append("- prompt template hashes: " + ", ".join(f"{k} `{v}`" for k, v in st["prompts"].items()))
    if st.get("partial"):  # a merge forced with --allow-partial
        out.append(f"- **PARTIAL MERGE** (`--allow-partial`): {'; '.join(st['partial'])}")
    if st.get("stale") or st.get("finished") is False:
        out.append("- **note**: the run that wrote these outputs did not finish; figures are incomplete")
    dups = summary.duplicates
    if dups:
        out.append(
            f"- **warning**: {len(dups)} ids appear more than once in data.jsonl + dropped.jsonl "
            f"(first: {', '.join(dups[:5])}); every row should end in exactly one place"
        )
    theirs = (st.get("funnel") or {}).get("p4_kept")
    if theirs is not None and theirs != total.kept:
        out.append(
            f"- **note**: stats.json says p4_kept={theirs}, data.jsonl holds {total.kept} "
            "records (a run still in progress or resumed); the tables below count the files"
        )
    return out + [""]


def render(
    run: RunDir, summary: fn.Summary, ev: dict[str, Any] | None = None, turns: dict[str, Any] | None = None
) -> str:
    parts = header(run, summary) + funnel_section(summary.funnels) + copies_line(summary.tags)
    if turns is None:
        turns = stats.turn_stats(run.iter_records(), run.iter_dropped())
    parts += turns_section(turns, run.stats)
    parts += tags_section(summary.tags)
    if ev:
        parts += metrics_section(ev) + judges_section({**ev, "_dir": str(run.path)})
    else:
        parts += ["## Answer quality and judges", "", "Run `sysgen eval DIR` to add them.", ""]
    return "\n".join(parts + paper_section())


def write_report(out_dir: Path | str) -> Path:
    """Write DIR/report.md, DIR/funnel.png, DIR/tags.png, DIR/turns.png when conversations have more
    than one user turn (and DIR/judges.png after eval)."""
    run = load_run(out_dir)
    ev = read_eval(run.path)
    summary = fn.summarize(run.iter_records(), run.iter_dropped())
    turns = stats.turn_stats(run.iter_records(), run.iter_dropped())
    plots.funnel_png(summary.funnels, run.path / plots.FUNNEL_PNG)
    plots.tags_png(summary.tags, run.path / plots.TAGS_PNG)
    plots.turns_png(turns, run.path / plots.TURNS_PNG)
    if ev and (ev.get("judges") or {}).get("status") == "ok":
        plots.judges_png(ev["judges"], run.path / plots.JUDGES_PNG)
    path = run.path / REPORT_MD
    return write_atomic(path, render(run, summary, ev, turns).encode())
