"""`sysgen export`: the kept records as a training set that `datasets` and TRL read directly.

- messages: JSON lines `{"id", "source", "messages": [{"role", "content"}, ...]}` (TRL's
  conversational format);
- sharegpt: JSON lines `{"id", "source", "conversations": [{"from", "value"}, ...]}` with
  from = system | human | gpt;
- parquet: columns id, source and messages as list<struct<role, content>>.

messages and parquet are what TRL's SFTTrainer takes as conversational data; sharegpt is for
trainers that read that layout (axolotl, LLaMA-Factory).
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any, Literal

import orjson

from sysgen.eval.rundir import RunDir

Format = Literal["messages", "sharegpt", "parquet"]
FORMATS: tuple[str, ...] = ("messages", "sharegpt", "parquet")
EXPORT_DIR = "export"
DEFAULT_NAMES = {"messages": "messages.jsonl", "sharegpt": "sharegpt.jsonl", "parquet": "data.parquet"}
SHAREGPT_FROM = {"system": "system", "user": "human", "assistant": "gpt"}
PARQUET_BATCH = 10_000  # rows per row group: bounded memory on paper-scale runs


def default_path(run_dir: Path, fmt: str) -> Path:
    return Path(run_dir) / EXPORT_DIR / DEFAULT_NAMES[fmt]


def _messages(rec: dict[str, Any], index: int) -> list[dict[str, str]]:
    out = []
    for m in rec["messages"]:
        role = m.get("role")
        if role not in SHAREGPT_FROM:
            raise ValueError(f"data.jsonl record {index} (id {rec.get('id')!r}): unknown role {role!r}; "
                             f"expected one of {', '.join(SHAREGPT_FROM)}")
        out.append({"role": str(role), "content": str(m.get("content") or "")})
    return out


def rows(run: RunDir, fmt: str) -> Iterator[dict[str, Any]]:
    """Records in the export shape (parquet uses the messages shape), streamed from data.jsonl."""
    for i, rec in enumerate(run.iter_records(), 1):
        msgs = _messages(rec, i)
        row: dict[str, Any] = {"id": str(rec.get("id")), "source": str(rec.get("source") or "")}
        if fmt == "sharegpt":
            row["conversations"] = [{"from": SHAREGPT_FROM[m["role"]], "value": m["content"]} for m in msgs]
        else:
            row["messages"] = msgs
        yield row


def export(run: RunDir, fmt: str, out: Path | None = None) -> tuple[Path, int]:
    """Write the export file (atomically: a reader never sees half a file); return it and its row
    count."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r} unknown; choose one of {', '.join(FORMATS)}")
    path = Path(out) if out is not None else default_path(run.path, fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        n = _write_parquet(rows(run, fmt), tmp) if fmt == "parquet" else _write_jsonl(rows(run, fmt), tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)
    return path, n


def _write_jsonl(data: Iterator[dict[str, Any]], path: Path) -> int:
    n = 0
    with path.open("wb") as fh:
        for row in data:
            fh.write(orjson.dumps(row) + b"\n")
            n += 1
    return n


def _write_parquet(data: Iterator[dict[str, Any]], path: Path) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    schema = pa.schema([("id", pa.string()), ("source", pa.string()), ("messages", pa.list_(message))])
    n = 0
    with pq.ParquetWriter(path, schema) as writer:
        while batch := list(islice(data, PARQUET_BATCH)):
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
            n += len(batch)
    return n


def existing_exports(run_dir: Path) -> dict[str, Path]:
    """Export files present at their default paths, by format (for the dataset card's configs)."""
    return {f: default_path(run_dir, f) for f in FORMATS if default_path(run_dir, f).is_file()}
