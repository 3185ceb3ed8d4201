"""Cost of building P4 prompts with the real tokenizer: time per prompt and memory growth.

P4's system message is new for every instance. The prompter before multi-turn cached one split per
system message (memory grew with every instance) and tokenized each prompt three times; this
measures the current one, and that one (kept in tests/engine/legacy_prefix.py) when present.

    python -m bench.prompter_cost [N]        # N distinct P4 prompts (default 20000)
    python -m bench.prompter_cost --turns 10,100,1000,4000   # conversation-length scaling

`--turns`: seconds to build every turn's prompt of one conversation of T turns as P4 does (the first
turn whole, each later one extending the previous prompt plus its answer), token ids with SmolLM2's
tokenizer; the prompt of the last turn holds about 55 tokens per turn.
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
    return {
        "prompts": n,
        "us_per_prompt": round(1e6 * dt / n, 1),
        "heap_growth_mb": round((grown - base) / 2**20, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def conversation(turns: int) -> dict:
    """One conversation of `turns` turns, every turn's prompt built as P4 builds it."""
    from transformers import AutoTokenizer

    from engine.backends.model_cache import default_model_dir
    from engine.prefix import ChatPrompter

    chat = ChatPrompter(AutoTokenizer.from_pretrained(default_model_dir()))
    msgs = [
        ("system", "You are a careful assistant. Answer in short steps."),
        ("user", "Question 0: what is 0 plus 0? Please explain the steps."),
    ]
    t0 = time.perf_counter()
    ids = chat.prompt(msgs)
    for j in range(1, turns):
        msgs += [
            ("assistant", f"The answer is {2 * j - 2}, because {j - 1} and {j - 1} make {2 * j - 2}."),
            ("user", f"Question {j}: what is {j} plus {j}? Please explain the steps."),
        ]
        ids = chat.extend(ids, msgs)
    dt = time.perf_counter() - t0
    return {
        "turns": turns,
        "seconds": round(dt, 3),
        "ms_per_turn": round(1e3 * dt / turns, 3),
        "last_prompt_tokens": len(ids),
    }


def main() -> None:
    import json

    from engine.prefix import ChatPrompter

    if len(sys.argv) > 2 and sys.argv[1] == "--turns":
        rows = [conversation(int(t)) for t in sys.argv[2].split(",")]
        print(json.dumps(rows, indent=2))
        return
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
