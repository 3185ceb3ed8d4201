"""File types (gzip, JSON arrays, parquet), resume points, strict mode and input checks."""

from __future__ import annotations

import gzip
import io
import re
import tracemalloc

import orjson
import pytest

from sysgen.datasets import (
    DatasetError,
    Instance,
    Rejected,
    iter_instances,
    iter_rows,
    readers,
    source_name,
    to_instance,
)
from sysgen.datasets.json_array import split_array

ROWS = [
    {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": 'tricky "]}, [{" \\ q'}]},
    {"question": "Ünïcode ✓ 😀?", "answer": "yes\nno"},
    {"instruction": "Write code", "input": "Language: C", "output": "int main() { return 0; }"},
    {"messages": [{"role": "user", "content": "a\\"}, {"role": "assistant", "content": "b"}]},
    {"query": "q5", "response": "r5"},
    {"problem": "p6", "solution": "s6"},
    {"conversation": [{"input": "i7\n", "output": "o7"}, {"input": "i8", "output": "o8"}]},
]


def first_users(items) -> list[str]:
    return [i.first_user for i in items]


def write_jsonl(path, rows=ROWS) -> None:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))


def write_array(path, rows=ROWS, opener=open) -> None:
    with opener(path, "wb") as f:
        f.write(orjson.dumps(rows, option=orjson.OPT_INDENT_2))


def expected() -> list[Instance]:
    """ROWS converted one by one: what every file type must give back."""
    return [to_instance(r, source="ref", path="ref", line=n) for n, r in enumerate(ROWS, 1)]


def assert_same_rows(items, source: str) -> None:
    ref = expected()
    assert all(isinstance(i, Instance) for i in items)
    assert [(i.fmt, i.turns) for i in items] == [(r.fmt, r.turns) for r in ref]
    assert [i.id for i in items] == [f"{source}:{n}" for n in range(1, len(ROWS) + 1)]


def test_source_name_drops_only_known_extensions():
    assert source_name("a/capybara_test.jsonl.gz") == "capybara_test"
    assert source_name("train.v2.json") == "train.v2"
    assert source_name("x.parquet") == "x"


def test_gzip_jsonl(tmp_path):
    path = tmp_path / "rows.jsonl.gz"
    with gzip.open(path, "wb") as f:
        write_jsonl_to(f)
    items = list(iter_instances([path]))
    assert_same_rows(items, "rows")
    assert {i.offset for i in items} == {-1}


def write_jsonl_to(f) -> None:
    f.write(b"".join(orjson.dumps(r) + b"\n" for r in ROWS))


@pytest.mark.parametrize("gz", [False, True])
def test_json_array(tmp_path, gz):
    path = tmp_path / ("arr.json.gz" if gz else "arr.json")
    write_array(path, opener=gzip.open if gz else open)
    items = list(iter_instances([str(path)]))
    assert_same_rows(items, "arr")
    assert {(i.path, i.offset) for i in items} == {(str(path), -1)}


def test_json_file_holding_json_lines_is_read_as_lines(tmp_path):
    path = tmp_path / "lines.json"
    write_jsonl(path)
    items = list(iter_instances([path]))
    assert_same_rows(items, "lines")


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, 1 << 20])
def test_split_array_is_exact_across_chunk_edges(chunk):
    data = orjson.dumps(ROWS + [[1, [2]], "s,]", 3.5, None, {}], option=orjson.OPT_INDENT_2)
    pieces = list(split_array(io.BytesIO(data), limit=1 << 20, chunk_size=chunk))
    assert [n for n, _, _ in pieces] == list(range(1, len(ROWS) + 6))
    assert {kind for _, kind, _ in pieces} == {"row"}
    assert [orjson.loads(v) for _, _, v in pieces] == orjson.loads(data)


