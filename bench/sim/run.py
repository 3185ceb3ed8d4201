"""The measurements: sysgen streaming against the simulated engine, and the phase-by-phase batch
replay of exactly the same engine calls."""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

from bench.sim.backend import Recorded, SimBackend
from bench.sim.cache import block_chain
from bench.sim.cost import EngineSpec
from bench.sim.engine import SimEngine, SimReq
from bench.sim.workload import PAPER_TOTAL, Workload

PHASES = ("p1", "p3", "p4")
_PHASE_KEYS = ("requests", "prompt_tokens", "cached_tokens", "output_tokens")


def _ratio(stats, groups) -> float:
    prompt = sum(stats.by_group.get(g, [0, 0, 0, 0])[1] for g in groups)
    cached = sum(stats.by_group.get(g, [0, 0, 0, 0])[2] for g in groups)
    return cached / prompt if prompt else 0.0


def engine_summary(eng: SimEngine, seconds: float) -> dict:
    s = eng.stats
    return {
        "virtual_s": round(seconds, 1),
        "gpu_busy_s": round(s.gpu_s, 1),
        "forwards": s.forwards,
        "engine_busy": round(s.feeding_busy / s.feeding_forwards, 4) if s.feeding_forwards else None,
        "engine_busy_all": round(s.busy / s.forwards, 4) if s.forwards else None,
        "output_tokens": s.output_tokens,
        "output_tokens_per_s": round(s.output_tokens / seconds, 1) if seconds else None,
        "prompt_tokens": s.prompt_tokens,
        "cached_ratio": round(s.cached_tokens / s.prompt_tokens, 4) if s.prompt_tokens else 0.0,
        "cached_ratio_p1_p3": round(_ratio(s, ("p1", "p3")), 4),
        "retractions": s.retractions,
        "by_phase": {g: dict(zip(_PHASE_KEYS, v, strict=True)) for g, v in sorted(s.by_group.items())},
    }


async def _stream(
    workload: Workload,
    spec: EngineSpec,
    tokenizer,
    out: Path,
    max_inflight: int | None,
    charge_wrapper: bool,
    keep_outputs: bool,
    p3_context: str,
) -> tuple[dict, Recorded]:
    from engine.store import Store
    from sysgen.config import RunConfig
    from sysgen.run.pipeline import run_stream

    eng = SimEngine(spec)
    backend = SimBackend(eng, tokenizer, workload, charge_wrapper=charge_wrapper, keep_outputs=keep_outputs)
    backend.expected_p1 = workload.instances
    # engine="auto" is never resolved here: the simulated backend is passed in directly.
    cfg = RunConfig(
        inputs=(str(workload.path),),
        out=str(out),
        max_inflight=max_inflight,
        progress=False,
        report=False,
        p3_context=p3_context,
    )
    t0, c0 = time.perf_counter(), time.process_time()
    async with backend:
        with Store.open(out / "store.db") as store:
            counters = await run_stream(cfg, backend, store, out, progress_enabled=False)
    res = engine_summary(eng, backend.vt)
    res.update(
        {
            "kept": counters["kept"],
            "dropped": counters["dropped"],
            "window": counters["scheduler"].get("window") or max_inflight,
            "wrapper_cpu_s": round(backend.wrapper_cpu_s, 2),
            "wrapper_cpu_us_per_request": round(1e6 * backend.wrapper_cpu_s / max(1, backend._next), 1),
            "wrapper_bound_s": round(backend.wrapper_bound_s, 2),
            "simulation_cpu_s": round(backend.sim_cpu_s, 2),
            "engine_calls": backend._next,
            "real_s": round(time.perf_counter() - t0, 1),
            "real_cpu_s": round(time.process_time() - c0, 1),
        }
    )
    return res, backend.record


def stream(
    workload: Workload,
    spec: EngineSpec,
    tokenizer,
    *,
    max_inflight: int | None = None,
    workdir: Path | None = None,
    charge_wrapper: bool = True,
    keep_outputs: bool = False,
    p3_context: str = "standalone",
) -> tuple[dict, Recorded]:
    """sysgen's real run_stream (scheduler, store, pipeline) over the workload, simulated engine.
    `p3_context` is sysgen's --p3-context (continue pays off with keep_outputs: P1's answers cached).
    Runs on asyncio's default loop: the driver needs to see when the loop is idle."""
    with tempfile.TemporaryDirectory(prefix="sysgen-sim-", dir=workdir) as tmp:
        return asyncio.run(
            _stream(
                workload, spec, tokenizer, Path(tmp), max_inflight, charge_wrapper, keep_outputs, p3_context
            )
        )


def batch(spec: EngineSpec, recorded: Recorded, limit: int | None = None) -> dict:
    """The offline way: all P1 requests at once, run to the end, then all P3, then all P4
    (what `Engine.generate(list)` users do). The same engine calls as the streaming run (with
    `limit`, the first `limit` of each phase)."""
    eng = SimEngine(spec)
    t = 0.0
    phases = {}
    rid = 0
    for phase in (*PHASES, *sorted(set(recorded.calls) - set(PHASES))):
        calls = recorded.calls.get(phase, [])[:limit]
        for plen, ids, max_new, out_len, con, keep_ids in calls:
            eng.add(
                SimReq(
                    rid,
                    plen,
                    block_chain(ids),
                    max_new,
                    out_len,
                    con,
                    group=phase,
                    ids=ids,
                    keep=block_chain(keep_ids) if keep_ids is not None else None,
                    keep_ids=keep_ids,
                )
            )
            rid += 1
        t0 = t
        while (out := eng.step()) is not None:
            t += out[0]
        phases[phase] = {"requests": len(calls), "virtual_s": round(t - t0, 1)}
    res = engine_summary(eng, t)
    res["phases"] = phases
    return res


def predicted_hours(seconds: float, instances: int, total: int = PAPER_TOTAL) -> float:
    """Linear in instances: the workload already has the paper's dataset mix, and at 100k+
    instances the start and the drain at the end are a small share of the run."""
    return seconds / instances * total / 3600
