"""GPU benchmark: plain SGLang batch generation vs sysgen's scheduler + store, on the same prompts,
one engine, one run. Prints a table, writes JSON.

    python -m bench.gpu --model /models/Llama-3.1-8B-Instruct [--profile h100-80gb] [--n 2000] --json out.json
    python -m bench.gpu --dry-run --n 50            # builds the prompts, prints the plan; no GPU
    python -m bench.gpu --url http://127.0.0.1:8000 --model $M --n 2000   # a running vLLM server

Parts, each from an empty prefix cache (flush_cache) so none profits from another's work:
  raw_free     Engine.async_generate per prompt, at most WINDOW outstanding, no regex  (SGLang alone)
  raw_regex    the same with the P1 regex                                   (cost of constraining)
  sysgen_regex the same requests streamed through Scheduler + Store        (our overhead on top)
  raw_batch    all n regex requests at once, as Engine.generate(list) sends them   (--batch-baseline)
WINDOW is the scheduler's own window (engine_window from the engine's reported capacity, or
--max-inflight), so raw_* and sysgen_regex run in the same policy regime: SGLang's lpm reorders by
prefix only while a rank's waiting queue holds <= 128 requests. raw_batch puts n - running requests
in the queue at once (FCFS once past 128): it measures the policy difference, not our overhead, and
is reported beside, never in the overhead ratio. A request SGLang aborts (a 400: prompt too long,
bad grammar) counts as failed in its part; it never ends the benchmark (Engine.generate(list)
raises for the whole batch on one such abort, so no part uses it).
Ratios: sysgen_regex / raw_regex output tokens/s (1.0 = no overhead), raw_regex / raw_free.
Prompts are real P1 prompts (shared template first) built from --input, or from synthetic SFT
rows (bench.synthetic) when no input is given. Decoding is greedy, so both paths produce the same
tokens and token counts compare directly. The first --warmup requests run untimed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson

import kernels_cfg
from bench.gpu_parts import (
    build_requests,
    part_ratios,
    part_stats,
    plan,
    ratio,
    run_sysgen,
    table,
    write_json,
)
from bench.gpu_url import main_url
from engine.backends.select import detect_gpu
from engine.backends.sglang import SGLangBackend, result_from_output, sampling_params_for
from engine.policy import LPM_WAITING_LIMIT, engine_window
from engine.request import Result


def run_raw(engine, requests: list, window: int | None) -> tuple[list, float]:
    """SGLang with no scheduler and no store: one Engine.async_generate per request, at most
    `window` outstanding (None: all at once, the queue regime of Engine.generate(list)). Runs on
    the engine's own loop, from an empty prefix cache."""
    engine.flush_cache()
    t0 = time.perf_counter()
    results = engine.loop.run_until_complete(_raw(engine, requests, window))
    return results, time.perf_counter() - t0


