"""bench.gpu --url: the same three parts against a running server (vLLM by default, or SGLang with
--engine sglang_http), so one command compares engines on a node:

    vllm serve $M --port 8000 --enable-prompt-tokens-details &
    python -m bench.gpu --url http://127.0.0.1:8000 --model $M --n 2000 --json bench-vllm.json

  raw_free     every P1 request sent at once through the HTTP backend, no regex (the server alone)
  raw_regex    the same with the P1 regex
  sysgen_regex the same requests through Scheduler + Store (our overhead on top)

Before each part the server's prefix cache is reset where the server allows it (vLLM: POST
/reset_prefix_cache, dev mode only, VLLM_SERVER_DEV_MODE=1; SGLang: POST /flush_cache); the JSON
says whether it was (`cache_reset`), since without it later parts find earlier parts' prefixes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from bench.gpu_parts import build_requests, part_ratios, part_stats, plan, run_sysgen, table, write_json
from engine.backend import EngineError
from engine.request import Result
from sysgen.backend_factory import make_backend

RESET_PATH = {"vllm_http": "/reset_prefix_cache", "sglang_http": "/flush_cache"}


def make_url_backend(engine: str, url: str, model: str | None, api_key: str | None):
    """The run's own backend (sysgen.backend_factory), so the bench measures what `sysgen run` uses."""
    if engine not in RESET_PATH:
        raise ValueError(f"--engine {engine!r}: bench --url drives vllm_http or sglang_http")
    return make_backend(engine, model=model, url=url, api_key=api_key)


async def reset_cache(backend, engine: str) -> bool:
    """True when the server emptied its prefix cache (see the module docstring). Sent through the
    backend's own client, so a server started with --api-key gets the key."""
    try:
        reply = await backend._client.post(RESET_PATH[engine], {}, max_bytes=1 << 20, timeout_s=60.0)
    except EngineError:
        return False
    return reply.status == 200


async def run_direct(backend, requests: list) -> tuple[list, float]:
    """All requests at once straight to the backend (its own connection cap applies): no
    scheduler, no store. A failed request counts as failed, not fatal."""

    async def one(r):
        try:
            return await backend.generate(r)
        except Exception as e:
            return Result.failure(f"{type(e).__name__}: {e}")

    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(r) for r in requests))
    return list(results), time.perf_counter() - t0


async def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
    backend = make_url_backend(args.engine, args.url, args.model, api_key)
    async with backend:
        if backend.tokenizer is None:
            raise SystemExit(
                "error: --url needs --model DIR (a local copy of the served model, for its "
                "tokenizer: prompts go out as token ids)"
            )
        mk = dict(input_path=args.input, tokenizer=backend.tokenizer, model_id=backend.model_id, workdir=work)
        regex_reqs = build_requests(args.n, constrain=True, **mk)
        free_reqs = build_requests(args.n, constrain=False, **mk)
        info = plan(args, regex_reqs, None, "none (a running server)")
        info.update(
            engine=args.engine,
            url=args.url,
            served_model=backend.model_id,
            server_version=getattr(backend, "server_version", None),
            capacity=backend.capabilities.max_running,
            cache_reset={},
        )
        if args.warmup:
            await run_direct(backend, regex_reqs[: args.warmup])
        rows = []
        for name, reqs in (("raw_free", free_reqs), ("raw_regex", regex_reqs)):
            info["cache_reset"][name] = await reset_cache(backend, args.engine)
            rows.append(part_stats(name, *await run_direct(backend, reqs)))
        info["cache_reset"]["sysgen_regex"] = await reset_cache(backend, args.engine)
        rows.append(
            part_stats(
                "sysgen_regex", *await run_sysgen(backend, regex_reqs, work / "store.db", args.max_inflight)
            )
        )
    part_ratios(info, rows)
    return info


def main_url(args: argparse.Namespace) -> int:
    """`python -m bench.gpu --url ...`: measure, print the table and ratios, write --json."""
    with tempfile.TemporaryDirectory(prefix="bench-gpu-url-") as tmp:
        info = asyncio.run(measure(args, Path(tmp)))
    print(table(info["results"]))
    print(orjson.dumps({**info["ratios"], "cache_reset": info["cache_reset"]}).decode())
    write_json(args.json, info)
    return 0
