"""Text a row carries that no format or mapping read: counted per source and key, so a user's
data never shrinks without a word (a `category` or `reference` field, a second answer column)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

log = logging.getLogger(__name__)
_DEPTH = 4


def _is_id(key: str) -> bool:
    # Identifiers label a row, they are not its text.
    k = key.lower()
    return k in ("id", "idx", "uuid", "index") or k.endswith(("_id", "_idx", "_uuid"))


def holds_text(value: object, depth: int = _DEPTH) -> bool:
    if isinstance(value, str):
        return bool(value.strip())
    if depth <= 0:
        return False
    if isinstance(value, list):
        return any(holds_text(v, depth - 1) for v in value)
    if isinstance(value, dict):
        return any(holds_text(v, depth - 1) for v in value.values())
    return False


def unused_text_keys(row: dict, used: set[str]) -> list[str]:
    return [k for k, v in row.items() if k not in used and not _is_id(str(k)) and holds_text(v)]


@dataclass
class SourceUnused:
    counts: dict[str, int] = field(default_factory=dict)
    example: str = ""  # the id of the first row that had any
    last_line: int = 0  # rows up to here are counted: a resume that reads them again adds nothing

    def to_dict(self) -> dict:
        return {
            "keys": dict(sorted(self.counts.items())),
            "example": self.example,
            "last_line": self.last_line,
        }


class UnusedFields:
    """Per source: how many rows carried text under each unused key, and an example row id."""

    def __init__(self, saved: dict | None = None) -> None:
        self.by_source: dict[str, SourceUnused] = {}
        for name, d in (saved or {}).items():
            self.by_source[name] = SourceUnused(
                dict(d.get("keys", {})), d.get("example", ""), int(d.get("last_line", 0))
            )

    def add(self, source: str, line: int, row_id: str, keys: list[str]) -> None:
        s = self.by_source.setdefault(source, SourceUnused())
        if line <= s.last_line:
            return
        s.last_line = line
        for k in keys:
            s.counts[k] = s.counts.get(k, 0) + 1
        if keys and not s.example:
            s.example = row_id

    def to_dict(self) -> dict:
        return {n: s.to_dict() for n, s in self.by_source.items() if s.counts}

    def summary(self, source: str) -> dict | None:
        """What stats.json shows for a source: {"keys": {key: rows}, "example": id}, or None."""
        s = self.by_source.get(source)
        if s is None or not s.counts:
            return None
        return {"keys": dict(sorted(s.counts.items())), "example": s.example}

    def log_summary(self) -> None:
        for name, s in self.by_source.items():
            if s.counts:
                keys = ", ".join(f"'{k}' ({n:,} rows)" for k, n in sorted(s.counts.items()))
                log.warning(
                    "source %s: text in %s is read by no format or --columns mapping (e.g. row %s); "
                    "pass --columns to map it, or ignore this if it is not part of the conversation",
                    name,
                    keys,
                    s.example,
                )
