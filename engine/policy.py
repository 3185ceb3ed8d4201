"""Scheduling decisions as plain functions over plain data (no I/O, testable without an engine)."""

from __future__ import annotations

import random
from dataclasses import replace

from engine.request import SamplingParams

# SGLang's `lpm` policy reorders by longest prefix match only while its waiting queue holds at most
# 128 requests; past that it falls back to FCFS. Keep the engine busy (its running capacity) plus a
# margin small enough that the waiting queue stays under that limit.
LPM_WAITING_LIMIT = 128


def window_size(max_running: int, margin: float = 0.25) -> int:
    """Requests to keep outstanding: the engine's running capacity plus a bounded margin."""
    extra = min(LPM_WAITING_LIMIT // 2, max(2, int(max_running * margin)))
    return max(1, max_running) + extra


def pick_group(waiting: dict[str, int], last: str | None) -> str:
    """Next group to release a waiter from: stay on the current template while it has waiters (so
    the engine sees runs sharing a prefix), else the group with most waiters."""
    if last is not None and waiting.get(last):
        return last
    return max(waiting, key=lambda g: (waiting[g], g))


def backoff_s(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**(attempt-1))]."""
    r = (rng or random).random()
    return r * min(cap, base * 2 ** (attempt - 1))


def retry_sampling(sampling: SamplingParams, try_no: int) -> SamplingParams:
    """A constrained output ran out of tokens. Greedy decoding would repeat it exactly, so the retry
    samples (deterministically seeded) to leave the loop it was stuck in."""
    return replace(sampling, temperature=max(sampling.temperature, 0.7), seed=sampling.seed + 1000 * try_no)


def probe_delay_s(n: int, base: float, cap: float) -> float:
    """Wait before the n-th probe of an unreachable engine: doubling from `base` up to `cap`."""
    return min(cap, base * 2 ** (n - 1))


def shed_delay_s(retry_after: float | None, n: int, base: float, cap: float) -> float:
    """Wait after the n-th load-shedding answer (429/503) to one request: the server's Retry-After
    when it gave one, else jittered exponential backoff."""
    return retry_after if retry_after is not None else backoff_s(n, base, cap)


class Streak:
    """Consecutive final failures of one kind, across all requests; any success resets it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit  # 0 = never stop
        self.kind: str | None = None
        self.count = 0

    def success(self) -> None:
        self.kind, self.count = None, 0

    def failure(self, kind: str) -> bool:
        """Record a failure; True when the last `limit` failures were all of this kind."""
        self.count = self.count + 1 if kind == self.kind else 1
        self.kind = kind
        return bool(self.limit) and self.count >= self.limit
