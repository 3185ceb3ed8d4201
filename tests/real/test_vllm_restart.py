"""A vLLM server restarted under a running `sysgen run`, a new one started on the same port:
nothing dropped and no retry spent (with --max-retries 0 a single spent retry would drop its row
as an engine error). Two ways it goes away: SIGTERM to its whole process group (SIGKILL after
5 s), and SIGTERM to its API server alone, whose front end then hangs in shutdown holding our
connections while the new server answers beside it."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

try:
    from tests.real.checks import ids_once, stats
    from tests.real.runs import start, sysgen_cmd, write_inputs
    from tests.real.servers import get
    from tests.real.test_vllm_run import stored_results
except ImportError:
    from checks import ids_once, stats
    from runs import start, sysgen_cmd, write_inputs
    from servers import get
    from test_vllm_run import stored_results

pytestmark = pytest.mark.real_engine
ROWS = 4


def run_with_a_result(vllm, model_dir, tmp_path) -> tuple[subprocess.Popen, Path]:
    """A `sysgen run` over ROWS rows with --max-retries 0, once its first result is stored. Two
    requests at a time: most rows are still to come when the server goes away."""
    inp, out = write_inputs(tmp_path / "in.jsonl", ROWS), tmp_path / "out"
    budget = ("--p1-max-tokens", "96", "--max-retries", "0", "--max-inflight", "2")
    proc = start(sysgen_cmd(inp, out, vllm.url, model_dir, *budget))
    deadline = time.monotonic() + 600
    while stored_results(out) < 1 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before the server went away"
    return proc, out


def test_a_server_restart_mid_run_drops_nothing_and_spends_no_retries(vllm, model_dir, tmp_path):
    proc, out = run_with_a_result(vllm, model_dir, tmp_path)
    vllm.stop(grace_s=5.0)
    vllm.start().wait_ready()
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    s = stats(out)
    assert not any("engine" in k for k in s["dropped"]), s["dropped"]
    assert len(ids_once(out)) == ROWS and set(ids_once(out).values()) == {1}
    assert "retrying" not in err  # the scheduler's line for a spent retry
    assert "unreachable" in err or "stalled" in err, err[-2000:]


def _metric_sum(url: str, names: tuple[str, ...]) -> float:
    """The sum of the vLLM server's /metrics samples named `names` (vllm:NAME{...} VALUE)."""
    text = get(f"{url}/metrics", timeout=2.0)[1].decode("utf-8", "replace")
    pattern = rf"^vllm:(?:{'|'.join(names)})\{{[^}}]*\}}\s+(\S+)"
    return sum(float(v) for v in re.findall(pattern, text, re.M))


IN_FLIGHT = ("num_requests_running", "num_requests_waiting")


def _long_request(url: str, model: str) -> None:
    """A 1,500-token completion, left to hang or fail with the server it went to."""
    body = json.dumps(
        {"model": model, "prompt": "Tell a long story.", "max_tokens": 1500, "ignore_eos": True}
    )
    request = urllib.request.Request(
        f"{url}/v1/completions", body.encode(), {"Content-Type": "application/json"}
    )
    with contextlib.suppress(OSError):
        urllib.request.urlopen(request, timeout=600).read()


def _served_any(url: str) -> bool:
    """Whether the vLLM server at `url` has taken any request yet."""
    return _metric_sum(url, (*IN_FLIGHT, "prompt_tokens_total")) > 0


def test_a_front_end_hung_in_shutdown_stalls_the_run_under_a_minute(vllm, model_dir, tmp_path):
    """The old server's front end keeps our connections open with nothing behind them while a new
    server answers on the same port: the liveness probe gives those requests up and resubmits
    them, so the new server stands idle for well under a minute (it was 10 minutes: --timeout-s)."""
    proc, out = run_with_a_result(vllm, model_dir, tmp_path)
    # The first result came as a request ended (its twin, same prompt size and budget, often with
    # it): the hang needs requests in flight, so wait until the server shows some on two reads in
    # a row (a read just after a finish may still show the step before it).
    seen, busy = 0, time.monotonic() + 60
    while seen < 2 and proc.poll() is None and time.monotonic() < busy:
        seen = seen + 1 if _metric_sum(vllm.url, IN_FLIGHT) > 0 else 0
        time.sleep(0.3)
    # And one long request of the test's own, so the front end surely has one to wait for.
    holder = threading.Thread(target=_long_request, args=(vllm.url, str(model_dir)), daemon=True)
    holder.start()
    time.sleep(1.0)
    old = vllm.terminate_front_end()
    try:
        freed = time.monotonic() + 60
        while get(f"{vllm.url}/v1/models", timeout=1.0)[0] and time.monotonic() < freed:
            time.sleep(0.2)
        vllm.start().wait_ready()
        ready, before = time.monotonic(), stored_results(out)
        assert old.proc.poll() is None, (
            "the old vLLM front end exited: it no longer hangs in shutdown, so this test no longer "
            f"sets up what it names. Its log: {old.tail()}"
        )
        while not _served_any(vllm.url) and proc.poll() is None and time.monotonic() < ready + 180:
            time.sleep(0.2)
        idle_s = time.monotonic() - ready
        while stored_results(out) == before and proc.poll() is None and time.monotonic() < ready + 300:
            time.sleep(0.2)
        progress_s = time.monotonic() - ready
        print(
            f"the new server stood idle {idle_s:.1f}s; the next result came {progress_s:.1f}s after it was up"
        )
    finally:
        old.stop(signal.SIGKILL, grace_s=10.0)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    assert idle_s < 40, f"the new server stood idle {idle_s:.0f}s beside the hung one: {err[-2000:]}"
    assert progress_s < 90, f"no result for {progress_s:.0f}s after the new server was up: {err[-2000:]}"
    s = stats(out)
    assert not any("engine" in k for k in s["dropped"]), s["dropped"]
    assert len(ids_once(out)) == ROWS and set(ids_once(out).values()) == {1}
    assert "retrying" not in err
    assert "resubmitting" in err, err[-2000:]  # the liveness probe's line, not a timeout's
