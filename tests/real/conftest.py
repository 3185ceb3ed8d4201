"""The real-engine tier (marker `real_engine`): a real vLLM CPU server and the real routers, from
their own venvs (tests/real/setup.sh, run here on first use; idempotent). Selected only with
`-m real_engine` (`make test-real`, run by .ci/run): the plain suite stays fast. A test skips only
when the install itself is impossible here, with the installer's own words."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

try:
    from tests.real.servers import MAX_MODEL_LEN, REPO, SETUP, Process, free_port, router, vllm_server
except ImportError:  # tests/real is not a package: pytest put its folder on sys.path
    from servers import MAX_MODEL_LEN, REPO, SETUP, Process, free_port, router, vllm_server

# vLLM CPU on 2 shared cores: ~25 s alone with --enforce-eager, minutes when the cores are busy.
SERVER_START_S = 600
ROUTER_START_S = 60


def pytest_collection_modifyitems(config, items):
    """Run this tier only when asked for by marker (`-m real_engine`): it installs a server and takes
    minutes."""
    here = Path(__file__).parent
    if "real_engine" in (config.option.markexpr or ""):
        return
    mine = [i for i in items if here in Path(str(i.fspath)).parents]
    if mine:
        config.hook.pytest_deselected(items=mine)
        items[:] = [i for i in items if i not in mine]


_SETUPS: dict[str, tuple[subprocess.Popen, Path]] = {}


def _begin_setup(what: str) -> None:
    """Start tests/real/setup.sh `what` in the background (once per session), logging to a file (a
    pipe would fill with pip's warnings and stall it until read)."""
    if what not in _SETUPS:
        fd, name = tempfile.mkstemp(prefix=f"sysgen-setup-{what}-", suffix=".log")
        os.close(fd)
        log = Path(name)
        with open(log, "w") as f:
            proc = subprocess.Popen(["bash", str(SETUP), what], cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
        _SETUPS[what] = (proc, log)


def _setup(what: str) -> None:
    """Wait for tests/real/setup.sh `what`; skip, with the installer's words, where it failed."""
    _begin_setup(what)
    proc, log = _SETUPS[what]
    proc.wait()
    if proc.returncode != 0:
        pytest.skip(
            f"{SETUP.relative_to(REPO)} {what} failed (exit {proc.returncode}), so no real "
            f"{what} here: {log.read_text(errors='replace')[-600:]}"
        )


@pytest.fixture(scope="session")
def model_dir(smol_dir) -> Path:
    """The default model as the HF folder vLLM loads (tests/conftest.py converts it once)."""
    return smol_dir


def group_members(pgid: int) -> list[int]:
    """The live processes of process group `pgid` (from /proc)."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) == pgid:
                    members.append(int(entry))
            except ProcessLookupError:
                pass
    return members


class Served:
    """The vLLM server of the session: one process, restartable on the same port."""

    def __init__(self, model_dir: Path, logs: Path) -> None:
        self.model_dir, self.logs, self.port = model_dir, logs, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.starts = 0
        self.process: Process | None = None

    def start(self) -> Served:
        self.starts += 1
        self.process = vllm_server(self.model_dir, self.port, self.logs / f"vllm-{self.starts}.log").start()
        return self

    def wait_ready(self) -> Served:
        self.process.wait_ready(f"{self.url}/v1/models", SERVER_START_S)
        return self

    def terminate_front_end(self) -> Process:
        """The engine dies while the API server shuts down: its engine processes are stopped
        (SIGSTOP), then the API server alone gets SIGTERM, as `kill PID` sends it. vLLM 0.32 then
        kills its engine, closes its listening socket and waits, without limit, for the open
        connections to close ("Waiting for connections to close"): requests in flight hang and a
        new server can take the port. Without the SIGSTOP the engine sometimes answers them
        `abort` first (a race), and nothing hangs. Returns the old process, still alive: the
        caller stops it."""
        old, self.process = self.process, None
        leader = old.proc.pid
        for pid in group_members(leader):
            if pid != leader:
                os.kill(pid, signal.SIGSTOP)
        os.kill(leader, signal.SIGTERM)
        return old

    def stop(self, grace_s: float = 30.0) -> None:
        if self.process is not None:
            self.process.stop(grace_s=grace_s)
            self.process = None


@pytest.fixture(scope="session")
def vllm(model_dir, tmp_path_factory) -> Served:
    _begin_setup("routers")  # beside the vLLM install and start: the router tests come later
    _setup("vllm")
    served = Served(model_dir, tmp_path_factory.mktemp("vllm-logs")).start()
    try:
        served.wait_ready()
        yield served
    finally:
        served.stop()


@pytest.fixture(scope="session")
def router_factory(vllm, tmp_path_factory):
    """start(name) -> the URL of that router in front of the session's vLLM server (each started
    once, all stopped at the end)."""
    _setup("routers")
    started: dict[str, tuple[Process, str]] = {}
    logs = tmp_path_factory.mktemp("router-logs")

    def start(name: str) -> str:
        if name not in started:
            port = free_port()
            proc = router(name, [vllm.url], port, free_port(), logs / f"{name}.log").start()
            url = f"http://127.0.0.1:{port}"
            proc.wait_ready(f"{url}/v1/models", ROUTER_START_S)
            started[name] = (proc, url)
        return started[name][1]

    yield start
    for proc, _ in started.values():
        proc.stop(grace_s=10.0)


__all__ = ["MAX_MODEL_LEN"]
