"""One sequence being decoded by the hf backend, and the per-step choice of next tokens for a batch.

Kept free of the model so the stop/finish rules are plain code over plain data.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import torch
import xgrammar as xgr

from engine.backend import EngineError, TransientEngineError
from engine.request import FinishReason, Request, Result


@dataclass(eq=False, slots=True)
class Row:
    request: Request
    ids: tuple[int, ...]  # prompt token ids
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    matcher: xgr.GrammarMatcher | None = None
    generator: torch.Generator | None = None  # None: greedy
    out: list[int] = field(default_factory=list)
    n_real: int = 0  # this row's tokens in the batch KV (the rest of its KV row is padding)
    cached: int = 0  # prompt tokens whose KV came from the prefix cache
    stop_window: int = 0  # generated tokens to decode when looking for a stop string

    @classmethod
    def make(cls, request: Request, ids: tuple[int, ...], grammar: xgr.CompiledGrammar | None,
             future: asyncio.Future, loop: asyncio.AbstractEventLoop) -> Row:
        s = request.sampling
        gen = torch.Generator().manual_seed(s.seed) if s.temperature > 0 else None
        # Every token decodes to at least one character (byte tokens to a partial one, hence +2), so
        # a stop string ending in the newest token lies within this many newest tokens.
        window = max((len(x) for x in s.stop), default=0) + 2 if s.stop else 0
        return cls(request, ids, future, loop, xgr.GrammarMatcher(grammar) if grammar else None, gen,
                   stop_window=window)

    @property
    def abandoned(self) -> bool:
        # Read across threads without a lock: a stale answer only costs one extra decode step.
        return self.future.done()

    def accept(self, token: int, eos_ids: frozenset[int], tokenizer: Any) -> FinishReason | None:
        """Record the chosen token; the finish reason if this row is now done."""
        self.out.append(token)
        if self.matcher is not None:
            if not self.matcher.accept_token(token):
                raise TransientEngineError(f"grammar matcher rejected token {token} it had allowed",
                                           self.request)
            if self.matcher.is_terminated():
                return "stop"
        elif token in eos_ids:
            return "stop"
        if self.stop_window:
            tail = tokenizer.decode(self.out[-self.stop_window :], skip_special_tokens=True)
            if any(s in tail for s in self.request.sampling.stop):
                return "stop"
        if len(self.out) >= self.request.sampling.max_new_tokens:
            return "length"
        return None

    def result(self, finish: FinishReason, eos_ids: frozenset[int], tokenizer: Any) -> Result:
        ids = self.out[:-1] if self.out and self.out[-1] in eos_ids else self.out
        text = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        cuts = [i for i in (text.find(s) for s in self.request.sampling.stop) if i >= 0]
        if cuts:
            text, finish = text[: min(cuts)], "stop"
        return Result(text=text, finish_reason=finish, prompt_tokens=len(self.ids),
                      completion_tokens=len(self.out), cached_tokens=self.cached)

    def resolve(self, result: Result | None = None, error: EngineError | None = None) -> None:
        """Hand the outcome to the awaiting coroutine on its own event loop."""
        try:
            self.loop.call_soon_threadsafe(_settle, self.future, result, error)
        except RuntimeError:  # that loop is closed: nobody is waiting any more
            pass


def _settle(fut: asyncio.Future, result: Result | None, error: BaseException | None) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


class TokenChooser:
    """Masks (grammar), then picks (greedy or seeded top-p sampling) the next token of every row."""

    def __init__(self, max_batch: int, logits_width: int) -> None:
        self.bitmask = xgr.allocate_token_bitmask(max_batch, logits_width)
        self.batch_matcher = xgr.BatchGrammarMatcher()

    def choose(self, rows: list[Row], logits: torch.Tensor) -> list[int]:
        """`logits` is (len(rows), vocab) float32; it is modified in place."""
        constrained = [i for i, r in enumerate(rows) if r.matcher is not None]
        if constrained:
            matchers = [rows[i].matcher for i in constrained]
            self.batch_matcher.batch_fill_next_token_bitmask(matchers, self.bitmask, constrained)
            xgr.apply_token_bitmask_inplace(logits, self.bitmask, vocab_size=logits.shape[-1],
                                            indices=constrained)
        tokens = logits.argmax(dim=-1).tolist()
        for i, row in enumerate(rows):
            if row.generator is not None:
                tokens[i] = _sample(logits[i], row.request.sampling.temperature,
                                    row.request.sampling.top_p, row.generator)
        return tokens


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        # Keep the smallest head whose mass reaches top_p (the first token always stays).
        sorted_p[(sorted_p.cumsum(0) - sorted_p) >= top_p] = 0.0
        return int(order[torch.multinomial(sorted_p, 1, generator=gen)])
    return int(torch.multinomial(probs, 1, generator=gen))
