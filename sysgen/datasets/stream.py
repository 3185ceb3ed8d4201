"""Instances from a list of files, lazily, with resume points and strict mode."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from sysgen.datasets.convert import to_instance
from sysgen.datasets.errors import DatasetError
from sysgen.datasets.formats import FORMATS
from sysgen.datasets.instance import Instance, Known, Rejected
from sysgen.datasets.readers import file_kind, iter_rows, source_name


def iter_instances(
    paths: Sequence[str | Path],
    *,
    fmt: str = "auto",
    strict: bool = False,
    start: dict[str, tuple[int, int]] | None = None,
    known: Callable[[str, int], bool] | None = None,
) -> Iterator[Instance | Rejected | Known]:
    """Yield one Instance per row of each file in order, or a Rejected naming file, line and reason.

    Every path, the format name and `start` are checked now, before anything is read, so a typo
    fails at once with a DatasetError. `start` maps a path (as given) to the (line, byte offset) of
    the first row to read again, i.e. an Instance's own `line` and `offset`: uncompressed JSON
    Lines files seek there; other files (offset -1) skip earlier rows unparsed. With strict=True
    the first bad row raises DatasetError("path:line: reason. Fix: ...") instead. `known(path, line)`
    true yields a Known in that row's place, unconverted (and unchecked, even with strict)."""
    if fmt != "auto" and fmt not in FORMATS:
        raise DatasetError(f"unknown format {fmt!r}. Fix: use one of auto, {', '.join(FORMATS)}")
    names = [str(p) for p in paths]
    for p in names:
        file_kind(p)
    sources: dict[str, str] = {}
    for p in names:
        src = source_name(p)
        if src in sources:
            raise DatasetError(
                f"{sources[src]} and {p} both have the source name {src!r}, so their ids would collide. "
                "Fix: rename one of the files (or pass each file once)"
            )
        sources[src] = p
    start = dict(start or {})
    unknown = set(start) - set(names)
    if unknown:
        raise DatasetError(
            f"resume point given for {sorted(unknown)}, which is not among the inputs. "
            "Fix: key `start` by the paths exactly as passed"
        )
    return _generate(names, sources, fmt, strict, start, known)


def _generate(
    names: list[str], sources: dict[str, str], fmt: str, strict: bool, start: dict[str, tuple[int, int]],
    known: Callable[[str, int], bool] | None,
) -> Iterator[Instance | Rejected | Known]:
    by_path = {p: s for s, p in sources.items()}
    for name in names:
        line, offset = start.get(name, (1, 0))
        source = by_path[name]
        for n, off, row in iter_rows(name, start_offset=max(offset, 0), start_line=line):
            if known is not None and known(name, n):
                yield Known(name, n, off)
                continue
            item = to_instance(row, source=source, path=name, line=n, offset=off, fmt=fmt)
            if strict and isinstance(item, Rejected):
                fix = getattr(item, "fix", "") or "repair or remove the row"
                raise DatasetError(f"{item}. Fix: {fix}")
            yield item
