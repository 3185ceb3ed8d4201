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
  lets a re-run seek past finished input);
- with --tokenized a second run on the same input whose prompts are token ids built with the
  default model's real tokenizer (SmolLM2 through engine/prefix.ChatPrompter, as the GPU backends
  build them; SYSGEN_STANDIN_TOKENIZER=default): requests_per_s_tokenized, peak_rss_mb_tokenized,
  rss_growth_mb_per_100k_tokenized (resident memory sampled every 0.5 s: growth over the second
  half of the run, per 100,000 instances; ~0 when memory is flat) and tokenized_vs_plain (the two
  rates, measured in this one invocation).
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
from dataclasses import dataclass
from pathlib import Path

from bench import synthetic
from sysgen.run_argv import run_argv

TARGETS = {
    "requests_per_s": (">=", 10_000),
    "peak_rss_mb": ("<=", 500),
    "resume_s": ("<=", 10),
    "peak_rss_mb_tokenized": ("<=", 500),
}
RSS_EVERY_S = 0.5


@dataclass
class CliRun:
    seconds: float
    rss_samples: list[tuple[float, float]]  # (seconds since start, resident MB)
    peak_mb: float  # the child's own peak resident memory (its ru_maxrss, from wait4)


def _rss_mb(pid: int) -> float | None:
    """VmRSS of a live process, in MB."""
    try:
        line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("VmRSS:"))
        return int(line.split()[1]) / 1024
    except (OSError, ValueError, StopIteration, IndexError):
        return None


def _run_cli(inp: Path, out: Path, tokenizer: str | None = None) -> CliRun:
    cmd = run_argv(inp, out)
    # Zero latency and no injected faults, whatever the caller's environment says.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYSGEN_STANDIN")}
    if tokenizer:
        env["SYSGEN_STANDIN_TOKENIZER"] = tokenizer
    samples: list[tuple[float, float]] = []
    t0 = next_sample = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        # Reaped with wait4: its rusage is this child's own peak (RUSAGE_CHILDREN's ru_maxrss is the
        # largest of every child this process ever waited for, a test's earlier runs included).
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                break
            if time.perf_counter() >= next_sample:
                rss = _rss_mb(proc.pid)
                if rss is not None:
                    samples.append((round(time.perf_counter() - t0, 2), round(rss, 1)))
                next_sample += RSS_EVERY_S
            time.sleep(0.02)
        seconds = time.perf_counter() - t0
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"bench.overhead: sysgen run failed ({proc.returncode}):\n{stderr[-3000:]}")
    return CliRun(seconds, samples, round(usage.ru_maxrss / 1024, 1))


def rss_growth_per_100k(samples: list[tuple[float, float]], instances: int) -> float | None:
    """Resident MB gained over the second half of the run, per 100,000 instances (progress taken as
    linear in time; the first half holds start-up: imports, the tokenizer, the store's key filter).
    ~0 when memory is flat. None with too few samples to say (a run of a few seconds)."""
    samples = [(t, rss) for t, rss in samples if rss > 0]
    if len(samples) < 8 or instances <= 0:
        return None
    end = samples[-1][0]
    half = next(rss for t, rss in samples if t >= end / 2)
    return round((samples[-1][1] - half) / (0.5 * instances) * 100_000, 1)


def resume_seconds(inp: Path, out: Path) -> tuple[float, dict]:
    """Re-run the same configuration in this process; seconds until every instance is confirmed done."""
    import uvloop

    from engine.store import Store
    from sysgen import standin
    from sysgen.config import RunConfig
    from sysgen.run.pipeline import run_stream

    cfg = RunConfig(inputs=(str(inp),), out=str(out), engine="standin")

    async def go() -> dict:
        with Store.open(out / "store.db") as store:
            return await run_stream(cfg, standin.make_backend(), store, out, progress_enabled=False)

    t0 = time.perf_counter()
    counters = (uvloop.run if sys.platform != "win32" else asyncio.run)(go())
    return time.perf_counter() - t0, counters


