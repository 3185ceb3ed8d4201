"""`python -m sysgen run --engine sglang_http` against the stand-in server of bench/http_server.py
(a separate process: canned answers, no model) while that server goes away: a restart mid-run loses
nothing; an engine that stays down stops the run resumable (exit 1, nothing dropped); kill -9
during an outage, then a resume, keeps every row exactly once; a refused key stops the run at once."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

try:
    from tests.sysgen.pipeline_helpers import ids_once, write_rows
except ImportError:  # tests/sysgen is not a package: pytest put its folder on sys.path
    from pipeline_helpers import ids_once, write_rows

pytest.importorskip("aiohttp", reason="the sglang_http backend needs aiohttp: pip install -e '.[http]'")
tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.kill  # a stand-in server and `sysgen run` in subprocesses, killed and restarted
REPO = Path(__file__).resolve().parents[2]
N = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """bench/http_server.py on a fixed port, so it can be stopped and started again there."""

    def __init__(self, port: int, delay_s: float = 0.15, *extra: str) -> None:
        self.port, self.delay_s, self.proc, self.extra = port, delay_s, None, extra

    def start(self) -> Server:
        cmd = [
            sys.executable,
            "-m",
            "bench.http_server",
            "--port",
            str(self.port),
            "--delay",
            str(self.delay_s),
            *self.extra,
        ]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().startswith("PORT ")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture
def tokenizer_dir(tmp_path) -> Path:
    """A byte-level tokenizer (one token per byte, no merges) with a chat template: sglang_http makes
    token ids with --model, and every distinct prompt must stay distinct."""
    alphabet = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok = tokenizers.Tokenizer(tokenizers.models.BPE({c: i for i, c in enumerate(alphabet)}, []))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    path = tmp_path / "tok"
    fast.save_pretrained(path)
    return path


def cli(inp: Path, out: Path, port: int, model: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "sysgen",
        "run",
        str(inp),
        "--out",
        str(out),
        "--engine",
        "sglang_http",
        "--url",
        f"http://127.0.0.1:{port}",
        "--model",
        str(model),
        "--no-progress",
        "--no-report",
        *extra,
    ]


def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_rows(out: Path, proc: subprocess.Popen, n: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    data = out / "data.jsonl"
    while time.monotonic() < deadline:
        if data.exists() and data.read_bytes().count(b"\n") >= n:
            return
        assert proc.poll() is None, f"run ended early: {proc.communicate()}"
        time.sleep(0.05)
    raise AssertionError(f"fewer than {n} rows appeared")


def every_row_once(out: Path) -> bool:
    seen = ids_once(out)
    return len(seen) == N and set(seen.values()) == {1}


def engine_drops(out: Path) -> list[dict]:
    path = out / "dropped.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    return [r for r in rows if str(r.get("reason", "")).startswith("engine")]


def test_a_server_restart_mid_run_loses_nothing(tmp_path, tokenizer_dir):
    inp, out, port = tmp_path / "in.jsonl", tmp_path / "out", free_port()
    write_rows(inp, N)
    srv = Server(port).start()
    try:
        proc = start(cli(inp, out, port, tokenizer_dir, "--max-inflight", "8"))
        wait_rows(out, proc, 5)
        srv.stop()
        time.sleep(3)  # a restart: connections refused for 3 s
        srv.start()
        _, err = proc.communicate(timeout=120)
    finally:
        srv.stop()
    assert proc.returncode == 0, err
    assert engine_drops(out) == []
    assert every_row_once(out)
    assert "unreachable" in err and "answers again" in err


def test_kill_9_during_an_outage_then_resume_keeps_every_row(tmp_path, tokenizer_dir):
    inp, out, port = tmp_path / "in.jsonl", tmp_path / "out", free_port()
    write_rows(inp, N)
    srv = Server(port).start()
    try:
        proc = start(cli(inp, out, port, tokenizer_dir, "--max-inflight", "8"))
        wait_rows(out, proc, 5)
        srv.stop()
        time.sleep(1.5)  # the run is waiting for the engine now
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        assert 0 < len(ids_once(out)) < N
        # The engine stays down: the resumed run waits its --engine-down-s, then stops resumable.
        stopped = subprocess.run(
            cli(inp, out, port, tokenizer_dir, "--engine-down-s", "2"),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert stopped.returncode != 0
        srv.start()
        done = subprocess.run(
            cli(inp, out, port, tokenizer_dir), cwd=REPO, capture_output=True, text=True, timeout=120
        )
    finally:
        srv.stop()
    assert done.returncode == 0, done.stderr
    assert engine_drops(out) == []
    assert every_row_once(out)


def test_an_engine_that_stays_down_stops_the_run_resumable(tmp_path, tokenizer_dir):
    inp, out, port = tmp_path / "in.jsonl", tmp_path / "out", free_port()
    write_rows(inp, N)
    srv = Server(port).start()
    try:
        proc = start(cli(inp, out, port, tokenizer_dir, "--max-inflight", "8", "--engine-down-s", "2"))
        wait_rows(out, proc, 5)
        srv.stop()
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 1, err
        assert "unreachable for 2s" in err and "re-run the same command to resume" in err
        assert engine_drops(out) == []
        srv.start()
        done = subprocess.run(
            cli(inp, out, port, tokenizer_dir), cwd=REPO, capture_output=True, text=True, timeout=120
        )
    finally:
        srv.stop()
    assert done.returncode == 0, done.stderr
    assert every_row_once(out) and engine_drops(out) == []


def test_a_refused_api_key_stops_the_run_at_once_and_drops_nothing(tmp_path, tokenizer_dir):
    inp, out, port = tmp_path / "in.jsonl", tmp_path / "out", free_port()
    write_rows(inp, N)
    srv = Server(port, 0.0, "--api-key", "right-key").start()
    try:
        bad = subprocess.run(
            cli(inp, out, port, tokenizer_dir, "--api-key", "wrong-key"),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        good = subprocess.run(
            cli(inp, out, port, tokenizer_dir, "--api-key", "right-key"),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        srv.stop()
    assert bad.returncode != 0 and "401" in bad.stderr and "check --api-key" in bad.stderr
    assert "wrong-key" not in bad.stderr and "Unclosed" not in bad.stderr
    assert good.returncode == 0, good.stderr
    assert every_row_once(out) and engine_drops(out) == []
