"""The scheduler against fault-injecting stand-in engines: hits, dedupe, window, retries, timeouts."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import time

import orjson
import pytest

from engine.backend import (
    ContentFiltered,
    EngineAuthError,
    EngineDown,
    EngineOverloaded,
    EngineUnreachable,
    FailureStreak,
    RequestRejected,
    TransientEngineError,
)
from engine.backends.standin import StandInBackend
from engine.request import Request, SamplingParams, request_key
from engine.scheduler import Scheduler, SchedulerConfig
from engine.store import Store

FAST = SchedulerConfig(
    max_inflight=4, max_retries=2, timeout_s=0.2, backoff_base_s=0.001, backoff_max_s=0.002
)


def req(i: int, regex: str | None = None) -> Request:
    return Request(
        prompt=f"prompt {i}", sampling=SamplingParams(max_new_tokens=8), model="m", regex=regex, group="g"
    )


def run(coro):
    return asyncio.run(coro)


def test_store_hit_skips_the_engine(tmp_path):
    backend = StandInBackend(lambda r: "answer")

    async def go():
        with Store.open(tmp_path / "s.db") as st:
            s = Scheduler(backend, st, FAST)
            first = await s.submit(req(1))
            again = await s.submit(req(1))
            return first, again, s.metrics

    first, again, m = run(go())
    assert first.text == again.text == "answer"
    assert backend.calls == 1 and m.hits == 1 and m.engine_calls == 1


def test_identical_requests_in_flight_share_one_engine_call():
    backend = StandInBackend(lambda r: "x", delay_s=0.02)

    async def go():
        s = Scheduler(backend, None, FAST)
        return await asyncio.gather(*(s.submit(req(7)) for _ in range(5))), s.metrics

    results, m = run(go())
    assert {r.text for r in results} == {"x"} and backend.calls == 1 and m.deduped == 4


def test_window_bounds_requests_in_flight():
    peak = {"now": 0, "max": 0}

    class Counting(StandInBackend):
        async def generate(self, request):
            peak["now"] += 1
            peak["max"] = max(peak["max"], peak["now"])
            try:
                return await super().generate(request)
            finally:
                peak["now"] -= 1

    backend = Counting(lambda r: "x", delay_s=0.005)

    async def go():
        s = Scheduler(backend, None, FAST)
        await asyncio.gather(*(s.submit(req(i)) for i in range(40)))

    run(go())
    assert peak["max"] == FAST.max_inflight


def test_transient_errors_are_retried_then_succeed():
    backend = StandInBackend(lambda r: "ok", fault=lambda r, n: "error" if n <= 2 else None)

    async def go():
        s = Scheduler(backend, None, FAST)
        return await s.submit(req(1)), s.metrics

    res, m = run(go())
    assert res.ok and res.text == "ok" and res.attempts == 3 and m.retries == 2


def test_persistent_errors_become_a_stored_failure_with_the_reason(tmp_path):
    backend = StandInBackend(lambda r: "never", fault=lambda r, n: "error")

    async def go():
        with Store.open(tmp_path / "s.db") as st:
            s = Scheduler(backend, st, FAST)
            return await s.submit(req(1)), s.metrics

    res, m = run(go())
    assert not res.ok and "gave up after 3 attempts" in res.error and "injected engine error" in res.error
    assert m.failures == 1 and backend.calls == 3
    with Store.open(tmp_path / "s.db") as st:
        assert st.get(req(1).key).error == res.error


def test_a_hang_times_out_and_is_retried():
    backend = StandInBackend(lambda r: "late but fine", fault=lambda r, n: "hang" if n == 1 else None)

    async def go():
        s = Scheduler(backend, None, FAST)
        return await s.submit(req(1))

    res = run(go())
    assert res.ok and res.attempts == 2


def test_a_request_that_always_hangs_is_recorded_as_a_timeout():
    backend = StandInBackend(lambda r: "x", fault=lambda r, n: "hang")

    async def go():
        return await Scheduler(backend, None, FAST).submit(req(1))

    res = run(go())
    assert not res.ok and "timeout after 0.2s" in res.error and res.attempts == 3


def test_truncated_constrained_output_is_retried_with_new_sampling():
    seen = []

    def fault(r, n):
        seen.append(r.sampling)
        return "truncate" if len(seen) == 1 else None

    backend = StandInBackend(lambda r: "<Role>x</Role>\n", fault=fault)

    async def go():
        return await Scheduler(backend, None, FAST).submit(req(1, regex="(<Role>x</Role>\n)"))

    res = run(go())
    assert res.finish_reason == "stop" and len(seen) == 2
    assert seen[1].seed != seen[0].seed and seen[1].temperature > 0


def test_truncation_retries_are_bounded_and_unconstrained_ones_not_retried():
    backend = StandInBackend(lambda r: "abcdefgh", fault=lambda r, n: "truncate")

    async def go():
        s = Scheduler(backend, None, FAST)
        return await s.submit(req(1, regex="a+")), await s.submit(req(2))

    constrained, free = run(go())
    assert constrained.finish_reason == "length" and free.finish_reason == "length"
    assert backend.calls == 1 + FAST.length_retries + 1


def test_rejection_is_not_retried_and_engine_death_propagates():
    from engine.backend import EngineDied

    rejecting = StandInBackend(lambda r: "x", fault=lambda r, n: "reject")
    res = run(Scheduler(rejecting, None, FAST).submit(req(1)))
    assert not res.ok and res.error.startswith("rejected:") and rejecting.calls == 1
    dying = StandInBackend(lambda r: "x", fault=lambda r, n: "die")
    with pytest.raises(EngineDied):
        run(Scheduler(dying, None, FAST).submit(req(1)))


def test_stored_failures_are_reused_unless_asked_to_retry(tmp_path):
    failing = StandInBackend(lambda r: "x", fault=lambda r, n: "error")
    working = StandInBackend(lambda r: "fixed")

    async def go(backend, **kw):
        with Store.open(tmp_path / "s.db") as st:
            return await Scheduler(backend, st, FAST, **kw).submit(req(1))

    assert not run(go(failing)).ok
    assert not run(go(working)).ok and working.calls == 0
    assert run(go(working, retry_stored_failures=True)).text == "fixed"
    assert run(go(StandInBackend(lambda r: "other"))).text == "fixed"


def test_sampling_dict_matches_the_dataclass_so_request_keys_never_drift():
    s = SamplingParams(temperature=0.3, top_p=0.9, max_new_tokens=12, seed=4, stop=("\n",))
    assert s.to_dict() == dataclasses.asdict(s)
    assert request_key("m", "p", s, None) == request_key("m", "p", dataclasses.replace(s), None)
    assert request_key("m", "p", s, None) != request_key("m", "p", dataclasses.replace(s, seed=5), None)


# --- an engine that goes away, sheds load, or fails the same way every time ----------------------


class Flaky(StandInBackend):
    """A stand-in engine whose answer is decided per call by `outcome(call_no)`: an exception
    instance to raise, or None to answer. Records when each call came."""

    def __init__(self, outcome, **kw) -> None:
        super().__init__(lambda r: "ok", **kw)
        self.outcome, self.times = outcome, []

    async def generate(self, request):
        self.times.append(time.monotonic())
        err = self.outcome(len(self.times))
        if err is not None:
            raise err
        return await super().generate(request)


BREAKER = dataclasses.replace(
    FAST, max_retries=0, timeout_s=5, backoff_base_s=0.05, probe_max_s=0.1, engine_down_s=30
)


def test_while_the_engine_is_unreachable_requests_wait_without_spending_retries():
    down_until = time.monotonic() + 0.6
    backend = Flaky(lambda n: EngineUnreachable("refused") if time.monotonic() < down_until else None)

    async def go():
        s = Scheduler(backend, None, BREAKER)
        results = await asyncio.gather(*(s.submit(req(i)) for i in range(30)))
        await s.__aexit__(None, None, None)
        return results, s.metrics

    results, m = run(go())
    assert all(r.ok and r.attempts == 1 for r in results)  # max_retries=0, yet nothing failed
    assert m.failures == 0 and m.unreachable >= 1 and m.engine_down_s >= 0.4
    # While down, the engine saw the first window's attempts plus one probe per interval, not a flood.
    during = [t for t in backend.times if t < down_until]
    assert len(during) <= FAST.max_inflight + 0.6 / 0.05 + 1


def test_an_engine_that_never_comes_back_stops_every_request_with_engine_down():
    backend = Flaky(lambda n: EngineUnreachable("refused"))

    async def go():
        s = Scheduler(backend, None, dataclasses.replace(BREAKER, engine_down_s=0.5))
        return await asyncio.gather(*(s.submit(req(i)) for i in range(10)), return_exceptions=True)

    t0 = time.monotonic()
    outcomes = run(go())
    assert all(isinstance(o, EngineDown) for o in outcomes) and time.monotonic() - t0 < 3
    assert "--engine-down-s" in str(outcomes[0])


def test_load_shedding_waits_retry_after_and_spends_no_retries():
    backend = Flaky(lambda n: EngineOverloaded("429", retry_after_s=0.3) if n <= 2 else None)

    async def go():
        s = Scheduler(backend, None, BREAKER)
        return await s.submit(req(1)), s.metrics

    t0 = time.monotonic()
    res, m = run(go())
    assert res.ok and res.attempts == 1 and m.shed == 2 and time.monotonic() - t0 >= 0.6
    assert backend.times[1] - backend.times[0] >= 0.3


def test_endless_load_shedding_stops_the_run():
    backend = Flaky(lambda n: EngineOverloaded("503", retry_after_s=0.1))
    with pytest.raises(EngineDown, match="kept shedding load"):
        run(Scheduler(backend, None, dataclasses.replace(BREAKER, engine_down_s=0.3)).submit(req(1)))


def test_a_streak_of_one_failure_kind_stops_the_run_but_mixed_failures_do_not():
    same = Flaky(lambda n: TransientEngineError("boom", status=500))

    async def go(backend, n):
        s = Scheduler(backend, None, dataclasses.replace(BREAKER, failure_streak=5))
        return [await s.submit(req(i)) for i in range(n)]

    with pytest.raises(FailureStreak, match="last 5 engine requests all failed"):
        run(go(same, 20))
    assert len(same.times) == 5  # stopped at the fifth, nothing more was sent
    # Every 4th request succeeds: the streak never reaches 5, failures are recorded one by one.
    mixed = Flaky(lambda n: None if n % 4 == 0 else TransientEngineError("boom", status=500))
    results = run(go(mixed, 20))
    assert sum(not r.ok for r in results) == 15


def test_content_filter_drops_never_stop_the_run():
    filtered = Flaky(lambda n: ContentFiltered("content_filter"))

    async def go():
        s = Scheduler(filtered, None, dataclasses.replace(BREAKER, failure_streak=3))
        return await asyncio.gather(*(s.submit(req(i)) for i in range(10)))

    results = run(go())
    assert all(not r.ok and r.error.startswith("rejected: content_filter") for r in results)


def test_auth_failure_propagates():
    with pytest.raises(EngineAuthError):
        run(Scheduler(Flaky(lambda n: EngineAuthError("401")), None, BREAKER).submit(req(1)))


def test_window_shrinks_to_what_the_engines_kv_cache_runs():
    """An engine reporting 64 running slots but KV for 20,000 tokens: requests of ~1,000 tokens run
    20 at a time, so after RESIZE_EVERY calls the window drops from 64 + 16 to 20 + 5."""
    from engine.scheduler import RESIZE_EVERY

    backend = StandInBackend(lambda r: "x" * 400, delay_s=0.0)  # completion tokens: 400 // 4 = 100
    backend.capabilities = dataclasses.replace(backend.capabilities, kv_tokens=20_000)

    async def go():
        s = Scheduler(backend, None, SchedulerConfig(timeout_s=5))
        before = s.window
        big = [
            Request(prompt=tuple(range(899)) + (i,), sampling=SamplingParams(max_new_tokens=8), model="m")
            for i in range(RESIZE_EVERY)
        ]
        await asyncio.gather(*(s.submit(r) for r in big))
        return before, s.window, s._gate.size

    before, after, gate = run(go())
    assert before == 64 + 16 and after == gate == 20 + 5


@pytest.mark.skipif(
    sys.version_info < (3, 11),
    reason="the sweeper needs Task.uncancel (3.11+); 3.10 times attempts out with wait_for",
)
def test_timeouts_share_one_sweeper_and_outside_cancels_stay_cancels():
    """Per-attempt timeouts come from one sweeper task, not a timer per attempt: a hung attempt
    becomes a timeout, a cancel from outside stays a cancel, and the sweeper ends with the work."""
    backend = StandInBackend(lambda r: "x", fault=lambda r, n: "hang" if r.prompt == "prompt 1" else None)

    async def go():
        s = Scheduler(backend, None, dataclasses.replace(FAST, max_retries=0, max_inflight=8))
        hung = asyncio.ensure_future(s.submit(req(1)))
        fine = await asyncio.gather(*(s.submit(req(i)) for i in range(2, 50)))
        outside = asyncio.ensure_future(s.submit(req(1, regex="other")))
        await asyncio.sleep(0.05)
        outside.cancel()
        with pytest.raises(asyncio.CancelledError):
            await outside
        timed_out = await hung
        await asyncio.sleep(0.1)  # > one tick: the sweeper notices nothing is live and ends
        return fine, timed_out, s._deadlines._sweeper, s._deadlines._live

    fine, timed_out, sweeper, live = run(go())
    assert all(r.ok for r in fine)
    assert not timed_out.ok and "timeout after 0.2s" in timed_out.error
    assert sweeper is None and not live


def _key_by_whole_dict(model, prompt, sampling, regex) -> bytes:
    """The formula every existing store's keys were made with."""
    import orjson
    import xxhash

    payload = {"model": model, "prompt": prompt, "sampling": sampling.to_dict(), "regex": regex}
    return xxhash.xxh3_128_digest(orjson.dumps(payload, option=orjson.OPT_SORT_KEYS))


