"""Submitting: the array (split into several when the cluster's MaxArraySize is below N, each
chunk waiting for the one before so at most --concurrent tasks run at once), then the finishing
job with --dependency=afterany on all of them. Each submission is appended to RUN/jobs.jsonl."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import orjson

from sysgen.slurm.script import array_spec, finish_script, task_script
from sysgen.slurm.settings import SlurmSettings

JOBS = "jobs.jsonl"
DEFAULT_MAX_ARRAY_SIZE = 1001  # Slurm's own default


class SlurmError(RuntimeError):
    """A Slurm command failed; the message names it and what it said."""


def require_sbatch(cmd: str = "sbatch") -> None:
    if shutil.which(cmd) is None:
        raise SlurmError(f"{cmd} not found: run on a Slurm login node (or pass --dry-run to see the scripts)")


def _slurm(cmd: list[str]) -> str:
    require_sbatch(cmd[0])
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        raise SlurmError(f"`{' '.join(cmd)}` failed: {(p.stderr or p.stdout).strip()}")
    return p.stdout


def max_array_size() -> tuple[int, str]:
    """(MaxArraySize, where that figure comes from): array indices must stay below it."""
    if shutil.which("scontrol") is None:
        return DEFAULT_MAX_ARRAY_SIZE, "Slurm's default; scontrol not found here"
    try:
        m = re.search(r"^MaxArraySize\s*=\s*(\d+)", _slurm(["scontrol", "show", "config"]), re.M)
    except (SlurmError, subprocess.TimeoutExpired):
        return DEFAULT_MAX_ARRAY_SIZE, "Slurm's default; `scontrol show config` did not answer"
    if m is None:
        return DEFAULT_MAX_ARRAY_SIZE, "Slurm's default; not in `scontrol show config`"
    return int(m.group(1)), "the cluster's MaxArraySize"


def chunks(shards: list[int], limit: int) -> list[tuple[int, list[int]]]:
    """(offset, shards) groups whose array indices (shard - offset) stay below `limit`."""
    out: list[tuple[int, list[int]]] = []
    for i in sorted(shards):
        if out and i - out[-1][0] < limit:
            out[-1][1].append(i)
        else:
            out.append((i, [i]))
    return out


def submit(
    s: SlurmSettings, run_dir: Path, shards: list[int], dry_run: bool, say: Callable[[str], None] = print
) -> dict:
    """Write the scripts and submit them (or print them). Returns the jobs.jsonl record."""
    limit, source = max_array_size()
    groups = chunks(shards, limit)
    if len(groups) > 1:
        say(
            f"sysgen slurm: {len(shards)} shards exceed MaxArraySize={limit} ({source}): split into "
            f"{len(groups)} arrays, each starting after the one before"
        )
    scripts = run_dir / "scripts"
    if not dry_run:
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        scripts.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    arrays = []
    previous = None
    for k, (offset, members) in enumerate(groups):
        text = task_script(s, run_dir, members, offset)
        path = scripts / f"array-{stamp}-{k}.sbatch"
        dep = [f"--dependency=afterany:{previous}"] if previous else []
        if dry_run:
            shown = [f"--dependency=afterany:<array {k - 1}>"] if k else []
            say(f"# sbatch --parsable {' '.join(shown)} {path}".replace("  ", " "))
            say(text)
            job = f"<array {k}>"
        else:
            path.write_text(text)
            try:
                job = _slurm(["sbatch", "--parsable", *dep, str(path)]).strip().split(";")[0]
            except SlurmError as e:
                if arrays:  # recorded, so status and --resubmit know them
                    _record(run_dir, {"at": time.time(), "arrays": arrays, "finish_job": None})
                    raise SlurmError(
                        f"{e}. Submitted before it: array job(s) "
                        f"{', '.join(a['array_job'] for a in arrays)}; once the cause is "
                        f"fixed: sysgen slurm --resubmit {run_dir}"
                    ) from None
                raise
            say(
                f"sysgen slurm: submitted array job {job}: shards {_ranges(members)} of {s.shards}, "
                f"at most {s.concurrent} at once"
            )
        arrays.append({"array_job": job, "offset": offset, "shards": members})
        previous = job
    text = finish_script(s, run_dir)
    path = scripts / f"finish-{stamp}.sbatch"
    # afterany: whatever each task's end; none when every shard is finished already
    after = [f"--dependency=afterany:{':'.join(a['array_job'] for a in arrays)}"] if arrays else []
    if dry_run:
        say(" ".join(["# sbatch --parsable", *after, str(path)]))
        say(text)
        return {"arrays": arrays, "finish_job": "<finish>"}
    path.write_text(text)
    finish = _slurm(["sbatch", "--parsable", *after, str(path)]).strip()
    finish = finish.split(";")[0]
    say(
        f"sysgen slurm: submitted finishing job {finish} (runs after every task; merges into "
        f"{run_dir / 'merged'} when all shards are finished)"
    )
    record = {"at": time.time(), "arrays": arrays, "finish_job": finish}
    _record(run_dir, record)
    return record


def _record(run_dir: Path, record: dict) -> None:
    with open(run_dir / JOBS, "ab") as f:
        f.write(orjson.dumps(record) + b"\n")


def submissions(run_dir: Path) -> list[dict]:
    path = run_dir / JOBS
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def _ranges(shards: list[int]) -> str:
    return array_spec(shards, 0, 1).rsplit("%", 1)[0]
