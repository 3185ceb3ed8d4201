"""engine/liveness.py: a stalled server's requests are given up on (EngineUnreachable, which the
scheduler waits out without spending retries) once none has finished for quiet_s and the check
says twice in a row that the server is not serving them; a slow but live server is left alone.
The request timeout follows the observed p99 latency between a floor and the configured cap."""

from __future__ import annotations

import asyncio
import time

import pytest

from engine.backend import EngineUnreachable
from engine.liveness import LatencyTimeout, Liveness


def test_a_stalled_server_is_noticed_and_every_request_in_flight_resubmitted():
    checks = []

    async def check(outstanding):
        checks.append(outstanding)
        return "nothing running"

    async def go():
        live = Liveness(check, quiet_s=0.2, every_s=0.05)
        hang = [asyncio.get_running_loop().create_future() for _ in range(3)]  # answers that never come
        t0 = time.monotonic()
        results = await asyncio.gather(*(live.guard(f) for f in hang), return_exceptions=True)
        return live, hang, results, time.monotonic() - t0

    live, hang, results, seconds = asyncio.run(go())
    assert all(isinstance(r, EngineUnreachable) and "nothing running" in str(r) for r in results)
    assert all(f.cancelled() for f in hang)  # the hung requests themselves are abandoned
    assert live.stalls == 1 and checks[0] == 3 and len(checks) == 2  # two strikes, then given up
    assert 0.2 <= seconds < 1.0


def test_a_slow_but_live_server_is_left_alone():
    async def check(outstanding):
        return None  # the server reports our requests running

    async def go():
        live = Liveness(check, quiet_s=0.05, every_s=0.02)

        async def slow(i):
            await asyncio.sleep(0.3)
            return i

        return live, await asyncio.gather(*(live.guard(slow(i)) for i in range(4)))

    live, results = asyncio.run(go())
    assert results == [0, 1, 2, 3] and live.stalls == 0


def test_one_strike_is_not_enough():
    answers = iter(["stalled", None, "stalled", None, "stalled", None])

    async def check(outstanding):
        return next(answers, None)

    async def go():
        live = Liveness(check, quiet_s=0.05, every_s=0.03)

        async def slow():
            await asyncio.sleep(0.3)
            return "done"

        return live, await live.guard(slow())

    live, result = asyncio.run(go())
    assert result == "done" and live.stalls == 0


def test_a_cancel_from_outside_cancels_the_request_and_is_not_a_stall():
    async def check(outstanding):
        return "stalled"

    async def go():
        live = Liveness(check, quiet_s=10, every_s=5)
        inner = asyncio.get_running_loop().create_future()
        task = asyncio.ensure_future(live.guard(inner))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        live.close()
        return live, inner

    live, inner = asyncio.run(go())
    assert inner.cancelled() and live.stalls == 0


def test_request_timeout_follows_the_p99_between_floor_and_cap():
    t = LatencyTimeout(600.0, floor_s=30.0, multiple=4.0, min_samples=32)
    assert t.seconds == 600.0  # too few answers seen: the configured cap
    for _ in range(64):
        t.observe(2.0)
    assert t.seconds == 30.0  # 4 x 2 s is under the floor
    for _ in range(64):
        t.observe(20.0)
    assert t.seconds == 80.0  # 4 x the p99 (20 s)
    for _ in range(512):
        t.observe(500.0)
    assert t.seconds == 600.0  # never above --timeout-s
