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

from engine.backend import (
    Backend,
    ContentFiltered,
    EngineDied,
    EngineDown,
    EngineError,
    EngineOverloaded,
    EngineUnreachable,
    FailureStreak,
    RequestRejected,
)
from engine.breaker import Breaker
from engine.canary import ConstraintCanary, FirstFailures, FirstRequestsFailed
from engine.metrics import Metrics
from engine.policy import (
    Streak,
    backoff_s,
    engine_window,
    pick_group,
    retry_sampling,
    shed_delay_s,
    tokens_per_request,
)
from engine.request import ErrorKind, Request, Result
from engine.store import Store

log = logging.getLogger(__name__)

RESIZE_EVERY = 256  # engine calls between window re-sizings from observed request sizes
FIRST_RESIZE = 32  # the first one comes sooner: a window sized for the engine's ceiling shrinks early


class _Deadlines:
    """Per-attempt timeouts with one timer for all of them. Every attempt gets the same timeout, so
    deadlines arrive in order: an insertion-ordered dict of live attempts, and one sweeper task
    that wakes every `tick` and cancels the expired ones at the front (as asyncio.timeout does,
    the cancellation becomes a TimeoutError in the attempt). asyncio.timeout() per attempt (an
    object and a timer handle each) was ~10% of the event loop's time. Deadlines fire up to one
    tick late (tick = timeout / 10, at most 1 s). The sweeper stops a tick after the last attempt."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.tick = min(1.0, timeout_s / 10)
        self._live: dict[int, tuple] = {}  # id -> (deadline, task, task.cancelling() at start)
        self._fired: set[int] = set()
        self._next = 0
        self._sweeper: asyncio.Task | None = None

    async def run(self, aw):
        """Await `aw` within the timeout, from the task that will be cancelled if it expires."""
        task = asyncio.current_task()
        self._next = key = self._next + 1
        cancelling = task.cancelling()
        self._live[key] = (time.monotonic() + self.timeout_s, task, cancelling)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        try:
            return await aw
        except asyncio.CancelledError:
            if key in self._fired and task.uncancel() <= cancelling:  # ours, not a cancel from outside
                raise asyncio.TimeoutError from None
            raise
        finally:
            del self._live[key]
            if self._fired:
                self._fired.discard(key)

    async def _sweep(self) -> None:
        try:
            while self._live:
                await asyncio.sleep(self.tick)
                now = time.monotonic()
                for key, (deadline, task, _) in self._live.items():
                    if deadline > now:
                        break
                    if key not in self._fired:
                        self._fired.add(key)
                        task.cancel()
        finally:
            self._sweeper = None


async def _within(aw, timeout_s: float):  # pragma: no cover - Python 3.10 (no Task.uncancel)
    return await asyncio.wait_for(aw, timeout_s)


@dataclass(frozen=True)
class SchedulerConfig:
    max_inflight: int | None = None  # engine requests outstanding; None = from backend capacity
    max_retries: int = 3  # engine errors and timeouts
    length_retries: int = 1  # constrained outputs cut at max_new_tokens
    timeout_s: float = 600.0  # per request attempt
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    retry_stored_failures: bool = False  # treat failures found in the store as misses
    # How long the engine may stay unreachable (or keep shedding load with 429/503) before the run
    # stops, resumable; meanwhile requests wait instead of spending retries.
    engine_down_s: float = 600.0
    probe_max_s: float = 5.0  # longest wait between probes: the run resumes at most this late
    # Stop the run when this many final failures in a row are of one kind (0 = never): a broken
    # engine or a wrong setting would otherwise drop the rest of the input one request at a time.
    failure_streak: int = 25
    # Stop sooner at the start: this many final failures of one kind before any request succeeded.
    first_failures: int = 5
    # Check the first constrained answers against their regex (engine/canary.py).
    constraint_canary: bool = True

    def __post_init__(self) -> None:
        if self.max_inflight is not None and self.max_inflight < 1:
            raise ValueError(f"max_inflight must be >= 1, got {self.max_inflight}")
        if self.max_retries < 0 or self.length_retries < 0:
            raise ValueError("retry counts must be >= 0")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.engine_down_s <= 0:
            raise ValueError(f"engine_down_s must be > 0, got {self.engine_down_s}")
        if self.failure_streak < 0 or self.first_failures < 0:
            raise ValueError("failure_streak and first_failures must be >= 0")


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

    def resize(self, size: int) -> None:
        """A smaller window takes effect as requests finish; a larger one releases waiters now."""
        self.size = size
        self.used += 1
        self.release()


class Scheduler:
    """`async with Scheduler(backend, store) as s: result = await s.submit(request)`.

    submit() never raises for a failed request: the failure comes back as a Result with `error`
    and `error_kind` set and is stored. It raises only EngineDied (the run cannot go on: the engine
    is gone, stayed unreachable past `engine_down_s`, refused our credentials, the last
    `failure_streak` requests all failed the same way, the run's first `first_failures` did before
    anything succeeded, or the first constrained answers do not match their regex: see
    engine/canary.py) and CancelledError."""

    def __init__(
        self, backend: Backend, store: Store | None = None, config: SchedulerConfig | None = None, **overrides
    ) -> None:
        self.backend = backend
        self.store = store
        self.config = replace(config or SchedulerConfig(), **overrides)
        caps = backend.capabilities
        self.window = self.config.max_inflight or engine_window(caps.max_running, caps.dp_size)
        self._gate = _Gate(self.window)
        # With the engine's KV-cache size known, the window follows what the engine can really run
        # given the requests' observed sizes (re-sized every RESIZE_EVERY engine calls).
        self._resize_from = (0, 0, 0, 0) if self.config.max_inflight is None and caps.kv_tokens > 0 else None
        self._pending: dict[bytes, asyncio.Future | None] = {}
        self._deadlines = _Deadlines(self.config.timeout_s) if sys.version_info >= (3, 11) else None
        self.metrics = Metrics()
        self.breaker = Breaker(
            self.config.engine_down_s,
            self.config.backoff_base_s,
            self.config.probe_max_s,
            ping=getattr(backend, "ping", None),  # a cheap probe where the backend has one
        )
        self._streak = Streak(self.config.failure_streak)
        self._first = FirstFailures(self.config.first_failures)
        url = getattr(backend, "base_url", None)  # the HTTP backends': the message names the server
        where = f"{backend.name} at {url}" if url else backend.name
        # A backend without regex support runs unconstrained (callers parse leniently): nothing to check.
        self._canary = ConstraintCanary(where) if self.config.constraint_canary and caps.regex else None

    async def __aenter__(self) -> Scheduler:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.breaker.close()

    async def submit(self, request: Request) -> Result:
        m = self.metrics
        m.submitted += 1
        if self.store is not None:
            hit = self.store.get(request.key)
            if hit is not None and (hit.ok or not self.config.retry_stored_failures):
                m.hits += 1
                return hit
        pending = self._pending
        if request.key in pending:
            m.deduped += 1
            shared = pending[request.key]
            if shared is None:  # the first follower makes the future the leader will resolve
                shared = pending[request.key] = asyncio.get_running_loop().create_future()
            return await asyncio.shield(shared)
        pending[request.key] = None  # no future until someone waits: nearly every request is alone
        try:
            result = await self._run(request)
            if self.store is not None:
                self.store.put(request.key, result)
            fut = pending.pop(request.key)
            if fut is not None:
                fut.set_result(result)
            return result
        except BaseException as e:
            fut = pending.pop(request.key, None)
            if fut is not None:
                fut.set_exception(e)
                fut.exception()  # mark retrieved: followers re-raise it themselves
            raise

    async def _run(self, request: Request) -> Result:
        cfg, m = self.config, self.metrics
        attempt, length_tries, shed, current = 0, 0, 0, request
        shed_since: float | None = None
        while True:
            await self.breaker.admit()  # waits while the engine is unreachable
            await self._gate.acquire(request.group)
            m.inflight += 1
            t0 = time.perf_counter()
            error: EngineError | asyncio.TimeoutError | None = None
            try:
                if self._deadlines is not None:
                    result = await self._deadlines.run(self.backend.generate(current))
                else:
                    result = await _within(self.backend.generate(current), cfg.timeout_s)
            except EngineDied:
                raise
            except (EngineError, asyncio.TimeoutError) as e:
                error = e
            finally:
                m.inflight -= 1
                self._gate.release()
            self._sync_metrics()
            if isinstance(error, EngineUnreachable):  # no retry spent: wait for the engine instead
                m.unreachable += 1
                self.breaker.trip(error)
                continue
            if not isinstance(error, asyncio.TimeoutError):
                self.breaker.reached()
            if isinstance(error, EngineOverloaded):  # load shedding: wait as told, no retry spent
                shed += 1
                m.shed += 1
                now = time.monotonic()
                shed_since = shed_since or now
                if now - shed_since > cfg.engine_down_s:
                    raise EngineDown(
                        f"the engine kept shedding load for {cfg.engine_down_s:g}s ({error}); "
                        "the run stops here with nothing dropped: re-run the same command to "
                        "resume once it has capacity (or raise --engine-down-s)"
                    )
                await asyncio.sleep(
                    shed_delay_s(error.retry_after_s, shed, cfg.backoff_base_s, cfg.backoff_max_s)
                )
                continue
            attempt += 1
            if error is not None:
                timed_out = isinstance(error, asyncio.TimeoutError)
                reason = f"timeout after {cfg.timeout_s:g}s" if timed_out else str(error)
                if isinstance(error, RequestRejected):
                    return self._failed(f"rejected: {error}", attempt, error, ErrorKind.REJECTED)
                if not isinstance(error, asyncio.TimeoutError) and not error.retryable:
                    return self._failed(f"engine error: {reason}", attempt, error, ErrorKind.ENGINE)
                if attempt > cfg.max_retries:
                    return self._failed(
                        f"gave up after {attempt} attempts: {reason}", attempt, error, ErrorKind.GAVE_UP
                    )
                m.retries += 1
                log.warning(
                    "request %s attempt %d failed (%s); retrying", request.key.hex()[:8], attempt, reason
                )
                await asyncio.sleep(backoff_s(attempt, cfg.backoff_base_s, cfg.backoff_max_s))
                continue
            m.record(result, time.perf_counter() - t0, request.group)
            self._streak.success()
            self._first.success()
            if self._canary is not None and request.regex and result.finish_reason == "stop":
                self._canary.check(request.regex, result.text)
            if self._resize_from is not None and (
                m.engine_calls % RESIZE_EVERY == 0 or m.engine_calls == FIRST_RESIZE
            ):
                self._resize_window()
            result.attempts = attempt
            if request.regex and result.finish_reason == "length" and length_tries < cfg.length_retries:
                length_tries += 1
                m.retries += 1
                current = replace(request, sampling=retry_sampling(request.sampling, length_tries))
                continue
            return result

    def _failed(
        self, reason: str, attempt: int, error: EngineError | asyncio.TimeoutError, kind: ErrorKind
    ) -> Result:
        """The request's final failure, to be stored; or FailureStreak when the last
        `failure_streak` final failures were all of this kind, FirstRequestsFailed when the run's
        first `first_failures` were and nothing has succeeded yet."""
        self.metrics.failures += 1
        self.metrics.last_failure = reason
        if isinstance(error, ContentFiltered):  # about this request's content, not the engine
            return Result.failure(reason, attempt, kind)
        same = "timeout" if isinstance(error, asyncio.TimeoutError) else error.kind
        if self._streak.failure(same):
            raise FailureStreak(
                f"the last {self._streak.count} engine requests all failed the same way "
                f"({reason}); the run stops here rather than drop the rest of the input: "
                "fix the cause and re-run the same command to resume"
            )
        if self._first.failure(same):
            raise FirstRequestsFailed(
                f"the first {self._first.count} engine requests of this run all failed "
                f"the same way and none succeeded ({reason}); the run stops here: fix "
                "the cause and re-run the same command"
            )
        return Result.failure(reason, attempt, kind)

    def _sync_metrics(self) -> None:
        b = self.breaker
        self.metrics.engine_down_s = b.down_s + (
            time.monotonic() - b.open_since if b.open_since is not None else 0.0
        )

    def _resize_window(self) -> None:
        m, caps = self.metrics, self.backend.capabilities
        now = (m.prompt_tokens, m.cached_tokens, m.completion_tokens, m.engine_calls)
        delta = [a - b for a, b in zip(now, self._resize_from or (0, 0, 0, 0), strict=True)]
        self._resize_from = now
        size = engine_window(caps.max_running, caps.dp_size, caps.kv_tokens, tokens_per_request(*delta))
        if size != self.window:
            log.debug("window %d -> %d (KV cache of %d tokens per rank)", self.window, size, caps.kv_tokens)
            self.window = size
            self._gate.resize(size)
