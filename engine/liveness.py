"""Noticing a server that stopped serving while our requests wait on it, and a request timeout that
follows the latencies the server really shows.

A server restarted under load can leave its old front end holding our connections open, with
nothing behind them (vLLM's HTTP server waits, without limit, for open connections to close after
its engine died): every request then hangs until its timeout, and the new server behind the same
URL stays idle. `Liveness` watches the requests a backend has in flight; when none has finished
for `quiet_s`, it asks the backend's `check` what the server says (nothing answers, nothing running
while our requests wait, a new process behind the URL). Two such answers in a row cancel every
request in flight with EngineUnreachable, which the scheduler's circuit breaker waits out without
spending retries, and the requests go again to whatever answers at the URL.

`LatencyTimeout` replaces a flat per-request timeout (600 s hid a stall for 10 minutes) with a
multiple of the recent p99 latency, never below a floor nor above the configured cap.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TypeVar

from engine.backend import EngineUnreachable
from engine.request import Request

log = logging.getLogger(__name__)
T = TypeVar("T")

# check(outstanding) -> why the server is not serving them, or None when it looks alive.
Check = Callable[[int], Awaitable[str | None]]


class Liveness:
    def __init__(
        self,
        check: Check,
        *,
        quiet_s: float = 20.0,
        every_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.check, self.quiet_s, self.every_s, self.clock = check, quiet_s, every_s, clock
        self.stalls = 0  # times the in-flight requests were given up on and resubmitted
        self._inflight: dict[asyncio.Task, Request | None] = {}
        self._cancelled: dict[asyncio.Task, str] = {}
        self._progress = clock()  # last finish, or the start of a busy period
        self._monitor: asyncio.Task | None = None

    async def guard(self, aw: Awaitable[T], request: Request | None = None) -> T:
        """Await `aw` as one request in flight; EngineUnreachable if the server is found stalled."""
        if not self._inflight:
            self._progress = self.clock()
        task = asyncio.ensure_future(aw)
        self._inflight[task] = request
        loop = asyncio.get_running_loop()
        if self._monitor is None or self._monitor.get_loop() is not loop:  # none yet, or a closed loop's
            self._monitor = loop.create_task(self._watch())
        try:
            result = await asyncio.shield(task)
            self._progress = self.clock()
            return result
        except asyncio.CancelledError:
            why = self._cancelled.pop(task, None)
            if why is None:  # cancelled from outside (the caller's timeout): cancel the request too
                task.cancel()
                raise
            raise EngineUnreachable(f"the server stalled ({why}); resubmitting", request) from None
        finally:
            self._inflight.pop(task, None)
            self._cancelled.pop(task, None)

    async def _watch(self) -> None:
        strikes = 0
        try:
            while self._inflight:
                await asyncio.sleep(self.every_s)
                if not self._inflight or self.clock() - self._progress < self.quiet_s:
                    strikes = 0
                    continue
                why = await self.check(len(self._inflight))
                strikes = strikes + 1 if why else 0
                if why and strikes >= 2:
                    strikes = 0
                    self._stall(why)
        finally:
            self._monitor = None

    def _stall(self, why: str) -> None:
        self.stalls += 1
        quiet = self.clock() - self._progress
        log.warning(
            "no request finished for %.0fs and %s: resubmitting the %d requests in flight (no retries spent)",
            quiet,
            why,
            len(self._inflight),
        )
        for task in list(self._inflight):
            self._cancelled[task] = why
            task.cancel()
        self._progress = self.clock()

    def close(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()


class LatencyTimeout:
    """The timeout of the next request: `multiple` x the p99 of the last `window` latencies, at
    least `floor_s`, at most `cap_s` (the configured --timeout-s); `cap_s` until `min_samples`."""

    def __init__(
        self,
        cap_s: float,
        *,
        floor_s: float = 60.0,
        multiple: float = 4.0,
        window: int = 512,
        min_samples: int = 32,
    ) -> None:
        self.cap_s, self.floor_s, self.multiple, self.min_samples = (
            cap_s,
            min(floor_s, cap_s),
            multiple,
            min_samples,
        )
        self._recent: deque[float] = deque(maxlen=window)
        self._current = cap_s

    def observe(self, seconds: float) -> None:
        self._recent.append(seconds)
        n = len(self._recent)
        if n >= self.min_samples and n % 8 == 0:  # a sort per 8 answers, not per answer
            p99 = sorted(self._recent)[min(n - 1, int(n * 0.99))]
            self._current = min(self.cap_s, max(self.floor_s, self.multiple * p99))

    @property
    def seconds(self) -> float:
        return self._current
