"""LLM judges of the new answers: pairwise vs the original (the paper's Fig. 3), asked in both
orders to cancel position bias, and system-message alignment (its Fig. 4).

Requests go through whatever `submit` coroutine the caller gives (the engine's Scheduler in the
CLI, so judgements land in the run's store and a re-run costs nothing); this module builds the
requests, parses the verdicts and counts them.
"""

from __future__ import annotations

import asyncio
import functools
import re
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

import xxhash

from engine.prefix import ChatPrompter
from engine.request import Prompt, Request, Result, SamplingParams, messages_prompt
from sysgen.eval.rundir import message, turn_pairs

Kind = Literal["original_first", "new_first", "alignment"]
PAIRWISE_REGEX = r"(A|B|tie)"
ALIGNMENT_REGEX = r"(yes|no)"
MAX_NEW_TOKENS = 4
ANSWER_CHARS = 6000  # per answer, before the token check shrinks it further to fit the context
Submit = Callable[[Request], Awaitable[Result]]

# A and B only as capitals: a lower-case "a" is the article, not a verdict.
_PAIRWISE_LENIENT = re.compile(r"\b(A|B|(?i:tie))\b")
_ALIGNMENT_LENIENT = re.compile(r"\b(yes|no)\b", re.IGNORECASE)
_SLOT = re.compile(r"\{(instruction|system|answer|answer_a|answer_b)\}")


@dataclass(frozen=True, slots=True)
class Judgement:
    """One judge call's outcome: `verdict` is None when the output could not be parsed or the
    request failed (`error` says which)."""

    id: str
    source: str
    kind: Kind
    verdict: str | None
    raw: str
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "source": self.source,
            "kind": self.kind,
            "verdict": self.verdict,
            "raw": self.raw,
            "error": self.error,
        }


def load_prompt(name: str) -> str:
    """The text of sysgen/prompts/judge_<name>.txt."""
    return resources.files("sysgen.prompts").joinpath(f"judge_{name}.txt").read_text(encoding="utf-8")


def prompt_hash(name: str) -> str:
    return xxhash.xxh3_64_hexdigest(load_prompt(name).encode())


def fill(template: str, **values: str) -> str:
    """Fill {slot}s in one pass, so braces inside the inserted texts are never treated as slots."""
    return _SLOT.sub(lambda m: values[m.group(1)] if m.group(1) in values else m.group(0), template)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "\n[... truncated]"


def to_prompt(messages: list[dict[str, str]], backend: Any) -> Prompt:
    """Token ids through the backend's chat template when it takes ids, else chat messages."""
    tok = getattr(backend, "tokenizer", None)
    if backend.capabilities.token_ids and tok is not None:
        # The judged texts are data: special-token text in them must stay text (engine/prefix.py).
        return _prompter(tok).prompt([(m["role"], m["content"]) for m in messages])
    return messages_prompt(messages)


@functools.lru_cache(maxsize=4)
def _prompter(tokenizer: Any) -> ChatPrompter:
    return ChatPrompter(tokenizer)


def make_request(text: str, backend: Any, regex: str, group: str) -> Request:
    return Request(
        prompt=to_prompt([{"role": "user", "content": text}], backend),
        sampling=SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW_TOKENS),
        model=backend.model_id,
        regex=regex if backend.capabilities.regex else None,
        group=group,
    )


def fitted_request(build: Callable[[int], str], backend: Any, regex: str, group: str) -> Request:
    """Build with answers clipped to ANSWER_CHARS, halving the clip until the prompt fits the
    backend's context (token-id prompts only; text endpoints reject what does not fit)."""
    limit = ANSWER_CHARS
    while True:
        req = make_request(build(limit), backend, regex, group)
        budget = backend.capabilities.max_context - MAX_NEW_TOKENS
        if req.kind != "ids" or req.prompt_len <= budget or limit < 200:
            return req
        limit //= 2


def pairwise_request(instruction: str, answer_a: str, answer_b: str, backend: Any) -> Request:
    template = load_prompt("pairwise")
    return fitted_request(
        lambda n: fill(
            template,
            instruction=_clip(instruction, n),
            answer_a=_clip(answer_a, n),
            answer_b=_clip(answer_b, n),
        ),
        backend,
        PAIRWISE_REGEX,
        "judge_pairwise",
    )


def alignment_request(system: str, instruction: str, answer: str, backend: Any) -> Request:
    template = load_prompt("alignment")
    return fitted_request(
        lambda n: fill(
            template, system=_clip(system, n), instruction=_clip(instruction, n), answer=_clip(answer, n)
        ),
        backend,
        ALIGNMENT_REGEX,
        "judge_alignment",
    )