@pytest.mark.parametrize(
    "model,prompt,sampling,regex",
    [
        ("m", "plain text", SamplingParams(), None),
        (
            "Llama-3.1-8B+fp8",
            (1, 2, 3, 128000),
            SamplingParams(temperature=0.7, seed=3, stop=("</s>", "\n")),
            "(a|b)",
        ),
        (
            "m",
            ((("role", "system"), ("content", 'é \n "q"')), (("role", "user"), ("content", "x"))),
            SamplingParams(max_new_tokens=320),
            "<Role>[^<>\n]*</Role>\n",
        ),
        ("m", "p", SamplingParams(temperature=0), None),  # int 0, then float 0.0 and -0.0: spelled apart
        ("m", "p", SamplingParams(temperature=0.0), None),
        ("m", "p", SamplingParams(temperature=-0.0), None),
        ("m", "p", SamplingParams(seed=True), ""),
    ],
)
def test_request_key_assembled_from_parts_equals_the_whole_dict_hash(model, prompt, sampling, regex):
    assert request_key(model, prompt, sampling, regex) == _key_by_whole_dict(model, prompt, sampling, regex)


# --- guards on the first requests of a run (engine/canary.py) ----------------------------------


def test_a_server_ignoring_the_regex_stops_the_run_on_the_first_answers():
    from engine.canary import ConstraintIgnored

    free_text = StandInBackend(lambda r: "Sure! Here is a system message.")

    async def go(backend, n):
        s = Scheduler(backend, None, FAST)
        return [await s.submit(req(i, regex=r"<Role>[a-z]+</Role>")) for i in range(n)]

    with pytest.raises(ConstraintIgnored, match="ignoring the regex field") as e:
        run(go(free_text, 20))
    assert "standin" in str(e.value) and free_text.calls == 2  # stopped at the second answer
    # An engine that honours the regex passes; so does one odd answer among matching ones.
    assert all(r.ok for r in run(go(StandInBackend(lambda r: "<Role>teacher</Role>"), 20)))
    odd = StandInBackend(lambda r: "<Role>x</Role>" if r.prompt != "prompt 1" else "free")
    assert len(run(go(odd, 12))) == 12


