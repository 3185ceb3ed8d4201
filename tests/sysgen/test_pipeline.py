"""The run in-process: exactly once, accounted, resumable, invalidated exactly where inputs changed."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections import Counter

import orjson
import pytest
import xxhash

try:
    from tests.sysgen.pipeline_helpers import FAST, backend, ids_once, records, run, write_rows
except ImportError:  # tests/sysgen is not a package: pytest put its folder on sys.path
    from pipeline_helpers import FAST, backend, ids_once, records, run, write_rows

import sysgen.prompts
import sysgen.tags
from engine.store import Store, StoreError
from sysgen.config import RunConfig
from sysgen.run import stats
from sysgen.run.pipeline import run_stream

# Twelve kinds of unreadable rows: each must come out in dropped.jsonl naming file:line.
MALFORMED = [
    b'{"question": "a" "answer": "b"}',  # bad JSON
    b"[1, 2]",  # not an object
    b"42",
    b'"just a string"',
    b'{"foo": 1, "bar": 2}',  # unknown shape
    b'{"conversations": "hi"}',
    b'{"messages": [{"role": "user", "content": 5}]}',
    b'{"conversations": [{"from": "human", "value": "  "}, {"from": "gpt", "value": "x"}]}',
    b'{"messages": [{"role": "tool", "content": "x"}]}',
    b'{"question": "q", "response": "r"}',
    b'{"question": "caf\xe9!", "answer": "x"}',  # not UTF-8
    b'{"question": "cut of',  # cut mid-row
]


def test_every_row_ends_once_and_stats_account_for_it(tmp_path):
    good = write_rows(tmp_path / "in.jsonl", 40)
    lines = list(good)
    for i, bad in enumerate(MALFORMED):
        lines.insert(3 * i + 1, bad)
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out"
    counters = run([tmp_path / "in.jsonl"], out)
    assert counters["kept"] + counters["dropped"] == len(lines)
    ids = ids_once(out)
    assert len(ids) == len(lines) and set(ids.values()) == {1}
    unreadable = [r for r in records(out)["dropped"] if r["reason"] == "unreadable_row"]
    bad_lines = sorted(3 * i + 2 for i in range(len(MALFORMED)))
    assert sorted(int(r["id"].rsplit(":", 1)[1]) for r in unreadable) == bad_lines
    # Named by the source like the file's instances: one file is one source in by_source.
    assert all(r["id"].startswith("in:") and r["source"] == "in" and r["detail"] for r in unreadable)
    assert {r["phase"] for r in unreadable} == {"input"}
    st = stats.write(out, {}, rows_read=counters["rows_read"])
    assert st["accounted"] and st["input"] == len(lines) and st["dropped"]["input:unreadable_row"] == 12


def test_a_rerun_reads_no_finished_input_and_calls_no_engine(tmp_path):
    write_rows(tmp_path / "in.jsonl", 60)
    out = tmp_path / "out"
    run([tmp_path / "in.jsonl"], out, limit=25)
    before = (out / "data.jsonl").read_bytes()
    calls = Counter()
    second = run([tmp_path / "in.jsonl"], out, backend(calls))
    # Starts at the watermark: only the last finished row is read again, the rest is new work.
    assert second["skipped_done"] <= 1 and second["kept"] + second["dropped"] == 35
    assert second["already_done"] == 25
    assert (out / "data.jsonl").read_bytes().startswith(before)
    third_calls = Counter()
    third = run([tmp_path / "in.jsonl"], out, backend(third_calls))
    assert third["kept"] == third["dropped"] == 0 and not third_calls
    assert third["already_done"] == 60
    assert set(ids_once(out).values()) == {1} and len(ids_once(out)) == 60


def _changed(monkeypatch, name: str, extra: str) -> None:
    real = sysgen.prompts.load

    def load(n):
        return real(n) + extra if n == name else real(n)

    monkeypatch.setattr(sysgen.prompts, "load", load)


def _phase_calls(tmp_path, **cfg_kw) -> Counter:
    calls = Counter()
    run([tmp_path / "in.jsonl"], tmp_path / "out", backend(calls), **cfg_kw)
    return calls


def test_changing_p4_sampling_misses_only_p4(tmp_path):
    write_rows(tmp_path / "in.jsonl", 20)
    first = _phase_calls(tmp_path)
    assert first["p1"] == 20 and first["p4"] > 0
    again = _phase_calls(tmp_path, p4_max_tokens=300)
    assert again == Counter(p4=first["p4"])  # P1 and P3 were store hits
    out = records(tmp_path / "out")
    assert len(out["data"]) + len(out["dropped"]) == 20  # outputs started afresh, not appended


def test_changing_the_p3_template_keeps_p1(tmp_path, monkeypatch):
    write_rows(tmp_path / "in.jsonl", 20)
    first = _phase_calls(tmp_path)
    _changed(monkeypatch, "p3_verify", "\nBe strict.")
    again = _phase_calls(tmp_path)
    assert again["p1"] == 0 and again["p3"] == first["p3"]


def test_a_new_p1_grammar_redoes_p1_and_the_instance_outputs(tmp_path, monkeypatch):
    # A sysgen upgrade that changes the tag grammar: the P1 regex is in P1's request key (so every P1
    # is asked again) and in the run fingerprint (so old outputs are not kept as if still current).
    write_rows(tmp_path / "in.jsonl", 20)
    first = _phase_calls(tmp_path)
    narrower = sysgen.tags.p1_regex().replace("[^<>\\n]*", "[^<>\\n]{0,250}")
    assert narrower != sysgen.tags.p1_regex()
    monkeypatch.setattr(sysgen.tags, "p1_regex", lambda: narrower)
    again = _phase_calls(tmp_path)
    assert again["p1"] == first["p1"] == 20
    out = records(tmp_path / "out")
    assert len(out["data"]) + len(out["dropped"]) == 20
    assert set(ids_once(tmp_path / "out").values()) == {1}


def test_changing_the_p1_template_or_the_model_misses_everything(tmp_path, monkeypatch):
    write_rows(tmp_path / "in.jsonl", 20)
    first = _phase_calls(tmp_path)
    _changed(monkeypatch, "p1_generate", "\nOne more example.")
    assert _phase_calls(tmp_path) == first
    monkeypatch.undo()
    calls = Counter()
    run([tmp_path / "in.jsonl"], tmp_path / "out", backend(calls, model_id="another-model"))
    assert calls == first
    assert set(ids_once(tmp_path / "out").values()) == {1}


def test_engine_faults_are_retried_then_recorded(tmp_path):
    write_rows(tmp_path / "in.jsonl", 40)

    def fault(request, attempt):
        h = request.key[0]
        if request.group == "p1" and h % 10 == 0:
            return "error"  # every attempt: recorded as an engine error
        if request.group == "p1" and h % 10 == 1 and attempt == 1:
            return "hang"  # once: the retry answers
        if request.group == "p3" and h % 10 == 2 and attempt == 1:
            return "error"
        if request.group == "p4" and xxhash.xxh3_64_intdigest(repr(request.prompt).encode()) % 10 == 3:
            # unconstrained: not retried by the scheduler; the canned answer repeats itself, so P4
            # resamples the turn once (same prompt), is cut again, and drops the instance
            return "truncate"
        if request.group == "p1" and h % 10 == 4 and attempt == 1:
            return "truncate"  # constrained: retried with new sampling
        return None

    out = tmp_path / "out"
    counters = run([tmp_path / "in.jsonl"], out, backend(fault=fault))
    assert counters["scheduler"]["retries"] > 0
    dropped = Counter(f"{r['phase']}:{r['reason']}" for r in records(out)["dropped"])
    # --turns all names the turn (p4:loop@turn1: cut twice, and the tail repeats itself)
    assert dropped["p1:engine_error"] > 0 and dropped["p4:loop@turn1"] > 0
    errors = [r for r in records(out)["dropped"] if r["reason"] == "engine_error"]
    assert all("gave up after 3 attempts" in r["detail"] for r in errors)
    st = stats.write(out, {}, rows_read=counters["rows_read"])
    assert st["accounted"] and st["input"] == 40


def test_a_store_failure_stops_the_run_and_a_rerun_finishes_exactly_once(tmp_path, monkeypatch):
    from engine.store_writer import StoreWriter

    write_rows(tmp_path / "in.jsonl", 50)
    out = tmp_path / "out"
    real, calls = StoreWriter._commit, {"n": 0}

    def failing_later(self):
        calls["n"] += 1
        if calls["n"] >= 3:
            raise OSError(28, "No space left on device")
        return real(self)

    monkeypatch.setattr(StoreWriter, "_commit", failing_later)
    cfg = RunConfig(inputs=(str(tmp_path / "in.jsonl"),), out=str(out), engine="standin")

    async def go():
        st = Store.open(out / "store.db", commit_every=20)
        try:
            await run_stream(cfg, backend(delay_s=0.002), st, out, progress_enabled=False, sched_config=FAST)
        finally:
            st.close()

    with pytest.raises(StoreError, match="disk is full"):
        asyncio.run(go())
    monkeypatch.undo()
    run([tmp_path / "in.jsonl"], out)
    ids = ids_once(out)
    assert len(ids) == 50 and set(ids.values()) == {1}


def test_shard_split_is_stable_across_processes(tmp_path):
    rows = write_rows(tmp_path / "in.jsonl", 30)
    code = (
        "import sys, orjson; from sysgen.datasets import iter_instances; "
        "print([i.content_hash % 7 for i in iter_instances([sys.argv[1]])])"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code, str(tmp_path / "in.jsonl")],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
            check=True,
        ).stdout
        for seed in ("1", "2")
    }
    assert len(outs) == 1 and len(orjson.loads(outs.pop())) == len(rows)
