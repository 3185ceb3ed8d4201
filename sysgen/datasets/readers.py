"""Rows out of files: JSON Lines, JSON arrays, parquet, CSV/TSV, and gzip of the JSON ones, all streamed."""

from __future__ import annotations

import csv
import gzip
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import orjson

from sysgen.datasets.errors import BadFile, BadRow, DatasetError, human_size
from sysgen.datasets.inputs import FILE_EXTENSIONS, extension
from sysgen.datasets.json_array import split_array

# A row bigger than this is rejected unread: one giant row must not take the machine's memory.
MAX_ROW_BYTES = 8 * 1024 * 1024
EXTENSIONS = FILE_EXTENSIONS
_BOM = b"\xef\xbb\xbf"
_CHUNK = 1 << 20
Row = tuple[int, int, object]


def file_kind(path: str | Path) -> str:
    """The accepted extension `path` ends with; DatasetError naming the file when it has none,
    does not exist, or is not a regular file."""
    p = Path(path)
    kind = extension(p.name)
    if not kind:
        raise DatasetError(
            f"{path}: unknown file type. Fix: give a file ending in one of {', '.join(EXTENSIONS)}"
        )
    if not p.exists():
        raise DatasetError(f"{path}: no such file. Fix: check the path")
    if not p.is_file():
        raise DatasetError(f"{path}: not a regular file. Fix: pass the data files themselves")
    return kind


def source_name(path: str | Path) -> str:
    """The file name without the extension we recognised it by: data/capybara_test.jsonl.gz ->
    capybara_test (other dots stay, so train.v2.jsonl -> train.v2). Alone, not unique: two inputs
    may share it; `inputs.resolve_inputs` gives every source of a run its unique name."""
    name = Path(path).name
    return name[: len(name) - len(extension(name))]


def iter_rows(path: str | Path, *, start_offset: int = 0, start_line: int = 1) -> Iterator[Row]:
    """Yield (line, offset, row) for each non-blank row: row is the parsed JSON value (any type;
    to_instance judges it) or a Rejected for bad JSON, bad UTF-8 or an oversized row.

    `line` is the 1-based line for JSON Lines, else the 1-based row number; `offset` is the byte
    offset of the line in an uncompressed JSON Lines file, else -1. To resume: with
    start_offset > 0 (uncompressed JSON Lines only) the file is seeked there and numbered from
    start_line; otherwise rows before start_line are skipped unparsed. Blank lines are skipped
    silently and are never rejections. A `.json` file holding JSON Lines is read as such.
    A file that cannot be read on (a cut-off .gz, a damaged parquet) ends with one BadFile in
    the place of the first row it could not give."""
    kind = file_kind(path)
    name = str(path)
    if kind == ".parquet":
        yield from _parquet(name, start_line)
        return
    if kind in (".csv", ".tsv"):
        yield from _csv(name, kind, start_line)
        return
    gz = kind.endswith(".gz")
    last = start_line - 1
    with gzip.open(name, "rb") if gz else open(name, "rb", buffering=_CHUNK) as f:
        try:
            if (kind.startswith(".json.") or kind == ".json") and _first_byte(f) == b"[":
                for n, what, value in split_array(f, MAX_ROW_BYTES, _CHUNK):  # type: ignore[arg-type]
                    if n >= start_line:
                        last = n
                        yield n, -1, _array_piece(name, n, what, value)
                return
            seek = start_offset if start_offset > 0 and not gz else 0
            for item in _lines(f, name, seekable=not gz, seek=seek, start_line=start_line):  # type: ignore[arg-type]
                last = item[0]
                yield item
        except (EOFError, OSError, zlib.error) as e:
            # A damaged or cut-off gzip: the rows before were good; say where it broke.
            yield (
                last + 1,
                -1,
                BadFile(
                    name,
                    last + 1,
                    f"the file cannot be read after line {last} ({e}); its remaining rows are lost",
                    fix="re-download or re-compress the file",
                ),
            )


def _first_byte(f: BinaryIO) -> bytes:
    head = f.read(4096)
    f.seek(0)
    return head.removeprefix(_BOM).lstrip()[:1]


