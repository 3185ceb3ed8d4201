"""One parsed row to one Instance (or a Rejected saying why not)."""

from __future__ import annotations

from sysgen.datasets.columns import ColumnMap
from sysgen.datasets.errors import BadRow, RowProblem, type_name
from sysgen.datasets.formats import EXPECTED_SHAPES, FORMATS, detect_format, present_keys, raw_turns
from sysgen.datasets.instance import Instance, Rejected
from sysgen.datasets.turns import check_turns


def to_instance(
    row: object,
    *,
    source: str,
    path: str,
    line: int,
    offset: int = -1,
    fmt: str = "auto",
    columns: ColumnMap | None = None,
) -> Instance | Rejected:
    """Convert a parsed row. `fmt="auto"` detects the format of this row alone; any other name in
    FORMATS forces it; `columns` maps the turns instead (format "columns"). A row that is already a
    Rejected (from iter_rows) is passed through."""
    if isinstance(row, Rejected):
        return row
    try:
        if not isinstance(row, dict):
            raise RowProblem(
                f"row is a JSON {type_name(row)}, not an object",
                'make each row one JSON object, e.g. {"conversations": [...]}',
            )
        if columns is not None:
            turns = check_turns(columns.raw_turns(row))
            return Instance(
                id=f"{source}:{line}",
                source=source,
                fmt="columns",
                turns=turns,
                path=path,
                line=line,
                offset=offset,
            )
        used = detect_format(row) if fmt == "auto" else fmt
        if used is None:
            keys = "{" + ",".join(repr(k) for k in sorted(present_keys(row))) + "}"
            raise RowProblem(
                f"no known format: keys {keys}; expected one of {EXPECTED_SHAPES} "
                "(or pass --format or --columns)",
                "rename the row's keys to one of those shapes, or map them with --columns",
            )
        if used not in FORMATS:
            raise RowProblem(f"unknown format '{used}'", f"use one of auto, {', '.join(FORMATS)}")
        turns = check_turns(raw_turns(row, used))
    except RowProblem as p:
        return BadRow(path, line, p.reason, fix=p.fix)
    return Instance(
        id=f"{source}:{line}", source=source, fmt=used, turns=turns, path=path, line=line, offset=offset
    )
