"""The checkpoint store: content-addressed results, done markers, exactly-once sinks, failures."""

from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path

import orjson
import pytest

from engine import sink_log, store_writer
from engine.keyfilter import KeyFilter
from engine.request import Result
from engine.store import SinkMismatch, Store, StoreError
from engine.store_writer import StoreWriter


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def test_put_get_visible_before_and_after_commit(tmp_path):
    with Store.open(tmp_path / "s.db") as st:
        st.put(key(1), Result("hello", "stop", prompt_tokens=3, completion_tokens=1))
        assert st.get(key(1)).text == "hello"  # not committed yet
        assert st.get(key(2)) is None
        st.flush()
        assert st.count() == 1
    with Store.open(tmp_path / "s.db") as st:
        got = st.get(key(1))
        assert (got.text, got.finish_reason, got.prompt_tokens) == ("hello", "stop", 3)
        assert st.get(key(2)) is None


def test_values_are_json_and_failures_keep_their_reason(tmp_path):
    with Store.open(tmp_path / "s.db") as st:
        st.put(key(1), Result.failure("gave up after 4 attempts: timeout after 5s", 4))
    raw = sqlite3.connect(tmp_path / "s.db").execute("SELECT value FROM results").fetchone()[0]
    assert orjson.loads(raw)["error"] == "gave up after 4 attempts: timeout after 5s"
    with Store.open(tmp_path / "s.db") as st:
        got = st.get(key(1))
        assert not got.ok and got.attempts == 4 and "timeout" in got.error


def test_a_later_put_replaces_a_stored_failure(tmp_path):
    with Store.open(tmp_path / "s.db") as st:
        st.put(key(1), Result.failure("engine error"))
    with Store.open(tmp_path / "s.db") as st:
        st.put(key(1), Result("fine", "stop"))
    with Store.open(tmp_path / "s.db") as st:
        assert st.get(key(1)).ok and st.count() == 1


