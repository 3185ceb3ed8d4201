"""`sysgen status RUN_DIR`: progress across the shards of a `sysgen slurm` run, read-only.

Safe beside running writers: no store is opened (a shard's SQLite file may be in use on another
node). The figures come from what each task leaves in its folder: the complete lines of data.jsonl
and dropped.jsonl (done, kept, dropped by reason), the last progress line of task.log (tokens/s,
ETA) and the wrapper's task.json; which tasks are pending or running comes from `squeue`."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import orjson

from engine.progress import fmt_eta
from sysgen.slurm import settings
from sysgen.slurm.submit import submissions

FINISH = "finish.json"
MERGED = "merged"
_PROGRESS = re.compile(
    rb"\[\s*(?:[\d.]+%|\?)\s*\] [\d,]+ done.*?\| ([\d,.]+) \S+/s \| ([\d,]+) out tok/s"
    rb".*?ETA (\d+:\d\d:\d\d|--:--:--)"
)
_ACTIVE = {"RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT"}


def _complete_lines(path: Path) -> list[bytes]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    return data[: data.rfind(b"\n") + 1].splitlines()  # a line being written is not counted yet


def _last_progress(log: Path) -> tuple[float, float, float | None] | None:
    """(items/s, tokens/s, ETA seconds) from the last progress line sysgen printed."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, os.path.getsize(log) - 65536))
            tail = f.read()
    except FileNotFoundError:
        return None
    found = list(_PROGRESS.finditer(tail))
    if not found:
        return None
    rate, tok, eta = found[-1].groups()
    eta_s = None
    if eta != b"--:--:--":
        h, m, s = (int(x) for x in eta.split(b":"))
        eta_s = 3600 * h + 60 * m + s
    return float(rate.replace(b",", b"")), float(tok.replace(b",", b"")), eta_s


def _task(shard_dir: Path) -> dict:
    try:
        return orjson.loads((shard_dir / "task.json").read_bytes())
    except (FileNotFoundError, orjson.JSONDecodeError):
        return {}


def _squeue() -> list[tuple[str, str, str]] | None:
    """(job id, array index or N/A, state) of every job squeue lists; None without squeue."""
    if shutil.which("squeue") is None:
        return None
    try:
        p = subprocess.run(
            ["squeue", "-h", "-r", "-o", "%F|%K|%T"], capture_output=True, text=True, timeout=60
        )
    except subprocess.TimeoutExpired:
        return None
    if p.returncode != 0:
        return None
    return [tuple(line.strip().split("|", 2)) for line in p.stdout.splitlines() if line.count("|") == 2]


def live_tasks(run_dir: Path) -> dict[int, str] | None:
    """Shard -> Slurm state for this run's array tasks that squeue still lists; None without squeue."""
    offsets = {str(a["array_job"]): a["offset"] for s in submissions(run_dir) for a in s["arrays"]}
    jobs = _squeue()
    if jobs is None:
        return None
    return {
        int(index) + offsets[job]: state for job, index, state in jobs if job in offsets and index.isdigit()
    }


def live_finishing_jobs(run_dir: Path) -> list[str]:
    """This run's finishing jobs that squeue still lists (pending or running)."""
    ids = {str(s["finish_job"]) for s in submissions(run_dir) if s.get("finish_job")}
    return [job for job, _, _ in _squeue() or [] if job in ids]


def shard_status(shard_dir: Path, live_state: str | None, squeue_known: bool) -> dict:
    data = _complete_lines(shard_dir / "data.jsonl")
    drops = Counter()
    for line in _complete_lines(shard_dir / "dropped.jsonl"):
        try:
            rec = orjson.loads(line)
            drops[f"{rec.get('phase', '?')}:{rec.get('reason', '?')}"] += 1
        except orjson.JSONDecodeError:
            drops["unreadable line"] += 1
    task = _task(shard_dir)
    was = task.get("state")
    if was == "finished":
        state = "finished"
    elif live_state in _ACTIVE:
        state = "running"
    elif live_state is not None:
        state = "pending"  # waiting, or requeued and waiting to run again
    elif not squeue_known:
        state = {"running": "running", "requeued": "pending", None: "not started"}.get(was, "failed")
    else:
        state = "not started" if was is None else "failed"
    progress = _last_progress(shard_dir / "task.log") if state == "running" else None
    out = {
        "state": state,
        "done": len(data) + sum(drops.values()),
        "kept": len(data),
        "dropped": sum(drops.values()),
        "dropped_by_reason": dict(sorted(drops.items())),
        "items_per_s": None,
        "tokens_per_s": None,
        "eta_s": None,
        "job": task.get("job"),
        "host": task.get("host"),
        "restarts": task.get("restarts", 0),
        "exit_code": task.get("rc"),
        "slurm_state": live_state,
    }
    if progress:
        out["items_per_s"], out["tokens_per_s"], out["eta_s"] = progress
    return out


