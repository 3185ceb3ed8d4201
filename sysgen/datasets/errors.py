"""What goes wrong while reading a dataset, with the words a user needs to fix it."""

from __future__ import annotations

from dataclasses import dataclass

from sysgen.datasets.instance import Rejected


class DatasetError(ValueError):
    """A dataset cannot be read as given (bad path, bad option, or a bad row under strict=True).
    The message names the file (and line, for a row) and says how to fix it."""


@dataclass(frozen=True, slots=True)
class BadRow(Rejected):
    """A Rejected that also carries the fix, so strict mode can tell the user what to do."""

    fix: str = ""


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
