"""The asyncio scheduler: store lookups, in-flight dedupe, a bounded window, retries, timeouts.

Decisions (which waiter goes next, how long to back off, whether to retry) are plain functions
in engine/policy.py; this file does the I/O around them.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field, replace

from engine.backend import Backend, EngineDied, EngineError, RequestRejected
from engine.metrics import Metrics
from engine.policy import backoff_s, pick_group, retry_sampling, window_size
from engine.request import Request, Result
from engine.store import Store

log = logging.getLogger(__name__)


async def _within(aw, timeout_s: float):
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(timeout_s):  # no extra task per request, unlike wait_for() < 3.12
            return await aw
    return await asyncio.wait_for(aw, timeout_s)  # pragma: no cover - Python 3.10


@dataclass(frozen=True)
class SchedulerConfig:
    max_inflight: int | None = None  # engine requests outstanding; None = from backend capacity
    max_retries: int = 3  # engine errors and timeouts
    length_retries: int = 1  # constrained outputs cut at max_new_tokens
    timeout_s: float = 600.0  # per request attempt
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    retry_stored_failures: bool = False  # treat failures found in the store as misses

    def __post_init__(self) -> None:
        if self.max_inflight is not None and self.max_inflight < 1:
            raise ValueError(f"max_inflight must be >= 1, got {self.max_inflight}")
        if self.max_retries < 0 or self.length_retries < 0:
            raise ValueError("retry counts must be >= 0")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")


@dataclass
class _Gate:
    """A window of `size` slots; waiters queue per group and are released group-by-group."""

    size: int
    used: int = 0
    waiting: dict[str, deque[asyncio.Future]] = field(default_factory=lambda: defaultdict(deque))
    last_group: str | None = None

    async def acquire(self, group: str) -> None:
        if self.used < self.size and not any(self.waiting.values()):
            self.used += 1
            self.last_group = group
            return
        fut = asyncio.get_running_loop().create_future()
        self.waiting[group].append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # slot was handed to us as we were cancelled: pass it on
            elif fut in self.waiting[group]:
                self.waiting[group].remove(fut)
            raise

    def release(self) -> None:
        self.used -= 1
        while self.used < self.size:
            sizes = {g: len(q) for g, q in self.waiting.items() if q}
            if not sizes:
                return
            group = pick_group(sizes, self.last_group)
            fut = self.waiting[group].popleft()
            if fut.cancelled():
                continue
            self.used += 1
            self.last_group = group
            fut.set_result(None)


class Scheduler:
    """`async with Scheduler(backend, store) as s: result = await s.submit(request)`.

    submit() never raises for a failed request: the failure comes back as a Result with `error`
    set and is stored. It raises only EngineDied (the run cannot go on) and CancelledError."""

    def __init__(self, backend: Backend, store: Store | None = None, config: SchedulerConfig | None = None,
                 **overrides) -> None:
        self.backend = backend
        self.store = store
        self.config = replace(config or SchedulerConfig(), **overrides)
        self.window = self.config.max_inflight or window_size(backend.capabilities.max_running)
        self._gate = _Gate(self.window)
        self._pending: dict[bytes, asyncio.Future] = {}
        self.metrics = Metrics()

    async def __aenter__(self) -> Scheduler:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def submit(self, request: Request) -> Result:
        m = self.metrics
        m.submitted += 1
        if self.store is not None:
            hit = self.store.get(request.key)
            if hit is not None and (hit.ok or not self.config.retry_stored_failures):
                m.hits += 1
                return hit
        shared = self._pending.get(request.key)
        if shared is not None:
            m.deduped += 1
            return await asyncio.shield(shared)
        fut = asyncio.get_running_loop().create_future()
        self._pending[request.key] = fut
        try:
            result = await self._run(request)
            if self.store is not None:
                self.store.put(request.key, result)
            fut.set_result(result)
            return result
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # mark retrieved: followers re-raise it themselves
            raise
        finally:
            del self._pending[request.key]

    async def _run(self, request: Request) -> Result:
        cfg, m = self.config, self.metrics
        attempt, length_tries, current = 0, 0, request
        while True:
            attempt += 1
            await self._gate.acquire(request.group)
            m.inflight += 1
            t0 = time.perf_counter()
            try:
                result = await _within(self.backend.generate(current), cfg.timeout_s)
            except EngineDied:
                raise
            except RequestRejected as e:
                m.failures += 1
                return Result.failure(f"rejected: {e}", attempt)
            except (EngineError, asyncio.TimeoutError) as e:
                timed_out = isinstance(e, asyncio.TimeoutError)
                reason = f"timeout after {cfg.timeout_s:g}s" if timed_out else str(e)
                if isinstance(e, EngineError) and not e.retryable:
                    m.failures += 1
                    return Result.failure(f"engine error: {reason}", attempt)
                if attempt > cfg.max_retries:
                    m.failures += 1
                    return Result.failure(f"gave up after {attempt} attempts: {reason}", attempt)
                m.retries += 1
                log.warning("request %s attempt %d failed (%s); retrying", request.key.hex()[:8], attempt,
                            reason)
                await asyncio.sleep(backoff_s(attempt, cfg.backoff_base_s, cfg.backoff_max_s))
                continue
            finally:
                m.inflight -= 1
                self._gate.release()
            m.record(result, time.perf_counter() - t0, request.group)
            result.attempts = attempt
            if request.regex and result.finish_reason == "length" and length_tries < cfg.length_retries:
                length_tries += 1
                m.retries += 1
                current = replace(request, sampling=retry_sampling(request.sampling, length_tries))
                continue
            return result