def status(run_dir: Path) -> dict:
    s = settings.load(run_dir)
    if s is None:
        raise ValueError(
            f"{run_dir}: no {settings.FILE}, not a `sysgen slurm` run directory. Fix: give the "
            "--out of a `sysgen slurm` submission"
        )
    live = live_tasks(run_dir)
    shards = {}
    for i in range(s.shards):
        shards[i] = shard_status(run_dir / "shards" / str(i), (live or {}).get(i), live is not None)
    counts = Counter(v["state"] for v in shards.values())
    drops = Counter()
    for v in shards.values():
        drops.update(v["dropped_by_reason"])
    running = [v for v in shards.values() if v["state"] == "running"]
    finish = {}
    try:
        finish = orjson.loads((run_dir / FINISH).read_bytes())
    except (FileNotFoundError, orjson.JSONDecodeError):
        pass
    merged = run_dir / MERGED
    finished = bool(finish.get("merged")) and (merged / "stats.json").exists()
    etas = [v["eta_s"] for v in running if v["eta_s"] is not None]
    eta = max(etas) if etas else None
    done = [v["done"] for v in shards.values() if v["state"] == "finished"]
    rate = sum(v["items_per_s"] or 0 for v in running)
    if done and rate and len(done) < s.shards:  # the shards left, sized as the finished ones were
        left = sum(done) / len(done) * s.shards - sum(v["done"] for v in shards.values())
        eta = max(eta or 0, left / rate)
    unfinished = sorted(i for i, v in shards.items() if v["state"] in ("failed",))
    return {
        "run_dir": str(run_dir),
        "shards": s.shards,
        "finished": finished,
        "merged": str(merged) if finished else None,
        "states": {k: counts.get(k, 0) for k in ("finished", "running", "pending", "failed", "not started")},
        "done": sum(v["done"] for v in shards.values()),
        "kept": sum(v["kept"] for v in shards.values()),
        "dropped": sum(v["dropped"] for v in shards.values()),
        "dropped_by_reason": dict(sorted(drops.items())),
        "tokens_per_s": sum(v["tokens_per_s"] or 0 for v in running) if running else None,
        # The longer of the running shards' own ETAs and the work left (shards sized as the finished
        # ones) at the running shards' rate: an estimate, as the shards' sizes differ.
        "eta_s": None if eta is None else round(eta),
        "squeue": live is not None,
        "failed_shards": unfinished,
        "resubmit": f"sysgen slurm --resubmit {run_dir}" if unfinished else None,
        "finish": finish or None,
        "per_shard": {str(i): v for i, v in shards.items()},
    }


def render(st: dict) -> str:
    c = st["states"]
    lines = [
        f"{st['run_dir']}: {st['shards']} shards: {c['finished']} finished, {c['running']} running, "
        f"{c['pending']} pending, {c['failed']} failed, {c['not started']} not started"
        + ("" if st["squeue"] else " (squeue not available: states from the tasks' own records)")
    ]
    tok = "n/a" if st["tokens_per_s"] is None else f"{st['tokens_per_s']:,.0f}"
    eta = fmt_eta(st["eta_s"]) if st["eta_s"] is not None else "n/a"
    lines.append(
        f"done {st['done']:,}: kept {st['kept']:,}, dropped {st['dropped']:,}; "
        f"{tok} out tok/s; ETA {eta}{' (estimated)' if st['eta_s'] is not None else ''}"
    )
    if st["dropped_by_reason"]:
        by = st["dropped_by_reason"].items()
        lines.append("dropped by reason: " + ", ".join(f"{k} {v:,}" for k, v in by))
    lines.append(
        f"{'shard':>5} {'state':<11} {'done':>9} {'kept':>9} {'dropped':>8} {'tok/s':>8} "
        f"{'ETA':>8} {'restarts':>8}  job@host"
    )
    for i, v in st["per_shard"].items():
        tok = "" if v["tokens_per_s"] is None else f"{v['tokens_per_s']:,.0f}"
        eta = "" if v["eta_s"] is None else fmt_eta(v["eta_s"])
        where = f"{v['job']}@{v['host']}" if v["job"] else ""
        lines.append(
            f"{i:>5} {v['state']:<11} {v['done']:>9,} {v['kept']:>9,} {v['dropped']:>8,} {tok:>8} "
            f"{eta:>8} {v['restarts']:>8}  {where}"
        )
    if st["finished"]:
        lines.append(f"finished: merged into {st['merged']}")
    elif st["finish"] and st["finish"].get("message"):
        lines.append(f"finishing job: {st['finish']['message']}")
    if st["resubmit"]:
        lines.append(
            f"shards {', '.join(map(str, st['failed_shards']))} stopped unfinished; once nothing of "
            f"this run is pending or running: {st['resubmit']}"
        )
    return "\n".join(lines)
