"""The eight functionalities: the P1/P3 regexes, P2 parse-filter-reorder, P3 verdicts, P4 stripping.

Tagged form, one phrase per line: `<Role>You are a patient math tutor.</Role>`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cache

from sysgen.copies import Examples

TAGS: tuple[str, ...] = ("Role", "Content", "Task", "Action", "Style", "Background", "Tool", "Format")
VERDICTS: tuple[str, ...] = ("Good", "Bad", "None")
PHRASE_MAX = 300  # characters per phrase; longer ones are rambling, not a system-message clause
# Phrase body: no tag brackets, no newline, starts with a non-blank so "<Role> </Role>" is impossible.
# Unbounded on purpose: xgrammar expands a bounded repeat {0,299} into ~300 states per tag, which
# measured (bench.grammar, SmolLM2 vocabulary) 16.6 us p50 / 371 us p90 per mask and 142 ms per
# 256-sequence step, a predicted 9.5x slower 8B decode step on an H100; the unbounded class costs
# 1.2 us p50 / 1.5 us p90 and 0.4 ms, ratio 1.02. The length is enforced by P2 (too_long) and by
# the P1 token budget instead.
PHRASE_RE = r"[^<>\n \t][^<>\n]*"
_BLANK = " \t"  # what P2 strips from a phrase: exactly what PHRASE_RE forbids as a first character


def _tag_line(tag: str) -> str:
    return f"<{tag}>{PHRASE_RE}</{tag}>\n"


@cache
def p1_regex() -> str:
    """Well-formed tag lines, each tag at most once, in the fixed order, at least one.

    "At least one of an ordered optional sequence" has no small flat regex; we branch on which tag
    comes first: A_i = T_i (T_{i+1})? ... (T_8)?  |  A_{i+1}. That is 36 tag patterns, linear in
    states for the matcher (each branch is a disjoint literal prefix), and it never admits "".
    """
    n = len(TAGS)
    branches = []
    for i in range(n):
        rest = "".join(f"(?:{_tag_line(t)})?" for t in TAGS[i + 1 :])
        branches.append(_tag_line(TAGS[i]) + rest)
    return "(?:" + "|".join(branches) + ")"


def p3_regex(tags: Sequence[str]) -> str:
    """One verdict line per present tag, in order: fixed literals the engine can jump over."""
    return _p3_regex(tuple(tags))


@cache  # one per tag subset (at most 255 in a run); built for every P3 request otherwise
def _p3_regex(tags: tuple[str, ...]) -> str:
    verdict = "(?:" + "|".join(VERDICTS) + ")"
    return "".join(f"{re.escape(t)}: {verdict}\n" for t in tags)


def p3_token_bound(tags: Sequence[str]) -> int:
    """Tokens enough for any output p3_regex(tags) admits, end-of-sequence included: the output is
    ASCII, so every token carries at least one character. Constrained decoding may pick unusual
    splits ("N", "one"), which is why a budget from typical tokenizations truncates (measured:
    SmolLM2 cut 3 of 10 real instances at 48 tokens with 7 tags)."""
    return _p3_token_bound(tuple(tags))


@cache
def _p3_token_bound(tags: tuple[str, ...]) -> int:
    longest = max(map(len, VERDICTS))
    return sum(len(f"{t}: \n") + longest for t in tags) + 1


_LINE = re.compile(r"^\s*<([A-Za-z]+)>(.*?)</([A-Za-z]+)>\s*$")
_VERDICT = re.compile(r"^\s*\**\s*([A-Za-z]+)\s*\**\s*[:\-]\s*\**\s*(Good|Bad|None)\b", re.IGNORECASE)
_TAG_BY_LOWER = {t.lower(): t for t in TAGS}


@dataclass(frozen=True, slots=True)
class Filtered:
    """P2's outcome: surviving tags in the fixed order, and every dropped piece with its reason."""

    tags: dict[str, str]
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (tag or line excerpt, reason)
    well_formed: bool = True  # every non-blank line was a valid, known, first-seen tag line
    # tag -> (its phrase, the P1 example phrase it copies); dropped as "copied_example" unless kept on request
    copied: dict[str, tuple[str, str]] = field(default_factory=dict)

    def render(self) -> str:
        return render_tagged(self.tags)


def render_tagged(tags: dict[str, str]) -> str:
    return "".join(f"<{t}>{tags[t]}</{t}>\n" for t in TAGS if t in tags)


# What constrained P1 output nearly always is: known tags, each line exactly as _tag_line writes it.
# Such text is parsed in one regex pass; anything else takes the line-by-line path, which gives the
# same answer for this text (tested) and also names every drop.
_TAG_ALT = "|".join(TAGS)
_WELL_FORMED = re.compile(rf"(?:<({_TAG_ALT})>{PHRASE_RE}</\1>\n)+")
_WELL_LINE = re.compile(rf"<({_TAG_ALT})>({PHRASE_RE})</\1>\n")


