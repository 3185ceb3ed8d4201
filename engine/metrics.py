"""Counters the scheduler keeps; derived rates are properties, not stored copies."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from engine.request import Result


@dataclass
class Metrics:
    submitted: int = 0
    hits: int = 0
    deduped: int = 0
    engine_calls: int = 0
    retries: int = 0
    failures: int = 0
    inflight: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    engine_s: float = 0.0
    unreachable: int = 0  # attempts that found no engine listening (they waited, no retry spent)
    shed: int = 0  # attempts the engine answered 429/503 (retried after Retry-After, no retry spent)
    engine_down_s: float = 0.0  # time the engine was unreachable (the breaker open)
    last_failure: str = ""  # the most recent final failure's message, for a run that kept nothing
    by_phase: dict[str, dict[str, int]] = field(default_factory=dict)  # per Request.group
    started: float = field(default_factory=time.monotonic)

    def record(self, result: Result, seconds: float, group: str = "") -> None:
        self.engine_calls += 1
        self.prompt_tokens += result.prompt_tokens
        self.completion_tokens += result.completion_tokens
        self.cached_tokens += result.cached_tokens
        self.engine_s += seconds
        if group:
            g = self.by_phase.get(group)
            if g is None:
                g = self.by_phase[group] = {
                    "engine_calls": 0,
                    "prompt_tokens": 0,
                    "cached_tokens": 0,
                    "completion_tokens": 0,
                }
            g["engine_calls"] += 1
            g["prompt_tokens"] += result.prompt_tokens
            g["cached_tokens"] += result.cached_tokens
            g["completion_tokens"] += result.completion_tokens

    @property
    def misses(self) -> int:
        return self.submitted - self.hits - self.deduped

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    @property
    def output_tokens_per_s(self) -> float:
        return self.completion_tokens / max(self.elapsed_s, 1e-9)

    @property
    def cached_ratio(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("started")
        d.update(
            misses=self.misses,
            elapsed_s=round(self.elapsed_s, 3),
            output_tokens_per_s=round(self.output_tokens_per_s, 2),
            cached_ratio=round(self.cached_ratio, 4),
            engine_down_s=round(self.engine_down_s, 3),
        )
        return d
