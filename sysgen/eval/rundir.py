"""Read a run's output directory (data.jsonl, dropped.jsonl, stats.json) into plain data.

Every consumer (report, eval, export, card) reads through here, so a malformed line fails once,
with its file and line number and what to do about it. Where the folder holds the run's store.db,
`load_run` first proves both outputs are the bytes the store committed (engine/sink_log.py, every
byte): a record edited by hand is refused, not reported, judged or exported as it stands; and only
the committed bytes are read, so a run still writing is reported as of its last commit.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import orjson

from engine import sink_log
from engine.store_errors import SinkMismatch

DATA = "data.jsonl"
DROPPED = "dropped.jsonl"
STATS = "stats.json"


class RunDirError(ValueError):
    """The output directory is missing a file or holds a line we cannot read."""


@dataclass(frozen=True)
class RunDir:
    """A run's output directory. Records are read from disk on each iter_*() call (a paper-scale
    run has ~800k of them: report and export stream); `records` loads them once, for eval."""

    path: Path
    stats: dict[str, Any] = field(default_factory=dict)
    # Each output's bytes its store committed, proved by load_run ("data", "dropped"); an output
    # not named here (no store.db: records copied elsewhere) is read whole.
    committed: dict[str, int] = field(default_factory=dict)

    def iter_records(self) -> Iterator[dict[str, Any]]:
        data = self.path / DATA
        for i, rec in enumerate(iter_jsonl(data, self.committed.get("data")), 1):
            if not isinstance(rec.get("messages"), list):
                raise RunDirError(f"{data}: record {i} (id {rec.get('id')!r}) has no 'messages' list")
            yield rec

    def iter_dropped(self) -> Iterator[dict[str, Any]]:
        path = self.path / DROPPED
        if path.is_file():
            yield from iter_jsonl(path, self.committed.get("dropped"))

    @cached_property
    def records(self) -> list[dict[str, Any]]:
        return list(self.iter_records())

    @property
    def model(self) -> str:
        """The generator model, from stats.json or else the first record."""
        if self.stats.get("model"):
            return str(self.stats["model"])
        first = next(self.iter_records(), None)
        return str(first.get("model") or "unknown") if first else "unknown"


def iter_jsonl(path: Path, limit: int | None = None) -> Iterator[dict[str, Any]]:
    """Objects of a .jsonl file, one per non-blank line, from its first `limit` bytes (all of it
    when None); a bad line raises naming file and line."""
    read = 0
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            read += len(raw)
            if limit is not None and read > limit:  # past the last commit: a write in progress
                return
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
    """Open DIR: data.jsonl must exist (read lazily); stats.json is read now when present; with a
    store.db, both outputs are proved to be what it committed (see the module docstring)."""
    root = Path(path)
    data = root / DATA
    if not data.is_file():
        raise RunDirError(f"{data}: not found; pass the --out directory of a `sysgen run` (it holds {DATA})")
    stats: dict[str, Any] = {}
    stats_path = root / STATS
    if stats_path.is_file():
        try:
            stats = orjson.loads(stats_path.read_bytes())
        except orjson.JSONDecodeError as exc:
            raise RunDirError(
                f"{stats_path}: not valid JSON ({exc}); delete it to report without it"
            ) from exc
    return RunDir(path=root, stats=stats, committed=_proved_lengths(root))


def _proved_lengths(root: Path) -> dict[str, int]:
    """The committed length of each output, once every committed byte is proved to be the store's;
    {} without a run's store.db (none, or only eval's judgement cache)."""
    db = root / "store.db"
    if not db.is_file():
        return {}
    try:
        return sink_log.committed_lengths(db, ("data", "dropped")) or {}
    except SinkMismatch as e:
        raise RunDirError(str(e)) from None
    except sqlite3.DatabaseError as e:
        raise RunDirError(
            f"{db}: cannot read the run's store ({e}), so its outputs cannot be checked. Fix: "
            f"restore store.db, or copy {DATA} and {DROPPED} to a folder of their own and use that"
        ) from e


def message(record: dict[str, Any], role: str) -> str | None:
    """Content of the first message with this role in a record, or None."""
    for m in record.get("messages", []):
        if m.get("role") == role:
            return str(m.get("content", ""))
    return None


def turn_pairs(record: dict[str, Any]) -> list[tuple[str, str, str | None]]:
    """(user, new answer, original answer or None) per answered turn, in order. Records before
    multi-turn carry a single `original_answer` (the first turn's)."""
    msgs = record.get("messages", [])
    users = [str(m.get("content", "")) for m in msgs if m.get("role") == "user"]
    news = [str(m.get("content", "")) for m in msgs if m.get("role") == "assistant"]
    originals = record.get("original_answers")
    if not isinstance(originals, list):
        originals = [record.get("original_answer")]
    originals = list(originals) + [None] * (len(news) - len(originals))
    return list(zip(users, news, originals[: len(news)], strict=False))
