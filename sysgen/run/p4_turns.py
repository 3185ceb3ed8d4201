"""P4 over a whole conversation: every assistant turn rewritten, in order, under the new system message.

Turn j's prompt is [system, u1, a1', ..., u(j-1), a(j-1)', uj] (with `--history original`, the
source's answers stand in the history where it has them). Turn j+1 can only be asked once turn j is
answered, so an instance is a chain of requests; the scheduler fills the engine with other instances'
turns meanwhile. With token-id prompts each turn's ids extend the previous prompt plus its answer
(engine/prefix.py), so a prefix-caching engine serves the whole history from cache.

Each turn gets a budget fitted to its original answer. A greedy small model can fall into a
repetition loop; a turn cut at its budget whose tail repeats is resampled once (seeded, so a re-run
asks the same request) before the conversation is dropped.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field, replace

from engine.policy import retry_sampling
from engine.prefix import PromptTooLong
from engine.request import ErrorKind, Request, Result, SamplingParams
from sysgen.datasets.instance import Instance
from sysgen.run.phases import PhaseSettings, PromptBuilder, user_turns


def drop_reason(res: Result) -> str:
    """The drop reason for an engine failure: refused for what the request is, or the engine failed."""
    return "engine_rejected" if res.error_kind is ErrorKind.REJECTED else "engine_error"


LOOP_TAIL = 1500  # characters of a cut answer examined for a loop
LOOP_MIN = 240  # shorter tails are never called loops
LOOP_ZLIB = 0.2  # compressed/raw size under which the tail counts as a loop (prose is ~0.4-0.5)
PARTIAL_REASONS = ("truncated", "loop", "context", "empty_answer")  # --keep-partial keeps turns before these


def looks_like_loop(text: str) -> bool:
    """True when the end of `text` repeats itself: an exact period (the last k characters equal the k
    characters one period earlier, k at least two periods), or a tail that compresses like a loop
    with small variations (counters, alternating lines)."""
    tail = text[-LOOP_TAIL:]
    if len(tail) < LOOP_MIN:
        return False
    for p in range(1, len(tail) // 3 + 1):
        k = max(2 * p, 120)
        if k + p > len(tail):
            break
        if tail[-k:] == tail[-k - p : -p]:
            return True
    raw = tail.encode()
    return len(zlib.compress(raw, 6)) < LOOP_ZLIB * len(raw)


def turn_budget(s: PhaseSettings, original_tokens: int | None) -> int:
    """A multiple of the original answer's tokens, at least --p4-max-tokens (the floor, and the whole
    budget of a turn with no original answer), at most --p4-budget-cap."""
    floor = s.p4_max_tokens
    if original_tokens is None or s.p4_budget_factor <= 0:
        return floor
    return min(max(floor, math.ceil(s.p4_budget_factor * original_tokens)), max(floor, s.p4_budget_cap))


@dataclass
class Turns:
    """What P4 made of one conversation: the new messages (system first), and why it stopped early."""

    messages: list[dict[str, str]]
    original_answers: list[str | None]
    keys: list[str] = field(default_factory=list)
    resampled: list[int] = field(default_factory=list)  # turns whose first answer looped
    user_turns: int = 0
    reason: str = ""  # empty when every turn was answered
    detail: str = ""
    error: Result | None = None  # the engine failure that stopped it

    @property
    def answered(self) -> int:
        return len(self.original_answers)

    @property
    def partial_ok(self) -> bool:
        return self.reason.split("@")[0] in PARTIAL_REASONS and self.answered > 0


async def answer_turns(inst: Instance, system: str, submit, build: PromptBuilder, s: PhaseSettings) -> Turns:
    pairs = user_turns(inst)
    out = Turns([{"role": "system", "content": system}], [], user_turns=len(pairs))
    shown: list[tuple[str, str]] = [("system", system)]  # what the model sees as history
    prompt = None
    for j, (user, original) in enumerate(pairs, 1):
        msgs = shown + [("user", user)]
        try:
            if prompt is None:
                prompt = await build.off_loop(len(system) + len(user), lambda b, m=msgs: b.conversation(m))
            else:
                prompt = await build.off_loop(
                    len(prompt) + len(user), lambda b, p=prompt, m=msgs: b.extend(p, m)
                )
        except PromptTooLong as e:  # known from the text's length, before it is tokenized
            out.reason, out.detail = f"context@turn{j}", str(e)
            return out
        budget = turn_budget(s, build.count_tokens(original) if original is not None else None)
        n_prompt = _ids_len(prompt)
        if n_prompt is not None and s.max_context:
            room = s.max_context - n_prompt
            if room < min(budget, s.p4_max_tokens):
                out.reason = f"context@turn{j}"
                out.detail = f"prompt {n_prompt} tokens, context {s.max_context}"
                return out
            budget = min(budget, room)
        req = Request(
            prompt=prompt,
            sampling=SamplingParams(temperature=s.temperature, max_new_tokens=budget, seed=s.seed),
            model=s.model_id,
            group="p4",
        )
        out.keys.append(req.key.hex())
        res = await submit(req)
        if res.ok and res.finish_reason == "length" and looks_like_loop(res.text):
            out.resampled.append(j)
            req = replace(req, sampling=retry_sampling(req.sampling, 1))
            out.keys[-1] = req.key.hex()
            res = await submit(req)
        if not res.ok:
            kind = drop_reason(res)
            out.reason, out.detail, out.error = f"{kind}@turn{j}", res.error or "", res
            return out
        if res.finish_reason == "length":
            kind = "loop" if j in out.resampled and looks_like_loop(res.text) else "truncated"
            out.reason, out.detail = f"{kind}@turn{j}", res.text[-200:]
            return out
        answer = res.text.strip()
        if not answer:
            out.reason = f"empty_answer@turn{j}"
            return out
        out.messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        out.original_answers.append(original)
        # The history holds the text as generated (not stripped): its ids are what the model produced.
        shown = msgs + [("assistant", res.text if s.history == "new" or original is None else original)]
    return out


def _ids_len(prompt) -> int | None:
    """Tokens in a token-id prompt; None for chat messages (the server counts them)."""
    return len(prompt) if isinstance(prompt, tuple) and prompt and isinstance(prompt[0], int) else None
