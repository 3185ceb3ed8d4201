"""`sysgen export`: the kept records as a training set that `datasets` and TRL read directly.

- messages: JSON lines `{"id", "source", "messages": [{"role", "content"}, ...]}` (TRL's
  conversational format);
- sharegpt: JSON lines `{"id", "source", "conversations": [{"from", "value"}, ...]}` with
  from = system | human | gpt;
- parquet: columns id, source and messages as list<struct<role, content>>.

messages and parquet are what TRL's SFTTrainer takes as conversational data; sharegpt is for
trainers that read that layout (axolotl, LLaMA-Factory).

The export is a folder: the data files and README.md (the dataset card, whose YAML header names
them as configs) side by side, so `datasets.load_dataset(folder)` reads it, and the folder can be
pushed to the hub as it is. Nothing is written into the run folder unless the export folder is
inside it (the default, DIR/export).
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any, Literal

import orjson

from sysgen.atomic import atomic_path
from sysgen.eval.rundir import RunDir

Format = Literal["messages", "sharegpt", "parquet"]
FORMATS: tuple[str, ...] = ("messages", "sharegpt", "parquet")
EXPORT_DIR = "export"
DEFAULT_NAMES = {"messages": "messages.jsonl", "sharegpt": "sharegpt.jsonl", "parquet": "data.parquet"}
SHAREGPT_FROM = {"system": "system", "user": "human", "assistant": "gpt"}
PARQUET_BATCH = 10_000  # rows per row group: bounded memory on paper-scale runs


DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".gz", ".csv")


class ExportError(ValueError):
    """The export cannot be written where asked; the message says where to write it instead."""


def default_dir(run_dir: Path, fmt: str) -> Path:
    """DIR/export, or DIR/export_parquet: `datasets` reads one file type per folder."""
    return Path(run_dir) / (EXPORT_DIR + ("_parquet" if fmt == "parquet" else ""))


def export_dir(run_dir: Path, out: Path | None, fmt: str = "messages") -> Path:
    """The folder the export goes to; ExportError when it would overwrite the run's own files or a
    file that is not an export."""
    run_dir = Path(run_dir)
    if out is None:
        return default_dir(run_dir, fmt)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(
            f"--out {out} is a file; the export is a folder (data files and README.md side "
            f"by side). Fix: pass a folder, e.g. --out {out.parent / 'export'}"
        )
    if not out.exists() and out.name.endswith(DATA_SUFFIXES):
        raise ExportError(
            f"--out {out} names a file; the export is a folder (data files and README.md side "
            f"by side). Fix: pass a folder, e.g. --out {out.with_suffix('')}"
        )
    if out.resolve() == run_dir.resolve():
        raise ExportError(
            f"--out {out} is the run folder itself; the export would mix with the run's own "
            f"files. Fix: pass another folder, e.g. --out {run_dir / EXPORT_DIR}"
        )
    return out


def _check_one_file_type(folder: Path, fmt: str) -> None:
    # `datasets` picks one reader for a whole folder: JSON Lines and parquet exports cannot share one.
    other = [p.name for f, p in existing_exports(folder).items() if (f == "parquet") != (fmt == "parquet")]
    if other:
        raise ExportError(
            f"{folder} already holds {', '.join(other)}; one folder holds one file type so "
            "that datasets.load_dataset reads it. Fix: pass another --out for this format"
        )


def _check_readme(out: Path) -> None:
    readme = out / "README.md"
    if readme.is_file() and "- sysgen\n" not in readme.read_text(encoding="utf-8", errors="replace"):
        raise ExportError(
            f"{readme} exists and is not a sysgen dataset card; exporting would overwrite it. "
            "Fix: pass an empty folder to --out"
        )


def unfinished(run: RunDir, exported: int) -> str | None:
    """Why the run looks unfinished (so its export holds only part of the data), or None.
    stats.json is written when a run ends; a run stopped before that leaves it missing or older
    than the records."""
    st = run.stats
    if not st:
        return "it has no stats.json, which a run writes when it ends"
    if (st.get("this_run") or {}).get("interrupted") or st.get("complete") is False:
        return "its last run was interrupted"
    if "kept" in st and st["kept"] != exported:
        return (
            f"data.jsonl holds {exported:,} records but stats.json, written when the last run ended, "
            f"counts {st['kept']:,}: a later run was stopped before it ended"
        )
    return None


def _messages(rec: dict[str, Any], index: int) -> list[dict[str, str]]:
    out = []
    for m in rec["messages"]:
        role = m.get("role")
        if role not in SHAREGPT_FROM:
            raise ValueError(
                f"data.jsonl record {index} (id {rec.get('id')!r}): unknown role {role!r}; "
                f"expected one of {', '.join(SHAREGPT_FROM)}"
            )
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
    """Write the export file into the export folder `out` (default: default_dir) atomically: a reader
    never sees half a file; return it and its row count. `run` comes from load_run, which proved its
    records are the bytes its store committed."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r} unknown; choose one of {', '.join(FORMATS)}")
    folder = export_dir(run.path, out, fmt)
    _check_readme(folder)
    _check_one_file_type(folder, fmt)
    path = folder / DEFAULT_NAMES[fmt]
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:  # hidden: a killed export's half file is never loaded as data
        n = _write_parquet(rows(run, fmt), tmp) if fmt == "parquet" else _write_jsonl(rows(run, fmt), tmp)
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


def existing_exports(folder: Path) -> dict[str, Path]:
    """Export files present in an export folder, by format (for the dataset card's configs)."""
    paths = {f: Path(folder) / DEFAULT_NAMES[f] for f in FORMATS}
    return {f: p for f, p in paths.items() if p.is_file()}
