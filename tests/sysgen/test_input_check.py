"""Input files edited between runs: detected by size, mtime and content hash; appends are not edits;
an edited file restarts the outputs and only its changed rows reach the engine."""

from __future__ import annotations

import os
from collections import Counter

import pytest
import xxhash

from sysgen.run import input_check

try:
    from tests.sysgen.pipeline_helpers import backend, ids_once, records, run, write_rows
except ImportError:  # tests/sysgen is not a package: pytest put its folder on sys.path
    from pipeline_helpers import backend, ids_once, records, run, write_rows


@pytest.mark.parametrize("prefix", [0, 1, 7, 8, 9, 20, 24])
def test_digest_of_a_prefix_in_the_same_pass(tmp_path, monkeypatch, prefix):
    monkeypatch.setattr(input_check, "_CHUNK", 8)  # prefixes on, before and after chunk edges
    data = bytes(range(24))
    (tmp_path / "f").write_bytes(data)
    whole, head = input_check.digest(tmp_path / "f", prefix)
    assert whole == xxhash.xxh3_128_hexdigest(data)
    assert head == xxhash.xxh3_128_hexdigest(data[:prefix])


def test_unchanged_appended_and_edited_files(tmp_path, monkeypatch):
    f = tmp_path / "data.jsonl"
    f.write_bytes(b'{"a": 1}\n')
    changed, rec = input_check.compare({}, (str(f),))
    assert changed == [] and set(rec) == {"data"}

    def no_read(*a, **k):
        raise AssertionError("an unchanged file must not be read")

    with monkeypatch.context() as m:
        m.setattr(input_check, "digest", no_read)
        assert input_check.compare(rec, (str(f),)) == ([], rec)

    with f.open("ab") as fh:
        fh.write(b'{"a": 2}\n')
    changed, rec = input_check.compare(rec, (str(f),))
    assert changed == []  # rows appended: the finished ones still hold

    f.write_bytes(b'{"a": 9}\n{"a": 2}\n')  # same size, first row edited
    os.utime(f, ns=(rec["data"]["mtime_ns"] + 10**9,) * 2)
    changed, rec2 = input_check.compare(rec, (str(f),))
    assert changed == [str(f)] and rec2["data"]["xxh3"] != rec["data"]["xxh3"]

    other = tmp_path / "other.jsonl"
    other.write_bytes(b"{}\n")
    _, both = input_check.compare(rec2, (str(other),))
    assert set(both) == {"data", "other"}  # an earlier run's input stays recorded


def test_a_row_fixed_in_place_is_redone_and_only_it_reaches_the_engine(tmp_path):
    path = tmp_path / "in.jsonl"
    rows = write_rows(path, 12)
    lines = rows[:5] + [b'{"question": "broken"'] + rows[6:]
    path.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out"
    run([path], out)
    assert [r["reason"] for r in records(out)["dropped"] if r["phase"] == "input"] == ["unreadable_row"]

    lines[5] = rows[5]  # the user fixes the row where it stands, as the error message suggests
    path.write_bytes(b"\n".join(lines) + b"\n")
    calls = Counter()
    again = run([path], out, backend(calls))
    assert calls["p1"] == 1  # the fixed row; the other eleven came from the store
    assert again["already_done"] == 0
    out_recs = records(out)
    assert not [r for r in out_recs["dropped"] if r["phase"] == "input"]
    assert set(ids_once(out).values()) == {1} and len(ids_once(out)) == 12


def test_an_edit_with_the_mtime_put_back_is_found_by_the_ctime(tmp_path):
    import os
    import time

    from sysgen.run import input_check

    p = tmp_path / "a.jsonl"
    p.write_bytes(b'{"q": "one"}\n')
    _, ids = input_check.compare({}, (str(p),))
    st = os.stat(p)
    time.sleep(0.01)
    p.write_bytes(b'{"q": "two"}\n')  # same size
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    changed, _ = input_check.compare(ids, (str(p),))
    assert changed == [str(p)]


def test_bytes_appended_after_a_last_row_without_newline_are_an_edit(tmp_path):
    from sysgen.run import input_check

    p = tmp_path / "a.jsonl"
    p.write_bytes(b'{"q": "one"}')
    _, ids = input_check.compare({}, (str(p),))
    with open(p, "ab") as f:
        f.write(b'{"q": "two"}\n')
    assert input_check.compare(ids, (str(p),))[0] == [str(p)]
    q = tmp_path / "b.jsonl"
    q.write_bytes(b'{"q": "one"}\n')
    _, ids = input_check.compare({}, (str(q),))
    with open(q, "ab") as f:
        f.write(b'{"q": "two"}\n')
    assert input_check.compare(ids, (str(q),))[0] == []  # a true append
