"""The openvino backend: the Backend contract over OpenVINO GenAI, first as plain functions (no model),
then on the real SmolLM2 GGUF (marked `model`).

Greedy outputs are not compared across cache states: with prefix caching on, the same prompt can
decode differently once its blocks come from the cache (seen in the spike of issue 11). The tests check
formats, regex matches, lengths, finish reasons and timing instead."""

from __future__ import annotations

import asyncio
import re
import time

import pytest

from engine.backend import EngineDied, RequestRejected, TransientEngineError
from engine.backends.openvino import OpenVINOBackend, default_kv_cache_gb, generation_config
from engine.request import Request, SamplingParams

ov = pytest.importorskip("openvino_genai")


# -- plain functions ---------------------------------------------------------------------------------


def test_kv_cache_is_a_tenth_of_available_memory_within_bounds():
    gib = 2**30
    assert default_kv_cache_gb(20 * gib) == 2
    assert default_kv_cache_gb(3 * gib) == 1  # never below 1 GB
    assert default_kv_cache_gb(1024 * gib) == 16  # nor above 16
    assert default_kv_cache_gb() >= 1


def test_generation_config_maps_sampling_regex_and_stops():
    greedy = Request((1, 2), SamplingParams(max_new_tokens=7), "m")
    cfg = generation_config(ov, greedy, 2, {2, 5})
    assert cfg.max_new_tokens == 7 and cfg.is_greedy_decoding() and cfg.eos_token_id == 2
    assert cfg.stop_token_ids == {2, 5} and cfg.structured_output_config is None and not cfg.stop_strings

    sampled = Request(
        (1, 2), SamplingParams(temperature=0.7, top_p=0.9, seed=11, stop=("END",)), "m", regex="(yes|no)"
    )
    cfg = generation_config(ov, sampled, 2, {2})
    assert cfg.is_multinomial() and cfg.rng_seed == 11 and abs(cfg.temperature - 0.7) < 1e-6
    assert abs(cfg.top_p - 0.9) < 1e-6 and cfg.stop_strings == {"END"} and not cfg.include_stop_str_in_output
    assert cfg.structured_output_config.regex == "(yes|no)"


# -- the real model ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def backend(smol_gguf):
    b = OpenVINOBackend(max_num_seqs=8, kv_cache_gb=1)
    yield b
    asyncio.run(b.close())


def _ids(backend, text: str, system: str | None = None) -> tuple[int, ...]:
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    rendered = backend.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return tuple(backend.tokenizer.encode(rendered, add_special_tokens=False))


def _req(backend, text="Write a short poem about the sea.", **kw) -> Request:
    regex = kw.pop("regex", None)
    prompt = kw.pop("prompt", None) or _ids(backend, text)
    return Request(prompt, SamplingParams(**kw), backend.model_id, regex=regex)


def _run(coro):
    return asyncio.run(coro)


@pytest.mark.model
def test_token_ids_in_text_out_with_counts_and_finish_reasons(backend):
    async def go():
        return await asyncio.gather(
            backend.generate(_req(backend, "What is the capital of France?", max_new_tokens=64)),
            backend.generate(_req(backend, max_new_tokens=5)),
        )

    free, short = _run(go())
    assert free.ok and free.finish_reason == "stop" and "Paris" in free.text
    assert free.prompt_tokens == len(_ids(backend, "What is the capital of France?"))
    assert 0 < free.completion_tokens < 64
    assert short.finish_reason == "length" and short.completion_tokens == 5 and short.text


@pytest.mark.model
def test_regex_constrains_the_output(backend):
    from sysgen import tags

    yes_no = _run(
        backend.generate(_req(backend, "Is water wet? Answer yes or no.", max_new_tokens=8, regex="(yes|no)"))
    )
    assert yes_no.text in ("yes", "no") and yes_no.finish_reason == "stop"
    p1 = _run(
        backend.generate(
            _req(
                backend,
                "Write tagged lines describing a math tutor.",
                max_new_tokens=200,
                regex=tags.p1_regex(),
            )
        )
    )
    if p1.finish_reason == "stop":
        assert re.fullmatch(tags.p1_regex(), p1.text), p1.text
    assert p1.text.startswith("<"), p1.text


@pytest.mark.model
def test_stop_string_ends_the_output_and_is_not_returned(backend):
    r = _run(
        backend.generate(_req(backend, "List five fruits, one per line.", max_new_tokens=60, stop=("\n",)))
    )
    assert r.finish_reason == "stop" and "\n" not in r.text and r.completion_tokens < 60