def measure(
    n: int, workdir: Path, row_bytes: int = 2000, full_scan: bool = False, tokenized: bool = False
) -> dict:
    inp, out = workdir / "synthetic.jsonl", workdir / "out"
    shutil.rmtree(out, ignore_errors=True)  # a fresh run, never a resumed one
    t0 = time.perf_counter()
    size = synthetic.write(inp, n, row_bytes=row_bytes)
    gen_s = time.perf_counter() - t0
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    run = _run_cli(inp, out)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    cli_s = run.seconds
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
        # CPU seconds of the whole run process (all threads, start-up included): on a shared machine
        # wall time measures the neighbours too, this does not.
        "requests_per_cpu_s": round(sched["submitted"] / cpu_s, 1) if cpu_s > 0 else None,
        "peak_rss_mb": run.peak_mb,
        "rss_growth_mb_per_100k": rss_growth_per_100k(run.rss_samples, n),
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
    if tokenized:
        res.update(measure_tokenized(inp, workdir / "out_tokenized", n, res["requests_per_s"]))
    return res


def measure_tokenized(inp: Path, out: Path, n: int, plain_rate: float, tokenizer: str = "default") -> dict:
    """The same input again, prompts built as token ids with a real tokenizer (see the docstring)."""
    shutil.rmtree(out, ignore_errors=True)
    run = _run_cli(inp, out, tokenizer=tokenizer)
    st = json.loads((out / "stats.json").read_text())
    sched = st["this_run"]["scheduler"]
    rate = round(sched["submitted"] / st["wall_s"], 1)
    return {
        "requests_per_s_tokenized": rate,
        "peak_rss_mb_tokenized": run.peak_mb,
        "rss_growth_mb_per_100k_tokenized": rss_growth_per_100k(run.rss_samples, n),
        "rss_mb_samples_tokenized": _thin(run.rss_samples, 12),
        "tokenized_vs_plain": round(rate / plain_rate, 4) if plain_rate else None,
        "prompt_tokens_mean_tokenized": round(sched["prompt_tokens"] / max(1, sched["engine_calls"]), 1),
        "pipeline_s_tokenized": st["wall_s"],
        "accounted_tokenized": st["accounted"],
        "tokenizer": "SmolLM2-135M-Instruct (the default CPU model's) via engine/prefix.ChatPrompter"
        if tokenizer == "default"
        else tokenizer,
    }


def _thin(samples: list, k: int) -> list:
    if len(samples) <= k:
        return samples
    step = (len(samples) - 1) / (k - 1)
    return [samples[round(i * step)] for i in range(k)]


def _verdict(key: str, value: float) -> str:
    if key not in TARGETS:
        return ""
    op, target = TARGETS[key]
    ok = value >= target if op == ">=" else value <= target
    return f"(target {op} {target:,}: {'met' if ok else 'MISSED'})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.overhead",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--instances", type=int, default=800_000)
    ap.add_argument("--row-bytes", type=int, default=2000, help="approximate size of a synthetic row")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--workdir", help="keep the input and outputs here (default: a temporary directory)")
    ap.add_argument(
        "--full-scan-resume", action="store_true", help="also time a re-run without the watermark"
    )
    ap.add_argument(
        "--tokenized",
        action="store_true",
        help="also run with prompts tokenized by the default model's real tokenizer (SmolLM2)",
    )
    args = ap.parse_args(argv)
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        res = measure(
            args.instances, Path(args.workdir), args.row_bytes, args.full_scan_resume, args.tokenized
        )
    else:
        with tempfile.TemporaryDirectory(prefix="sysgen-overhead-") as tmp:
            res = measure(args.instances, Path(tmp), args.row_bytes, args.full_scan_resume, args.tokenized)
    print(
        f"bench.overhead: {res['instances']:,} synthetic instances of ~{res['row_bytes_mean']:,} B, "
        f"stand-in engine (zero latency), {res['cpus']} CPUs"
    )
    for key in (
        "requests_per_s",
        "requests_per_cpu_s",
        "instances_per_s",
        "peak_rss_mb",
        "rss_growth_mb_per_100k",
        "resume_s",
        "resume_full_scan_s",
        "pipeline_s",
        "requests",
        "engine_calls",
        "kept",
        "dropped",
        "accounted",
        "requests_per_s_tokenized",
        "peak_rss_mb_tokenized",
        "rss_growth_mb_per_100k_tokenized",
        "tokenized_vs_plain",
        "prompt_tokens_mean_tokenized",
        "accounted_tokenized",
    ):
        if res.get(key) is not None:
            v = res[key]
            if isinstance(v, float):  # noqa: SIM108 - one conditional expression inside another reads worse
                shown = f"{v:,.3f}" if v < 100 else f"{v:,.0f}"
            else:
                shown = str(v)
            print(f"  {key:<34} {shown:>14}  {_verdict(key, v)}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