def test_the_canary_skips_cut_answers_unconstrained_ones_and_engines_without_regex_support():
    cut = StandInBackend(lambda r: "free text", fault=lambda r, n: "truncate")
    unconstrained = StandInBackend(lambda r: "free text")
    no_regex = StandInBackend(lambda r: "free text")
    no_regex.capabilities = dataclasses.replace(no_regex.capabilities, regex=False)

    async def go(backend, regex):
        s = Scheduler(backend, None, FAST)
        return [await s.submit(req(i, regex=regex)) for i in range(10)]

    assert len(run(go(cut, r"<Role>[a-z]+</Role>"))) == 10
    assert len(run(go(unconstrained, None))) == 10
    assert len(run(go(no_regex, r"<Role>[a-z]+</Role>"))) == 10


def test_the_first_requests_all_rejected_the_same_way_stop_the_run_whatever_the_streak_limit():
    from engine.canary import FirstRequestsFailed

    refusing = Flaky(
        lambda n: RequestRejected("400 data did not match any variant of StringOrArray", status=400)
    )

    async def go(backend, n):
        s = Scheduler(backend, None, BREAKER)  # failure_streak 25
        return [await s.submit(req(i)) for i in range(n)]

    with pytest.raises(FirstRequestsFailed, match=r"first 5 engine requests.*StringOrArray"):
        run(go(refusing, 7))
    assert len(refusing.times) == 5
    # Once a request has succeeded, rejections are dropped one by one (up to the streak limit).
    later = Flaky(lambda n: None if n == 1 else RequestRejected("400 too long", status=400))
    results = run(go(later, 10))
    assert sum(not r.ok for r in results) == 9


