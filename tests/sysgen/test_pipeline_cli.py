"""`python -m sysgen run --engine standin` as a process: kill -9 and resume, SIGTERM with hung work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

try:
    from tests.sysgen.pipeline_helpers import ids_once, write_rows
except ImportError:  # tests/sysgen is not a package: pytest put its folder on sys.path
    from pipeline_helpers import ids_once, write_rows

import pytest

from sysgen.run.pipeline import DRAIN_S
from sysgen.run_argv import run_argv

pytestmark = pytest.mark.kill  # runs `sysgen run` in subprocesses and signals them
REPO = Path(__file__).resolve().parents[2]


def cli(inp: Path, out: Path, *extra: str) -> list[str]:
    return run_argv(inp, out, *extra)


def start(cmd: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, cwd=REPO, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for_output(out: Path, proc: subprocess.Popen, min_bytes: int = 1, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (out / "data.jsonl").exists() and (out / "data.jsonl").stat().st_size >= min_bytes:
            return
        assert proc.poll() is None, f"run ended early: {proc.communicate()}"
        time.sleep(0.05)
    raise AssertionError("no output appeared")


def finish(cmd: list[str], **env: str) -> subprocess.CompletedProcess:
    done = subprocess.run(
        cmd, cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done


def test_kill_9_mid_run_then_resume_gives_every_row_exactly_once(tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out"
    write_rows(inp, 400)
    slow = {"SYSGEN_STANDIN_DELAY": "0.1:0.2"}  # ~2 s of work: output commits every second
    for _ in range(2):  # two kills at different points
        proc = start(cli(inp, out), **slow)
        wait_for_output(out, proc, min_bytes=(out / "data.jsonl").stat().st_size + 1 if out.exists() else 1)
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert len(ids_once(out)) < 400
    finish(cli(inp, out))
    ids = ids_once(out)
    assert len(ids) == 400 and set(ids.values()) == {1}
    st = json.loads((out / "stats.json").read_text())
    assert st["accounted"] and st["input"] == 400


def test_sigterm_with_hung_requests_exits_within_10s_and_says_how_to_resume(tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out"
    write_rows(inp, 300)
    # Some requests hang (the engine never answers, the per-request timeout is long), the rest are slow.
    proc = start(
        cli(inp, out, "--timeout-s", "600"),
        SYSGEN_STANDIN_DELAY="0.01:0.02",
        SYSGEN_STANDIN_FAULTS="hang=0.2",
    )
    wait_for_output(out, proc)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=15)
    assert time.monotonic() - t0 < 10
    assert proc.returncode == 130 and "re-run the same command to resume" in err
    done_before = len(ids_once(out))
    assert 0 < done_before < 300
    finish(cli(inp, out))
    ids = ids_once(out)
    assert len(ids) == 300 and set(ids.values()) == {1}


def test_a_second_ctrl_c_skips_the_drain(tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out"
    write_rows(inp, 300)
    proc = start(
        cli(inp, out, "--timeout-s", "600"),
        SYSGEN_STANDIN_DELAY="0.01:0.02",
        SYSGEN_STANDIN_FAULTS="hang=0.2",
    )  # hung requests would hold the drain its full time
    wait_for_output(out, proc)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=15)
    assert time.monotonic() - t0 < 0.5 + DRAIN_S - 2
    assert "press Ctrl-C again to stop at once" in err and "stopping now" in err
    assert proc.returncode == 130 and "re-run the same command to resume" in err
    finish(cli(inp, out))
    assert set(ids_once(out).values()) == {1} and len(ids_once(out)) == 300


def test_engine_errors_through_the_cli_are_retried_and_accounted(tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out"
    write_rows(inp, 120)
    finish(cli(inp, out, "--timeout-s", "0.5"), SYSGEN_STANDIN_FAULTS="error=0.3,truncate=0.05,hang=0.02")
    st = json.loads((out / "stats.json").read_text())
    assert st["accounted"] and st["input"] == 120
    assert st["this_run"]["scheduler"]["retries"] > 0
    assert set(ids_once(out).values()) == {1}


def test_a_bad_standin_spec_is_a_clear_cli_error(tmp_path):
    inp = tmp_path / "in.jsonl"
    write_rows(inp, 2)
    done = subprocess.run(
        cli(inp, tmp_path / "out"),
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "SYSGEN_STANDIN_FAULTS": "explode=0.5"},
    )
    assert done.returncode == 2 and "stand-in fault 'explode' unknown" in done.stderr


def test_a_run_whose_every_engine_request_failed_does_not_exit_0(tmp_path):
    """3 instances, every request refused: too few for the early stop, so the run ends, keeps
    nothing, and says so with the engine's message instead of exiting 0."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out"
    write_rows(inp, 3)
    done = subprocess.run(
        cli(inp, out),
        cwd=REPO,
        env={**os.environ, "SYSGEN_STANDIN_FAULTS": "reject=1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr
    assert "kept nothing: all 3 engine requests of this run failed" in done.stderr
    assert "injected rejection" in done.stderr and "Traceback" not in done.stderr
    # Seven: the first five rejections stop the run with the engine's message.
    write_rows(inp, 7)
    done = subprocess.run(
        cli(inp, tmp_path / "out7"),
        cwd=REPO,
        env={**os.environ, "SYSGEN_STANDIN_FAULTS": "reject=1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and "first 5 engine requests" in done.stderr, done.stderr
    assert "injected rejection" in done.stderr and "Traceback" not in done.stderr
