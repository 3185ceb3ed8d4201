"""GPU benchmark: plain SGLang batch generation vs sysgen's scheduler + store, on the same prompts,
one engine, one run. Prints a table, writes JSON.

    python -m bench.gpu --model /models/Llama-3.1-8B-Instruct [--profile h100-80gb] [--n 2000] --json out.json
    python -m bench.gpu --dry-run --n 50            # builds the prompts, prints the plan; no GPU
    python -m bench.gpu --url http://127.0.0.1:8000 --model $M --n 2000   # a running vLLM server

Parts, each from an empty prefix cache (flush_cache) so none profits from another's work:
  raw_free     Engine.generate(list of all P1 prompts), no regex           (SGLang alone)
  raw_regex    the same with the P1 regex                                   (cost of constraining)
  sysgen_regex the same requests streamed through Scheduler + Store        (our overhead on top)
Ratios: sysgen_regex / raw_regex output tokens/s (1.0 = no overhead), raw_regex / raw_free.
Prompts are real P1 prompts (shared template first) built from --input, or from synthetic SFT
rows (bench.synthetic) when no input is given. Decoding is greedy, so both paths produce the same
tokens and token counts compare directly. The first --warmup requests run untimed.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson


def build_requests(n: int, *, input_path: str | None, tokenizer: Any, model_id: str, constrain: bool,
                   workdir: Path) -> list:
    """`n` P1 requests (token ids when there is a tokenizer, else chat messages)."""
    from bench import synthetic
    from sysgen.datasets.instance import Instance
    from sysgen.datasets.stream import iter_instances
    from sysgen.phases import PhaseSettings, PromptBuilder, p1_request

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
    return {"part": name, "requests": len(results), "failed": len(results) - len(ok),
            "seconds": round(seconds, 3), "output_tokens": out_tok, "prompt_tokens": prompt_tok,
            "cached_tokens": cached,
            "output_tokens_per_s": round(out_tok / seconds, 1) if seconds > 0 else 0.0,
            "requests_per_s": round(len(ok) / seconds, 2) if seconds > 0 else 0.0,
            "cached_ratio": round(cached / prompt_tok, 4) if prompt_tok else 0.0}


def run_raw(engine, requests: list) -> tuple[list, float]:
    """SGLang's batch API with no scheduler: the whole list in one Engine.generate call."""
    from engine.backends.sglang import result_from_output, sampling_params_for

    engine.flush_cache()
    t0 = time.perf_counter()
    outs = engine.generate(input_ids=[list(r.prompt) for r in requests],
                           sampling_params=[sampling_params_for(r) for r in requests])
    seconds = time.perf_counter() - t0
    results = []
    for r, out in zip(requests, outs, strict=True):
        try:
            results.append(result_from_output(out, r))
        except Exception as e:  # counted as failed, not fatal to the benchmark
            from engine.request import Result

            results.append(Result.failure(str(e)))
    return results, seconds


async def run_sysgen(backend, requests: list, store_path: Path,
                     max_inflight: int | None) -> tuple[list, float]:
    """The same requests through our scheduler and a fresh store, all submitted at once as a run
    would (the scheduler bounds what reaches the engine)."""
    from engine.scheduler import Scheduler
    from engine.store import Store

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


