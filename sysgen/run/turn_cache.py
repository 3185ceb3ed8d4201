"""How much of each P4 turn's prompt the engine served from its prefix cache: turn j+1's prompt is
turn j's prompt plus its answer plus the next user message, so with history reuse working the
later turns should be mostly cached. Read from the store's results for the P4 request keys the
output records name (one per answered turn), so it covers every run that wrote into the outputs."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import orjson


class P4TurnCache:
    """add(record) for every kept and dropped record; ratios() -> [cached/prompt per turn] (index 0
    = turn 1; None where no request of that turn reported prompt tokens)."""

    def __init__(self, store_path: Path) -> None:
        self.store_path = store_path
        self.prompt: list[int] = []
        self.cached: list[int] = []
        self._db: sqlite3.Connection | None = None
        self._unreadable = not store_path.exists()

    def add(self, rec: dict[str, Any]) -> None:
        keys = (rec.get("request_keys") or {}).get("p4") or []
        for turn, key in enumerate(keys):
            counts = self._counts(key)
            if counts is None:
                continue
            while len(self.prompt) <= turn:
                self.prompt.append(0)
                self.cached.append(0)
            self.prompt[turn] += counts[0]
            self.cached[turn] += counts[1]

    def _counts(self, key: str) -> tuple[int, int] | None:
        if self._unreadable:
            return None
        try:
            if self._db is None:
                self._db = sqlite3.connect(f"file:{self.store_path}?mode=ro", uri=True)
            row = self._db.execute("SELECT value FROM results WHERE key=?", (bytes.fromhex(key),)).fetchone()
        except (sqlite3.Error, ValueError):
            self._unreadable = True  # a store of another layout, or none: the figure is left out
            return None
        if row is None:
            return None
        value = orjson.loads(row[0])
        return int(value.get("prompt_tokens") or 0), int(value.get("cached_tokens") or 0)

    def ratios(self) -> list[float | None]:
        if self._db is not None:
            self._db.close()
            self._db = None
        return [round(c / p, 3) if p else None for p, c in zip(self.prompt, self.cached, strict=True)]