@pytest.mark.model
def test_requests_run_as_one_batch_and_text_and_message_prompts_work(backend):
    before = backend.stats["peak_running"]
    prompts = [f"Give me one fact about the number {i}." for i in range(6)]

    async def go():
        reqs = [_req(backend, p, max_new_tokens=12) for p in prompts]
        reqs.append(Request("Once upon a time", SamplingParams(max_new_tokens=6), backend.model_id))
        reqs.append(
            Request(
                ((("role", "user"), ("content", "Hi!")),), SamplingParams(max_new_tokens=6), backend.model_id
            )
        )
        return await asyncio.gather(*(backend.generate(r) for r in reqs))

    results = _run(go())
    assert all(r.ok and r.text and r.completion_tokens <= 12 for r in results)
    assert backend.stats["peak_running"] >= max(before, 4), "requests were not decoded together"


@pytest.mark.model
def test_sampling_with_a_temperature_runs(backend):
    r = _run(backend.generate(_req(backend, temperature=0.9, top_p=0.95, seed=3, max_new_tokens=16)))
    assert r.ok and r.text and r.completion_tokens <= 16


@pytest.mark.model
def test_bad_requests_fail_alone_before_reaching_the_engine(backend):
    async def go():
        good = asyncio.create_task(backend.generate(_req(backend, max_new_tokens=10)))
        bad = [
            _req(backend, max_new_tokens=8, regex="(yes|no"),  # would wreck the batch inside step()
            Request((1, 10**7), SamplingParams(max_new_tokens=4), backend.model_id),  # id out of vocab
            Request((1,) * 9000, SamplingParams(max_new_tokens=4), backend.model_id),  # over the context
            Request((), SamplingParams(max_new_tokens=4), backend.model_id),
            Request((1, 2), SamplingParams(max_new_tokens=4), "another-model"),
        ]
        errors = await asyncio.gather(*(backend.generate(r) for r in bad), return_exceptions=True)
        return await good, errors

    good, errors = _run(go())
    assert good.ok and good.completion_tokens > 0
    assert all(isinstance(e, RequestRejected) for e in errors), errors
    assert "regex" in str(errors[0]) and "outside" in str(errors[1]) and "at most" in str(errors[2])


@pytest.mark.model
def test_a_cancelled_request_is_dropped_from_the_engine(backend):
    async def go():
        task = asyncio.create_task(
            backend.generate(
                _req(backend, "Write a very long story.", max_new_tokens=2000, regex="(la ){1000}")
            )
        )
        while backend.stats["live"] == 0:  # wait until it runs in the engine
            await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        t0 = time.monotonic()
        while backend.stats["live"] and time.monotonic() - t0 < 10:
            await asyncio.sleep(0.05)
        # The engine keeps serving: a new request completes, not queued behind 2,000 tokens.
        after = await asyncio.wait_for(backend.generate(_req(backend, max_new_tokens=4)), 60)
        return after

    after = _run(go())
    assert backend.stats["live"] == 0 and after.completion_tokens == 4


@pytest.mark.model
def test_timeout_through_wait_for_also_drops_the_request(backend):
    async def go():
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(
                backend.generate(_req(backend, max_new_tokens=2000, regex="(la ){1000}")), 0.5
            )
        t0 = time.monotonic()
        while backend.stats["live"] and time.monotonic() - t0 < 10:
            await asyncio.sleep(0.05)

    _run(go())
    assert backend.stats["live"] == 0


@pytest.mark.model
def test_prefix_cache_serves_a_long_shared_prefix(backend):
    """The second prompt shares a ~2,500-token prefix (like a conversation so far) with the first:
    its prefill must come from the cache, so it finishes much faster than the cold first one."""
    history = " ".join(
        f"Turn {i}: the user asked about topic number {i} and got an answer." for i in range(160)
    )

    def timed(suffix: str) -> float:
        t0 = time.perf_counter()
        r = _run(backend.generate(_req(backend, prompt=_ids(backend, history + suffix), max_new_tokens=1)))
        assert r.prompt_tokens > 2000
        return time.perf_counter() - t0

    cold = timed(" Now summarise turn 3.")
    warm = timed(" Now summarise turn 7.")
    assert warm < cold / 2, (cold, warm)


