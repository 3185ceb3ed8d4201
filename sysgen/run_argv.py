"""The command line of `sysgen run` in a child process, one place for the benches and tests that
spawn it (so a renamed flag breaks them all at once, not one by one)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path


def run_argv(
    inputs: str | Path | Sequence[str | Path], out: str | Path, *extra: str, engine: str = "standin"
) -> list[str]:
    """`python -m sysgen run INPUTS --out OUT --engine ENGINE --no-progress --no-report EXTRA`, with
    this interpreter: quiet (no progress line, no report figures), the outputs and stats only."""
    paths = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    return [
        sys.executable,
        "-m",
        "sysgen",
        "run",
        *map(str, paths),
        "--out",
        str(out),
        "--engine",
        engine,
        "--no-progress",
        "--no-report",
        *extra,
    ]
