"""Phrases copied from the P1 prompt's worked examples.

A small model asked for a system message often answers with the prompt's own example ("You are a
friendly math tutor for school students.") whatever the conversation is about; SFT on such records
teaches one persona. The examples are read from the prompt text itself, so an edited or a user's own
prompt is checked against what it really shows.

The rule, on words (lower case; punctuation, case and spacing ignored):
- a phrase that holds an example phrase word for word is a copy (the example plus a tail is still
  the example), and so is one that holds RUN_SHARE of an example's words as one unbroken run of at
  least RUN_MIN words ("You are a senior Python developer and patient tutor for students.");
- a phrase whose words match an example's in order for at least NEAR_RATIO of both lengths together
  (difflib's 2M/T on words) is a near-copy: "You are a friendly math tutor for high school students."
Generic phrases that share only an opening ("You are a helpful assistant.") stay well below both
(docs/copies.md has the scores measured on real outputs).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from difflib import SequenceMatcher
from functools import cache
from typing import Any

NEAR_RATIO = 0.8
RUN_SHARE, RUN_MIN = 0.75, 5
_WORD = re.compile(r"[a-z0-9]+(?:['\u2019][a-z0-9]+)*")  # an apostrophe, straight or typographic
_EXAMPLE_LINE = re.compile(r"^\s*<([A-Za-z]+)>([^<>\n]*?)</\1>\s*$", re.MULTILINE)


def words(text: str) -> tuple[str, ...]:
    """The words of a phrase as compared: lower case, punctuation and spacing dropped."""
    return tuple(_WORD.findall(text.lower()))


def _spaced(ws: tuple[str, ...]) -> str:
    """Words as " a b c ": one phrase holds another word for word iff this string holds the other's."""
    return f" {' '.join(ws)} "


@dataclass(frozen=True, slots=True)
class Examples:
    """The tagged example phrases of one prompt, as written and as word tuples."""

    phrases: tuple[str, ...]
    _words: tuple[tuple[str, ...], ...]
    _spaced: tuple[str, ...]
    _index: dict[str, tuple[int, ...]]  # word -> the examples that hold it

    def __len__(self) -> int:
        return len(self.phrases)

    def match(self, phrase: str) -> str | None:
        """The example phrase `phrase` copies or nearly copies, or None."""
        got = words(phrase)
        if not got:
            return None
        # Words of the phrase found in each example: a bound on the words any rule can match, so the
        # alignment runs only for the few examples that could pass (P2 stays cheap at paper scale).
        shared = [0] * len(self.phrases)
        for w in got:
            for i in self._index.get(w, ()):
                shared[i] += 1
        spaced = _spaced(got)
        for i, n in enumerate(shared):
            ex = self._words[i]
            whole_or_run = min(len(ex), max(RUN_MIN, RUN_SHARE * len(ex)))
            if n < whole_or_run and 2 * n < NEAR_RATIO * (len(got) + len(ex)):
                continue
            if self._spaced[i] in spaced:
                return self.phrases[i]
            sm = SequenceMatcher(None, got, ex, autojunk=False)
            run = sm.find_longest_match(0, len(got), 0, len(ex)).size
            if sm.ratio() >= NEAR_RATIO or (run >= RUN_MIN and run >= RUN_SHARE * len(ex)):
                return self.phrases[i]
        return None

    def found_in(self, text: str) -> list[str]:
        """Example phrases that `text` (a whole system message) holds word for word."""
        spaced = _spaced(words(text))
        return [p for p, ex in zip(self.phrases, self._spaced, strict=True) if ex in spaced]


def copied_tags(row: dict[str, Any]) -> list[str]:
    """The tags of an output row (kept or dropped) whose phrase copied a P1 example: `p2_copied`,
    written in both modes, or else the P2 drop reason."""
    if row.get("p2_copied"):
        return list(row["p2_copied"])
    return [t for t, r in (row.get("p2_dropped") or {}).items() if r == "copied_example"]


@cache
def examples(prompt: str) -> Examples:
    """Every `<Tag>phrase</Tag>` line of a prompt: its worked examples (the tag descriptions of the
    bundled prompt have no closing tag, so they are not taken for examples)."""
    seen: dict[str, tuple[str, ...]] = {}
    for m in _EXAMPLE_LINE.finditer(prompt):
        phrase = m.group(2).strip()
        if words(phrase) and phrase not in seen:
            seen[phrase] = words(phrase)
    ws = tuple(seen.values())
    index: dict[str, list[int]] = {}
    for i, w in enumerate(ws):
        for word in set(w):
            index.setdefault(word, []).append(i)
    return Examples(tuple(seen), ws, tuple(map(_spaced, ws)), {k: tuple(v) for k, v in index.items()})


def copied_share(system_messages: Iterable[str], ex: Examples) -> dict[str, object]:
    """How many system messages hold an example phrase word for word (0 is the goal), and which."""
    total = hits = 0
    by_phrase: dict[str, int] = {}
    for msg in system_messages:
        total += 1
        found = ex.found_in(msg)
        hits += bool(found)
        for p in found:
            by_phrase[p] = by_phrase.get(p, 0) + 1
    return {
        "records": total,
        "with_example_phrase": hits,
        "pct": round(100 * hits / total, 2) if total else 0.0,
        "by_phrase": dict(sorted(by_phrase.items(), key=lambda kv: (-kv[1], kv[0]))),
    }
