"""SGLangHTTPBackend against a real HTTP server on 127.0.0.1 that speaks SGLang's native API
(a stand-in: canned answers, no model). Checks the JSON we send against the pinned SGLang's
api/v1 schema (read with ast), error classification by status (200, 400, 401/403, 429/503 with
Retry-After, slow, down), response validation, bounded reads, and the scheduler riding out outages."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler

import pytest

from engine.backend import (
    EngineAuthError,
    EngineDied,
    EngineDown,
    EngineOverloaded,
    EngineUnreachable,
    FailureStreak,
    RequestRejected,
    TransientEngineError,
)
from engine.backends.sglang_http import MAX_REPORTED_RUNNING, SGLangHTTPBackend
from engine.request import Request, SamplingParams, messages_prompt
from engine.scheduler import Scheduler, SchedulerConfig
from kernels_cfg.fields import class_field_names, sglang_root
from tests.local_http import QUICK, Canned, LocalHTTPServer, scheduled, tiny_tokenizer_dir

pytest.importorskip("aiohttp", reason="the sglang_http backend needs aiohttp: pip install -e '.[http]'")

SLOW, BAD, DOWN = 999, 400, 503


class StandInSGLangServer(LocalHTTPServer):
    """Answers like `sglang.launch_server`: /model_info, /server_info, /generate."""

    def __init__(self, router: bool = False, delay_s: float = 0.0) -> None:
        super().__init__(_Handler)
        self.router, self.delay_s = router, delay_s
        self.bodies: list[dict] = []
        self.inflight = self.peak = 0
        self.lock = threading.Lock()


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output quiet
        pass

    def _send(self, status: int, body) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self):
        srv = self.server
        if srv.canned(self):
            return
        routes = {
            "/model_info": {"model_path": "/models/Llama-3.1-8B-Instruct", "is_generation": True},
            "/server_info": {
                "max_running_requests": 200,
                "dp_size": 2,
                "grammar_backend": "xgrammar",
                "context_length": 4096,
                "internal_states": [
                    {"effective_max_running_requests_per_dp": 100},
                    {"effective_max_running_requests_per_dp": 100},
                ],
            },
        }
        path = self.path.replace("/get_", "/") if srv.router else self.path
        if srv.router and self.path in routes:  # a router serving only the older /get_* paths
            return self._send(404, {"detail": "Not Found"})
        if path in routes:
            return self._send(200, routes[path])
        self._send(404, {"detail": "Not Found"})

    def do_POST(self):
        srv = self.server
        if srv.canned(self):
            return
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with srv.lock:
            srv.bodies.append(body)
            srv.inflight += 1
            srv.peak = max(srv.peak, srv.inflight)
        try:
            first = (body.get("input_ids") or [0])[0]
            if srv.delay_s:
                time.sleep(srv.delay_s)
            if first == SLOW:  # far past any timeout a test sets: one that did not fire shows
                time.sleep(3.0)
            if first == BAD:
                return self._send(400, {"error": {"message": "Invalid regex: unbalanced parenthesis"}})
            if first == DOWN:
                return self._send(503, {"error": {"message": "server is shutting down"}})
            n = len(body.get("input_ids") or body.get("text", ""))
            self._send(
                200,
                {
                    "text": "<Role>A tutor.</Role>\n",
                    "meta_info": {
                        "id": "abc",
                        "finish_reason": {"type": "stop", "matched": 128009},
                        "prompt_tokens": n,
                        "completion_tokens": 6,
                        "cached_tokens": max(0, n - 1),
                        "e2e_latency": 0.01,
                    },
                },
            )
        finally:
            with srv.lock:
                srv.inflight -= 1


def req(first: int = 1, regex: str | None = "(<Role>[^<>\\n]{1,300}</Role>\\n)") -> Request:
    return Request(
        prompt=(first, 2, 3),
        sampling=SamplingParams(temperature=0.0, max_new_tokens=64),
        model="m",
        regex=regex,
    )


def run(coro):
    return asyncio.run(coro)


@pytest.mark.slow
def test_generate_sends_sglangs_schema_and_maps_meta_info():
    root = sglang_root()
    if root is None:
        pytest.skip("sglang source not installed: pip install --no-deps sglang==<pin> (the Makefile does)")
    api = root / "api" / "v1" / "api_types.py"
    request_fields = class_field_names(api, "GenerateRequest")
    sampling_fields = class_field_names(api, "SamplingParams")  # the server rejects unknown keys
    with StandInSGLangServer() as srv:

        async def go():
            async with SGLangHTTPBackend(srv.url, model_path=None) as b:
                return b, await b.generate(req())

        backend, result = run(go())
    (body,) = srv.bodies
    assert set(body) <= request_fields, f"not GenerateRequest fields: {set(body) - request_fields}"
    assert set(body["sampling_params"]) <= sampling_fields
    assert body["input_ids"] == [1, 2, 3] and body["sampling_params"]["regex"].startswith("(<Role>")
    assert (result.text, result.finish_reason, result.prompt_tokens, result.cached_tokens) == (
        "<Role>A tutor.</Role>\n",
        "stop",
        3,
        2,
    )
    assert backend.capabilities.max_running == 200  # 2 DP ranks x 100, as /server_info reports
    assert backend.capabilities.max_context == 4096
    assert backend.model_id == "Llama-3.1-8B-Instruct"
    assert backend.capabilities.token_ids is False  # no --model: no tokenizer to make ids with


def test_router_paths_fallback_and_concurrency_cap():
    with StandInSGLangServer(router=True, delay_s=0.1) as srv:

        async def go():
            async with SGLangHTTPBackend(srv.url, model_path=None, max_concurrency=3) as b:
                results = await asyncio.gather(*(b.generate(req()) for _ in range(12)))
                return b, results

        backend, results = run(go())
    assert backend.model_id == "Llama-3.1-8B-Instruct"  # read from /get_model_info
    assert backend.capabilities.max_running == 3
    assert all(r.ok for r in results) and srv.peak <= 3 and len(srv.bodies) == 12


def test_client_cap_follows_a_big_servers_capacity_unless_set():
    info = {"internal_states": [{"effective_max_running_requests_per_dp": 512}] * 8}
    auto = SGLangHTTPBackend("http://127.0.0.1:1", model_path=None)
    auto.server_info = info
    auto._apply_info()
    assert auto.capabilities.max_running == 8 * 512 and auto.max_concurrency == 8 * 512 + 128
    capped = SGLangHTTPBackend("http://127.0.0.1:1", model_path=None, max_concurrency=1000)
    capped.server_info = info
    capped._apply_info()
    assert capped.capabilities.max_running == 1000 and capped.max_concurrency == 1000


def test_400_is_rejected_with_the_servers_message():
    with StandInSGLangServer() as srv:

        async def go():
            async with SGLangHTTPBackend(srv.url, model_path=None) as b:
                await b.generate(req(BAD))

        with pytest.raises(RequestRejected, match="400 Invalid regex: unbalanced parenthesis"):
            run(go())


def test_503_is_transient():
    with StandInSGLangServer() as srv:

        async def go():
            async with SGLangHTTPBackend(srv.url, model_path=None) as b:
                await b.generate(req(DOWN))

        with pytest.raises(TransientEngineError, match="503 server is shutting down"):
            run(go())


def test_slow_answer_times_out_as_transient():
    with StandInSGLangServer() as srv:

        async def go():
            async with SGLangHTTPBackend(srv.url, model_path=None, timeout_s=0.3) as b:
                t0 = time.monotonic()
                with pytest.raises(TransientEngineError, match=r"no answer in 0.3s"):
                    await b.generate(req(SLOW))
                return time.monotonic() - t0

        assert run(go()) < 2.0  # 0.3 s, with room for a loaded machine


def test_unreachable_server_fails_fast_with_the_fix():
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def go():
        async with SGLangHTTPBackend(f"http://127.0.0.1:{port}", model_path=None, retries=1):
            pass

    t0 = time.monotonic()
    with pytest.raises(EngineDied, match=r"no SGLang server answers.*sglang.launch_server"):
        run(go())
    assert time.monotonic() - t0 < 5


def test_text_prompt_and_messages_without_tokenizer():
    with StandInSGLangServer() as srv:

        async def go():
            async with SGLangHTTPBackend(srv.url, model_path=None) as b:
                text = Request(prompt="hello", sampling=SamplingParams(), model="m")
                r = await b.generate(text)
                chat = Request(
                    prompt=messages_prompt([{"role": "user", "content": "hi"}]),
                    sampling=SamplingParams(),
                    model="m",
                )
                with pytest.raises(RequestRejected, match="--model"):
                    await b.generate(chat)
                return r

        assert run(go()).prompt_tokens == 5
    assert srv.bodies[0]["text"] == "hello" and "input_ids" not in srv.bodies[0]


def test_tokenizer_from_a_local_model_dir(tmp_path):
    tiny_tokenizer_dir(tmp_path)
    with StandInSGLangServer() as srv:

        async def go():
            async with SGLangHTTPBackend(srv.url, model_path=str(tmp_path)) as b:
                ids = tuple(b.tokenizer.encode("hi there", add_special_tokens=False))
                chat = Request(
                    prompt=messages_prompt([{"role": "user", "content": "there hi"}]),
                    sampling=SamplingParams(),
                    model="m",
                )
                await b.generate(chat)  # the chat template is applied here, ids go out
                return b, await b.generate(Request(prompt=ids, sampling=SamplingParams(), model="m"))

        backend, result = run(go())
    assert backend.capabilities.token_ids and result.ok
    assert srv.bodies[0]["input_ids"] == [2, 1] and srv.bodies[1]["input_ids"] == [1, 2]
    # The server's model is what names the results, not the local tokenizer directory.
    assert backend.model_id == "Llama-3.1-8B-Instruct"


# --- faults: each against the stand-in server, each a way a run used to lose rows or crash ---------

OK_ANSWER = {
    "text": "fine",
    "meta_info": {
        "finish_reason": {"type": "stop"},
        "prompt_tokens": 3,
        "completion_tokens": 1,
        "cached_tokens": 0,
    },
}


def generate_once(srv, request: Request | None = None, **kw):
    async def go():
        async with SGLangHTTPBackend(srv.url, model_path=None, **kw) as b:
            return await b.generate(request or req())

    return run(go())


def through_scheduler(srv, n: int, config: SchedulerConfig = QUICK, during=None):
    """n distinct requests through a Scheduler; `during(srv)` runs in a thread once they are going."""

    async def go():
        async with SGLangHTTPBackend(srv.url, model_path=None) as b:
            return await scheduled(b, [req(1000 + i) for i in range(n)], config, srv, during)

    return run(go())


@pytest.mark.parametrize("status", [429, 503, 502, 504])
def test_load_shedding_is_overloaded_with_retry_after(status):
    with StandInSGLangServer() as srv:
        srv.inject("/generate", Canned(status, {"error": "busy"}, headers={"Retry-After": "7"}))
        with pytest.raises(EngineOverloaded, match=f"{status} busy") as e:
            generate_once(srv)
    assert e.value.retry_after_s == 7.0


def test_a_router_whose_worker_restarts_loses_nothing():
    """502 then 504 from a router in front (its worker restarting, then slow): waited out like load
    shedding, no retry spent, so a run with no retries left still gets its answer."""
    with StandInSGLangServer() as srv:
        gateway = Canned(502, {"error": "bad gateway"})
        srv.inject("/generate", gateway, Canned(504, {"error": "gateway timeout"}), gateway)
        (result,), m = through_scheduler(srv, 1, dataclasses.replace(QUICK, max_retries=0))
    assert result.ok and m.shed == 3 and m.failures == 0


def test_load_shedding_is_retried_after_retry_after_without_spending_retries():
    with StandInSGLangServer() as srv:
        srv.inject("/generate", *[Canned(429, {"error": "slow down"}, headers={"Retry-After": "0.4"})] * 3)
        t0 = time.monotonic()
        (result,), m = through_scheduler(srv, 1, dataclasses.replace(QUICK, max_retries=0))
    assert result.ok and result.text == "<Role>A tutor.</Role>\n"
    assert m.shed == 3 and m.failures == 0 and time.monotonic() - t0 >= 1.2


@pytest.mark.parametrize("status", [401, 403])
def test_auth_failure_stops_the_run_with_the_fix(status):
    with StandInSGLangServer() as srv:
        srv.inject("/generate", *[Canned(status, {"detail": "Unauthorized"})] * 50)
        with pytest.raises(EngineAuthError, match="check --api-key"):
            through_scheduler(srv, 20)
        srv.inject("/model_info", Canned(status, {"detail": "Unauthorized"}))
        with pytest.raises(EngineAuthError, match=f"{status}"):  # at start too: not "no server answers"
            generate_once(srv)


def test_api_key_is_sent_and_never_shown():
    with StandInSGLangServer() as srv:

        class Seen(_Handler):
            def do_POST(self):
                srv.auth = self.headers.get("Authorization")
                super().do_POST()

        srv.RequestHandlerClass = Seen
        generate_once(srv, api_key="sk-secret-123456789")
    assert srv.auth == "Bearer sk-secret-123456789"
    assert "sk-secret" not in repr(SGLangHTTPBackend(srv.url, model_path=None, api_key="sk-secret-123456789"))


@pytest.mark.parametrize(
    "body,why",
    [
        ({"text": 12345, "meta_info": OK_ANSWER["meta_info"]}, "text is a int"),
        (
            {"text": "x", "meta_info": {**OK_ANSWER["meta_info"], "completion_tokens": "twelve"}},
            "completion_tokens",
        ),
        ({"text": "x", "meta_info": {**OK_ANSWER["meta_info"], "prompt_tokens": True}}, "prompt_tokens"),
        ("just a string", "a JSON str"),
        ([], "a JSON list"),
        ({"text": "x", "meta_info": "done"}, "meta_info is not an object"),
        (b"<html>502 Bad Gateway</html>", "not JSON"),
    ],
)
def test_malformed_answer_is_transient_never_a_success(body, why):
    with StandInSGLangServer() as srv:
        srv.inject("/generate", Canned(200, body))
        with pytest.raises(TransientEngineError, match=why):
            generate_once(srv)


def test_malformed_answers_are_retried_then_the_good_one_is_kept(tmp_path):
    from engine.store import Store

    with StandInSGLangServer() as srv, Store.open(tmp_path / "s.db") as store:
        srv.inject("/generate", Canned(200, {"text": 12345, "meta_info": OK_ANSWER["meta_info"]}))

        async def go():
            async with SGLangHTTPBackend(srv.url, model_path=None) as b:
                return await Scheduler(b, store, QUICK).submit(req())

        result = run(go())
        assert result.ok and result.text == "<Role>A tutor.</Role>\n" and result.attempts == 2
        assert store.get(req().key).text == "<Role>A tutor.</Role>\n"


@pytest.mark.parametrize("with_length", [True, False])
def test_a_body_larger_than_the_token_budget_is_refused_unread(with_length):
    huge = b'{"text": "' + b"x" * (30 << 20) + b'"}'
    with StandInSGLangServer() as srv:
        srv.inject("/generate", Canned(200, huge, content_length=with_length))
        with pytest.raises(TransientEngineError, match="more than the request's token budget"):
            generate_once(srv)  # max_new_tokens=64: ~68 KB at most


def test_absurd_or_malformed_server_info_is_clamped_or_ignored():
    with StandInSGLangServer() as srv:
        srv.inject("/server_info", Canned(200, {"max_running_requests": 10**9, "context_length": "big"}))

        async def go():
            async with SGLangHTTPBackend(srv.url, model_path=None) as b:
                return b.capabilities, b.max_concurrency

        caps, conc = run(go())
        assert caps.max_running == MAX_REPORTED_RUNNING and conc == MAX_REPORTED_RUNNING + 128
        assert caps.max_context == 1 << 20
        srv.inject(
            "/server_info",
            Canned(200, {"max_running_requests": 100, "dp_size": "eight", "internal_states": "n/a"}),
        )
        caps, _ = run(go())
        assert caps.max_running == 100  # dp_size ignored, no traceback


def test_html_server_info_is_not_sglang():
    with StandInSGLangServer() as srv:
        srv.inject(
            "/model_info",
            Canned(200, b"<!doctype html><title>Welcome to nginx</title>", content_type="text/html"),
        )
        with pytest.raises(EngineDied, match=r"answered something that is not SGLang.*text/html"):
            generate_once(srv)


def test_connection_refused_is_unreachable():
    with StandInSGLangServer() as srv:

        async def go():
            async with SGLangHTTPBackend(srv.url, model_path=None) as b:
                srv.down()
                await b.generate(req())

        with pytest.raises(EngineUnreachable, match="cannot connect"):
            run(go())


@pytest.mark.slow
def test_a_server_restart_mid_run_loses_nothing():
    with StandInSGLangServer(delay_s=0.02) as srv:
        results, m = through_scheduler(srv, 120, during=lambda s: s.outage(1.5).join())
    assert all(r.ok for r in results), [r.error for r in results if not r.ok][:3]
    assert m.failures == 0 and m.unreachable > 0 and m.engine_down_s > 1.0


def test_an_engine_that_stays_down_stops_the_run_instead_of_dropping():
    with StandInSGLangServer(delay_s=0.02) as srv:
        t0 = time.monotonic()
        with pytest.raises(EngineDown, match=r"unreachable for 1.5s.*re-run the same command"):
            through_scheduler(
                srv, 40, dataclasses.replace(QUICK, engine_down_s=1.5), during=lambda s: s.down()
            )
        assert time.monotonic() - t0 < 6


def test_the_same_failure_over_and_over_stops_the_run():
    with StandInSGLangServer() as srv:
        srv.inject("/generate", *[Canned(500, {"error": "CUDA error: an illegal memory access"})] * 500)
        with pytest.raises(FailureStreak, match=r"last 5 engine requests all failed.*500 CUDA error"):
            through_scheduler(srv, 30, dataclasses.replace(QUICK, failure_streak=5, max_retries=0))


def test_timeout_s_reaches_the_client():
    from sysgen.backend_factory import make_backend

    b = make_backend("sglang_http", model=None, url="http://127.0.0.1:9", timeout_s=42.0)
    assert b.timeout_s == 42.0


def test_no_log_line_per_request(caplog):
    caplog.set_level(logging.DEBUG)
    with StandInSGLangServer() as srv:
        results, _ = through_scheduler(srv, 50)
    assert all(r.ok for r in results)
    assert len(caplog.records) < 10, [r.getMessage() for r in caplog.records[:5]]


def test_the_connection_pool_follows_the_servers_capacity():
    with StandInSGLangServer() as srv:
        srv.inject("/server_info", Canned(200, {"max_running_requests": 1000}))

        async def go():
            async with SGLangHTTPBackend(srv.url, model_path=None) as b:
                await b.generate(req())
                return b.max_concurrency, b._client._session.connector.limit

        assert run(go()) == (1128, 1128)  # one keep-alive connection per request in flight


def test_retry_after_as_seconds_or_an_http_date():
    from engine.backends.http_client import RETRY_AFTER_CAP_S, retry_after_s

    assert retry_after_s("3") == 3.0 and retry_after_s(None) is None and retry_after_s("soon") is None
    assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert retry_after_s("99999") == RETRY_AFTER_CAP_S and retry_after_s("-5") == 0.0


# --- SGLang's own signals over HTTP: per-rank capacity, grammar compile timeouts ------------------


def server_capabilities(srv, info: dict):
    srv.inject("/server_info", Canned(200, info))

    async def go():
        async with SGLangHTTPBackend(srv.url, model_path=None) as b:
            return b.capabilities

    return run(go())


def test_internal_states_give_dp_ranks_and_kv_capacity():
    """/server_info's internal_states, one per DP rank (sglang 0.5.23 http_server.server_info):
    the scheduler sizes its window per rank and by KV cache, so both must reach Capabilities."""
    ranks = [
        {"effective_max_running_requests_per_dp": 48, "memory_usage": {"token_capacity": 300_000}},
        {"effective_max_running_requests_per_dp": 48, "memory_usage": {"token_capacity": 280_000}},
    ]
    with StandInSGLangServer() as srv:
        caps = server_capabilities(srv, {"max_running_requests": 48, "dp_size": 2, "internal_states": ranks})
    assert (caps.max_running, caps.dp_size, caps.kv_tokens) == (96, 2, 280_000)  # the smallest rank's KV


def test_absurd_or_malformed_internal_states_are_clamped_or_ignored():
    with StandInSGLangServer() as srv:
        caps = server_capabilities(
            srv,
            {
                "internal_states": [{"effective_max_running_requests_per_dp": 10**9, "memory_usage": "lots"}]
                * 8
            },
        )
        assert (caps.max_running, caps.dp_size, caps.kv_tokens) == (MAX_REPORTED_RUNNING, 8, 0)
        caps = server_capabilities(
            srv,
            {
                "max_running_requests": 64,
                "dp_size": 4,
                "internal_states": [
                    {"effective_max_running_requests_per_dp": True},
                    {"effective_max_running_requests_per_dp": 32},
                ],
            },
        )
        assert (caps.max_running, caps.dp_size, caps.kv_tokens) == (256, 4, 0)  # the flat fields instead


GRAMMAR_400 = Canned(
    400,
    {
        "error": {
            "message": "Grammar preprocessing timed out: req.grammar_key=('regex', '(a|b)')",
            "type": "invalid_request_error",
            "code": 400,
        }
    },
)
GRAMMAR_ABORT = Canned(
    200,
    {
        "text": "",
        "meta_info": {
            "finish_reason": {
                "type": "abort",
                "message": "Failed to compile regex grammar: Grammar preprocessing timed out",
            },
            "prompt_tokens": 3,
            "completion_tokens": 0,
            "cached_tokens": 0,
        },
    },
)


@pytest.mark.parametrize("timeout", [GRAMMAR_400, GRAMMAR_ABORT], ids=["400", "abort-in-200"])
def test_grammar_timeout_is_retried_and_a_second_one_stops_the_run(timeout):
    """SGLang caches a timed-out grammar as invalid and aborts every later request with that regex:
    as RequestRejected, one slow compile would store every remaining request as a failure."""
    with StandInSGLangServer() as srv:
        srv.inject("/generate", timeout)
        (result,), _ = through_scheduler(srv, 1)
        assert result.ok and result.attempts == 2  # the engine's failure: retried, not rejected

        async def go():
            async with SGLangHTTPBackend(srv.url, model_path=None) as b:
                sched = Scheduler(b, None, QUICK)
                try:
                    with pytest.raises(EngineDied, match=r"2 times for this regex.*SGLANG_GRAMMAR_MAX_POLL"):
                        await sched.submit(req())
                    with pytest.raises(EngineDied):  # and it stays stopped
                        await b.generate(req(7, regex=None))
                finally:
                    await sched.__aexit__(None, None, None)

        srv.inject("/generate", timeout, timeout)
        n = len(srv.bodies)
        run(go())
        assert len(srv.bodies) == n  # both attempts got the canned timeouts; nothing sent after the stop


def test_an_ordinary_400_is_still_rejected_and_does_not_count_as_a_grammar_timeout():
    """Only SGLang's grammar-timeout text is the engine's failure: other 400s (a bad regex, a prompt
    too long) stay the request's, and do not bring the same regex closer to stopping the run."""
    with StandInSGLangServer() as srv:

        async def go():
            async with SGLangHTTPBackend(srv.url, model_path=None) as b:
                sched = Scheduler(b, None, QUICK)
                try:
                    rejected = [await sched.submit(req(BAD)) for _ in range(2)]
                    srv.inject("/generate", GRAMMAR_400)  # the same regex, one compile timeout
                    return rejected, await sched.submit(req())
                finally:
                    await sched.__aexit__(None, None, None)

        rejected, retried = run(go())
    assert [(r.ok, r.attempts) for r in rejected] == [(False, 1)] * 2
    assert all("400 Invalid regex" in r.error for r in rejected)
    assert retried.ok and retried.attempts == 2


def test_deterministic_needs_a_server_running_deterministic_inference():
    from engine.backend import EngineConfigError

    with StandInSGLangServer() as srv:
        with pytest.raises(EngineConfigError, match="--enable-deterministic-inference"):
            generate_once(srv, deterministic=True)
        info = {"max_running_requests": 8, "enable_deterministic_inference": True}
        srv.inject("/server_info", Canned(200, info))
        assert generate_once(srv, deterministic=True).ok
        assert generate_once(srv).ok  # without the flag, the server's setting does not matter
