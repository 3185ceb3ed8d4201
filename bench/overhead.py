"""What sysgen itself costs per request, with the model taken out.

`python -m bench.overhead [--instances 800000] [--json FILE]`

A zero-latency stand-in engine (engine/backends/standin.py: canned answers, no model) runs through
the real CLI, scheduler, store and pipeline (`python -m sysgen run ... --engine standin`) over a
synthetic JSON Lines file of ~2 KB rows, generated streaming in a temporary directory. Measured:
- requests_per_s: requests submitted (P1 + P3 + P4) / the run's wall time (stats.json `wall_s`:
  engine set-up, store open, every instance to a committed output line; not interpreter start-up
  or the stats.json pass after it);
- peak_rss_mb: the run's peak resident memory (the child process's ru_maxrss);
- resume_s: a re-run of the same configuration over the full store, from opening the store until
  it has confirmed every instance is done (measured in this process);
- with --full-scan-resume also resume_full_scan_s: the same with the watermark deleted, so every
  row is read again and checked against its done marker (the worst case; normally the watermark
  lets a re-run seek past finished input).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import synthetic

TARGETS = {"requests_per_s": (">=", 10_000), "peak_rss_mb": ("<=", 500), "resume_s": ("<=", 10)}


def _run_cli(inp: Path, out: Path) -> float:
    cmd = [sys.executable, "-m", "sysgen", "run", str(inp), "--out", str(out), "--engine", "standin",
           "--no-progress", "--no-report"]
    # Zero latency and no injected faults, whatever the caller's environment says.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYSGEN_STANDIN")}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench.overhead: sysgen run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def resume_seconds(inp: Path, out: Path) -> tuple[float, dict]:
    """Re-run the same configuration in this process; seconds until every instance is confirmed done."""
    import uvloop

    from engine.store import Store
    from sysgen import standin
    from sysgen.config import RunConfig
    from sysgen.pipeline import run_stream

    cfg = RunConfig(inputs=(str(inp),), out=str(out), engine="standin")

    async def go() -> dict:
        with Store.open(out / "store.db") as store:
            return await run_stream(cfg, standin.make_backend(), store, out, progress_enabled=False)

    t0 = time.perf_counter()
    counters = (uvloop.run if sys.platform != "win32" else asyncio.run)(go())
    return time.perf_counter() - t0, counters


def measure(n: int, workdir: Path, row_bytes: int = 2000, full_scan: bool = False) -> dict:
    inp, out = workdir / "synthetic.jsonl", workdir / "out"
    shutil.rmtree(out, ignore_errors=True)  # a fresh run, never a resumed one
    t0 = time.perf_counter()
    size = synthetic.write(inp, n, row_bytes=row_bytes)
    gen_s = time.perf_counter() - t0
    cli_s = _run_cli(inp, out)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    st = json.loads((out / "stats.json").read_text())
    sched = st["this_run"]["scheduler"]
    resume_s, again = resume_seconds(inp, out)
    if again["kept"] or again["dropped"] or again["scheduler"]["submitted"]:
        raise SystemExit(f"bench.overhead: the re-run did work on a complete store: {again}")
    res = {
        "instances": n,
        "input_bytes": size,
        "row_bytes_mean": round(size / max(n, 1)),
        "requests": sched["submitted"],
        "engine_calls": sched["engine_calls"],
        "store_hits": sched["hits"],
        "pipeline_s": st["wall_s"],
        "requests_per_s": round(sched["submitted"] / st["wall_s"], 1),
        "instances_per_s": round(n / st["wall_s"], 1),
        "peak_rss_mb": round(peak_rss_mb, 1),
        "resume_s": round(resume_s, 3),
        "cli_total_s": round(cli_s, 2),
        "generate_s": round(gen_s, 2),
        "kept": st["kept"],
        "dropped": sum(st["dropped"].values()),
        "accounted": st["accounted"],
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "engine": "standin (zero latency, canned answers: not a model)",
    }
    if full_scan:
        with sqlite3.connect(out / "store.db") as conn:
            conn.execute("DELETE FROM meta WHERE k='watermark'")
        res["resume_full_scan_s"] = round(resume_seconds(inp, out)[0], 2)
    return res


def _verdict(key: str, value: float) -> str:
    if key not in TARGETS:
        return ""
    op, target = TARGETS[key]
    ok = value >= target if op == ">=" else value <= target
    return f"(target {op} {target:,}: {'met' if ok else 'MISSED'})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", type=int, default=800_000)
    ap.add_argument("--row-bytes", type=int, default=2000, help="approximate size of a synthetic row")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--workdir", help="keep the input and outputs here (default: a temporary directory)")
    ap.add_argument("--full-scan-resume", action="store_true",
                    help="also time a re-run without the watermark")
    args = ap.parse_args(argv)
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        res = measure(args.instances, Path(args.workdir), args.row_bytes, args.full_scan_resume)
    else:
        with tempfile.TemporaryDirectory(prefix="sysgen-overhead-") as tmp:
            res = measure(args.instances, Path(tmp), args.row_bytes, args.full_scan_resume)
    print(f"bench.overhead: {res['instances']:,} synthetic instances of ~{res['row_bytes_mean']:,} B, "
          f"stand-in engine (zero latency), {res['cpus']} CPUs")
    for key in ("requests_per_s", "instances_per_s", "peak_rss_mb", "resume_s", "resume_full_scan_s",
                "pipeline_s", "requests", "engine_calls", "kept", "dropped", "accounted"):
        if key in res:
            v = res[key]
            if isinstance(v, float):
                shown = f"{v:,.3f}" if v < 100 else f"{v:,.0f}"
            else:
                shown = str(v)
            print(f"  {key:<20} {shown:>14}  {_verdict(key, v)}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
