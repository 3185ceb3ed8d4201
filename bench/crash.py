"""kill -9 at random moments, resume, and check that every input row came out exactly once.

`python -m bench.crash [--kills 20] [--instances 60000] [--json FILE]`

The real CLI (`python -m sysgen run ... --engine standin`) runs over a synthetic input with some
malformed rows, in two variants: the zero-latency stand-in engine, and a slower one with random
per-request delays and injected engine errors and truncations. Each run is SIGKILLed at a random
moment and the same command started again, `--kills` times in all (split over the variants), then
left to finish. Checked at the end, per variant:
- lost: input rows whose id is in neither data.jsonl nor dropped.jsonl;
- duplicated: extra appearances of an id (and ids that are not input rows at all);
- corrupt: lines that do not parse as a JSON object with an id;
- accounted: stats.json says kept + dropped by reason = input, and input = the rows written.

Then (`--merge-kills`, `--export-kills`) the input is run as two shards, and `sysgen merge` and
`sysgen export` are SIGKILLed at random moments within their measured duration and run again:
the merged directory must hold every row exactly once (accounted), the export every kept record
exactly once, with no corrupt line in either.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import orjson

from bench import synthetic
from sysgen.run_argv import run_argv

VARIANTS = {
    "zero-latency": {},
    "random-delay": {
        "SYSGEN_STANDIN_DELAY": "0.002:0.03",
        "SYSGEN_STANDIN_FAULTS": "error=0.02,truncate=0.02",
    },
}
BAD_EVERY = 97  # one malformed row in 97: the input path's drops are part of the check


def expected_ids(inp: Path, n: int) -> set[str]:
    # Unreadable rows are named by their source like every other row (not by the path as typed).
    source = inp.name.removesuffix(".jsonl")
    return {f"{source}:{i + 1}" for i in range(n)}


def check(out: Path, expected: set[str]) -> dict:
    seen: Counter[str] = Counter()
    corrupt = 0
    for name in ("data.jsonl", "dropped.jsonl"):
        path = out / name
        if not path.exists():
            continue
        with open(path, "rb") as f:
            for line in f:
                try:
                    rec = orjson.loads(line)
                    seen[rec["id"]] += 1
                except (orjson.JSONDecodeError, KeyError, TypeError):
                    corrupt += 1
    lost = len(expected - seen.keys())
    extra = sum(c - 1 for c in seen.values() if c > 1)
    duplicated = extra + sum(c for i, c in seen.items() if i not in expected)
    stats_path = out / "stats.json"
    st = json.loads(stats_path.read_text()) if stats_path.exists() else {}
    accounted = bool(st.get("accounted")) and st.get("input") == len(expected)
    return {
        "lost": lost,
        "duplicated": duplicated,
        "corrupt": corrupt,
        "accounted": accounted,
        "kept": st.get("kept"),
        "dropped": st.get("dropped"),
    }


def run_variant(
    name: str,
    env_extra: dict,
    inp: Path,
    out: Path,
    kills: int,
    window: tuple[float, float],
    rng: random.Random,
    timeout_s: float,
) -> dict:
    cmd = run_argv(inp, out, "--timeout-s", "5")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SYSGEN_STANDIN")}, **env_extra}
    done_kills, early, moments, rows_at_kill = 0, 0, [], []
    t0 = time.perf_counter()
    while done_kills < kills:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        delay = rng.uniform(*window)
        try:
            proc.wait(timeout=delay)
            early += 1  # finished before its kill moment: the input was too small for this many kills
            if proc.returncode != 0:
                raise SystemExit(f"bench.crash: {name}: run failed:\n{proc.stderr.read().decode()[-2000:]}")
            break
        except subprocess.TimeoutExpired:
            proc.kill()  # SIGKILL: no handler runs, no flush
            proc.wait()
            done_kills += 1
            moments.append(round(delay, 3))
            rows_at_kill.append(rows_written(out))  # shows each kill landed mid-work, not before or after
        finally:
            proc.stderr.close()
    final = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    if final.returncode != 0:
        raise SystemExit(f"bench.crash: {name}: the resumed run failed:\n{final.stderr[-2000:]}")
    return {
        "variant": name,
        "kills": done_kills,
        "finished_before_kill": early,
        "kill_moments_s": moments,
        "rows_at_kill": rows_at_kill,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def rows_written(out: Path) -> int:
    """Complete lines in the output files (a torn last line is not counted)."""
    n = 0
    for name in ("data.jsonl", "dropped.jsonl"):
        path = out / name
        if path.exists():
            with open(path, "rb") as f:
                n += sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    return n


def _kill_loop(
    cmd: list[str], kills: int, rng: random.Random, timeout_s: float, output: Path, busy: Path | None = None
) -> dict:
    """Time one clean run of `cmd`, delete its `output`, then start it `kills` times and SIGKILL it
    at a uniform moment within that duration (narrowed to the quickest run that finished before
    its kill); then let it finish. `busy`: a glob whose match at the kill shows the kill landed
    mid-write."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYSGEN_STANDIN")}
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = None  # when the work (its temporary file) began: interpreter start-up comes before
    while proc.poll() is None:
        if first is None and busy is not None and any(busy.parent.glob(busy.name)):
            first = time.perf_counter() - t
        time.sleep(0.005)
    if proc.returncode != 0:
        raise SystemExit(f"bench.crash: {' '.join(cmd[3:5])} failed (exit {proc.returncode})")
    clean_s = time.perf_counter() - t
    lo = first if first is not None else 0.3 * clean_s
    hi = clean_s  # narrowed to the quickest run seen: one clean run may have been slow (a loaded machine)
    shutil.rmtree(output) if output.is_dir() else output.unlink()
    moments, mid_write, early = [], 0, 0
    done = 0
    while done < kills:
        if busy is not None:  # a killed run's temporary file: the next run rewrites it anyway
            for stale in busy.parent.glob(busy.name):
                stale.unlink()
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        delay = rng.uniform(lo, hi)
        try:
            proc.wait(timeout=delay)
            early += 1
            if early > 4 * kills:
                break  # the command is too quick to be killed mid-way on this machine
            hi = min(hi, 0.9 * (time.perf_counter() - started))
            lo = min(lo, 0.5 * hi)
            continue
        except subprocess.TimeoutExpired:
            mid_write += bool(busy is not None and any(busy.parent.glob(busy.name)))
            proc.kill()
            proc.wait()
            done += 1
            moments.append(round(delay, 3))
    final = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    if final.returncode != 0:
        raise SystemExit(f"bench.crash: {' '.join(cmd[3:5])} failed after kills:\n{final.stderr[-2000:]}")
    return {
        "kills": done,
        "clean_s": round(clean_s, 2),
        "work_from_s": round(lo, 2),
        "kill_moments_s": moments,
        "kills_with_temp_file": mid_write,
        "finished_before_kill": early,
    }


