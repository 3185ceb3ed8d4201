"""The four phases as plain functions: build each phase's Request, interpret its Result.

Every prompt puts the shared template first (the system turn, identical bytes for every instance,
so the engine's prefix cache reuses it) and the instance's text last.
"""

from __future__ import annotations

import asyncio
import copy
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from engine.prefix import ChatPrompter
from engine.request import Prompt, Request, SamplingParams, messages_prompt
from sysgen import copies, prompts, tags
from sysgen.config import default
from sysgen.datasets.instance import Instance

T = TypeVar("T")
OFF_LOOP_SIZE = 100_000  # characters (or prompt ids) from which a prompt is built off the event loop
_SPEAKER = {"system": "System", "user": "User", "assistant": "Assistant"}


@dataclass(frozen=True)
class PhaseSettings:
    """What the phases need of the run configuration (same names and defaults: sysgen/config.py
    says what each means; sysgen/run/plan.py derives these from it) and of the backend."""

    model_id: str
    constrain: bool = default("constrain")
    p1_max_tokens: int = default("p1_max_tokens")
    p3_max_tokens: int = default("p3_max_tokens")
    p4_max_tokens: int = default("p4_max_tokens")
    temperature: float = default("temperature")
    seed: int = default("seed")
    max_turn_chars: int = default("max_turn_chars")
    turns: str = default("turns")  # "first": the paper's single-turn P4, exactly as before multi-turn
    history: str = default("history")
    keep_partial: bool = default("keep_partial")
    p4_budget_factor: float = default("p4_budget_factor")
    p4_budget_cap: int = default("p4_budget_cap")
    max_context: int = 0  # prompt + answer tokens the engine takes; 0 = unknown
    p3_context: str = default("p3_context")  # "continue", "chat": P3 is the next turn of P1's chat
    keep_copies: bool = default("keep_copies")  # P2 marks phrases copied from the P1 examples, not drops