def plan(args, requests: list, server_args: dict | None, profile_note: str) -> dict[str, Any]:
    lens = [len(r.prompt) if r.kind == "ids" else len(orjson.dumps(r.prompt)) for r in requests]
    unit = "tokens" if requests and requests[0].kind == "ids" else "JSON bytes (no tokenizer)"
    return {"dry_run": bool(args.dry_run), "model": args.model, "n": len(requests), "warmup": args.warmup,
            "parts": ["raw_free", "raw_regex", "sysgen_regex"], "profile": profile_note,
            "server_args": server_args, "prompt_unit": unit,
            "prompt_len_mean": round(statistics.mean(lens), 1) if lens else 0,
            "prompt_len_max": max(lens, default=0),
            "regex_chars": len(requests[0].regex or "") if requests else 0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="local Hugging Face model directory")
    p.add_argument("--profile", help="kernels_cfg profile (default: from the detected GPU)")
    p.add_argument("--fp8", action="store_true", help="the profile's FP8 settings (Hopper)")
    p.add_argument("--input", help="SFT file to take instances from (default: synthetic rows)")
    p.add_argument("--n", type=int, default=2000, help="P1 requests per part")
    p.add_argument("--warmup", type=int, default=32)
    p.add_argument("--max-inflight", type=int, help="scheduler window (default: from the engine's capacity)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--dry-run", action="store_true", help="build prompts and print the plan; no engine")
    p.add_argument("--url", help="drive a running server instead of an in-process engine (bench.gpu_url)")
    p.add_argument("--engine", default="vllm_http", choices=("vllm_http", "sglang_http"),
                   help="with --url: what serves there")
    p.add_argument("--api-key", help="with --url: the server's key (default: env OPENAI_API_KEY)")
    args = p.parse_args(argv)
    if args.url and not args.dry_run:
        from bench.gpu_url import main_url

        return main_url(args)
    if not args.dry_run and not args.model:
        p.error("--model is required (or use --dry-run)")

    import kernels_cfg

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
            reqs = build_requests(args.n, input_path=args.input, tokenizer=tokenizer, model_id="dry-run",
                                  constrain=True, workdir=work)
            info = plan(args, reqs, server_args, note)
            print(orjson.dumps(info, option=orjson.OPT_INDENT_2).decode())
            _write(args.json, info)
            return 0
        return _measure(args, server_args, note, work)


def _measure(args, server_args: dict, note: str, work: Path) -> int:
    from engine.backends.select import detect_gpu
    from engine.backends.sglang import SGLangBackend

    backend = SGLangBackend(args.model, server_args=server_args)  # loads the model: minutes
    engine = backend._engine
    try:
        mk = dict(input_path=args.input, tokenizer=backend.tokenizer, model_id=backend.model_id, workdir=work)
        regex_reqs = build_requests(args.n, constrain=True, **mk)
        free_reqs = build_requests(args.n, constrain=False, **mk)
        info = plan(args, regex_reqs, server_args, note)
        info["gpu"] = detect_gpu()
        if args.warmup:
            engine.generate(input_ids=[list(r.prompt) for r in regex_reqs[: args.warmup]],
                            sampling_params={"max_new_tokens": 16, "temperature": 0.0})
        rows = [part_stats("raw_free", *run_raw(engine, free_reqs)),
                part_stats("raw_regex", *run_raw(engine, regex_reqs))]
        # Engine.generate runs SGLang's loop; the async path must run on that same loop (and
        # flush_cache, which runs that loop itself, before entering it).
        engine.flush_cache()
        results, seconds = engine.loop.run_until_complete(
            _entered(backend, run_sysgen(backend, regex_reqs, work / "store.db", args.max_inflight)))
        rows.append(part_stats("sysgen_regex", results, seconds))
    finally:
        engine.loop.run_until_complete(backend.close())
    by = {r["part"]: r for r in rows}
    info["results"] = rows
    info["ratios"] = {
        "sysgen_vs_raw_output_tok_s": ratio(by["sysgen_regex"]["output_tokens_per_s"],
                                            by["raw_regex"]["output_tokens_per_s"]),
        "regex_vs_free_output_tok_s": ratio(by["raw_regex"]["output_tokens_per_s"],
                                            by["raw_free"]["output_tokens_per_s"]),
    }
    print(table(rows))
    print(orjson.dumps(info["ratios"]).decode())
    _write(args.json, info)
    return 0


async def _entered(backend, coro):
    await backend.start()
    return await coro


def _tokenizer(model: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


def _write(path: str | None, info: dict) -> None:
    if path:
        Path(path).write_bytes(orjson.dumps(info, option=orjson.OPT_INDENT_2) + b"\n")


if __name__ == "__main__":
    sys.exit(main())
