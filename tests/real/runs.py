"""Demo-sized inputs and the `sysgen run` command line of the real-engine tests."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from sysgen.run_argv import run_argv

try:
    from tests.real.servers import REPO
except ImportError:
    from servers import REPO

# Budgets small enough for 2 shared cores: most P1 answers are cut and checked as regex prefixes;
# the ones that finish go on through P3 and P4.
SMALL = ("--p1-max-tokens", "128", "--p4-max-tokens", "32")
QUESTIONS = [
    "How do I reverse a list in Python?",
    "What is the capital of France?",
    "Write a haiku about rain.",
    "Explain what a hash map is in one sentence.",
    "Why is the sky blue?",
    "Give me a synonym for happy.",
]


def write_inputs(path: Path, n: int, turns: int = 1) -> Path:
    """`n` chat rows of `turns` user turns each (short answers: P4's budget follows them)."""
    rows = []
    for i in range(n):
        messages = []
        for t in range(turns):
            messages += [
                {"role": "user", "content": QUESTIONS[(i + t) % len(QUESTIONS)]},
                {"role": "assistant", "content": f"A short answer, number {i}.{t}."},
            ]
        rows.append(json.dumps({"messages": messages}))
    path.write_text("\n".join(rows) + "\n")
    return path


def sysgen_cmd(
    inp: Path, out: Path, url: str, model: Path | str, *extra: str, engine: str = "vllm_http"
) -> list[str]:
    return run_argv(inp, out, "--url", url, "--model", str(model), *SMALL, *extra, engine=engine)


def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
