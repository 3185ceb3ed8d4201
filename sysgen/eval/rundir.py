"""Read a run's output directory (data.jsonl, dropped.jsonl, stats.json) into plain data.

Every consumer (report, eval, export, card) reads through here, so a malformed line fails once,
with its file and line number and what to do about it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

DATA = "data.jsonl"
DROPPED = "dropped.jsonl"
STATS = "stats.json"


class RunDirError(ValueError):
    """The output directory is missing a file or holds a line we cannot read."""


@dataclass(frozen=True, slots=True)
class RunDir:
    """A run's output: kept records, dropped records and the pipeline's own stats (may be empty)."""

    path: Path
    records: list[dict[str, Any]]
    dropped: list[dict[str, Any]]
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def sources(self) -> list[str]:
        """Source names in first-seen order, kept and dropped alike."""
        seen: dict[str, None] = {}
        for row in (*self.records, *self.dropped):
            seen.setdefault(str(row.get("source") or "unknown"), None)
        return list(seen)

    @property
    def model(self) -> str:
        if self.stats.get("model"):
            return str(self.stats["model"])
        models = sorted({str(r.get("model")) for r in self.records if r.get("model")})
        return ", ".join(models) if models else "unknown"


def iter_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Objects of a .jsonl file, one per non-blank line; a bad line raises naming file and line."""
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                obj = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                raise RunDirError(
                    f"{path}:{lineno}: not valid JSON ({exc}); the run may have been killed mid-write: "
                    f"delete that line or re-run `sysgen run` with the same --out to resume"
                ) from exc
            if not isinstance(obj, dict):
                raise RunDirError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield obj


def load_run(path: Path | str) -> RunDir:
    """Load DIR/data.jsonl (required), DIR/dropped.jsonl and DIR/stats.json (optional)."""
    root = Path(path)
    data = root / DATA
    if not data.is_file():
        raise RunDirError(
            f"{data}: not found; pass the --out directory of a `sysgen run` (it holds {DATA})"
        )
    records = list(iter_jsonl(data))
    for i, rec in enumerate(records, 1):
        if not isinstance(rec.get("messages"), list):
            raise RunDirError(f"{data}: record {i} (id {rec.get('id')!r}) has no 'messages' list")
    dropped_path = root / DROPPED
    dropped = list(iter_jsonl(dropped_path)) if dropped_path.is_file() else []
    stats: dict[str, Any] = {}
    stats_path = root / STATS
    if stats_path.is_file():
        try:
            stats = orjson.loads(stats_path.read_bytes())
        except orjson.JSONDecodeError as exc:
            raise RunDirError(f"{stats_path}: not valid JSON ({exc}); delete it to report without it") \
                from exc
    return RunDir(path=root, records=records, dropped=dropped, stats=stats)


def message(record: dict[str, Any], role: str) -> str | None:
    """Content of the first message with this role in a record, or None."""
    for m in record.get("messages", []):
        if m.get("role") == role:
            return str(m.get("content", ""))
    return None