def test_failures_carry_their_kind_and_stored_ones_keep_it_readable(tmp_path):
    from engine.request import ErrorKind, Result

    rejecting = StandInBackend(lambda r: "x", fault=lambda r, n: "reject")
    failing = StandInBackend(lambda r: "x", fault=lambda r, n: "error")

    async def go(backend, i):
        with Store.open(tmp_path / "s.db") as st:
            return await Scheduler(backend, st, FAST).submit(req(i))

    assert run(go(rejecting, 1)).error_kind is ErrorKind.REJECTED
    assert run(go(failing, 2)).error_kind is ErrorKind.GAVE_UP
    stored = run(go(StandInBackend(lambda r: "never called"), 1))  # a store hit
    assert stored.error_kind is ErrorKind.REJECTED
    assert b'"error_kind":"rejected"' in stored.to_json()
    # A failure stored before kinds were stored reads its kind from the message.
    legacy = Result(**orjson.loads(b'{"text":"","finish_reason":"error","error":"rejected: 400 bad"}'))
    assert legacy.error_kind is ErrorKind.REJECTED


def test_the_first_window_resize_comes_early():
    """A window sized for the engine's ceiling (vLLM: 1,024 running per engine until its KV cache says
    otherwise) shrinks after FIRST_RESIZE calls, not after RESIZE_EVERY."""
    from engine.scheduler import FIRST_RESIZE

    backend = StandInBackend(lambda r: "x" * 400, delay_s=0.0)
    backend.capabilities = dataclasses.replace(backend.capabilities, max_running=1024, kv_tokens=20_000)

    async def go():
        s = Scheduler(backend, None, SchedulerConfig(timeout_s=5))
        before = s.window
        for i in range(FIRST_RESIZE):
            await s.submit(
                Request(prompt=tuple(range(899)) + (i,), sampling=SamplingParams(max_new_tokens=8), model="m")
            )
        return before, s.window

    before, after = run(go())
    assert before == 1024 + 64 and after == 20 + 5