def _lines(f: BinaryIO, name: str, *, seekable: bool, seek: int, start_line: int) -> Iterator[Row]:
    if seek:
        f.seek(seek - 1)
        if f.read(1) != b"\n":
            raise DatasetError(
                f"{name}: byte offset {seek} is not the start of a line. Fix: the file changed since "
                "the checkpoint was written; restart without resuming, or resume by line number"
            )
        line, skip_to = start_line, 0
    else:
        line, skip_to = 1, start_line
    pos = seek
    limit = MAX_ROW_BYTES
    while raw := f.readline(limit + 1):
        at, n = pos, line
        size = len(raw)
        big = size > limit and not raw.endswith(b"\n")
        if big:
            size += _skip_rest_of_line(f)
        pos += size
        line += 1
        if n < skip_to:
            continue
        off = at if seekable else -1
        if big:
            yield n, off, _too_big(name, n, size)
            continue
        if at == 0 and raw.startswith(_BOM):
            raw = raw[3:]
        if raw.isspace() or not raw:
            continue
        yield n, off, parse_row(raw, name, n)


def _skip_rest_of_line(f: BinaryIO) -> int:
    skipped = 0
    while chunk := f.readline(_CHUNK):
        skipped += len(chunk)
        if chunk.endswith(b"\n"):
            break
    return skipped


def _too_big(name: str, line: int, size: int) -> BadRow:
    return BadRow(
        name,
        line,
        f"row is {human_size(size)}, over the {human_size(MAX_ROW_BYTES)} limit",
        fix="drop or shorten the row, or raise sysgen.datasets.readers.MAX_ROW_BYTES",
    )


def parse_row(raw: bytes, name: str, line: int) -> object:
    """orjson-parse one row; a BadRow saying what is wrong when it is not valid UTF-8 JSON."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as u:
            return BadRow(
                name,
                line,
                f"invalid UTF-8 at byte {u.start} of the row",
                fix="re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)",
            )
        return BadRow(
            name,
            line,
            f"not valid JSON ({e.msg} at column {e.colno})",
            fix="repair the row so it is one complete JSON object, or delete it",
        )


def _array_piece(name: str, n: int, what: str, value: bytes | int | str) -> object:
    if what == "row":
        return parse_row(value, name, n)  # type: ignore[arg-type]
    if what == "big":
        return _too_big(name, n, value)  # type: ignore[arg-type]
    return BadRow(name, n, str(value), fix="repair the JSON array (check commas and brackets near this row)")


def _parquet(name: str, start_line: int) -> Iterator[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DatasetError(f"{name}: reading .parquet needs pyarrow. Fix: pip install pyarrow") from e
    row = 1
    try:
        pf = pq.ParquetFile(name)
        # Skip whole row groups before start_line without decoding them.
        groups = []
        for g in range(pf.metadata.num_row_groups):
            rows_in_group = pf.metadata.row_group(g).num_rows
            if row + rows_in_group <= start_line and not groups:
                row += rows_in_group
            else:
                groups.append(g)
        if not groups:
            return
        for batch in pf.iter_batches(batch_size=1024, row_groups=groups):
            for record in batch.to_pylist():
                if row >= start_line:
                    yield row, -1, record
                row += 1
    except Exception as e:  # pyarrow raises several types for a file that is not (good) parquet
        what = "not a readable parquet file" if row == 1 else f"the file cannot be read after row {row - 1}"
        yield (
            max(row, start_line),
            -1,
            BadFile(name, max(row, start_line), f"{what} ({e})", fix="re-download or re-write the file"),
        )


def _csv(name: str, kind: str, start_line: int) -> Iterator[Row]:
    """One row per record under the header line; `line` counts records (a quoted cell may span
    lines). An empty cell is an absent value, so a blank answer column makes a prompt-only row."""
    with open(name, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter="\t" if kind == ".tsv" else ",")
        row = 0
        try:
            header = next(reader, None)
            if header is None:
                return
            for row, cells in enumerate(reader, 1):
                if row < start_line or not any(c.strip() for c in cells):
                    continue
                if len(cells) != len(header):
                    yield (
                        row,
                        -1,
                        BadRow(
                            name,
                            row,
                            f"{len(cells)} cells under a header of {len(header)}",
                            fix="quote cells that hold the delimiter, or fix the row",
                        ),
                    )
                    continue
                yield row, -1, {k: (v if v != "" else None) for k, v in zip(header, cells, strict=True)}
        except (UnicodeDecodeError, csv.Error) as e:
            yield (
                row + 1,
                -1,
                BadFile(
                    name,
                    row + 1,
                    f"the file cannot be read after record {row} ({e})",
                    fix="re-encode the file as UTF-8 and check its quoting",
                ),
            )