@pytest.mark.parametrize(
    "data,expected",
    [
        (b"[]", []),
        (b" \n[ ] \n", []),
        (
            b'[{"a":1},]',
            [("row", None), ("bad", "empty element in the JSON array (a stray or trailing comma)")],
        ),
        (
            b'[{"a":1}, {"b":',
            [("row", None), ("bad", "file ends inside this row (missing closing quote, '}' or ']')")],
        ),
        (
            b'[{"a":1}',
            [("row", None), ("bad", "file ends before the closing ']' of the array (is it cut short?)")],
        ),
        (
            b'[{"a":1},',
            [("row", None), ("bad", "file ends before the closing ']' of the array (is it cut short?)")],
        ),
        (b'[{"a":1}] x', [("row", None), ("bad", "unexpected data after the closing ']' of the array")]),
        (b'{"a":1}', [("bad", "file is not a JSON array (it does not start with '[')")]),
    ],
)
def test_split_array_structural_damage(data, expected):
    pieces = list(split_array(io.BytesIO(data), limit=1000, chunk_size=3))
    assert [(k, v if k == "bad" else None) for _, k, v in pieces] == expected


def test_json_array_bad_elements_are_rejected_and_reading_goes_on(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "MAX_ROW_BYTES", 300)
    path = tmp_path / "mixed.json"
    good = orjson.dumps(ROWS[1]).decode()
    path.write_text(f'[{good}, [1, 2], {{"question": "{"z" * 2000}", "answer": "a"}}, {{"x": 1 1}}, {good}]')
    items = list(iter_instances([path]))
    assert [isinstance(i, Instance) for i in items] == [True, False, False, False, True]
    assert [i.line for i in items] == [1, 2, 3, 4, 5]
    assert items[1].reason == "row is a JSON list, not an object"
    assert items[2].reason.startswith("row is 2.0 KiB, over the 300 bytes limit")
    assert items[3].reason.startswith("not valid JSON (")


@pytest.mark.slow
def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "rows.parquet"
    # Mixed shapes in one table: every row gets every column, null where it had none.
    pq.write_table(pa.Table.from_struct_array(pa.array(ROWS)), path, row_group_size=3)
    items = list(iter_instances([path]))
    assert_same_rows(items, "rows")
    assert {i.offset for i in items} == {-1}


def test_parquet_resume_skips_whole_row_groups(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_struct_array(pa.array(ROWS)), path, row_group_size=2)
    for line in (1, 3, 4, 7, 8, 50):
        rows = list(iter_rows(path, start_line=line))
        assert [n for n, _, _ in rows] == list(range(line, len(ROWS) + 1))
    resumed = list(iter_instances([path], start={str(path): (5, -1)}))
    assert first_users(resumed) == first_users(expected())[4:]


def test_resume_jsonl_seeks_to_the_offset(tmp_path):
    path = tmp_path / "rows.jsonl"
    write_jsonl(path)
    full = list(iter_instances([path]))
    k = full[4]
    resumed = list(iter_instances([path], start={str(path): (k.line, k.offset)}))
    assert resumed == full[4:]
    # The offset, not the line, picks the place: with a made-up line number the rows are the same
    # ones, numbered from it, which only a seek can do.
    renumbered = list(iter_instances([path], start={str(path): (100, k.offset)}))
    assert first_users(renumbered) == first_users(full[4:])
    assert [i.line for i in renumbered] == [100, 101, 102]
    assert [i.offset for i in renumbered] == [i.offset for i in full[4:]]


def test_resume_at_an_offset_inside_a_line_is_refused(tmp_path):
    path = tmp_path / "rows.jsonl"
    write_jsonl(path)
    with pytest.raises(DatasetError, match=r"byte offset 5 is not the start of a line"):
        list(iter_instances([path], start={str(path): (2, 5)}))


@pytest.mark.parametrize("name", ["rows.jsonl.gz", "rows.json", "rows.json.gz", "rows.jsonl"])
def test_resume_by_row_count(tmp_path, name):
    path = tmp_path / name
    opener = gzip.open if name.endswith(".gz") else open
    if ".jsonl" in name:
        with opener(path, "wb") as f:
            write_jsonl_to(f)
    else:
        write_array(path, opener=opener)
    # offset -1 (or 0) means "count rows": that is what a non-seekable file's Instance carries.
    resumed = list(iter_instances([path], start={str(path): (6, -1)}))
    assert [i.line for i in resumed] == [6, 7]
    assert first_users(resumed) == first_users(expected())[5:]


