"""What the two GPU benchmarks share (bench/gpu.py in-process, bench/gpu_url.py against a server):
the P1 requests, running them through sysgen's scheduler and store, each part's figures, the
ratios, the plan and the JSON written."""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from bench import synthetic
from engine.scheduler import Scheduler
from engine.store import Store
from sysgen.datasets.instance import Instance
from sysgen.datasets.stream import iter_instances
from sysgen.run.phases import PhaseSettings, PromptBuilder, p1_request


def build_requests(
    n: int, *, input_path: str | None, tokenizer: Any, model_id: str, constrain: bool, workdir: Path
) -> list:
    """`n` P1 requests (token ids when there is a tokenizer, else chat messages)."""
    if input_path is None:
        input_path = str(workdir / "synthetic.jsonl")
        synthetic.write(input_path, n)
    build, settings = PromptBuilder(tokenizer), PhaseSettings(model_id=model_id, constrain=constrain)
    out = []
    for inst in iter_instances([input_path]):
        if isinstance(inst, Instance):
            out.append(p1_request(inst, build, settings))
            if len(out) == n:
                break
    if len(out) < n:
        print(f"note: {input_path} holds {len(out)} usable instances; benchmarking those", file=sys.stderr)
    return out


def part_stats(name: str, results: list, seconds: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    out_tok = sum(r.completion_tokens for r in ok)
    prompt_tok = sum(r.prompt_tokens for r in ok)
    cached = sum(r.cached_tokens for r in ok)
    return {
        "part": name,
        "requests": len(results),
        "failed": len(results) - len(ok),
        "seconds": round(seconds, 3),
        "output_tokens": out_tok,
        "prompt_tokens": prompt_tok,
        "cached_tokens": cached,
        "output_tokens_per_s": round(out_tok / seconds, 1) if seconds > 0 else 0.0,
        "requests_per_s": round(len(ok) / seconds, 2) if seconds > 0 else 0.0,
        "cached_ratio": round(cached / prompt_tok, 4) if prompt_tok else 0.0,
    }


async def run_sysgen(
    backend, requests: list, store_path: Path, max_inflight: int | None
) -> tuple[list, float]:
    """The same requests through our scheduler and a fresh store, all submitted at once as a run
    would (the scheduler bounds what reaches the engine)."""
    store = Store.open(store_path)
    try:
        overrides = {"max_inflight": max_inflight} if max_inflight else {}
        async with Scheduler(backend, store, **overrides) as scheduler:
            t0 = time.perf_counter()
            results = await asyncio.gather(*(scheduler.submit(r) for r in requests))
            seconds = time.perf_counter() - t0
        store.flush()
    finally:
        store.close()
    return list(results), seconds


def table(rows: list[dict[str, Any]]) -> str:
    cols = ["part", "requests", "failed", "seconds", "output_tokens", "output_tokens_per_s", "cached_ratio"]
    lines = ["  ".join(f"{c:>19}" if i else f"{c:<13}" for i, c in enumerate(cols))]
    for row in rows:
        lines.append("  ".join(f"{row[c]!s:>19}" if i else f"{row[c]!s:<13}" for i, c in enumerate(cols)))
    return "\n".join(lines)


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def part_ratios(info: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Record the parts and their two headline ratios in `info`; returns the parts by name."""
    by = {r["part"]: r for r in rows}
    info["results"] = rows
    info["ratios"] = {
        "sysgen_vs_raw_output_tok_s": ratio(
            by["sysgen_regex"]["output_tokens_per_s"], by["raw_regex"]["output_tokens_per_s"]
        ),
        "regex_vs_free_output_tok_s": ratio(
            by["raw_regex"]["output_tokens_per_s"], by["raw_free"]["output_tokens_per_s"]
        ),
    }
    return by


def plan(args, requests: list, server_args: dict | None, profile_note: str) -> dict[str, Any]:
    lens = [len(r.prompt) if r.kind == "ids" else len(orjson.dumps(r.prompt)) for r in requests]
    unit = "tokens" if requests and requests[0].kind == "ids" else "JSON bytes (no tokenizer)"
    return {
        "dry_run": bool(args.dry_run),
        "model": args.model,
        "n": len(requests),
        "warmup": args.warmup,
        "parts": ["raw_free", "raw_regex", "sysgen_regex"],
        "profile": profile_note,
        "server_args": server_args,
        "prompt_unit": unit,
        "prompt_len_mean": round(statistics.mean(lens), 1) if lens else 0,
        "prompt_len_max": max(lens, default=0),
        "regex_chars": len(requests[0].regex or "") if requests else 0,
    }


def write_json(path: str | None, info: dict) -> None:
    if path:
        Path(path).write_bytes(orjson.dumps(info, option=orjson.OPT_INDENT_2) + b"\n")