def check_export(path: Path, kept_ids: set[str]) -> dict:
    seen: Counter[str] = Counter()
    corrupt = 0
    with open(path, "rb") as f:
        for line in f:
            try:
                seen[orjson.loads(line)["id"]] += 1
            except (orjson.JSONDecodeError, KeyError, TypeError):
                corrupt += 1
    lost = len(kept_ids - seen.keys())
    duplicated = sum(c - 1 for c in seen.values() if c > 1) + sum(
        c for i, c in seen.items() if i not in kept_ids
    )
    return {"lost": lost, "duplicated": duplicated, "corrupt": corrupt}


def measure_merge_export(
    inp: Path,
    expected: set[str],
    workdir: Path,
    merge_kills: int,
    export_kills: int,
    rng: random.Random,
    timeout_s: float,
) -> list[dict]:
    """Kills during `sysgen merge` (of a two-shard run) and `sysgen export` (of the merge)."""
    py = [sys.executable, "-m", "sysgen"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYSGEN_STANDIN")}
    shards = [workdir / f"shard{i}" for i in range(2)]
    for i, d in enumerate(shards):
        shutil.rmtree(d, ignore_errors=True)
        cmd = run_argv(inp, d, "--shard", f"{i}/2")
        subprocess.run(cmd, env=env, capture_output=True, check=True, timeout=timeout_s)
    merged = workdir / "merged"
    shutil.rmtree(merged, ignore_errors=True)
    t0 = time.perf_counter()
    res = _kill_loop(
        [*py, "merge", str(merged), *map(str, shards)],
        merge_kills,
        rng,
        timeout_s,
        merged,
        busy=merged / "*.merging",
    )
    m = {"variant": "merge", **res, **check(merged, expected), "seconds": round(time.perf_counter() - t0, 1)}
    with open(merged / "data.jsonl", "rb") as f:
        kept = {orjson.loads(line)["id"] for line in f}
    t0 = time.perf_counter()
    res = _kill_loop(
        [*py, "export", str(merged), "--format", "messages"],
        export_kills,
        rng,
        timeout_s,
        merged / "export",
        busy=merged / "export" / "*.tmp",
    )
    e = {
        "variant": "export",
        **res,
        **check_export(merged / "export" / "messages.jsonl", kept),
        "accounted": True,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return [m, e]


def measure(
    n: int,
    kills: int,
    workdir: Path,
    window: tuple[float, float],
    seed: int = 0,
    variants: dict[str, dict] | None = None,
    timeout_s: float = 600,
    merge_kills: int = 0,
    export_kills: int = 0,
) -> dict:
    """`variants` maps a name to the stand-in's environment (default: VARIANTS)."""
    variants = variants or VARIANTS
    rng = random.Random(seed)
    inp = workdir / "crashbench.jsonl"
    synthetic.write(inp, n, seed=seed, bad_every=BAD_EVERY)
    expected = expected_ids(inp, n)
    per = [kills // len(variants) + (i < kills % len(variants)) for i in range(len(variants))]
    report = {
        "instances": n,
        "kills": 0,
        "lost": 0,
        "duplicated": 0,
        "corrupt": 0,
        "accounted": True,
        "variants": [],
    }
    for (name, env), k in zip(variants.items(), per, strict=True):
        out = workdir / f"out-{name}"
        shutil.rmtree(out, ignore_errors=True)
        v = run_variant(name, env, inp, out, k, window, rng, timeout_s)
        v.update(check(out, expected))
        report["variants"].append(v)
        report["kills"] += v["kills"]
        for key in ("lost", "duplicated", "corrupt"):
            report[key] += v[key]
        report["accounted"] = report["accounted"] and v["accounted"]
    if merge_kills or export_kills:
        for v in measure_merge_export(inp, expected, workdir, merge_kills, export_kills, rng, timeout_s):
            report["variants"].append(v)
            report["kills"] += v["kills"]
            for key in ("lost", "duplicated", "corrupt"):
                report[key] += v[key]
            report["accounted"] = report["accounted"] and v["accounted"]
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.crash",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--instances", type=int, default=60_000)
    ap.add_argument("--kill-window", default="0.3:2.0", help="LOW:HIGH seconds after start to kill at")
    ap.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}"
    )
    ap.add_argument("--merge-kills", type=int, default=10, help="kills during `sysgen merge` (0: skip)")
    ap.add_argument("--export-kills", type=int, default=10, help="kills during `sysgen export` (0: skip)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--workdir", help="keep inputs and outputs here (default: a temporary directory)")
    args = ap.parse_args(argv)
    lo, _, hi = args.kill_window.partition(":")
    window = (float(lo), float(hi))
    names = [v for v in args.variants.split(",") if v]
    unknown = set(names) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    variants = {name: VARIANTS[name] for name in names}
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        res = measure(
            args.instances,
            args.kills,
            Path(args.workdir),
            window,
            args.seed,
            variants,
            merge_kills=args.merge_kills,
            export_kills=args.export_kills,
        )
    else:
        with tempfile.TemporaryDirectory(prefix="sysgen-crash-") as tmp:
            res = measure(
                args.instances,
                args.kills,
                Path(tmp),
                window,
                args.seed,
                variants,
                merge_kills=args.merge_kills,
                export_kills=args.export_kills,
            )
    print(
        f"bench.crash: {res['instances']:,} input rows (1 in {BAD_EVERY} malformed), "
        "SIGKILL at random moments"
    )
    print(
        f"  {'variant':<14} {'kills':>5} {'lost':>5} {'dup':>5} {'corrupt':>7} {'accounted':>9} "
        f"{'seconds':>8}"
    )
    for v in res["variants"]:
        print(
            f"  {v['variant']:<14} {v['kills']:>5} {v['lost']:>5} {v['duplicated']:>5} {v['corrupt']:>7} "
            f"{v['accounted']!s:>9} {v['seconds']:>8}"
        )
        if "rows_at_kill" in v:
            print(f"  {'':<14} rows out at each kill: {', '.join(f'{r:,}' for r in v['rows_at_kill'])}")
        else:
            print(
                f"  {'':<14} kills at {v['work_from_s']}-{v['clean_s']} s (work starts, clean run ends); "
                f"{v['kills_with_temp_file']} of {v['kills']} while a temporary output file existed"
            )
    clean = not (res["lost"] or res["duplicated"] or res["corrupt"])
    ok = res["kills"] == args.kills + args.merge_kills + args.export_kills and clean and res["accounted"]
    print(
        f"  total: kills={res['kills']} lost={res['lost']} duplicated={res['duplicated']} "
        f"corrupt={res['corrupt']} accounted={res['accounted']} -> {'PASS' if ok else 'FAIL'}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