class PromptThread:
    """One daemon thread that builds prompts in order. A daemon, unlike a ThreadPoolExecutor's
    worker, never holds the process at exit: a signal stops the run in seconds even while a huge
    prompt is half tokenized (its result is simply dropped)."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._work, name="sysgen-prompts", daemon=True).start()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._jobs.put((loop, fut, fn, args))
        return await fut

    def close(self) -> None:
        self._jobs.put(None)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            loop, fut, fn, args = job
            if fut.cancelled():  # its instance was cancelled (a signal) before the thread got to it
                continue
            try:
                result, error = fn(*args), None
            except Exception as e:  # handed to the awaiting instance, which knows what to do with it
                result, error = None, e
            try:
                loop.call_soon_threadsafe(_settle, fut, result, error)
            except RuntimeError:  # the loop is closed: the run ended meanwhile
                return


def _settle(fut: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if fut.cancelled():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


class PromptBuilder:
    """Turns chats into the prompt form the backend takes: token ids when it has a tokenizer
    (templates tokenized once, data always plain text), else chat messages. `max_context`: the
    engine's context in tokens (0 = unknown); a prompt surely longer raises PromptTooLong before it
    is tokenized."""

    def __init__(self, tokenizer: Any | None, max_context: int = 0) -> None:
        self.chat = ChatPrompter(tokenizer, max_context) if tokenizer is not None else None
        self._far: PromptBuilder | None = None  # its twin for the prompt thread
        self._thread: PromptThread | None = None

    async def off_loop(self, size: int, fn: Callable[[PromptBuilder], T]) -> T:
        """fn(builder): on the event loop with this builder when `size` (characters or ids of the
        conversation) is small; else in the prompt thread with a twin builder that owns a copy of
        the tokenizer, so a long conversation never stalls the other instances or a signal. (One
        tokenizer is never shared by two threads: a call flips its split-special-tokens switch,
        which another thread's call would then read.)"""
        if self.chat is None or size < OFF_LOOP_SIZE:
            return fn(self)
        if self._thread is None:
            self._far = PromptBuilder(copy.deepcopy(self.chat.tokenizer), self.chat.max_tokens)
            self._thread = PromptThread()
        return await self._thread.run(fn, self._far)

    def close(self) -> None:
        if self._thread is not None:
            self._thread.close()

    def __call__(self, system: str | None, user: str) -> Prompt:
        """A prompt whose system text is one of our shared templates (P1, P3)."""
        if self.chat is not None:
            return self.chat.ids(system, user)
        msgs = ([{"role": "system", "content": system}] if system is not None else []) + [
            {"role": "user", "content": user}
        ]
        return messages_prompt(msgs)

    def conversation(self, messages: Sequence[tuple[str, str]]) -> Prompt:
        """A conversation ending with a user turn, nothing cached (P4: a new system message each time)."""
        if self.chat is not None:
            return self.chat.prompt(messages)
        return messages_prompt([{"role": r, "content": c} for r, c in messages])

    def extend(self, prev: Prompt, messages: Sequence[tuple[str, str]]) -> Prompt:
        """The next turn's prompt; with token ids it extends `prev` + the last answer exactly."""
        if self.chat is not None and isinstance(prev, tuple) and (not prev or isinstance(prev[0], int)):
            return self.chat.extend(prev, messages)
        return self.conversation(messages)

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` (about a quarter of its characters without a tokenizer); past the context,
        a lower bound read from its length (a budget is capped below the context anyway)."""
        if self.chat is not None:
            least = self.chat.least_tokens(text)
            if self.chat.max_tokens and least > self.chat.max_tokens:
                return least
            return len(self.chat.encode_data([text])[0])
        return len(text) // 4 + 1


def user_turns(inst: Instance) -> list[tuple[str, str | None]]:
    """(user text, original answer or None) per user turn, in order: prompt-only conversations have
    None where the source has no assistant turn (at the end, or between two user turns)."""
    pairs: list[tuple[str, str | None]] = []
    for t in inst.turns:
        if t.role == "user":
            pairs.append((t.content, None))
        elif t.role == "assistant" and pairs and pairs[-1][1] is None:
            pairs[-1] = (pairs[-1][0], t.content)
    return pairs


def show_conversation(inst: Instance, max_chars: int) -> str:
    """The conversation as P1 sees it. The source's own system turn is left out: P1 writes a new one."""
    lines = []
    for t in inst.turns:
        if t.role == "system":
            continue
        text = t.content if len(t.content) <= max_chars else t.content[:max_chars] + " [...]"
        lines.append(f"{_SPEAKER[t.role]}: {text}")
    return "\n\n".join(lines)


def _sampling(s: PhaseSettings, max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=s.temperature, max_new_tokens=max_tokens, seed=s.seed)


def p1_user_text(inst: Instance, s: PhaseSettings) -> str:
    return prompts.load("p1_user").format(conversation=show_conversation(inst, s.max_turn_chars))


def p1_system(s: PhaseSettings) -> str:
    """P1's system turn. `--p3-context chat` adds P3's instructions to it, so the shared cached
    prefix holds both phases' templates and P3 can continue P1's chat with only the message to judge."""
    if s.p3_context == "chat":
        return f"{prompts.load('p1_generate')}\n\n{prompts.load('p3_chat_system')}{prompts.load('p3_verify')}"
    return prompts.load("p1_generate")


def p1_examples() -> copies.Examples:
    """The worked examples of the P1 prompt in use: P2 drops phrases that copy them."""
    return copies.examples(prompts.load("p1_generate"))


def p2_filter(p1_text: str, s: PhaseSettings) -> tags.Filtered:
    return tags.filter_tags(p1_text, p1_examples(), s.keep_copies)


def p1_request(inst: Instance, build: PromptBuilder, s: PhaseSettings) -> Request:
    user = p1_user_text(inst, s)
    return Request(
        prompt=build(p1_system(s), user),
        sampling=_sampling(s, s.p1_max_tokens),
        model=s.model_id,
        regex=tags.p1_regex() if s.constrain else None,
        group="p1",
    )


@dataclass(frozen=True)
class P1Turn:
    """What `--p3-context continue|chat` needs of P1: its prompt as sent, its user text, its raw answer."""

    prompt: Prompt
    user: str
    answer: str


def p3_request(
    filtered: tags.Filtered, build: PromptBuilder, s: PhaseSettings, p1: P1Turn | None = None
) -> Request:
    """`standalone`: the P3 template as system turn, the message as user turn. `continue` and `chat`
    (with `p1`): the next turn of P1's chat, [P1 system, P1 user, P1's raw answer, P3's turn], so a
    prefix cache that keeps P1's prompt + answer (SGLang's radix cache) serves all of P1's part. The
    self-model judge then sees the conversation its tags were written for."""
    present = list(filtered.tags)
    # Constrained, the answer is a fixed form: budget exactly enough for its longest spelling.
    budget = tags.p3_token_bound(present) if s.constrain else s.p3_max_tokens
    if s.p3_context != "standalone" and p1 is not None:
        prompt = build.extend(
            p1.prompt,
            [
                ("system", p1_system(s)),
                ("user", p1.user),
                ("assistant", p1.answer),
                ("user", _p3_turn(filtered, s, p1)),
            ],
        )
    else:
        prompt = build(prompts.load("p3_verify"), _p3_user(filtered))
    return Request(
        prompt=prompt,
        sampling=_sampling(s, budget),
        model=s.model_id,
        regex=tags.p3_regex(present) if s.constrain else None,
        group="p3",
    )


def _p3_user(filtered: tags.Filtered) -> str:
    """The standalone P3 user turn: the filtered and the annotated message."""
    return prompts.load("p3_user").format(
        filtered=tags.strip_tags(filtered.tags), annotated=filtered.render()
    )


def _p3_turn(filtered: tags.Filtered, s: PhaseSettings, p1: P1Turn) -> str:
    """P3's turn in P1's chat. `continue`: the same instruction text as standalone, after one joining
    line saying it is a new task. `chat`: P3's instructions are already in P1's system turn, and the
    annotated message is P1's answer just above unless P2 changed it (dropped or reordered tags):
    only then is it repeated."""
    if s.p3_context == "continue":
        return f"Now a new task.\n\n{prompts.load('p3_verify')}\n\n{_p3_user(filtered)}"
    annotated = filtered.render()
    if annotated.strip() == p1.answer.strip():
        annotated = "(the tagged system message you wrote above)"
    return prompts.load("p3_chat_user").format(filtered=tags.strip_tags(filtered.tags), annotated=annotated)


def p4_request(inst: Instance, system_message: str, build: PromptBuilder, s: PhaseSettings) -> Request:
    """`--turns first`: the paper's single-turn P4 (the same request as before multi-turn)."""
    prompt = build.conversation([("system", system_message), ("user", inst.first_user)])
    return Request(
        prompt=prompt, sampling=_sampling(s, s.p4_max_tokens), model=s.model_id, regex=None, group="p4"
    )
