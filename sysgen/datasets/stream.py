"""Instances from the inputs, lazily, with resume points and strict mode."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from sysgen.datasets.columns import ColumnMap
from sysgen.datasets.convert import to_instance
from sysgen.datasets.errors import DatasetError
from sysgen.datasets.formats import FORMATS, used_keys
from sysgen.datasets.hf import iter_hf_rows, open_source
from sysgen.datasets.inputs import Source, resolve_inputs
from sysgen.datasets.instance import Instance, Known, Rejected
from sysgen.datasets.readers import iter_rows
from sysgen.datasets.unused import UnusedFields, unused_text_keys


def iter_instances(
    paths: Sequence[str | Path],
    *,
    fmt: str = "auto",
    strict: bool = False,
    start: dict[str, tuple[int, int]] | None = None,
    known: Callable[[str, int], bool] | None = None,
    columns: ColumnMap | str | None = None,
    split: str | None = None,
    subset: str | None = None,
    sources: Sequence[Source] | None = None,
    skip_before: str | None = None,
    unused: UnusedFields | None = None,
) -> Iterator[Instance | Rejected | Known]:
    """Yield one Instance per row of each source in order, or a Rejected naming file, line and reason.

    `paths` are inputs as typed (files, folders, glob patterns, save_to_disk folders, hf:NAME),
    expanded by `inputs.resolve_inputs` (or pass `sources` resolved already). Every input, the
    format and `start` are checked now, before anything is read, so a typo fails at once with a
    DatasetError. `start` maps a source path to the (line, byte offset) of the first row to read
    again, i.e. an Instance's own `line` and `offset`: uncompressed JSON Lines files seek there;
    others skip earlier rows unparsed. `skip_before` names the source path to start at (earlier
    sources are done). With strict=True the first bad row or file raises DatasetError instead.
    `known(path, line)` true yields a Known in that row's place, unconverted (and unchecked, even
    with strict). `unused` collects the text rows carry outside what their format reads."""
    columns = _reading(fmt, columns)
    srcs = list(sources) if sources is not None else resolve_inputs(paths)
    by_path = {s.path: s for s in srcs}
    start = {_key(k, by_path): v for k, v in (start or {}).items()}
    unknown = set(start) - set(by_path)
    if unknown:
        raise DatasetError(
            f"resume point given for {sorted(unknown)}, which is not among the inputs. "
            "Fix: key `start` by the paths exactly as passed"
        )
    if skip_before is not None:
        if skip_before not in by_path:
            raise DatasetError(f"resume source {skip_before} is not among the inputs")
        srcs = srcs[[s.path for s in srcs].index(skip_before) :]
    return _generate(srcs, fmt, strict, start, known, columns, split, subset, unused)


def _reading(fmt: str, columns: ColumnMap | str | None) -> ColumnMap | None:
    """How rows are read: --format checked, --columns parsed; DatasetError when they are wrong or clash."""
    if fmt != "auto" and fmt not in FORMATS:
        raise DatasetError(f"unknown format {fmt!r}. Fix: use one of auto, {', '.join(FORMATS)}")
    if isinstance(columns, str):
        try:
            columns = ColumnMap.parse(columns)
        except ValueError as e:
            raise DatasetError(str(e)) from None
    if columns is not None and fmt != "auto":
        raise DatasetError("--columns and --format both say how to read rows. Fix: pass one of them")
    return columns


def _key(path: str, by_path: dict[str, Source]) -> str:
    # Sources are named by absolute path; a caller may key `start` by the path as it typed it.
    return path if path in by_path else os.path.abspath(path)


def _rows(src: Source, line: int, offset: int, split: str | None, subset: str | None):
    if src.is_file:
        return iter_rows(src.path, start_offset=max(offset, 0), start_line=line)
    return iter_hf_rows(src, split=split, subset=subset, start_line=line)


def _generate(
    srcs: list[Source],
    fmt: str,
    strict: bool,
    start: dict[str, tuple[int, int]],
    known: Callable[[str, int], bool] | None,
    columns: ColumnMap | None,
    split: str | None,
    subset: str | None,
    unused: UnusedFields | None,
) -> Iterator[Instance | Rejected | Known]:
    for src in srcs:
        name = src.path
        line, offset = start.get(name, (1, 0))
        checked = columns is None
        for n, off, row in _rows(src, line, offset, split, subset):
            if known is not None and known(name, n):
                yield Known(name, n, off)
                continue
            if not checked and not isinstance(row, Rejected):
                columns.check_first_row(row, src.path)  # type: ignore[union-attr]
                checked = True
            item = to_instance(row, source=src.name, path=name, line=n, offset=off, fmt=fmt, columns=columns)
            if isinstance(item, Rejected):
                item = dataclasses.replace(item, source=src.name)
                if strict:
                    fix = getattr(item, "fix", "") or "repair or remove the row"
                    raise DatasetError(f"{item}. Fix: {fix}", kind=item.scope)
            elif unused is not None and isinstance(row, dict):
                used = columns.top_keys if columns is not None else used_keys(row, item.fmt)
                unused.add(src.name, n, item.id, unused_text_keys(row, used))
            yield item
    if unused is not None:
        unused.log_summary()


def preflight(
    inputs: Sequence[str | Path],
    *,
    fmt: str = "auto",
    columns: str | None = None,
    split: str | None = None,
    subset: str | None = None,
) -> list[Source]:
    """Everything about the inputs that can be wrong before a run starts, checked now: paths,
    --format and --columns, Hugging Face splits and subsets, and --columns against each source's
    first row. Returns the sources; DatasetError (kind "argument" or "file") otherwise."""
    cmap = _reading(fmt, columns or None)
    srcs = resolve_inputs(inputs)
    if (split or subset) and all(s.is_file for s in srcs):
        flag = "--split" if split else "--subset"
        raise DatasetError(
            f"{flag} applies to hf:NAME and save_to_disk inputs, and none is given. Fix: drop "
            f"{flag}, or pass the dataset as hf:OWNER/NAME"
        )
    for src in srcs:
        if not src.is_file:
            open_source(src, split, subset)  # a bad split or subset, or a dataset not to be had, fails here
        if cmap is None:
            continue
        for _, _, row in _rows(src, 1, 0, split, subset):
            if not isinstance(row, Rejected):
                cmap.check_first_row(row, src.path)
                break
    return srcs
