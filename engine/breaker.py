"""A circuit breaker for an unreachable engine: while nothing accepts a connection, requests wait
here instead of spending their retries (a 12 s server restart used to drop hundreds of instances).

Closed: every request goes. Open (a request could not connect): requests wait; after a backoff one
probe goes, with the next backoff doubled up to a cap; the first answer of any kind from the engine
closes the breaker. Open for longer than `down_limit_s`: every waiter, and every later request,
raises EngineDown, which stops the run (resumable; nothing dropped).

The probe is the backend's `ping` where it has one (a cheap GET that any answer satisfies): the
breaker then closes within one probe interval of the server answering. Without a ping the probe is
one waiting request, and everything else waits for its whole answer: on a CPU server a P1 answer
takes ~30 s, which a real restart test measured as 30 s of a new, idle server. A ping that answers
while requests still cannot connect does not reset the outage clock: `down_limit_s` still bounds it.
Such a failure comes within a connect timeout of the ping; a trip later than `confirm_s` after it
is a new outage (requests got through in between: the liveness probe's stall needs 20 s of quiet).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from engine.backend import EngineDown, EngineError
from engine.policy import probe_delay_s

log = logging.getLogger(__name__)


class Breaker:
    def __init__(
        self,
        down_limit_s: float,
        probe_base_s: float = 0.5,
        probe_max_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        ping: Callable[[], Awaitable[bool]] | None = None,
        confirm_s: float = 15.0,
    ) -> None:
        self.down_limit_s = down_limit_s
        self.ping = ping
        # Start of an outage that a ping closed (at `_pinged_at`) and no request has confirmed yet:
        # a trip within `confirm_s` of that ping continues it.
        self._unconfirmed: float | None = None
        self._pinged_at = 0.0
        self.confirm_s = confirm_s
        self.probe_base_s, self.probe_max_s = probe_base_s, probe_max_s
        self.clock = clock
        self.open_since: float | None = None
        self.fatal: EngineDown | None = None
        self.outages = 0
        self.down_s = 0.0  # total time open, closed outages only
        self._permits = 0  # probes allowed through while open
        self._wake = asyncio.Event()
        self._prober: asyncio.Task | None = None
        self._last: EngineError | None = None

    @property
    def is_open(self) -> bool:
        return self.open_since is not None

    async def admit(self) -> None:
        """Return when a request may go to the engine; raise EngineDown once the engine is given up on."""
        while True:
            if self.fatal is not None:
                raise self.fatal
            if self.open_since is None:
                return
            if self._permits > 0:
                self._permits -= 1
                return
            wake = self._wake
            await wake.wait()

    def trip(self, error: EngineError) -> None:
        """A request could not connect: open (if closed) and start probing."""
        self._last = error
        if self.open_since is not None or self.fatal is not None:
            return
        self.open_since = now = self.clock()
        if self._unconfirmed is not None and now - self._pinged_at <= self.confirm_s:
            self._probe_from(now, self._unconfirmed)  # the ping answered, requests still cannot connect
            return
        self._unconfirmed = None
        self.outages += 1
        log.warning(
            "the engine is unreachable (%s): requests wait and one probe goes every few seconds, "
            "for up to %gs before the run stops",
            error,
            self.down_limit_s,
        )
        self._probe_from(now, now)

    def _probe_from(self, since: float, outage_start: float) -> None:
        self._prober = asyncio.get_running_loop().create_task(self._probe(since, outage_start))

    def reached(self) -> None:
        """The engine answered a request (anything at all): close; the outage is over."""
        self._close()
        self._unconfirmed = None

    def _close(self) -> None:
        """Let every waiter go. The outage's start stays in `_unconfirmed` when a ping closed it."""
        if self.open_since is None:
            return
        now = self.clock()
        self.down_s += now - self.open_since
        start = self.open_since if self._unconfirmed is None else self._unconfirmed
        log.warning("the engine answers again after %.1fs; resuming", now - start)
        self.open_since, self._permits = None, 0
        self._notify()

    def close(self) -> None:
        if self._prober is not None:
            self._prober.cancel()

    def _notify(self) -> None:
        self._wake.set()
        self._wake = asyncio.Event()

    async def _probe(self, since: float, outage_start: float) -> None:
        n = 0
        while self.open_since == since:
            n += 1
            left = outage_start + self.down_limit_s - self.clock()
            if left <= 0:
                self.fatal = EngineDown(
                    f"the engine was unreachable for {self.down_limit_s:g}s (last error: {self._last}); "
                    "the run stops here with nothing dropped: start the engine (or raise --engine-down-s) "
                    "and re-run the same command to resume"
                )
                self._notify()
                return
            await asyncio.sleep(min(left, probe_delay_s(n, self.probe_base_s, self.probe_max_s)))
            if self.open_since != since or self.clock() - outage_start >= self.down_limit_s:
                continue
            if self.ping is None:
                self._permits = 1  # one waiting request goes as the probe
                self._notify()
            elif await self.ping() and self.open_since == since:
                self._unconfirmed, self._pinged_at = outage_start, self.clock()
                self._close()
