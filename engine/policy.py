"""Scheduling decisions as plain functions over plain data (no I/O, testable without an engine)."""

from __future__ import annotations

import random
from dataclasses import replace

from engine.request import SamplingParams

# SGLang's `lpm` policy reorders by longest prefix match only while its waiting queue holds at most
# 128 requests; past that it falls back to FCFS (sglang 0.5.23 managers/schedule_policy.py,
# WAITING_QUEUE_PREFIX_MATCH_MAX). Each data-parallel rank has its own scheduler and queue, so the
# limit is per rank. Keep every rank busy (what it really runs) plus a margin small enough that its
# waiting queue stays under that limit.
LPM_WAITING_LIMIT = 128


def window_size(max_running: int, margin: float = 0.25) -> int:
    """Requests to keep outstanding: the engine's running capacity plus a bounded margin."""
    extra = min(LPM_WAITING_LIMIT // 2, max(2, int(max_running * margin)))
    return max(1, max_running) + extra


def rank_running(max_running: int, kv_tokens: int = 0, tokens_per_request: float | None = None) -> int:
    """Requests one SGLang scheduler (one DP rank) actually runs at once. SGLang admits a request
    only while its tokens fit in the free KV cache, so with long prompts or answers a rank runs
    fewer than max_running_requests; the rest would wait. A request holds its unshared prompt
    tokens plus its answer (the shared prefix is stored once in the radix cache)."""
    running = max(1, max_running)
    if kv_tokens > 0 and tokens_per_request and tokens_per_request > 0:
        running = min(running, max(1, int(kv_tokens // tokens_per_request)))
    return running


def engine_window(
    max_running: int,
    dp_size: int = 1,
    kv_tokens: int = 0,
    tokens_per_request: float | None = None,
    margin: float = 0.25,
) -> int:
    """Outstanding requests for an engine of `dp_size` ranks running `max_running` in total, each
    rank with `kv_tokens` of KV cache (0 = unknown): per rank what it runs plus a margin that keeps
    its own waiting queue under LPM_WAITING_LIMIT, summed over ranks (SGLang's DP controller spreads
    requests over the ranks)."""
    dp = max(1, dp_size)
    per_rank = rank_running(max(1, max_running // dp), kv_tokens, tokens_per_request)
    return dp * window_size(per_rank, margin)


def tokens_per_request(
    prompt_tokens: int, cached_tokens: int, completion_tokens: int, calls: int
) -> float | None:
    """Mean KV tokens one request holds at its end: unshared prompt tokens plus answer."""
    if calls <= 0:
        return None
    return max(1.0, (prompt_tokens - cached_tokens + completion_tokens) / calls)


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
    samples, with a derived seed, to leave the loop it was stuck in. The seed makes the retry
    reproducible on the CPU backend; SGLang honours it only with enable_deterministic_inference,
    which we keep off (it costs throughput), so there the retry's text varies run to run (the
    store keeps the first answer, so a resumed run is stable anyway)."""
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
