"""Shared by the pipeline tests: input files, an in-process run, and the exactly-once check."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import orjson

from engine.backends.standin import StandInBackend
from engine.scheduler import SchedulerConfig
from engine.store import Store
from sysgen import standin
from sysgen.config import RunConfig
from sysgen.run.pipeline import run_stream

FAST = SchedulerConfig(
    max_inflight=8, max_retries=2, timeout_s=0.3, backoff_base_s=0.001, backoff_max_s=0.002
)


def write_rows(path: Path, n: int, start: int = 0) -> list[bytes]:
    """`n` good rows in four shapes; returns them."""
    rows = []
    for i in range(start, start + n):
        q, a = f"Question number {i}: how do I sort a list of {i} items?", f"Use sorted(); item {i}."
        row = [
            {"instruction": q, "output": a},
            {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]},
            {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]},
            {"question": q, "answer": a},
        ][i % 4]
        rows.append(orjson.dumps(row))
    path.write_bytes(b"\n".join(rows) + b"\n")
    return rows


def backend(calls: Counter | None = None, **kw) -> StandInBackend:
    """The stand-in engine; `calls` counts engine calls per phase."""

    def respond(request):
        if calls is not None:
            calls[request.group] += 1
        return standin.respond(request)

    return StandInBackend(respond, **kw)


def run(inputs, out: Path, b: StandInBackend | None = None, sched=FAST, **cfg_kw) -> dict:
    cfg = RunConfig(inputs=tuple(str(p) for p in inputs), out=str(out), engine="standin", **cfg_kw)

    async def go():
        with Store.open(out / "store.db") as st:
            return await run_stream(cfg, b or backend(), st, out, progress_enabled=False, sched_config=sched)

    return asyncio.run(go())


def records(out: Path) -> dict[str, list[dict]]:
    """Every output line by sink; raises if any line is not JSON."""
    res = {}
    for sink in ("data", "dropped"):
        p = out / f"{sink}.jsonl"
        res[sink] = [orjson.loads(line) for line in p.read_bytes().splitlines()] if p.exists() else []
    return res


def ids_once(out: Path) -> Counter:
    recs = records(out)
    return Counter(r["id"] for sink in recs.values() for r in sink)