def test_strict_mode_raises_with_path_line_and_fix(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(orjson.dumps(ROWS[1]) + b"\n" + b'{"foo": 1}\n' + orjson.dumps(ROWS[1]) + b"\n")
    seen = []
    with pytest.raises(DatasetError) as err:  # noqa: PT012 - the rows before the bad one are collected
        for item in iter_instances([path], strict=True):
            seen.append(item)
    assert len(seen) == 1
    assert str(err.value).startswith(f"{path}:2: no known format: keys {{'foo'}}")
    assert ". Fix: rename the row's keys" in str(err.value)
    assert len(list(iter_instances([path]))) == 3


def test_missing_or_unknown_files_fail_before_reading(tmp_path):
    good = tmp_path / "ok.jsonl"
    write_jsonl(good)
    with pytest.raises(DatasetError, match=r"nope\.jsonl: no such file"):
        iter_instances([good, tmp_path / "nope.jsonl"])  # raises at the call, not on first next()
    (tmp_path / "data.txt").write_text("a,b\n")
    with pytest.raises(DatasetError, match=r"data\.txt: unknown file type.*\.jsonl, \.json, \.parquet"):
        iter_instances([tmp_path / "data.txt"])
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(DatasetError, match=r"dir\.jsonl: a folder with no data file"):
        iter_instances([tmp_path / "dir.jsonl"])


def test_bad_options_fail_before_reading(tmp_path):
    a = tmp_path / "a" / "train.jsonl"
    b = tmp_path / "b" / "train.jsonl.gz"
    a.parent.mkdir()
    b.parent.mkdir()
    write_jsonl(a)
    b.write_bytes(gzip.compress(a.read_bytes()))
    with pytest.raises(DatasetError, match=r"unknown format 'chatml'"):
        iter_instances([a], fmt="chatml")
    assert {i.source for i in iter_instances([a, b])} == {"a/train", "b/train"}  # same name: told apart
    with pytest.raises(DatasetError, match=r"resume point given for"):
        iter_instances([a], start={"elsewhere.jsonl": (1, 0)})


def test_truncated_gzip_is_a_bad_file_and_reading_goes_on(tmp_path):
    path = tmp_path / "cut.jsonl.gz"
    blob = gzip.compress(b"".join(orjson.dumps(ROWS[1]) + b"\n" for _ in range(2000)))
    path.write_bytes(blob[: len(blob) // 2])
    after = tmp_path / "after.jsonl"
    write_jsonl(after)
    items = list(iter_instances([path, after]))
    bad = [i for i in items if isinstance(i, Rejected)]
    assert len(bad) == 1 and bad[0].scope == "file" and bad[0].source == "cut"
    assert re.search(r"cannot be read after line \d+", bad[0].reason)
    assert items[-1].source == "after"  # the next file is read
    with pytest.raises(DatasetError, match=r"cut\.jsonl\.gz:\d+: the file cannot be read") as e:
        list(iter_instances([path], strict=True))
    assert e.value.kind == "file"


def test_multiple_files_in_order(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.json"
    write_jsonl(a)
    write_array(b)
    items = list(iter_instances([a, b]))
    assert [i.source for i in items] == ["a"] * len(ROWS) + ["b"] * len(ROWS)
    assert all(isinstance(i, Instance) for i in items)
    assert not any(isinstance(i, Rejected) for i in items)


@pytest.mark.parametrize("name", ["big.jsonl", "big.json"])
@pytest.mark.slow
def test_memory_stays_flat_in_file_size(tmp_path, name):
    row = {"instruction": "w" * 2000, "output": "o" * 2000}
    n = 3000  # ~12 MB
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_bytes((orjson.dumps(row) + b"\n") * n)
    else:
        path.write_bytes(b"[" + b",\n".join([orjson.dumps(row)] * n) + b"]")
    tracemalloc.start()
    try:
        count = sum(1 for _ in iter_instances([path]))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == n
    assert peak < 4 * 1024 * 1024, (
        f"peak {peak / 1e6:.1f} MB while reading a {path.stat().st_size / 1e6:.0f} MB file"
    )
