"""A vLLM server restarted under a running `sysgen run` (SIGTERM; its front end may hang waiting
for open connections, then SIGKILL; a new server on the same port): nothing dropped and no retry
spent. With --max-retries 0 a single spent retry would drop its row as an engine error."""

from __future__ import annotations

import time

import pytest

try:
    from tests.real.checks import ids_once, stats
    from tests.real.runs import start, sysgen_cmd, write_inputs
    from tests.real.test_vllm_run import stored_results
except ImportError:
    from checks import ids_once, stats
    from runs import start, sysgen_cmd, write_inputs
    from test_vllm_run import stored_results

pytestmark = pytest.mark.real_engine
ROWS = 6


def test_a_server_restart_mid_run_drops_nothing_and_spends_no_retries(vllm, model_dir, tmp_path):
    inp, out = write_inputs(tmp_path / "in.jsonl", ROWS), tmp_path / "out"
    # Two requests at a time: most rows are still to come when the server goes away.
    proc = start(
        sysgen_cmd(
            inp,
            out,
            vllm.url,
            model_dir,
            "--p1-max-tokens",
            "96",
            "--max-retries",
            "0",
            "--max-inflight",
            "2",
        )
    )
    deadline = time.monotonic() + 600
    while stored_results(out) < 1 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before the restart"
    vllm.stop(grace_s=15.0)
    vllm.start().wait_ready()
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    s = stats(out)
    assert not any("engine" in k for k in s["dropped"]), s["dropped"]
    assert len(ids_once(out)) == ROWS and set(ids_once(out).values()) == {1}
    assert "retrying" not in err  # the scheduler's line for a spent retry
    assert "unreachable" in err or "stalled" in err, err[-2000:]
