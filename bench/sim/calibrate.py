"""Calibration: the simulated engine against a published SGLang offline-throughput figure.

Reference (the SGLang team's own run, cited in docs/benchmarks.md): sgl-project/sglang,
benchmark/benchmark_vllm_060/README.md, "Offline benchmark results, Llama 3.1 8B Instruct 1 x A100 80G":
SGLang v0.3.0, `--enable-torch-compile --disable-radix-cache`, `bench_serving --dataset-name sharegpt
--num-prompts 5000` (request rate inf: every request submitted at once): 22.03 requests/s,
4281.51 output tokens/s. No SGLang-published ShareGPT offline figure for 8B on one H100 was found
(only charts and CI lower bounds), so the cost model is checked on the A100 and run with the same
efficiencies on the H100/H200 datasheet figures; `prefill_check` adds a prefill-bound point measured
on an H100 by an SGLang maintainer. That run and this one use SGLang 0.3's defaults (no mixed chunk).

The ShareGPT mix: bench_serving keeps conversations with prompt 4..1024 tokens and prompt + output
<= 2048, prompt = first human turn, output = the first reply's length. We draw both from lognormals
truncated the same way, with means fitted to that benchmark's totals (mean output 4281.51 / 22.03 =
194.4 tokens; mean prompt ~230 tokens, from the SGLang maintainers' ShareGPT runs of the same script,
sgl-project/sglang issues #1268 and #2097: 248 and 224 tokens per prompt).
"""

from __future__ import annotations

import math
import random
from array import array

from bench.sim.cost import engine_spec
from bench.sim.engine import SimEngine, SimReq

PUBLISHED = {
    "source": "github.com/sgl-project/sglang/blob/main/benchmark/benchmark_vllm_060/README.md",
    "what": "SGLang v0.3.0 offline, ShareGPT, 5000 prompts at once, Llama 3.1 8B Instruct, 1 x A100 80G",
    "gpu_profile": "a100-80gb",
    "output_tokens_per_s": 4281.51,
    "requests_per_s": 22.03,
    "num_prompts": 5000,
}
MEAN_PROMPT, MEAN_OUTPUT = 230.0, 194.4
SIGMA_PROMPT, SIGMA_OUTPUT = 1.1, 1.0
# SGLang 0.3.0 defaults for this run: mem_fraction_static 0.88 (the README's note), and
# max_running_requests = req_to_token_pool size - 1 = min(max(pool / context_len x 512, 2048), 4096) - 1.
SERVER = {"mem_fraction_static": 0.88, "max_running_requests": 2047, "enable_mixed_chunk": False}


def _draw(rng: random.Random, mu_p: float, mu_o: float) -> tuple[int, int]:
    while True:
        p = int(math.exp(rng.gauss(mu_p, SIGMA_PROMPT)))
        o = int(math.exp(rng.gauss(mu_o, SIGMA_OUTPUT)))
        if 4 <= p <= 1024 and o >= 4 and p + o <= 2048:
            return p, o


def sharegpt_mix(n: int, seed: int = 0) -> list[tuple[int, int]]:
    """n (prompt, output) token lengths, ShareGPT-like, means fitted to MEAN_PROMPT / MEAN_OUTPUT."""
    mu_p, mu_o = math.log(MEAN_PROMPT) - 0.6, math.log(MEAN_OUTPUT) - 0.5
    for _ in range(30):  # fixed-point fit of the two location parameters under the truncation
        rng = random.Random(seed)
        pairs = [_draw(rng, mu_p, mu_o) for _ in range(n)]
        mp = sum(p for p, _ in pairs) / n
        mo = sum(o for _, o in pairs) / n
        if abs(mp - MEAN_PROMPT) < 1 and abs(mo - MEAN_OUTPUT) < 1:
            break
        mu_p += math.log(MEAN_PROMPT / mp)
        mu_o += math.log(MEAN_OUTPUT / mo)
    return pairs


def run_all_at_once(engine: SimEngine, pairs: list[tuple[int, int]], seed: int = 0) -> dict:
    """Submit every request at once (unique prompts: nothing to share, as with the radix cache off)
    and run to the end."""
    rng = random.Random(seed + 1)
    block = engine.block
    for i, (p, o) in enumerate(pairs):
        chain = array("q", (rng.getrandbits(62) for _ in range(p // block)))
        engine.add(SimReq(i, p, chain, max_new=o, out_len=o))
    engine.feeding = False
    t = 0.0
    while (out := engine.step()) is not None:
        t += out[0]
    s = engine.stats
    return {
        "requests": len(pairs),
        "gpu_s": t,
        "output_tokens": s.output_tokens,
        "output_tokens_per_s": s.output_tokens / t,
        "requests_per_s": len(pairs) / t,
        "mean_prompt": sum(p for p, _ in pairs) / len(pairs),
        "mean_output": sum(o for _, o in pairs) / len(pairs),
        "retractions": s.retractions,
    }


def calibrate(n: int = PUBLISHED["num_prompts"], seed: int = 0) -> dict:
    spec = engine_spec(PUBLISHED["gpu_profile"], overrides=SERVER)
    res = run_all_at_once(SimEngine(spec), sharegpt_mix(n, seed), seed)
    res["calibration_ratio"] = res["output_tokens_per_s"] / PUBLISHED["output_tokens_per_s"]
    res["published"] = PUBLISHED
    res["engine"] = spec.describe()
    return res


PREFILL_PUBLISHED = {
    "source": "github.com/sgl-project/sglang/pull/1060 (an SGLang maintainer's run on the PR's H100)",
    "what": "Llama-3.1-8B-Instruct, --enable-torch-compile --disable-radix-cache --disable-flashinfer; "
    "bench_serving random, 1000 prompts, input uniform in [0, 8192], output in [0, 8], all at once",
    "gpu_profile": "h100-80gb",
    "input_tokens_per_s": 27670.26,
}


def prefill_check(seed: int = 0) -> dict:
    """A second, prefill-bound point on the H100 itself (the ShareGPT point above is decode-heavy
    and on an A100): simulated input tokens/s over the published figure."""
    spec = engine_spec("h100-80gb", overrides={"enable_mixed_chunk": False})
    eng = SimEngine(spec)
    rng = random.Random(seed)
    for i in range(1000):
        p, o = rng.randint(1, 8192), rng.randint(1, 8)
        eng.add(SimReq(i, p, array("q", (rng.getrandbits(62) for _ in range(p // eng.block))), o, o))
    eng.feeding = False
    t = 0.0
    while (out := eng.step()) is not None:
        t += out[0]
    rate = eng.stats.prompt_tokens / t
    return {
        "input_tokens_per_s": rate,
        "ratio": rate / PREFILL_PUBLISHED["input_tokens_per_s"],
        "published": PREFILL_PUBLISHED,
    }