class Pinged(Flaky):
    """A stand-in engine with a ping (the breaker's cheap probe) and answers that take `answer_s`."""

    def __init__(self, outcome, up, answer_s: float) -> None:
        super().__init__(outcome)
        self.up, self.answer_s, self.pings = up, answer_s, 0

    async def ping(self) -> bool:
        self.pings += 1
        return self.up()

    async def generate(self, request):
        result = await super().generate(request)
        await asyncio.sleep(self.answer_s)
        return result


def test_a_ping_closes_the_breaker_without_waiting_for_a_whole_answer():
    """Every waiting request goes once the ping answers: nobody waits behind one probe request's
    whole (slow) answer, which is what a new CPU server after a restart stood idle for."""
    down_until = time.monotonic() + 0.4
    backend = Pinged(
        lambda n: EngineUnreachable("refused") if time.monotonic() < down_until else None,
        up=lambda: time.monotonic() >= down_until,
        answer_s=1.0,
    )

    async def go():
        s = Scheduler(backend, None, BREAKER)
        results = await asyncio.gather(*(s.submit(req(i)) for i in range(FAST.max_inflight)))
        await s.__aexit__(None, None, None)
        return results, s.metrics

    results, m = run(go())
    assert all(r.ok and r.attempts == 1 for r in results) and m.unreachable >= 1 and backend.pings >= 1
    after = sorted(t for t in backend.times if t >= down_until)
    assert len(after) == FAST.max_inflight  # each resubmitted once, not one probe then the rest
    assert after[-1] - down_until < 0.8  # within a probe interval (0.1 s) of the ping, not after 1 s


