"""Cost of building P4 prompts with the real tokenizer: time per prompt and memory growth.

P4's system message is new for every instance. The prompter before multi-turn cached one split per
system message (memory grew with every instance) and tokenized each prompt three times; this
measures the current one, and that one (kept in tests/engine/legacy_prefix.py) when present.

    python -m bench.prompter_cost [N]        # N distinct P4 prompts (default 20000)
"""

from __future__ import annotations

import gc
import resource
import sys
import time
import tracemalloc


def measure(make, n: int) -> dict:
    from transformers import AutoTokenizer

    from engine.backends.model_cache import default_model_dir

    chat = make(AutoTokenizer.from_pretrained(default_model_dir()))
    build = getattr(chat, "prompt", None)
    if build is None:  # the old prompter: ids(system, user)
        def build(msgs):
            return chat.ids(msgs[0][1], msgs[1][1])
    user = "Explain how a binary search works, with an example in Python. " * 3
    for i in range(50):  # warm-up
        build([("system", f"warm {i}"), ("user", user)])
    def system(i: int) -> str:
        return f"You are assistant {i}. Be concise and friendly; answer in steps."

    t0 = time.perf_counter()  # time first, without tracemalloc (it slows Python code several-fold)
    for i in range(n):
        build([("system", system(i)), ("user", user)])
    dt = time.perf_counter() - t0
    gc.collect()
    tracemalloc.start()
    base, _ = tracemalloc.get_traced_memory()
    for i in range(n, 2 * n):  # new system messages: what a cache per system message would keep
        build([("system", system(i)), ("user", user)])
    grown, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"prompts": n, "us_per_prompt": round(1e6 * dt / n, 1),
            "heap_growth_mb": round((grown - base) / 2**20, 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main() -> None:
    import json

    from engine.prefix import ChatPrompter

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    out = {"current": measure(ChatPrompter, n)}
    try:
        from tests.engine.legacy_prefix import ChatPrompter as Legacy
    except ImportError:
        pass
    else:
        out["before_multi_turn"] = measure(Legacy, n)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
