"""Answers for the stand-in engine (engine/backends/standin.py) shaped like a real model's: tagged
P1 messages, P3 verdict lines, P4 answers. For tests and benchmarks only, never for real data."""

from __future__ import annotations

import re

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
        return "".join(f"<{t}>{_PHRASES[t]}</{t}>\n" for t in chosen)
    if request.group == "p3":
        tags = _VERDICT_TAG.findall(request.regex or "") or [
            t for t in TAGS if f"<{t}>" in str(request.prompt)]
        return "".join(f"{t}: {'Bad' if (h >> i) % 7 == 0 else 'Good'}\n" for i, t in enumerate(tags))
    base = "Here is a careful answer that follows the system message. "
    return (base * (answer_chars // len(base) + 1))[:answer_chars]
