"""One conversation from an SFT file, in a single shape whatever the source format."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import orjson
import xxhash

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True, slots=True)
class Turn:
    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class Instance:
    """`id` is "<source>:<line>" (row index for parquet/json arrays), stable for a given file.
    `offset` is the byte offset of the row in an uncompressed .jsonl file (-1 elsewhere), so a
    resumed run can seek past work already done."""

    id: str
    source: str
    fmt: str
    turns: tuple[Turn, ...]
    path: str = ""
    line: int = 0
    offset: int = -1

    @property
    def system(self) -> str | None:
        return self.turns[0].content if self.turns and self.turns[0].role == "system" else None

    @property
    def first_user(self) -> str:
        return next(t.content for t in self.turns if t.role == "user")

    @property
    def original_answer(self) -> str | None:
        """The assistant turn answering the first user turn, or None for prompt-only data."""
        seen_user = False
        for t in self.turns:
            if t.role == "user":
                if seen_user:
                    return None
                seen_user = True
            elif t.role == "assistant" and seen_user:
                return t.content
        return None

    @property
    def content_hash(self) -> int:
        """Hash of the conversation alone (not its position): shards split on it."""
        return xxhash.xxh3_64_intdigest(orjson.dumps([(t.role, t.content) for t in self.turns]))


@dataclass(frozen=True, slots=True)
class Known:
    """A row the caller already knows the fate of, by its position (iter_instances' `known`):
    yielded in its place without being converted, so a resume can pass finished rows cheaply."""

    path: str
    line: int
    offset: int = -1


@dataclass(frozen=True, slots=True)
class Rejected:
    """A row that could not be read: where it is and why, in words a user can act on."""

    path: str
    line: int
    reason: str
    source: str = ""  # the source name, set by iter_instances (the path's, not the path as typed)

    @property
    def scope(self) -> str:
        """ "row" for one bad row; "file" when the file cannot be read on from here."""
        return "row"

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"
