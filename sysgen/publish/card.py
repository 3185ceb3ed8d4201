"""The dataset card, DIR/README.md: YAML front matter the Hugging Face hub reads (license, task,
configs pointing at the export files), then the funnel, tag counts, model, prompt hashes and the
licences of the sources."""

from __future__ import annotations

import re
from pathlib import Path

from sysgen.atomic import write_atomic
from sysgen.eval import funnel as fn
from sysgen.eval.rundir import RunDir
from sysgen.publish.export import existing_exports
from sysgen.publish.report import table

CARD = "README.md"
UNKNOWN = "unknown — check upstream"
SAMPLES_DIR = Path(__file__).resolve().parents[1] / "samples"
# Known upstream datasets (matched on the source name with non-letters removed) and their licences.
KNOWN_LICENSES: dict[str, tuple[str, str]] = {
    "capybara": ("LDJnr/Capybara", "mit"),
    "metamath": ("meta-math/MetaMathQA", "mit"),
    "slimorca": ("Open-Orca/SlimOrca", "mit"),
    "gsm8k": ("openai/gsm8k", "mit"),
    "magicoder": ("ise-uiuc/Magicoder-OSS-Instruct-75K", "mit"),
}


def source_license(name: str, path: str = "") -> tuple[str, str]:
    """(upstream dataset, licence id) for a source name or its file path; UNKNOWN when not known."""
    if path and Path(path).resolve().parent == SAMPLES_DIR:
        return ("sysgen's bundled samples (written for the project)", "apache-2.0")
    key = re.sub(r"[^a-z0-9]", "", f"{name} {Path(path).name}".lower())
    for needle, found in KNOWN_LICENSES.items():
        if needle in key:
            return found
    return ("", UNKNOWN)


def _size_category(n: int) -> str:
    for limit, label in (
        (1_000, "n<1K"),
        (10_000, "1K<n<10K"),
        (100_000, "10K<n<100K"),
        (1_000_000, "100K<n<1M"),
    ):
        if n < limit:
            return label
    return "1M<n<10M"


def _front_matter(base: Path, kept: int, license_id: str, exports: dict[str, Path]) -> list[str]:
    lines = ["---", f"license: {license_id}"]
    if license_id == "other":
        lines.append("license_name: mixed-see-card")
    lines += [
        "task_categories:",
        "- text-generation",
        "language:",
        "- en",
        "tags:",
        "- sysgen",
        "- system-message",
        "- synthetic",
        "size_categories:",
        f"- {_size_category(kept)}",
    ]
    if exports:
        lines.append("configs:")
        for i, (fmt, path) in enumerate(exports.items()):
            lines += (
                [f"- config_name: {fmt}"]
                + (["  default: true"] if i == 0 else [])
                + ["  data_files:", "  - split: train", f"    path: {path.relative_to(base).as_posix()}"]
            )
    return lines + ["---", ""]


def render_card(
    run: RunDir,
    license: str | None = None,
    exports: dict[str, Path] | None = None,
    folder: Path | None = None,
    status: str | None = None,
) -> str:
    """The card's text, for README.md in `folder` (default: the run folder) beside the export files.
    `license` overrides the licence derived from the sources; `status` says why the run is
    unfinished, if it is."""
    base = Path(folder) if folder is not None else run.path
    paths = {name: str(info.get("path", "")) for name, info in (run.stats.get("sources") or {}).items()}
    summary = fn.summarize(run.iter_records(), run.iter_dropped())
    funnels, tags, total = summary.funnels, summary.tags, summary.funnels[fn.ALL]
    per_source = {s: source_license(s, paths.get(s, "")) for s in summary.sources}
    found = {lic for _, lic in per_source.values()}
    license_id = license or (found.pop() if len(found) == 1 and UNKNOWN not in found else "other")
    exports = exports if exports is not None else existing_exports(base)
    lines = _front_matter(base, total.kept, license_id, exports)
    lines += [
        "# SYSGEN system-message data",
        "",
        "Conversations from public SFT datasets with a generated system message and a new assistant "
        "answer written under it, made with the SYSGEN method (Jeong et al. 2025, arXiv 2502.11330): "
        "P1 generate a tagged system message, P2 filter and reorder its tags, P3 verify each tag, "
        "P4 answer the user's instruction under the kept phrases.",
        "",
        f"- generator model: `{run.model}`",
        f"- records: {total.kept:,} kept of {total.original:,} read",
    ]
    if status:
        lines.append(f"- **unfinished run**: {status}; these are the records finished so far")
    if run.stats.get("prompts"):
        hashes = ", ".join(f"{k} `{v}`" for k, v in run.stats["prompts"].items())
        lines.append(f"- prompt template hashes: {hashes}")
    if exports:
        files = ", ".join(f"`{p.relative_to(base).as_posix()}` ({f})" for f, p in exports.items())
        lines.append(f"- files: {files}")
    lines += [
        "",
        "## Sources and licences",
        "",
        table(
            ["source", "upstream", "licence"], [[s, up or "—", lic] for s, (up, lic) in per_source.items()]
        ),
        "",
    ]
    if license:
        lines += [f"Licence of this dataset as given by its maker: `{license}`.", ""]
    elif license_id == "other":
        lines += [
            "The sources' licences differ or are unknown: check each upstream before use "
            "(or pass `--license` to `sysgen export`).",
            "",
        ]
    lines += [
        "The generated text also falls under the generator model's licence.",
        "",
        "## Retention",
        "",
        table(
            ["source", *[fn.STAGE_LABELS[s] for s in fn.STAGES]],
            [
                ["all" if g == fn.ALL else g] + [f"{f.counts[s]:,} ({f.pct(s):.1f}%)" for s in fn.STAGES]
                for g, f in funnels.items()
            ],
        ),
        "",
        "## Tags (present after P2 / kept after P3)",
        "",
        table(
            ["tag", *["all" if g == fn.ALL else g for g in tags]],
            [
                [t] + [f"{tags[g].generated[t]:,} / {tags[g].kept[t]:,}" for g in tags]
                for t in tags[fn.ALL].tags
            ],
        ),
        "",
        "## Record fields",
        "",
        "`messages` = [system (generated), then the conversation's user turns (original) each "
        "followed by a new assistant answer written under that system message]; the original "
        "answers (`original_answers`, one per turn), the tags, the P3 verdicts and the P2 removals "
        "are in the run's `data.jsonl`.",
        "",
    ]
    return "\n".join(lines)


def write_card(
    run: RunDir,
    license: str | None = None,
    exports: dict[str, Path] | None = None,
    folder: Path | None = None,
    status: str | None = None,
) -> Path:
    """Write README.md into `folder` (default: the run folder), atomically, and return its path."""
    base = Path(folder) if folder is not None else run.path
    path = base / CARD
    return write_atomic(path, render_card(run, license, exports, base, status).encode())