def filter_tags(text: str, examples: Examples | None = None, keep_copies: bool = False) -> Filtered:
    """P2: parse tag lines; drop malformed, unknown, mismatched, empty, overlong or duplicate tags,
    and phrases that copy one of `examples` (the P1 prompt's; `keep_copies` only marks them);
    return the rest in the fixed order. `well_formed` is about the parse alone."""
    parsed = _parse(text)
    if not examples or not parsed.tags:
        return parsed
    copied = {t: (p, ex) for t, p in parsed.tags.items() if (ex := examples.match(p)) is not None}
    if not copied:
        return parsed
    if keep_copies:
        return replace(parsed, copied=copied)
    return replace(
        parsed,
        tags={t: p for t, p in parsed.tags.items() if t not in copied},
        dropped=parsed.dropped + [(t, "copied_example") for t in copied],
        copied=copied,
    )


def _parse(text: str) -> Filtered:
    if _WELL_FORMED.fullmatch(text):
        pairs = _WELL_LINE.findall(text)
        found = {t: p.rstrip(_BLANK) for t, p in pairs}  # PHRASE_RE already forbids leading blanks
        if len(found) == len(pairs) and all(len(p) <= PHRASE_MAX for p in found.values()):
            return Filtered(tags={t: found[t] for t in TAGS if t in found}, dropped=[], well_formed=True)
    return _filter_lines(text)


def _filter_lines(text: str) -> Filtered:
    found: dict[str, str] = {}
    dropped: list[tuple[str, str]] = []
    for raw in text.split("\n"):  # only "\n": the regex admits other Unicode line separators in phrases
        if not raw.strip():
            continue
        m = _LINE.match(raw)
        if not m:
            dropped.append((raw.strip()[:60], "malformed"))
            continue
        open_tag, phrase, close_tag = m.group(1), m.group(2).strip(_BLANK), m.group(3)
        tag = _TAG_BY_LOWER.get(open_tag.lower())
        if open_tag != close_tag:
            dropped.append((open_tag, "mismatched_close"))
        elif tag is None or tag != open_tag:
            dropped.append((open_tag, "unknown_tag"))
        elif not phrase:
            dropped.append((tag, "empty"))
        elif "<" in phrase or ">" in phrase:
            dropped.append((tag, "nested_markup"))
        elif len(phrase) > PHRASE_MAX:
            dropped.append((tag, "too_long"))
        elif tag in found:
            dropped.append((tag, "duplicate"))
        else:
            found[tag] = phrase
    ordered = {t: found[t] for t in TAGS if t in found}
    return Filtered(tags=ordered, dropped=dropped, well_formed=not dropped and bool(ordered))


# Constrained P3 output exactly (p3_regex): read in one pass; anything looser goes line by line
# through _VERDICT, which reads these lines the same way (tested).
_VERDICT_ONLY = rf"({_TAG_ALT}): (Good|Bad|None)"
_VERDICT_TEXT = re.compile(rf"(?:{_VERDICT_ONLY}\n)*{_VERDICT_ONLY}\n?")
_VERDICT_EXACT = re.compile(_VERDICT_ONLY)


def parse_verdicts(text: str, tags: Sequence[str]) -> dict[str, str]:
    """P3: one verdict per present tag. A tag the verifier did not judge gets "None" (not kept)."""
    wanted = {t.lower(): t for t in tags}
    out: dict[str, str] = {}
    if _VERDICT_TEXT.fullmatch(text):
        pairs = _VERDICT_EXACT.findall(text)
    else:
        pairs = [(m.group(1), m.group(2).capitalize()) for m in map(_VERDICT.match, text.splitlines()) if m]
    for name, verdict in pairs:
        tag = wanted.get(name.lower())
        if tag and tag not in out:
            out[tag] = verdict
    return {t: out.get(t, "None") for t in tags}


def kept_tags(tags: dict[str, str], verdicts: dict[str, str]) -> dict[str, str]:
    return {t: p for t, p in tags.items() if verdicts.get(t) == "Good"}


def strip_tags(tags: dict[str, str]) -> str:
    """P4: the kept phrases, in the fixed order, as one natural paragraph."""
    sentences = []
    for t in TAGS:
        phrase = tags.get(t, "").strip()
        if not phrase:
            continue
        if phrase[-1] not in ".!?:;\"')":
            phrase += "."
        sentences.append(phrase[0].upper() + phrase[1:])
    return " ".join(sentences)