@pytest.mark.model
def test_close_fails_waiting_requests_and_refuses_new_ones(smol_gguf):
    b = OpenVINOBackend(max_num_seqs=2, kv_cache_gb=1)

    async def go():
        task = asyncio.create_task(b.generate(_req(b, max_new_tokens=2000, regex="(la ){1000}")))
        while b.stats["live"] == 0:
            await asyncio.sleep(0.05)
        await b.close()
        with pytest.raises(EngineDied):
            await task
        with pytest.raises(EngineDied):
            await b.generate(_req(b, max_new_tokens=2))
        await b.close()  # idempotent

    _run(go())
    assert not b._stepper.thread.is_alive()


def test_a_failed_step_fails_the_batch_retryably_and_the_engine_goes_on():
    """A stand-in pipeline (no model): its step() raises once; the running jobs fail with a retryable
    error, the pipeline is rebuilt, and the next job completes."""
    from engine.backends.openvino_stepper import Stepper

    class Handle:
        def __init__(self):
            self.reads = [
                {
                    0: type(
                        "Out",
                        (),
                        {"generated_ids": [7], "finish_reason": type("R", (), {"name": "LENGTH"})()},
                    )()
                }
            ]

        def can_read(self):
            return bool(self.reads)

        def read(self):
            return self.reads.pop()

        def get_status(self):
            return "FINISHED" if not self.reads else "RUNNING"

        def cancel(self):
            pass

    built = []

    class Pipe:
        def __init__(self):
            built.append(self)
            self.fail = len(built) == 1
            self.handles = []

        def add_request(self, rid, tensor, cfg):
            self.handles.append(Handle())
            return self.handles[-1]

        def step(self):
            if self.fail:
                raise RuntimeError("boom")

        def has_non_finished_requests(self):
            return False

    def finish(job, status):
        from engine.request import Result

        return Result(text="x", finish_reason="length", completion_tokens=len(job.out))

    stepper = Stepper(Pipe, finish, lambda ids: ids, "RUNNING")

    async def go():
        from engine.backends.openvino_stepper import Job

        loop = asyncio.get_running_loop()
        req = Request((1,), SamplingParams(max_new_tokens=1), "m")
        first = Job(req, (1,), None, loop.create_future(), loop)
        stepper.submit(first)
        with pytest.raises(TransientEngineError, match="boom"):
            await first.future
        second = Job(req, (1,), None, loop.create_future(), loop)
        stepper.submit(second)
        return await asyncio.wait_for(second.future, 10)

    result = _run(go())
    stepper.stop()
    stepper.thread.join(10)
    assert result.completion_tokens == 1 and len(built) == 2


def test_a_finish_step_that_streams_no_token_still_finishes():
    """OpenVINO GenAI streams nothing (or an empty output) from a finishing step that adds no token:
    the request must not fail as transient again and again on every retry."""
    from engine.backends.openvino import finish_of

    assert finish_of("STOP", 3, 8) == "stop" and finish_of("LENGTH", 8, 8) == "length"
    assert finish_of("NONE", 3, 8) == "stop" and finish_of(None, 0, 8) == "stop"  # ended on its own
    assert finish_of("NONE", 8, 8) == "length"  # the budget was spent
    assert finish_of("CANCEL", 3, 8) is None  # not an answer


def test_the_stepper_keeps_the_reason_a_later_empty_output_does_not_carry():
    from engine.backends.openvino_stepper import Job, Stepper

    def out(ids, reason):
        return type("Out", (), {"generated_ids": ids, "finish_reason": type("R", (), {"name": reason})()})()

    class Handle:
        def __init__(self):  # read() pops from the end: a token, then STOP, then an empty NONE output
            self.reads = [{0: out([], "NONE")}, {0: out([9], "STOP")}, {0: out([7], "NONE")}]

        def can_read(self):
            return bool(self.reads)

        def read(self):
            return self.reads.pop()

        def get_status(self):
            return "FINISHED"

        def cancel(self):
            pass

    class Pipe:
        def add_request(self, rid, tensor, cfg):
            return Handle()

        def step(self):
            pass

        def has_non_finished_requests(self):
            return False

    seen = []

    def finish(job, status):
        from engine.request import Result

        seen.append((job.finish, list(job.out)))
        return Result(text="x", finish_reason="stop")

    stepper = Stepper(Pipe, finish, lambda ids: ids, "RUNNING")

    async def go():
        loop = asyncio.get_running_loop()
        req = Request((1,), SamplingParams(max_new_tokens=4), "m")
        job = Job(req, (1,), None, loop.create_future(), loop)
        stepper.submit(job)
        return await asyncio.wait_for(job.future, 10)

    _run(go())
    stepper.stop()
    stepper.thread.join(10)
    assert seen == [("STOP", [7, 9])]