def test_schema_version_mismatch_is_a_clear_error(tmp_path):
    with Store.open(tmp_path / "s.db"):
        pass
    conn = sqlite3.connect(tmp_path / "s.db")
    conn.execute("UPDATE meta SET v='1' WHERE k='schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match=r"schema v1, this version reads v\d+\. Fix: write to a new --out"):
        Store.open(tmp_path / "s.db")


def test_foreign_files_are_refused(tmp_path):
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.commit()
    with pytest.raises(StoreError, match="not a sysgen store"):
        Store.open(other)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(StoreError, match="not a usable store"):
        Store.open(junk)


def _kill_before_commit(tmp_path, sink, lines, keep=0):
    """Write `lines` to sink `data` through a store whose commit fails after the lines are on disk
    (as a kill -9 between write and commit); then cut `keep` bytes off the end (a torn write)."""
    real = store_writer._insert_rows
    store_writer._insert_rows = lambda *a: (_ for _ in ()).throw(OSError("killed"))
    try:
        st = Store.open(tmp_path / "s.db")
        st.add_sink("data", sink)
        for i, line in enumerate(lines):
            st.finish_item(b"k%d" % i, None, (("data", line),))
        with pytest.raises(StoreError):
            st.flush()
        st.close()
    finally:
        store_writer._insert_rows = real
    if keep:
        with open(sink, "ab") as f:
            f.truncate(sink.stat().st_size + keep)


def test_sink_is_cut_back_to_its_committed_length(tmp_path):
    sink = tmp_path / "data.jsonl"
    with Store.open(tmp_path / "s.db") as st:
        st.add_sink("data", sink)
        st.finish_item(b"a", None, (("data", b'{"id":"a"}\n'),))
    committed = sink.read_bytes()
    # What a kill -9 between the sink write and the commit leaves: the lines on disk, not committed
    # (here the commit fails after the write), the last one torn.
    _kill_before_commit(tmp_path, sink, (b'{"id":"b"}\n', b'{"id":"c", "half":1}\n'), keep=-6)
    with Store.open(tmp_path / "s.db") as st:
        assert st.add_sink("data", sink) == len(committed)
        assert st.has_item(b"a") and not st.has_item(b"b")
    assert sink.read_bytes() == committed


def test_sink_shorter_than_committed_is_refused(tmp_path):
    sink = tmp_path / "data.jsonl"
    with Store.open(tmp_path / "s.db") as st:
        st.add_sink("data", sink)
        st.finish_item(b"a", None, (("data", b'{"id":"a"}\n'),))
    sink.write_bytes(b"")
    with Store.open(tmp_path / "s.db") as st, pytest.raises(StoreError, match="truncated or replaced"):
        st.add_sink("data", sink)


def test_reset_outputs_forgets_items_and_empties_sinks(tmp_path):
    sink = tmp_path / "data.jsonl"
    with Store.open(tmp_path / "s.db") as st:
        st.add_sink("data", sink)
        st.put(key(1), Result("kept", "stop"))
        st.finish_item(b"a", None, (("data", b"x\n"),))
        st.reset_outputs()
        assert not st.has_item(b"a") and st.get(key(1)).text == "kept"
        st.finish_item(b"b", None, (("data", b"y\n"),))
    assert sink.read_bytes() == b"y\n"
    with Store.open(tmp_path / "s.db") as st:
        assert st.add_sink("data", sink) == 2 and st.count("items") == 1


def test_last_item_finds_the_greatest_key_in_a_range(tmp_path):
    with Store.open(tmp_path / "s.db") as st:
        for line in (3, 17, 5):
            st.finish_item(b"P" + line.to_bytes(8, "big"))
        st.finish_item(b"Q" + (99).to_bytes(8, "big"))
        st.flush()
        assert st.last_item(b"P", b"P\xff" * 9) == b"P" + (17).to_bytes(8, "big")
        assert st.last_item(b"R", b"R\xff") is None


class _FullDisk:
    """A sink whose writes fail the way a full disk fails them."""

    def __init__(self, real):
        self.real = real

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_disk_full_stops_the_store_cleanly_and_keeps_what_was_committed(tmp_path, monkeypatch):
    sink = tmp_path / "data.jsonl"
    with Store.open(tmp_path / "s.db") as st:
        st.add_sink("data", sink)
        st.put(key(1), Result("one", "stop"))
        st.finish_item(b"a", None, (("data", b"a\n"),))
    monkeypatch.setattr(StoreWriter, "_open_sink", lambda self, path: _FullDisk(open(path, "ab")))  # noqa: SIM115
    st = Store.open(tmp_path / "s.db")
    st.add_sink("data", sink)
    st.put(key(2), Result("two", "stop"))
    st.finish_item(b"b", None, (("data", b"b\n"),))
    with pytest.raises(StoreError, match="disk is full"):
        st.flush()
    with pytest.raises(StoreError):  # and every later write says so too
        st.put(key(3), Result("three", "stop"))
    st.close()  # already reported: closing does not raise it again
    monkeypatch.undo()
    with Store.open(tmp_path / "s.db") as st:
        assert st.add_sink("data", sink) == 2
        assert st.get(key(1)).text == "one" and st.get(key(2)) is None and not st.has_item(b"b")
    assert sink.read_bytes() == b"a\n"


def test_a_failing_commit_rolls_back_and_is_reported(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = StoreWriter._commit

    def flaky(self):
        calls["n"] += 1
        if calls["n"] == 2:
            raise sqlite3.OperationalError("database or disk is full")
        return real(self)

    monkeypatch.setattr(StoreWriter, "_commit", flaky)
    st = Store.open(tmp_path / "s.db")
    st.put(key(1), Result("one", "stop"))
    st.flush()
    st.put(key(2), Result("two", "stop"))
    with pytest.raises(StoreError, match="disk is full"):
        st.flush()
    st.close()
    monkeypatch.undo()
    with Store.open(tmp_path / "s.db") as st:
        assert st.count() == 1 and st.get(key(1)) is not None


def test_close_raises_a_failure_nobody_saw(tmp_path, monkeypatch):
    def broken(self):
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(StoreWriter, "_commit", broken)
    st = Store.open(tmp_path / "s.db")
    st.put(key(1), Result("one", "stop"))
    with pytest.raises(StoreError, match="disk I/O error"):
        st.close()


def test_batches_commit_by_size_and_backlog_drains(tmp_path):
    with Store.open(tmp_path / "s.db", commit_every=100, commit_interval_s=30) as st:
        for i in range(1000):
            st.put(key(i), Result(str(i), "stop"))
        st.flush()
        assert st.backlog == 0 and st.count() == 1000
        assert 10 <= st.commits <= 11


def test_key_filter_has_no_false_negatives_and_few_false_positives():
    f = KeyFilter(1000)
    keys = [os.urandom(16) for _ in range(5000)]  # five times its first capacity: it grows
    f.add_many(keys[:2500])
    for k in keys[2500:]:
        f.add(k)
    assert all(k in f for k in keys)
    false = sum(os.urandom(16) in f for _ in range(20000))
    assert false / 20000 < 0.1
    f.add(b"a key of another length")
    assert b"a key of another length" in f


def test_filter_is_built_from_an_existing_store(tmp_path):
    with Store.open(tmp_path / "s.db") as st:
        for i in range(300):
            st.put(key(i), Result(str(i), "stop"))
    with Store.open(tmp_path / "s.db") as st:
        assert all(st.get(key(i)).text == str(i) for i in range(300))
        assert st.get(key(10_000)) is None


def test_a_second_writer_is_refused_with_the_first_ones_pid_until_it_closes(tmp_path):
    db = tmp_path / "out" / "store.db"
    first = Store.open(db)
    with pytest.raises(StoreError, match=rf"in use by another sysgen process \(pid {os.getpid()}\).*Fix"):
        Store.open(db)
    first.close()
    Store.open(db).close()


@pytest.mark.kill
def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    import signal
    import subprocess
    import sys

    db = tmp_path / "store.db"
    code = (
        "import sys, time; from engine.store import Store; s = Store.open(sys.argv[1]); "
        "print('open', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(db)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert proc.stdout.readline().strip() == "open"
        with pytest.raises(StoreError, match=f"pid {proc.pid}"):
            Store.open(db)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    Store.open(db).close()  # the OS dropped the lock with its holder


def test_a_file_system_without_locks_warns_and_goes_on(tmp_path, monkeypatch, caplog):
    import engine.store_lock as lock_mod

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(lock_mod.fcntl, "flock", no_locks)
    with Store.open(tmp_path / "store.db") as st:
        st.put(b"k" * 16, Result(text="x", finish_reason="stop"))
    assert "cannot lock" in caplog.text and "No locks available" in caplog.text


def test_a_sink_the_store_did_not_write_is_refused_not_emptied(tmp_path):
    (tmp_path / "data.jsonl").write_bytes(b"not ours\n")
    with Store.open(tmp_path / "store.db") as st, pytest.raises(StoreError, match="did not write"):
        st.add_sink("data", tmp_path / "data.jsonl")
    assert (tmp_path / "data.jsonl").read_bytes() == b"not ours\n"


def test_drop_lines_removes_lines_and_done_markers_in_one_step(tmp_path):
    with Store.open(tmp_path / "store.db") as st:
        st.add_sink("d", tmp_path / "d.jsonl")
        for i in range(5):
            st.finish_item(bytes([i]), None, (("d", b'{"n": %d}\n' % i),))
        st.set_meta("watermark", b"x")
        assert (
            st.drop_lines(
                "d", lambda line: b"3" in line or b"1" in line, [b"\x01", b"\x03"], meta_keys=("watermark",)
            )
            == 2
        )
        st.finish_item(b"\x03", None, (("d", b'{"n": 33}\n'),))  # re-done, appended as usual
        st.flush()
        assert st.get_meta("watermark") is None and not st.has_item(b"\x01")
    assert (tmp_path / "d.jsonl").read_bytes() == b'{"n": 0}\n{"n": 2}\n{"n": 4}\n{"n": 33}\n'
    with Store.open(tmp_path / "store.db") as st:  # the committed length matches the new file
        assert st.add_sink("d", tmp_path / "d.jsonl") == (tmp_path / "d.jsonl").stat().st_size


# ---- outputs proved by content (engine/sink_log.py) ----


def _three_commits(tmp_path) -> Path:
    sink = tmp_path / "data.jsonl"
    with Store.open(tmp_path / "s.db") as st:
        st.add_sink("data", sink)
        for i in range(30):
            st.finish_item(b"%02d" % i, None, (("data", b'{"id":"%02d"}\n' % i),))
            if i % 10 == 9:
                st.flush()
        assert st.commits == 4  # the first registers the sink
    return sink


def test_a_byte_changed_in_an_early_commit_is_found_and_nothing_is_cut(tmp_path):
    sink = _three_commits(tmp_path)
    data = bytearray(sink.read_bytes())
    data[data.index(b'"03"') + 2] = ord("9")  # line 4, inside the first commit; same size
    sink.write_bytes(bytes(data))
    with Store.open(tmp_path / "s.db") as st, pytest.raises(SinkMismatch, match=r"lines 1-10 \(bytes 0-"):
        st.add_sink("data", sink)
    assert sink.read_bytes() == bytes(data)


def test_an_untouched_sink_hashes_only_its_last_commit(tmp_path, monkeypatch):
    sink = _three_commits(tmp_path)
    hashed = []
    real = sink_log.hash_range
    monkeypatch.setattr(sink_log, "hash_range", lambda f, a, b, p: hashed.append(b - a) or real(f, a, b, p))
    with Store.open(tmp_path / "s.db") as st:
        st.add_sink("data", sink)
    assert hashed == [120]  # the third commit's ten lines, not the 360 bytes of the file
    os.utime(sink)  # touched (a copy, an editor): every commit is hashed once more
    hashed.clear()
    with Store.open(tmp_path / "s.db") as st:
        st.add_sink("data", sink)
    assert hashed == [120, 120, 120, 120]
    hashed.clear()
    with Store.open(tmp_path / "s.db") as st:  # proved in full once: its new stat is recorded
        st.add_sink("data", sink)
    assert hashed == [120]


def test_a_reset_killed_before_its_truncate_is_finished_at_the_next_open(tmp_path, monkeypatch):
    sink = _three_commits(tmp_path)

    class DiesAtTruncate:
        def __init__(self, real):
            self.real = real

        def truncate(self, n):
            raise OSError("killed")

        def __getattr__(self, name):
            return getattr(self.real, name)

    monkeypatch.setattr(StoreWriter, "_open_sink", lambda self, path: DiesAtTruncate(open(path, "ab")))  # noqa: SIM115
    st = Store.open(tmp_path / "s.db")
    st.add_sink("data", sink)
    with pytest.raises(StoreError):
        st.reset_outputs()  # committed, then the process dies before the file is emptied
    st.close()
    monkeypatch.undo()
    assert sink.stat().st_size == 360
    with Store.open(tmp_path / "s.db") as st:
        assert st.add_sink("data", sink) == 0 and st.count("items") == 0
    assert sink.read_bytes() == b""


def test_a_store_from_before_digests_is_adopted_then_checked_by_content(tmp_path):
    sink = _three_commits(tmp_path)
    with sqlite3.connect(tmp_path / "s.db") as db:
        db.execute("DROP TABLE sink_log")  # as an older sysgen wrote it
    with Store.open(tmp_path / "s.db") as st:
        assert st.add_sink("data", sink) == 360  # length checked, then its digest recorded
    sink.write_bytes(sink.read_bytes().replace(b'"05"', b'"50"'))
    with Store.open(tmp_path / "s.db") as st, pytest.raises(SinkMismatch):
        st.add_sink("data", sink)