async def _raw(engine, requests: list, window: int | None) -> list:
    gate = asyncio.Semaphore(window or len(requests) or 1)

    async def one(r):
        async with gate:
            try:
                out = await engine.async_generate(
                    input_ids=list(r.prompt), sampling_params=sampling_params_for(r)
                )
                return result_from_output(out, r)
            except Exception as e:  # SGLang's 400 abort raises ValueError: a failed request, not a failed run
                return Result.failure(f"{type(e).__name__}: {e}")

    return list(await asyncio.gather(*(one(r) for r in requests)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.gpu", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", help="local Hugging Face model directory")
    p.add_argument("--profile", help="kernels_cfg profile (default: from the detected GPU)")
    p.add_argument("--fp8", action="store_true", help="the profile's FP8 settings (Hopper)")
    p.add_argument("--input", help="SFT file to take instances from (default: synthetic rows)")
    p.add_argument("--n", type=int, default=2000, help="P1 requests per part")
    p.add_argument("--warmup", type=int, default=32)
    p.add_argument("--max-inflight", type=int, help="scheduler window (default: from the engine's capacity)")
    p.add_argument(
        "--batch-baseline",
        action="store_true",
        help="also time all n requests at once (Engine.generate(list)'s FCFS queue regime)",
    )
    p.add_argument("--json", help="write the results here")
    p.add_argument("--dry-run", action="store_true", help="build prompts and print the plan; no engine")
    p.add_argument("--url", help="drive a running server instead of an in-process engine (bench.gpu_url)")
    p.add_argument(
        "--engine",
        default="vllm_http",
        choices=("vllm_http", "sglang_http"),
        help="with --url: what serves there",
    )
    p.add_argument("--api-key", help="with --url: the server's key (default: env OPENAI_API_KEY)")
    args = p.parse_args(argv)
    if args.url and not args.dry_run:
        return main_url(args)
    if not args.dry_run and not args.model:
        p.error("--model is required (or use --dry-run)")

    server_args, note = None, "none"
    try:
        size = kernels_cfg.estimate_model_size_b(args.model) if args.model else None
        server_args = kernels_cfg.load_profile(args.profile, model_size_b=size, fp8=args.fp8)
        note = args.profile or "detected"
    except kernels_cfg.ProfileError as e:
        if not args.dry_run:
            print(f"error: {e}", file=sys.stderr)
            return 2
        note = f"unresolved: {e}"

    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        work = Path(tmp)
        if args.dry_run:
            tokenizer = _tokenizer(args.model) if args.model else None
            reqs = build_requests(
                args.n,
                input_path=args.input,
                tokenizer=tokenizer,
                model_id="dry-run",
                constrain=True,
                workdir=work,
            )
            info = plan(args, reqs, server_args, note)
            print(orjson.dumps(info, option=orjson.OPT_INDENT_2).decode())
            write_json(args.json, info)
            return 0
        return _measure(args, server_args, note, work)


def _measure(args, server_args: dict, note: str, work: Path) -> int:
    backend = SGLangBackend(args.model, server_args=server_args)  # loads the model: minutes
    engine = backend._engine
    try:
        # Everything runs on SGLang's own loop; flush_cache runs that loop itself, so it is called
        # between parts, never inside one. Entering first reads the engine's real capacity.
        engine.loop.run_until_complete(backend.start())
        caps = backend.capabilities
        window = args.max_inflight or engine_window(caps.max_running, caps.dp_size)
        mk = dict(input_path=args.input, tokenizer=backend.tokenizer, model_id=backend.model_id, workdir=work)
        regex_reqs = build_requests(args.n, constrain=True, **mk)
        free_reqs = build_requests(args.n, constrain=False, **mk)
        info = plan(args, regex_reqs, server_args, note)
        info["gpu"] = detect_gpu()
        info["regime"] = regime(window, caps, args.batch_baseline)
        if args.warmup:
            run_raw(
                engine,
                [
                    replace(r, sampling=replace(r.sampling, max_new_tokens=16))
                    for r in regex_reqs[: args.warmup]
                ],
                window,
            )
        rows = [
            part_stats("raw_free", *run_raw(engine, free_reqs, window)),
            part_stats("raw_regex", *run_raw(engine, regex_reqs, window)),
        ]
        engine.flush_cache()
        results, seconds = engine.loop.run_until_complete(
            run_sysgen(backend, regex_reqs, work / "store.db", args.max_inflight)
        )
        rows.append(part_stats("sysgen_regex", results, seconds))
        if args.batch_baseline:
            rows.append(part_stats("raw_batch", *run_raw(engine, regex_reqs, None)))
    finally:
        engine.loop.run_until_complete(backend.close())
    by = part_ratios(info, rows)
    if "raw_batch" in by:
        info["ratios"]["windowed_vs_batch_output_tok_s"] = ratio(
            by["raw_regex"]["output_tokens_per_s"], by["raw_batch"]["output_tokens_per_s"]
        )
    print(table(rows))
    print(orjson.dumps(info["ratios"]).decode())
    write_json(args.json, info)
    return 0


def regime(window: int, caps, batch: bool) -> dict[str, Any]:
    """The queue regime each part runs in, stated in the JSON so the ratios can be read."""
    dp = max(1, caps.dp_size)
    running = max(1, caps.max_running // dp)
    out = {
        "window": window,
        "dp_size": dp,
        "max_running_per_rank": running,
        "kv_tokens_per_rank": caps.kv_tokens,
        "waiting_per_rank_max": max(0, -(-window // dp) - running),
        "lpm_waiting_limit": LPM_WAITING_LIMIT,
        "raw_free": "windowed",
        "raw_regex": "windowed",
        "sysgen_regex": "windowed (the scheduler may shrink it when the KV cache runs fewer)",
    }
    if batch:
        out["raw_batch"] = "all n at once: waiting past the lpm limit, FCFS"
    return out


def _tokenizer(model: str):
    from transformers import AutoTokenizer  # seconds to import: only --dry-run with --model needs it

    return AutoTokenizer.from_pretrained(model)


if __name__ == "__main__":
    sys.exit(main())
