"""On a GPU node only: the real SGLang engine behind our backend, and the whole CLI on it.

Skipped (with the reason) without a CUDA GPU and SGLang, or without SYSGEN_GPU_TEST_MODEL, a local
instruct model directory small enough for the GPU (e.g. Qwen2.5-0.5B-Instruct or Llama-3.2-1B-Instruct).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from engine.backends.select import detect_gpu, sglang_installed
from sysgen.run_argv import run_argv

REPO = Path(__file__).resolve().parents[2]
MODEL = os.environ.get("SYSGEN_GPU_TEST_MODEL")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (sglang_installed() and detect_gpu()), reason="needs a CUDA GPU and SGLang"),
    pytest.mark.skipif(MODEL is None, reason="set SYSGEN_GPU_TEST_MODEL=/path/to/a/local/instruct/model"),
]


def test_backend_constrained_output_token_counts_and_prefix_cache():
    from engine.backends.sglang import SGLangBackend
    from engine.request import Request, SamplingParams, messages_prompt
    from kernels_cfg import estimate_model_size_b, load_profile
    from sysgen import tags

    args = load_profile(None, model_size_b=estimate_model_size_b(MODEL))
    shared = "You write system messages. " * 40  # a long shared prefix, as the P1 template is

    async def go():
        async with SGLangBackend(MODEL, server_args=args) as be:

            def req(q: str) -> Request:
                chat = be.tokenizer.apply_chat_template(
                    [{"role": "system", "content": shared}, {"role": "user", "content": q}],
                    add_generation_prompt=True,
                    tokenize=False,
                )
                ids = be.tokenizer.encode(chat, add_special_tokens=False)
                return Request(
                    prompt=tuple(ids),
                    sampling=SamplingParams(max_new_tokens=200),
                    model=be.model_id,
                    regex=tags.p1_regex(),
                    group="p1",
                )

            first = await be.generate(req("Write the tagged system message for: how do I sort a list?"))
            rest = await asyncio.gather(
                *(be.generate(req(f"Tagged system message for question {i}.")) for i in range(8))
            )
            text = await be.generate(
                Request(
                    prompt=messages_prompt([{"role": "user", "content": "Say hi."}]),
                    sampling=SamplingParams(max_new_tokens=16),
                    model=be.model_id,
                )
            )
            return first, rest, text

    first, rest, text = asyncio.run(go())
    for r in (first, *rest):
        assert r.finish_reason in ("stop", "length")
        if r.finish_reason == "stop":
            assert re.fullmatch(tags.p1_regex(), r.text), r.text
        assert r.prompt_tokens > 0 and r.completion_tokens > 0
    # The shared prefix was computed once: later requests report it as cached.
    assert min(r.cached_tokens for r in rest) > 0
    assert text.text and text.completion_tokens <= 16


def test_cli_run_on_sglang_then_rerun_makes_no_engine_call(tmp_path):
    out = tmp_path / "out"
    samples = [str(REPO / "sysgen/samples/demo_mixed.jsonl"), str(REPO / "sysgen/samples/demo_code.jsonl")]
    cmd = run_argv(samples, out, "--model", MODEL, engine="sglang")
    subprocess.run(cmd, check=True, timeout=1200)
    st = json.loads((out / "stats.json").read_text())
    assert st["accounted"] and st["input"] == 8
    assert st["p1_parse_rate"] == 1.0
    assert st["this_run"]["scheduler"]["cached_tokens"] > 0
    subprocess.run(cmd, check=True, timeout=1200)
    again = json.loads((out / "stats.json").read_text())
    assert again["this_run"]["scheduler"]["engine_calls"] == 0 and again["this_run"]["already_done"] == 8