def test_a_ping_that_answers_while_requests_cannot_connect_still_ends_in_engine_down():
    """/health answers, the generate route never connects: the outage clock is not reset by the
    ping, so the run still stops after --engine-down-s instead of looping forever."""
    backend = Pinged(lambda n: EngineUnreachable("refused"), up=lambda: True, answer_s=0.0)

    async def go():
        s = Scheduler(backend, None, dataclasses.replace(BREAKER, engine_down_s=0.6))
        return await asyncio.gather(*(s.submit(req(i)) for i in range(3)), return_exceptions=True)

    t0 = time.monotonic()
    outcomes = run(go())
    assert all(isinstance(o, EngineDown) for o in outcomes), outcomes
    assert time.monotonic() - t0 < 3 and backend.pings >= 2


def test_a_trip_long_after_a_ping_closed_the_breaker_is_a_new_outage():
    """Requests went and were taken after the ping; a stall found later (a front end hung in a second
    restart) starts its own outage and clock, not the first one's, which had ended. Within
    `confirm_s` of the ping a trip still continues the first outage."""
    from engine.breaker import Breaker

    async def go():
        b = Breaker(down_limit_s=60, probe_base_s=0.01, probe_max_s=0.01, ping=_answers, confirm_s=1.0)
        b.trip(EngineUnreachable("refused"))
        await b.admit()  # the ping closed it
        b.trip(EngineUnreachable("refused at once"))  # within confirm_s: the same outage
        await b.admit()
        same = b.outages
        await asyncio.sleep(1.2)
        b.trip(EngineUnreachable("the server stalled"))
        outages = b.outages
        b.close()
        return same, outages

    same, outages = run(go())
    assert same == 1 and outages == 2


async def _answers() -> bool:
    return True