def parse_pairwise(text: str) -> str | None:
    """ "A", "B" or "tie" from a judge's output; lenient for unconstrained endpoints (the first of
    them standing as a word), None when there is none."""
    m = _PAIRWISE_LENIENT.search(text.strip())
    if not m:
        return None
    word = m.group(1)
    return "tie" if word.lower() == "tie" else word.upper()


def parse_alignment(text: str) -> str | None:
    m = _ALIGNMENT_LENIENT.search(text.strip())
    return m.group(1).lower() if m else None


def select(records: Sequence[dict[str, Any]], limit: int | None) -> list[dict[str, Any]]:
    """The first `limit` records taken round-robin across sources, so every source is judged
    (the paper judged 20 per source); all of them when limit is None."""
    if limit is None or limit >= len(records):
        return list(records)
    queues: dict[str, deque[dict[str, Any]]] = {}
    for rec in records:
        queues.setdefault(str(rec.get("source") or "unknown"), deque()).append(rec)
    out: list[dict[str, Any]] = []
    while len(out) < limit:
        for q in queues.values():
            if q and len(out) < limit:
                out.append(q.popleft())
    return out


Job = tuple[dict[str, Any], Kind, Request]


def _judged(rec: dict[str, Any], pairwise: bool, alignment: bool) -> tuple[str | None, str | None]:
    """(original answer, system message) of a record, each None where its judge does not apply:
    pairwise needs an original answer, alignment a system message."""
    turns = turn_pairs(rec)
    original = turns[0][2] if turns else rec.get("original_answer")
    system = message(rec, "system")
    return (
        original if pairwise and original and original.strip() else None,
        system if alignment and system else None,
    )


def planned_count(records: Iterable[dict[str, Any]], *, pairwise: bool = True, alignment: bool = True) -> int:
    """How many requests iter_plan will build for these records, without building them."""
    n = 0
    for rec in records:
        original, system = _judged(rec, pairwise, alignment)
        n += 2 * (original is not None) + (system is not None)
    return n


def iter_plan(
    records: Iterable[dict[str, Any]], backend: Any, *, pairwise: bool = True, alignment: bool = True
) -> Iterator[Job]:
    """Every judge request for these records, built as they are needed: two pairwise orders when
    there is an original answer, one alignment request when there is a system message."""
    for rec in records:
        user, new = message(rec, "user") or "", message(rec, "assistant") or ""
        original, system = _judged(rec, pairwise, alignment)
        if original is not None:
            yield rec, "original_first", pairwise_request(user, original, new, backend)
            yield rec, "new_first", pairwise_request(user, new, original, backend)
        if system is not None:
            yield rec, "alignment", alignment_request(system, *_whole_conversation(rec, user, new), backend)


def _whole_conversation(rec: dict[str, Any], user: str, new: str) -> tuple[str, str]:
    """(instruction, response) for the alignment judge: a multi-turn record shows every turn, labelled,
    so the judge sees the whole conversation; a single-turn record is unchanged."""
    turns = turn_pairs(rec)
    if len(turns) < 2:
        return user, new
    return (
        "\n\n".join(f"[Turn {j}] {u}" for j, (u, _, _) in enumerate(turns, 1)),
        "\n\n".join(f"[Turn {j}] {a}" for j, (_, a, _) in enumerate(turns, 1)),
    )


def plan(records: Iterable[dict[str, Any]], backend: Any, **kw: bool) -> list[Job]:
    return list(iter_plan(records, backend, **kw))


async def run(jobs: Iterable[Job], submit: Submit, concurrency: int = 256) -> list[Judgement]:
    """Submit jobs with at most `concurrency` awaiting at once (built lazily, so a large run never
    holds every tokenized prompt) and parse each verdict; results in job order."""

    async def one(rec: dict[str, Any], kind: Kind, req: Request) -> Judgement:
        rid, src = str(rec.get("id")), str(rec.get("source") or "unknown")
        result = await submit(req)
        if not result.ok:
            return Judgement(rid, src, kind, None, result.text, error=result.error or "failed")
        verdict = parse_alignment(result.text) if kind == "alignment" else parse_pairwise(result.text)
        return Judgement(rid, src, kind, verdict, result.text, error=None if verdict else "unparseable")

    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    numbered = enumerate(jobs)  # shared by the workers: each takes the next job when free
    done: dict[int, Judgement] = {}

    async def worker() -> None:
        for i, (rec, kind, req) in numbered:
            done[i] = await one(rec, kind, req)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return [done[i] for i in range(len(done))]
