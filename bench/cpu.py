"""The CPU engine (OpenVINO GenAI continuous batching) on real P1 prompts, measured in one run against
plain sequential transformers `model.generate` (the loop a user would write), constrained against
unconstrained, and with prefix caching on against off. Greedy; every side gets the same prompts.

    python -m bench.cpu --json bench-cpu.json

Prompts are P1 prompts (the shared 500-token generation template, then one instance) over the first
rows of the real samples in ../shared/data when that folder exists (else built-in instructions).
Throughput counts the tokens each side actually generated (EOS included): our requests have no
ignore-EOS switch, and greedy texts differ between the engines' numerics, so lengths differ a little.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path
from typing import Any

import orjson

from engine.backends.openvino import OpenVINOBackend
from engine.request import Request, SamplingParams
from sysgen.run_argv import run_argv

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
_BUILTIN = (
    "Explain the difference between a list and a tuple in Python.",
    "Give three tips for sleeping better.",
    "What causes the seasons on Earth?",
    "Write a short poem about autumn leaves.",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "How do I reverse a string in JavaScript?",
    "A train travels 120 km in 1.5 hours. What is its average speed?",
    "What is photosynthesis?",
    "Suggest a name for a bakery that sells only bread.",
    "Why is the sky blue?",
    "Write a SQL query that counts rows per country in a table called users.",
    "What are the main causes of inflation?",
    "Translate 'good morning' into French and Spanish.",
    "Describe how a hash table works.",
    "List the planets of the solar system in order.",
    "If I have 3 apples and buy 5 more, then eat 2, how many do I have?",
)


def instructions(n: int = 16, max_chars: int = 600) -> tuple[list[str], str]:
    """n instructions: an equal share from each real sample file when present, else the built-ins."""
    files = [
        ("metamathqa/meta_math_qa_test.jsonl", lambda r: r["query"]),
        ("question_answer/gsm8k_test_first300.jsonl", lambda r: r["question"]),
        ("capybara/capybara_test.jsonl", lambda r: r["conversation"][0]["input"]),
        ("magicoder/magicoder_oss_instruct_first500.jsonl", lambda r: r["instruction"]),
    ]
    if not all((SHARED_DATA / f).is_file() for f, _ in files):
        return [_BUILTIN[i % len(_BUILTIN)] for i in range(n)], "built-in instructions"
    out: list[str] = []
    per = -(-n // len(files))
    for name, field in files:
        with (SHARED_DATA / name).open("rb") as fh:
            out += [field(orjson.loads(line))[:max_chars] for line, _ in zip(fh, range(per), strict=False)]
    return out[:n], "first rows of ../shared/data/{metamathqa,question_answer,capybara,magicoder}"


def chat_ids(tokenizer: Any, user: str, system: str | None = None) -> tuple[int, ...]:
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    return tuple(tokenizer.encode(text, add_special_tokens=False))


def p1_prompts(tokenizer: Any, instrs: list[str]) -> tuple[list[tuple[int, ...]], str]:
    """P1 prompts (the shared generation template first) and the P1 regex, from sysgen."""
    from sysgen import prompts, tags

    system = prompts.load("p1_generate")
    user = prompts.load("p1_user")
    ids = [chat_ids(tokenizer, user.format(conversation=f"User: {i}"), system) for i in instrs]
    return ids, tags.p1_regex()


def run_sequential_generate(model: Any, tokenizer: Any, prompts: list[tuple[int, ...]], max_new: int) -> dict:
    import torch

    tokens = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for ids in prompts:
            x = torch.tensor([ids])
            out = model.generate(
                input_ids=x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=max_new,
                do_sample=False,
                pad_token_id=tokenizer.eos_token_id,
            )
            tokens += out.shape[1] - len(ids)  # EOS included, as the engine counts it
    return _rate(tokens, time.perf_counter() - t0)


def run_engine(backend: Any, prompts: list[tuple[int, ...]], max_new: int, regex: str | None = None) -> dict:
    return asyncio.run(timed_requests(backend, prompts, max_new, regex))


async def timed_requests(
    backend: Any, prompts: list[tuple[int, ...]], max_new: int, regex: str | None = None
) -> dict:
    """Every prompt at once to the backend (greedy, P1 group): tokens generated and tok/s."""
    reqs = [
        Request(
            prompt=p,
            sampling=SamplingParams(max_new_tokens=max_new),
            model=backend.model_id,
            regex=regex,
            group="p1",
        )
        for p in prompts
    ]
    t0 = time.perf_counter()
    results = await asyncio.gather(*(backend.generate(r) for r in reqs))
    rate = _rate(sum(r.completion_tokens for r in results), time.perf_counter() - t0)
    return rate | {
        "finish_length": sum(r.finish_reason == "length" for r in results),
        "texts": [r.text for r in results],
    }


def _rate(tokens: int, seconds: float) -> dict:
    return {"tokens": int(tokens), "seconds": round(seconds, 3), "tok_s": round(tokens / seconds, 2)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench.cpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=32, help="engine max_num_seqs")
    ap.add_argument(
        "--sequential-prompts",
        type=int,
        default=8,
        help="prompts for the sequential baseline, spread evenly over the set: one at a time, "
        "its tok/s does not depend on how many, and all 32 take ~10 min on 2 cores",
    )
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--cache-root", type=Path, default=None, help="model cache root (default ~/.cache/sysgen)"
    )
    ap.add_argument(
        "--vllm-url",
        default=None,
        help="also a running vLLM CPU server (tests/real/setup.sh; docs/engines.md) on the "
        "same prompts, beside OpenVINO",
    )
    ap.add_argument(
        "--pipeline-rows",
        type=int,
        default=0,
        help="also the full pipeline (`sysgen run`, P1-P4) over this many built-in rows on "
        "each engine: output tok/s",
    )
    ap.add_argument(
        "--quick", action="store_true", help="skip the sequential baseline and the prefix-cache-off run"
    )
    args = ap.parse_args(argv)
    n_new = args.max_new_tokens
    kw: dict[str, Any] = {
        "max_num_seqs": args.max_batch,
        "threads": args.threads,
        "cache_root": args.cache_root,
    }

    from transformers import AutoTokenizer

    from engine.backends.model_cache import default_gguf_path, gguf_tokenizer_dir

    tok = AutoTokenizer.from_pretrained(gguf_tokenizer_dir(default_gguf_path(), args.cache_root))
    instrs, source = instructions(args.prompts)
    p1, p1_regex = p1_prompts(tok, instrs)
    # Warm-up prompt: a P1 prompt for an instruction outside the measured set, so the shared template
    # is in the prefix cache before the first timed run, as it is for every P1 request of a run but
    # its first few. (OpenVINO does not share a prefix between prompts admitted in the same step:
    # warmed with a plain chat prompt instead, the first run measured the same as cache off.)
    warm = p1_prompts(tok, ["Say hello."])[0][0]
    # The baseline first, before OpenVINO starts its thread pool, so the two never compete. It is very
    # sensitive to other load: torch's OpenMP threads did 11.6 tok/s at load average 0.5 and 1.2-2.2
    # tok/s at 3.4-4 on 2 cores, so read speedup_vs_sequential next to loadavg_1min_start.
    step = max(1, len(p1) // max(1, args.sequential_prompts))
    load_start = os.getloadavg()[0]
    seq = (
        None
        if args.quick
        else _sequential(p1[::step][: args.sequential_prompts], n_new, tok, args.cache_root)
    )

    engine = OpenVINOBackend(**kw)
    res: dict[str, Any] = {
        "engine": "openvino",
        "model": engine.model_id,
        "prompts": len(p1),
        "prompt_source": source,
        "p1_prompt_tokens_mean": round(sum(map(len, p1)) / len(p1)),
        "max_new_tokens": n_new,
        "max_batch": args.max_batch,
        "threads": args.threads or os.cpu_count(),
        "kv_cache_gb": engine.kv_cache_gb,
        "loadavg_1min_start": load_start,
    }
    # Warm-up: first inference, the P1 regex's first compile and the template in the prefix cache, on
    # a prompt outside the measured set (so no instance's own text is cached before its first timed run).
    run_engine(engine, [warm], 4)
    run_engine(engine, [warm], 4, regex=p1_regex)
    # 1. A run's real state: only the shared template is in the prefix cache, each instance's own text
    #    is new.
    unc = run_engine(engine, p1, n_new)
    # 2. Constrained vs unconstrained with the same cache state: both after every prompt was seen once.
    con = run_engine(engine, p1, n_new, regex=p1_regex)
    unc_warm = run_engine(engine, p1, n_new)
    asyncio.run(engine.close())
    res |= {
        "p1_unconstrained": _strip(unc),
        "p1_constrained": _strip(con),
        "p1_unconstrained_cached": _strip(unc_warm),
    }
    res["p1_tok_s"] = unc["tok_s"]
    res["constrained_vs_unconstrained"] = round(con["tok_s"] / unc_warm["tok_s"], 3)
    if not args.quick:
        # 3. Prefix caching off, the same warm-up: every prompt prefills its 500-token template again.
        off_engine = OpenVINOBackend(prefix_cache=False, **kw)
        run_engine(off_engine, [warm], 4)
        off = run_engine(off_engine, p1, n_new)
        asyncio.run(off_engine.close())
        res |= {"p1_prefix_cache_off": _strip(off), "sequential_generate": seq}
        res["speedup_vs_sequential"] = round(unc["tok_s"] / seq["tok_s"], 3)
        res["prefix_cache_speedup"] = round(unc["tok_s"] / off["tok_s"], 3)
    if args.vllm_url:
        res["vllm"] = _vllm(args.vllm_url, p1, warm, p1_regex, n_new)
        vllm_con = res["vllm"]["p1_constrained"]["tok_s"]
        res["vllm_vs_openvino_p1_constrained"] = round(vllm_con / con["tok_s"], 3)
    if args.pipeline_rows:
        res["pipeline"] = {"openvino": _pipeline("openvino", None, args.pipeline_rows)}
        if args.vllm_url:
            res["pipeline"]["vllm_http"] = _pipeline("vllm_http", args.vllm_url, args.pipeline_rows)
    res["loadavg_1min_end"] = os.getloadavg()[0]
    _print(res)
    if args.json:
        args.json.write_bytes(orjson.dumps(res, option=orjson.OPT_INDENT_2))
    return res


def _sequential(prompts: list[tuple[int, ...]], n_new: int, tok: Any, cache_root: Path | None) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from engine.backends.model_cache import default_model_dir

    model = AutoModelForCausalLM.from_pretrained(default_model_dir(cache_root), dtype=torch.float32).eval()
    run_sequential_generate(model, tok, prompts[:1], 4)  # warm-up
    return run_sequential_generate(model, tok, prompts, n_new) | {
        "prompts": len(prompts),
        "threads": torch.get_num_threads(),
    }


def _vllm(url: str, p1: list[tuple[int, ...]], warm: tuple[int, ...], regex: str, n_new: int) -> dict:
    """The same P1 prompts (token ids) on a running vLLM server, warmed the same way, then
    unconstrained and constrained. The server has its own threads and KV cache: compare tok/s."""
    from engine.backends.model_cache import default_model_dir
    from engine.backends.vllm_http import VLLMHTTPBackend

    async def go() -> dict:
        async with VLLMHTTPBackend(url, model_path=str(default_model_dir())) as b:
            await timed_requests(b, [warm], 4)
            await timed_requests(b, [warm], 4, regex)
            unc = await timed_requests(b, p1, n_new)
            con = await timed_requests(b, p1, n_new, regex)
            return {
                "url": url,
                "server_version": b.server_version,
                "p1_unconstrained": _strip(unc),
                "p1_constrained": _strip(con),
                "constrained_vs_unconstrained": round(con["tok_s"] / unc["tok_s"], 3),
            }

    return asyncio.run(go())


def _pipeline(engine: str, url: str | None, rows: int) -> dict:
    """`sysgen run` P1-P4 over `rows` built-in instructions: wall time and output tok/s from stats.json."""
    import json
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench-cpu-pipeline-") as tmp:
        inp = Path(tmp, "in.jsonl")
        inp.write_text(
            "".join(
                json.dumps({"instruction": _BUILTIN[i % len(_BUILTIN)], "output": f"A short answer {i}."})
                + "\n"
                for i in range(rows)
            )
        )
        cmd = run_argv(inp, f"{tmp}/out", "--p4-max-tokens", "128", engine=engine)
        if url:
            from engine.backends.model_cache import default_model_dir

            cmd += ["--url", url, "--model", str(default_model_dir())]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        wall = time.perf_counter() - t0
        st = json.loads(Path(tmp, "out", "stats.json").read_text())
    sched = st["this_run"]["scheduler"]
    return {
        "rows": rows,
        "kept": st["kept"],
        "p1_parse_rate": st["p1_parse_rate"],
        "wall_s": round(wall, 1),
        "output_tokens": sched["completion_tokens"],
        "output_tok_s": sched["output_tokens_per_s"],
        "cached_ratio": sched.get("cached_ratio"),
    }


def _strip(r: dict) -> dict:
    return {k: v for k, v in r.items() if k != "texts"}


def _print(res: dict) -> None:
    print(
        f"{res['prompts']} P1 prompts (~{res['p1_prompt_tokens_mean']} tokens; {res['prompt_source']}), "
        f"greedy, {res['max_new_tokens']} new tokens, batch {res['max_batch']}, {res['threads']} threads, "
        f"load average {res['loadavg_1min_start']:.2f} -> {res['loadavg_1min_end']:.2f}"
    )
    print(f"{'run':28} {'tokens':>7} {'seconds':>8} {'tok/s':>8}")
    rows = [
        (n, res.get(n))
        for n in (
            "sequential_generate",
            "p1_unconstrained",
            "p1_constrained",
            "p1_unconstrained_cached",
            "p1_prefix_cache_off",
        )
    ]
    rows += [(f"vllm_{n}", (res.get("vllm") or {}).get(n)) for n in ("p1_unconstrained", "p1_constrained")]
    for name, r in rows:
        if r:
            print(f"{name:28} {r['tokens']:7d} {r['seconds']:8.2f} {r['tok_s']:8.2f}")
    for engine, p in (res.get("pipeline") or {}).items():
        print(
            f"pipeline {engine:19} {p['output_tokens']:7d} {p['wall_s']:8.1f} {p['output_tok_s']:8.2f}"
            f"  ({p['rows']} rows -> {p['kept']} kept, P1 parse {p['p1_parse_rate']})"
        )
    print(
        "  ".join(
            f"{k} {res[k]}x"
            for k in (
                "speedup_vs_sequential",
                "constrained_vs_unconstrained",
                "prefix_cache_speedup",
                "vllm_vs_openvino_p1_constrained",
            )
            if k in res
        )
    )


if __name__ == "__main__":
    main()
