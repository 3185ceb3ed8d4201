"""`--columns user=FIELD,assistant=FIELD,system=FIELD`: read any row shape by naming where its
turns are. A FIELD is a dotted path into nested objects and lists: `instances.0.input` is the
`input` of the first element of the row's `instances` list."""

from __future__ import annotations

from dataclasses import dataclass

from sysgen.datasets.errors import DatasetError, RowProblem
from sysgen.datasets.formats import RawTurn, text_of

ROLES = ("system", "user", "assistant")
_MISSING = object()
MAX_LISTED = 30


@dataclass(frozen=True)
class ColumnMap:
    """Role -> path (a tuple of keys and list indices)."""

    paths: tuple[tuple[str, tuple[str | int, ...]], ...]

    @classmethod
    def parse(cls, spec: str) -> ColumnMap:
        """From the flag's text; ValueError naming the flag and the fix."""
        out: dict[str, tuple[str | int, ...]] = {}
        for part in (p.strip() for p in spec.split(",") if p.strip()):
            role, eq, path = part.partition("=")
            role, path = role.strip(), path.strip()
            if not eq or not path:
                raise ValueError(
                    f"--columns: {part!r} is not ROLE=FIELD. Fix: e.g. --columns "
                    "user=question,assistant=answer"
                )
            if role not in ROLES:
                raise ValueError(f"--columns: unknown role {role!r}. Fix: use {', '.join(ROLES)}")
            if role in out:
                raise ValueError(f"--columns: {role} is given twice. Fix: map each role once")
            steps = path.split(".")
            if any(not s for s in steps):
                raise ValueError(f"--columns: {path!r} has an empty step. Fix: write a.b.0.c")
            out[role] = tuple(int(s) if s.isdigit() else s for s in steps)
        if "user" not in out:
            raise ValueError("--columns needs user=FIELD (the field holding the instruction)")
        return cls(tuple((r, out[r]) for r in ROLES if r in out))

    @property
    def top_keys(self) -> set[str]:
        return {str(p[0]) for _, p in self.paths}

    def describe(self) -> str:
        return ",".join(f"{r}={_dotted(p)}" for r, p in self.paths)

    def check_first_row(self, row: object, where: str) -> None:
        """DatasetError (an argument error: the mapping, not the data, is wrong) when a mapped
        path is not in the source's first row, listing the fields that row has."""
        for role, path in self.paths:
            if not isinstance(row, dict) or lookup(row, path) is _MISSING:
                fields = field_paths(row) if isinstance(row, dict) else []
                shown = ", ".join(fields[:MAX_LISTED]) + (", …" if len(fields) > MAX_LISTED else "")
                raise DatasetError(
                    f"--columns {role}={_dotted(path)}: the first row of {where} has no such "
                    f"field; its fields are: {shown or '(none)'}. Fix: map the roles to "
                    "those fields"
                )

    def raw_turns(self, row: dict) -> list[RawTurn]:
        out: list[RawTurn] = []
        for role, path in self.paths:
            value = lookup(row, path)
            name = _dotted(path)
            if value is _MISSING or value is None:
                if role == "user":
                    raise RowProblem(
                        f"row has no '{name}' (mapped to user by --columns)",
                        "fill in the field or drop the row",
                    )
                continue  # no system message, or no answer: a prompt-only row
            out.append((role, text_of(value, "row", name), f"'{name}'"))
        return out


def lookup(row: object, path: tuple[str | int, ...]) -> object:
    """The value at `path`, or _MISSING. An integer step indexes a list (or is a key of an object,
    as JSON keys may be digits)."""
    cur = row
    for step in path:
        if isinstance(cur, dict):
            key = str(step)
            if key not in cur:
                return _MISSING
            cur = cur[key]
        elif isinstance(cur, list) and isinstance(step, int):
            if step >= len(cur):
                return _MISSING
            cur = cur[step]
        else:
            return _MISSING
    return cur


def field_paths(row: dict, prefix: str = "", depth: int = 4) -> list[str]:
    """Dotted paths to the leaves of a row (lists shown by their first element), for messages."""
    out: list[str] = []
    for k, v in row.items():
        here = f"{prefix}{k}"
        if isinstance(v, dict) and v and depth > 1:
            out += field_paths(v, here + ".", depth - 1)
        elif isinstance(v, list) and v and isinstance(v[0], dict) and depth > 1:
            out += field_paths(v[0], here + ".0.", depth - 1)
        elif isinstance(v, list) and v:
            out.append(f"{here}.0")
        else:
            out.append(here)
    return out


def _dotted(path: tuple[str | int, ...]) -> str:
    return ".".join(str(p) for p in path)
