"""kill -9 in the middle of conversations, then resume: finished turns come from the store, the
conversation goes on at the turn it was on, and no request is generated twice."""

from __future__ import annotations

import json
import signal
import sqlite3
import time
from pathlib import Path

import pytest

try:
    from tests.sysgen.pipeline_helpers import backend, ids_once, records, run
    from tests.sysgen.test_multiturn import capybara_rows, write
    from tests.sysgen.test_pipeline_cli import cli, finish, start
except ImportError:  # tests/sysgen is not a package: pytest put its folder on sys.path
    from pipeline_helpers import backend, ids_once, records, run
    from test_multiturn import capybara_rows, write
    from test_pipeline_cli import cli, finish, start


def stored_keys(out: Path) -> set[str]:
    con = sqlite3.connect(f"file:{out / 'store.db'}?mode=ro", uri=True)
    try:
        return {bytes(k).hex() for (k,) in con.execute("SELECT key FROM results")}
    except sqlite3.OperationalError:  # the run has not created its tables yet
        return set()
    finally:
        con.close()


@pytest.mark.kill
def test_kill_9_mid_conversation_then_resume_generates_no_turn_twice(tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out"
    write(inp, capybara_rows(60, turns=4))
    # The stand-in is deterministic: an in-process run tells each conversation's P4 keys, turn by turn.
    run([inp], tmp_path / "ref", backend())
    turn_keys = [r["request_keys"]["p4"] for r in records(tmp_path / "ref")["data"]]
    proc = start(cli(inp, out, "--max-inflight", "16"), SYSGEN_STANDIN_DELAY="0.2:0.3")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # kill once a conversation's first turns are stored, not its last
        if (out / "store.db").exists():
            stored = stored_keys(out)
            if sum(1 for ks in turn_keys if ks[0] in stored and ks[-1] not in stored) >= 3:
                break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    before = stored_keys(out)
    n_done = len(ids_once(out))
    assert n_done < 60

    finish(cli(inp, out))
    ids = ids_once(out)
    assert len(ids) == 60 and set(ids.values()) == {1}
    data = records(out)["data"]
    assert len(data) == 60 and all(r["answered_turns"] == 4 for r in data)
    # Some conversations were cut mid-way: their first turns were stored before the kill, later ones not.
    mid = [
        r for r in data if r["request_keys"]["p4"][0] in before and r["request_keys"]["p4"][-1] not in before
    ]
    assert mid, f"the kill should land mid-conversation ({len(before)} stored, {n_done} done)"
    # The resumed run asked the engine only for what the store did not hold: nothing twice.
    after = stored_keys(out)
    sched = json.loads((out / "stats.json").read_text())["this_run"]["scheduler"]
    assert sched["engine_calls"] == len(after - before)
    assert sched["hits"] >= sum(1 for r in mid for k in r["request_keys"]["p4"] if k in before)
