"""The hf backend on the CPU: against plain sequential `model.generate`, constrained vs unconstrained,
and with vs without shared-prefix KV reuse. Greedy, the same prompts for each side, measured in one run.

    python -m bench.cpu --json bench-cpu.json

Prompts are the first rows of the real samples in ../shared/data when that folder exists (else
built-in instructions). Throughput counts the tokens each side actually generated (EOS included):
our request type has no ignore-EOS switch, and greedy outputs of both sides are compared for equality.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path
from typing import Any

import orjson
import torch

from engine.backends.hf import HFBackend
from engine.backends.model_cache import DEFAULT_MODEL_ID, default_model_dir
from engine.request import Request, Result, SamplingParams

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
_BUILTIN = (
    "Explain the difference between a list and a tuple in Python.", "Give three tips for sleeping better.",
    "What causes the seasons on Earth?", "Write a short poem about autumn leaves.",
    "Summarise the plot of Romeo and Juliet in two sentences.", "How do I reverse a string in JavaScript?",
    "A train travels 120 km in 1.5 hours. What is its average speed?", "What is photosynthesis?",
    "Suggest a name for a bakery that sells only bread.", "Why is the sky blue?",
    "Write a SQL query that counts rows per country in a table called users.",
    "What are the main causes of inflation?", "Translate 'good morning' into French and Spanish.",
    "Describe how a hash table works.", "List the planets of the solar system in order.",
    "If I have 3 apples and buy 5 more, then eat 2, how many do I have?",
)


def instructions(n: int = 16, max_chars: int = 600) -> tuple[list[str], str]:
    """n instructions: 4 from each real sample file when present, else the built-in list."""
    files = [("metamathqa/meta_math_qa_test.jsonl", lambda r: r["query"]),
             ("question_answer/gsm8k_test_first300.jsonl", lambda r: r["question"]),
             ("capybara/capybara_test.jsonl", lambda r: r["conversation"][0]["input"]),
             ("magicoder/magicoder_oss_instruct_first500.jsonl", lambda r: r["instruction"])]
    if not all((SHARED_DATA / f).is_file() for f, _ in files):
        return list(_BUILTIN[:n]), "built-in instructions"
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


def p1_prompts(tokenizer: Any, instrs: list[str]) -> tuple[list[tuple[int, ...]], str | None]:
    """P1-shaped prompts (the shared generation template first) and the P1 regex, from sysgen."""
    from sysgen import prompts, tags

    system = prompts.load("p1_generate")
    user = prompts.load("p1_user")
    ids = [chat_ids(tokenizer, user.format(conversation=f"User: {i}"), system) for i in instrs]
    return ids, tags.p1_regex()


def run_sequential_generate(model: Any, tokenizer: Any, prompts: list[tuple[int, ...]], max_new: int) -> dict:
    texts, tokens = [], 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for ids in prompts:
            x = torch.tensor([ids])
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new,
                                 do_sample=False, pad_token_id=tokenizer.eos_token_id)
            new = out[0, len(ids):].tolist()
            tokens += len(new)  # EOS included, as the backend counts it
            new = [t for t in new if t != tokenizer.eos_token_id]
            texts.append(tokenizer.decode(new, skip_special_tokens=True))
    return _rate(tokens, time.perf_counter() - t0) | {"texts": texts}


def run_backend(backend: HFBackend, prompts: list[tuple[int, ...]], max_new: int, regex: str | None = None,
                group: str = "") -> dict:
    reqs = [Request(prompt=p, sampling=SamplingParams(max_new_tokens=max_new), model=backend.model_id,
                    regex=regex, group=group) for p in prompts]

    async def go() -> list[Result]:
        return await asyncio.gather(*(backend.generate(r) for r in reqs))

    t0 = time.perf_counter()
    results = asyncio.run(go())
    rate = _rate(sum(r.completion_tokens for r in results), time.perf_counter() - t0)
    return rate | {"texts": [r.text for r in results], "cached_tokens": sum(r.cached_tokens for r in results),
                   "prompt_tokens": sum(r.prompt_tokens for r in results),
                   "finish_length": sum(r.finish_reason == "length" for r in results)}


def _rate(tokens: int, seconds: float) -> dict:
    return {"tokens": tokens, "seconds": round(seconds, 3), "tok_s": round(tokens / seconds, 2)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench.cpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cache-root", type=Path, default=None,
                    help="model cache root (default ~/.cache/sysgen)")
    args = ap.parse_args(argv)
    n_new = args.max_new_tokens

    model_dir = default_model_dir(args.cache_root)
    kw = {"model_id": DEFAULT_MODEL_ID, "max_batch": args.max_batch, "threads": args.threads}
    backend = HFBackend(model_dir, **kw)
    tok = backend.tokenizer
    instrs, source = instructions(args.prompts)
    plain = [chat_ids(tok, i) for i in instrs]
    p1, p1_regex = p1_prompts(tok, instrs)

    # Warm up: first forward passes, and compile the P1 regex once (the backend caches it).
    run_sequential_generate(backend.model, tok, plain[:1], 4)
    run_backend(backend, plain[:2], 4)
    run_backend(backend, p1[:1], 2, regex=p1_regex)

    # Other processes on a small machine distort CPU timings badly (OpenMP threads spin-wait), so the
    # load average is recorded next to the numbers.
    res: dict[str, Any] = {"prompts": len(instrs), "prompt_source": source, "max_new_tokens": n_new,
                           "max_batch": args.max_batch, "threads": args.threads or torch.get_num_threads(),
                           "loadavg_1min_start": os.getloadavg()[0]}
    seq = run_sequential_generate(backend.model, tok, plain, n_new)
    hf = run_backend(backend, plain, n_new)
    res["sequential_generate"] = _strip(seq)
    res["hf_backend"] = _strip(hf)
    res["hf_vs_generate"] = round(hf["tok_s"] / seq["tok_s"], 3)
    res["greedy_outputs_equal"] = sum(a == b for a, b in zip(seq["texts"], hf["texts"], strict=True))

    p1_new = n_new + 16  # room for a few tag lines
    unc = run_backend(backend, p1, p1_new, group="p1")
    con = run_backend(backend, p1, p1_new, regex=p1_regex, group="p1")
    res["p1_unconstrained"], res["p1_constrained"] = _strip(unc), _strip(con)
    res["constrained_vs_unconstrained"] = round(con["tok_s"] / unc["tok_s"], 3)
    asyncio.run(backend.close())

    no_prefix = HFBackend(model_dir, prefix_cache=False, **kw)
    run_backend(no_prefix, plain[:1], 2)
    off = run_backend(no_prefix, p1, p1_new, group="p1")
    asyncio.run(no_prefix.close())
    res["p1_unconstrained_no_prefix_reuse"] = _strip(off)
    res["prefix_reuse_speedup"] = round(off["seconds"] / unc["seconds"], 3)
    res["loadavg_1min_end"] = os.getloadavg()[0]
    _print(res)
    if args.json:
        args.json.write_bytes(orjson.dumps(res, option=orjson.OPT_INDENT_2))
    return res


def _strip(r: dict) -> dict:
    return {k: v for k, v in r.items() if k != "texts"}


def _print(res: dict) -> None:
    print(f"{res['prompts']} prompts ({res['prompt_source']}), greedy, batch {res['max_batch']}, "
          f"{res['threads']} threads, load average {res['loadavg_1min_start']:.2f} -> "
          f"{res['loadavg_1min_end']:.2f}")
    print(f"{'run':36} {'tokens':>7} {'seconds':>8} {'tok/s':>8} {'cached':>7}")
    for name in ("sequential_generate", "hf_backend", "p1_unconstrained", "p1_constrained",
                 "p1_unconstrained_no_prefix_reuse"):
        r = res[name]
        cached = r.get("cached_tokens", 0)
        print(f"{name:36} {r['tokens']:7d} {r['seconds']:8.2f} {r['tok_s']:8.2f} {cached:7d}")
    print(f"hf / generate: {res['hf_vs_generate']}x  (greedy texts equal: {res['greedy_outputs_equal']}/"
          f"{res['prompts']});  constrained / unconstrained: {res['constrained_vs_unconstrained']}x;  "
          f"prefix reuse speedup: {res['prefix_reuse_speedup']}x")


if __name__ == "__main__":
    main()
