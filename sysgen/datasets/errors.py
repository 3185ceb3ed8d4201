"""What goes wrong while reading a dataset, with the words a user needs to fix it."""

from __future__ import annotations

from dataclasses import dataclass

from sysgen.datasets.instance import Rejected


class DatasetError(ValueError):
    """A dataset cannot be read as given (bad path, bad option, or a bad row or file under
    strict=True). The message names the file (and line, for a row) and says how to fix it; `kind`
    says what is at fault ("argument", "file" or "row"), so the caller's advice can fit the cause."""

    def __init__(self, message: str, kind: str = "argument") -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True, slots=True)
class BadRow(Rejected):
    """A Rejected that also carries the fix, so strict mode can tell the user what to do."""

    fix: str = ""


@dataclass(frozen=True, slots=True)
class BadFile(BadRow):
    """The file itself cannot be read on from `line` (a cut-off .gz, a file that is not parquet):
    recorded in that row's place, and the file's remaining rows, if any, are lost."""

    @property
    def scope(self) -> str:
        return "file"


class RowProblem(Exception):
    """Raised inside the converters; turned into a BadRow once path and line are known."""

    def __init__(self, reason: str, fix: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.fix = fix


def type_name(value: object) -> str:
    """Python type names, except JSON null and objects, which users know by those names."""
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def human_size(n: int) -> str:
    if n < 1024:
        return f"{n} bytes"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n / (1024 * 1024):.1f} MiB"
