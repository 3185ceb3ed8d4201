"""`python -m bench.sim [--instances 100000] [--json FILE]`: sysgen against a SIMULATED SGLang engine.

No GPU and no model: the real pipeline, scheduler and store run against a simulated SGLang scheduler
(bench/sim/engine.py) whose step times come from a roofline cost model (bench/sim/cost.py) sized by
kernels_cfg and checked against a published SGLang throughput figure (calibration.py). Prints and
writes: calibration_ratio, wrapper_vs_batch (sysgen streaming throughput / phase-by-phase batch of the
same engine calls), engine_busy, cached_ratio_p1_p3, predicted_hours_806796 (one GPU, 8B), instances,
and a per-profile table. Simulated figures, not measurements of a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from bench.sim.calibrate import calibrate, prefill_check
from bench.sim.cost import engine_spec
from bench.sim.run import batch, predicted_hours, stream
from bench.sim.workload import PAPER_TOTAL, NoData, build, default_data_dir

TARGETS = {
    "calibration_ratio": (0.85, 1.15),
    "wrapper_vs_batch": (0.97, None),
    "engine_busy": (0.95, None),
    "cached_ratio_p1_p3": (0.60, None),
    "predicted_hours_806796": (None, 8.0),
}
PROFILES = (
    ("h100-80gb", False),
    ("h100-80gb", True),
    ("h200-141gb", False),
    ("h200-141gb", True),
    ("a100-80gb", False),
    ("a100-40gb", False),
)


def _tokenizer():
    from transformers import AutoTokenizer

    from engine.backends.model_cache import default_model_dir

    return AutoTokenizer.from_pretrained(default_model_dir())


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _verdict(key: str, value) -> str:
    if key not in TARGETS or value is None:
        return ""
    lo, hi = TARGETS[key]
    ok = (lo is None or value >= lo) and (hi is None or value <= hi)
    want = f">= {lo}" if hi is None else f"<= {hi}" if lo is None else f"{lo}-{hi}"
    return f"(target {want}: {'met' if ok else 'MISSED'})"


def run(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    res: dict = {
        "simulated": True,
        "note": "simulated engine in virtual time, not a GPU measurement",
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "loadavg_1min": os.getloadavg()[0],
    }
    cal = calibrate(seed=args.seed)
    res["calibration_ratio"] = round(cal["calibration_ratio"], 3)
    res["calibration"] = cal
    pre = prefill_check(seed=args.seed)
    res["calibration_prefill_ratio_h100"] = round(pre["ratio"], 3)
    res["calibration_prefill"] = pre
    tok = _tokenizer()
    spec = engine_spec(args.profile, fp8=args.fp8)
    with tempfile.TemporaryDirectory(prefix="sysgen-sim-wl-") as tmp:
        try:
            wl = build(
                Path(tmp) / "workload.jsonl",
                args.instances,
                tok,
                data_dir=args.data,
                turns=args.turns or None,
                seed=args.seed,
                paper_answers=args.paper_answers,
            )
        except NoData as e:
            print(f"bench.sim: {e}; only the calibration ran", file=sys.stderr)
            res["skipped"] = str(e)
            return res
        res["instances"] = args.instances
        res["workload"] = {
            "datasets": wl.datasets,
            "turns": args.turns or "all",
            "answer_lengths": "paper Table 9 means" if args.paper_answers else "real rows",
        }
        keep = (
            args.keep_outputs
            if args.keep_outputs is not None
            else (bool(args.turns and args.turns > 1) or args.p3_context != "standalone")
        )
        res["p3_context"] = args.p3_context
        for mi in args.sweep or ():
            s, _ = stream(wl, spec, tok, max_inflight=mi, keep_outputs=keep, p3_context=args.p3_context)
            res.setdefault("sweep", {})[str(mi)] = s
        streamed, recorded = stream(
            wl, spec, tok, max_inflight=args.max_inflight, keep_outputs=keep, p3_context=args.p3_context
        )
        base = batch(spec, recorded)
    res["engine"] = spec.describe()
    res["stream"] = streamed
    res["batch"] = base
    res["wrapper_vs_batch"] = round(base["virtual_s"] / streamed["virtual_s"], 4)
    res["engine_busy"] = streamed["engine_busy"]
    res["cached_ratio_p1_p3"] = streamed["cached_ratio_p1_p3"]
    res["predicted_hours_806796"] = round(predicted_hours(streamed["virtual_s"], args.instances), 2)
    # Other profiles: the same engine calls replayed phase by phase on each, scaled by this run's
    # wrapper_vs_batch (streaming costs what the batch costs / wrapper_vs_batch).
    # On a subsample (the first --profile-instances of each phase) to keep the run short.
    table = {}
    limit = min(args.profile_instances, len(recorded.calls.get("p1", ())))
    share = args.instances * limit / max(1, len(recorded.calls.get("p1", ())))
    for prof, fp8 in PROFILES if not args.quick else ():
        name = prof + (" fp8" if fp8 else " bf16")
        b = batch(engine_spec(prof, fp8=fp8), recorded, limit)
        streamed_s = b["virtual_s"] / res["wrapper_vs_batch"]
        table[name] = {
            "batch_hours_806796": round(predicted_hours(b["virtual_s"], share), 2),
            "predicted_hours_806796": round(predicted_hours(streamed_s, share), 2),
            "output_tokens_per_s": b["output_tokens_per_s"],
            "cached_ratio": b["cached_ratio"],
        }
    res["profiles"] = table
    res["profiles_from_instances"] = round(share)
    res["real_s"] = round(time.perf_counter() - t0, 1)
    res["total"] = PAPER_TOTAL
    return res


def _print(res: dict) -> None:
    print("bench.sim: SIMULATED SGLang engine in virtual time (not a GPU measurement)")
    c = res["calibration"]
    pub = c["published"]
    print(
        f"  calibration: {c['output_tokens_per_s']:,.0f} simulated vs {pub['output_tokens_per_s']:,} "
        f"published output tok/s ({pub['what']})"
    )
    pre = res["calibration_prefill"]
    print(
        f"  prefill check: {pre['input_tokens_per_s']:,.0f} simulated vs "
        f"{pre['published']['input_tokens_per_s']:,} published input tok/s on an H100 "
        f"({pre['published']['source']})"
    )
    keys = (
        "calibration_ratio",
        "calibration_prefill_ratio_h100",
        "instances",
        "wrapper_vs_batch",
        "engine_busy",
        "cached_ratio_p1_p3",
        "predicted_hours_806796",
    )
    for key in keys:
        if key in res:
            print(f"  {key:<24} {res[key]!s:>10}  {_verdict(key, res[key])}")
    if "stream" in res:
        s, b = res["stream"], res["batch"]
        print(
            f"  stream: {s['virtual_s']:,.0f} virtual s, {s['output_tokens_per_s']:,.0f} output tok/s, "
            f"kept {s['kept']:,}, wrapper CPU {s['wrapper_cpu_us_per_request']} us/request, "
            f"real {s['real_s']} s"
        )
        phases = ", ".join(f"{k} {v['virtual_s']:,.0f} s" for k, v in b["phases"].items())
        print(
            f"  batch:  {b['virtual_s']:,.0f} virtual s, {b['output_tokens_per_s']:,.0f} output tok/s "
            f"(phases {phases})"
        )
    for mi, s in res.get("sweep", {}).items():
        print(
            f"  sweep max_inflight={mi}: {s['virtual_s']:,.0f} virtual s, engine_busy {s['engine_busy']}, "
            f"cached p1+p3 {s['cached_ratio_p1_p3']}"
        )
    if res.get("profiles"):
        print(f"  {'profile':<18} {'predicted h':>11} {'batch h':>8} {'out tok/s':>10}")
        for name, r in res["profiles"].items():
            print(
                f"  {name:<18} {r['predicted_hours_806796']:>11} {r['batch_hours_806796']:>8} "
                f"{r['output_tokens_per_s']:>10,.0f}"
            )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.sim", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--instances", type=int, default=100_000)
    ap.add_argument("--profile", default="h100-80gb", help="kernels_cfg profile of the streamed run")
    ap.add_argument("--fp8", action="store_true", help="the profile's fp8 settings (Hopper)")
    ap.add_argument(
        "--max-inflight", type=int, default=None, help="scheduler window (default: from capacity)"
    )
    ap.add_argument("--sweep", type=int, nargs="*", help="also stream with each of these max_inflight values")
    ap.add_argument(
        "--turns",
        type=int,
        default=1,
        help="keep the first N exchanges of each conversation (default 1: the paper's 806,796 "
        "instances are single-turn, so the prediction for them is; 0 = every turn)",
    )
    ap.add_argument(
        "--keep-outputs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="cache P1/P4 prompt + answer ids for the request extending them (default: on "
        "when --turns > 1 or --p3-context continue/chat)",
    )
    ap.add_argument(
        "--p3-context",
        choices=("standalone", "continue", "chat"),
        default="standalone",
        help="sysgen's P3 prompt layout (continue: P3 extends P1's prompt + answer)",
    )
    ap.add_argument("--data", type=Path, default=default_data_dir(), help="the real sample rows (SOURCES.md)")
    ap.add_argument(
        "--paper-answers",
        action="store_true",
        help="scale answer lengths to the paper's Table 9 means per dataset",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="skip the per-profile table")
    ap.add_argument(
        "--profile-instances",
        type=int,
        default=20_000,
        help="instances whose engine calls the per-profile table replays",
    )
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    if args.instances < 1:
        ap.error("--instances must be >= 1")
    res = run(args)
    _print(res)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0
