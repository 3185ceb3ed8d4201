"""OpenAIBackend against a real HTTP server on 127.0.0.1 speaking /v1/chat/completions (a stand-in
with canned answers). The API key must reach the server and appear nowhere else: not in repr,
errors, or any log line (the HTTP library's included)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from http.server import BaseHTTPRequestHandler

import pytest

from engine.backend import (
    ContentFiltered,
    EngineAuthError,
    EngineConfigError,
    EngineOverloaded,
    NeverAnswered,
    RequestRejected,
    TransientEngineError,
)
from engine.backends.openai_http import OpenAIBackend
from engine.backends.regex_probe import PROBE_REGEX
from engine.request import Request, SamplingParams, messages_prompt
from engine.scheduler import Scheduler, SchedulerConfig
from tests.local_http import Canned, LocalHTTPServer

pytest.importorskip("aiohttp", reason="the openai backend needs aiohttp: pip install -e '.[http]'")

KEY = "sk-test-0123456789abcdef-SECRET"


class StandInOpenAIServer(LocalHTTPServer):
    def __init__(self, status: int = 200, honours_regex: bool = True) -> None:
        super().__init__(_Handler)
        self.status = status
        self.honours_regex = honours_regex  # False: a router that drops the regex field (sglang-router)
        self.seen: list[tuple[dict, str | None]] = []


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):  # GET /v1/models at start: canned replies, else a route it does not have
        if not self.server.canned(self):
            self.send_error(404)

    def do_POST(self):
        srv = self.server
        if srv.canned(self):
            return
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        srv.seen.append((body, self.headers.get("Authorization")))
        if self.path != "/v1/chat/completions":
            status, answer = 404, {"error": {"message": "no route"}}
        elif srv.status == 401:  # real services echo (part of) the key they refuse
            status, answer = 401, {"error": {"message": f"Incorrect API key provided: {KEY}"}}
        elif srv.status != 200:
            status, answer = srv.status, {"error": {"message": "slow down"}}
        else:
            regex = (body.get("structured_outputs") or {}).get("regex") or body.get("regex")
            text = "12345" if srv.honours_regex and regex == PROBE_REGEX else "Verdict: A"
            status, answer = (
                200,
                {
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": "length",
                            "message": {"role": "assistant", "content": text},
                        }
                    ],
                    "usage": {
                        "prompt_tokens": 20,
                        "completion_tokens": 4,
                        "prompt_tokens_details": {"cached_tokens": 16},
                    },
                },
            )
        raw = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)


def chat() -> Request:
    return Request(
        prompt=messages_prompt(
            [{"role": "system", "content": "Judge."}, {"role": "user", "content": "A or B?"}]
        ),
        sampling=SamplingParams(temperature=0.0, max_new_tokens=4, stop=("\n",)),
        model="judge",
    )


def call(url: str, request: Request, key: str | None = KEY):
    async def go():
        async with OpenAIBackend(url, model="judge-7b", api_key=key) as b:
            return await b.generate(request)

    return asyncio.run(go())


def test_chat_completion_maps_to_result_and_sends_the_key():
    with StandInOpenAIServer() as srv:
        r = call(srv.url, chat())
    ((body, auth),) = srv.seen
    assert auth == f"Bearer {KEY}"
    assert body["model"] == "judge-7b" and body["messages"][1] == {"role": "user", "content": "A or B?"}
    assert body["max_tokens"] == 4 and body["stop"] == ["\n"] and body["temperature"] == 0.0
    assert (r.text, r.finish_reason, r.prompt_tokens, r.completion_tokens, r.cached_tokens) == (
        "Verdict: A",
        "length",
        20,
        4,
        16,
    )


def test_string_prompt_is_one_user_message_and_no_key_sends_no_header():
    with StandInOpenAIServer() as srv:
        call(srv.url, Request(prompt="Say hi", sampling=SamplingParams(), model="j"), key=None)
    ((body, auth),) = srv.seen
    assert body["messages"] == [{"role": "user", "content": "Say hi"}] and auth is None


def test_capabilities_and_model_id():
    b = OpenAIBackend("http://127.0.0.1:9/", model="gpt-x", api_key=KEY)
    assert b.capabilities.regex is False and b.capabilities.token_ids is False
    assert b.model_id == "openai:gpt-x@http://127.0.0.1:9"
    with pytest.raises(RequestRejected, match="not token ids"):
        b.payload(Request(prompt=(1, 2), sampling=SamplingParams(), model="m"))


@pytest.mark.parametrize(
    "status,error",
    [(401, EngineAuthError), (400, RequestRejected), (429, EngineOverloaded), (503, EngineOverloaded)],
)
def test_errors_by_status_never_show_the_key(status, error, caplog):
    caplog.set_level(logging.DEBUG)
    with StandInOpenAIServer(status) as srv, pytest.raises(error) as e:
        call(srv.url, chat())
    assert str(status) in str(e.value)
    assert KEY not in str(e.value) and KEY[:8] not in str(e.value)
    assert KEY not in caplog.text


def test_key_absent_from_repr_logs_and_connection_errors(caplog):
    caplog.set_level(logging.DEBUG)
    b = OpenAIBackend("http://127.0.0.1:9", model="m", api_key=KEY)
    assert KEY not in repr(b) and "api_key=<set>" in repr(b)
    assert KEY not in str(vars(b).get("api_key", ""))

    async def go():
        async with b:
            await b.generate(chat())

    with pytest.raises(NeverAnswered) as e:  # port 9 (discard) has no listener here
        asyncio.run(go())
    assert KEY not in str(e.value) and KEY not in repr(e.value)
    assert KEY not in caplog.text


def answer(finish: str = "stop", content="fine", **usage) -> dict:
    message = {"role": "assistant", "content": content}
    return {
        "choices": [{"index": 0, "finish_reason": finish, "message": message}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, **usage},
    }


def test_content_filter_is_a_drop_with_its_reason_not_a_success():
    with StandInOpenAIServer() as srv:
        srv.inject("/v1/chat/completions", Canned(200, answer("content_filter", "")))
        with pytest.raises(ContentFiltered, match="content_filter"):
            call(srv.url, chat())
        srv.inject("/v1/chat/completions", *[Canned(200, answer("content_filter", ""))] * 40)

        async def go():
            async with OpenAIBackend(srv.url, model="m", api_key=None) as b:
                s = Scheduler(b, None, SchedulerConfig(failure_streak=5))
                return await asyncio.gather(
                    *(
                        s.submit(Request(prompt=f"q{i}", sampling=SamplingParams(), model="m"))
                        for i in range(40)
                    )
                )

        results = asyncio.run(go())  # forty filtered answers: forty drops, not a stopped run
    assert all(not r.ok and "content_filter" in r.error and r.error.startswith("rejected") for r in results)


@pytest.mark.parametrize(
    "body,why",
    [
        (answer(content=12345), "content is a int"),
        (answer(completion_tokens="twelve"), "completion_tokens is 'twelve'"),
        ({"choices": []}, "no choices"),
        ("a string", "a JSON str, not an object"),
        ([], "a JSON list, not an object"),
        (b"<html>", "not JSON"),
    ],
)
def test_malformed_completion_is_transient(body, why):
    with StandInOpenAIServer() as srv:
        srv.inject("/v1/chat/completions", Canned(200, body))
        with pytest.raises(TransientEngineError, match=why):
            call(srv.url, chat())


def test_429_is_retried_after_retry_after():
    with StandInOpenAIServer() as srv:
        srv.inject(
            "/v1/chat/completions",
            *[Canned(429, {"error": {"message": "rate limited"}}, headers={"Retry-After": "0.3"})] * 2,
        )

        async def go():
            async with OpenAIBackend(srv.url, model="m", api_key=KEY) as b:
                s = Scheduler(b, None, SchedulerConfig(max_retries=0))
                return await s.submit(chat()), s.metrics

        result, m = asyncio.run(go())
    assert result.ok and result.text == "Verdict: A" and m.shed == 2


def test_a_huge_completion_is_refused():
    with StandInOpenAIServer() as srv:
        srv.inject("/v1/chat/completions", Canned(200, answer(content="y" * (5 << 20))))
        with pytest.raises(TransientEngineError, match="token budget"):
            call(srv.url, chat())


P1_REGEX = "(<Role>[^<>\\n]{1,300}</Role>\\n)"


def constrained(regex: str | None = P1_REGEX) -> Request:
    return Request(
        prompt="Write a system message.", sampling=SamplingParams(max_new_tokens=8), model="m", regex=regex
    )


@pytest.mark.parametrize("server", ["vllm", "sglang"])
def test_a_self_hosted_server_gets_the_regex_in_its_own_field(server):
    from tests.engine import vllm_fields

    async def go():
        async with OpenAIBackend(srv.url, model="m", api_key=None, server=server) as b:
            assert b.capabilities.regex  # so the pipeline sends its P1/P3 regex
            await b.generate(constrained())
            await b.generate(constrained(regex=None))

    with StandInOpenAIServer() as srv:
        asyncio.run(go())
    (probe, _), (body, _), (free, _) = srv.seen  # the start-up regex probe, then our two requests
    assert probe["messages"][0]["content"] == "Say hello."
    if server == "vllm":  # vLLM 0.33.0's ChatCompletionRequest.structured_outputs (StructuredOutputsParams)
        fields = vllm_fields.shipped()["classes"]
        unknown = set(body) - set(fields["ChatCompletionRequest"])  # vLLM would ignore these silently
        assert not unknown, unknown
        assert body["structured_outputs"] == {"regex": P1_REGEX}
        assert set(body["structured_outputs"]) <= set(fields["StructuredOutputsParams"])
        assert (body["top_k"], body["min_p"], body["repetition_penalty"]) == (-1, 0.0, 1.0)
    else:  # SGLang 0.5.23's ChatCompletionRequest.regex
        assert body["regex"] == P1_REGEX
        assert "top_k" not in body
    assert "structured_outputs" not in free and "regex" not in free


def test_a_hosted_endpoint_stays_unconstrained():
    with StandInOpenAIServer() as srv:
        call(srv.url, constrained())
    ((body, _),) = srv.seen
    assert "structured_outputs" not in body and "regex" not in body
    assert OpenAIBackend(srv.url, model="m", api_key=None).capabilities.regex is False
    with pytest.raises(ValueError, match="expected 'vllm' or 'sglang'"):
        OpenAIBackend(srv.url, model="m", api_key=None, server="tgi")


def test_cli_openai_server_flag_constrains_p1_on_a_self_hosted_vllm(tmp_path):
    """`sysgen run --engine openai --openai-server vllm`: every P1 request carries the regex in
    vLLM's field (the stand-in's canned verdict fails P1's parse: what matters is what was sent)."""
    from pathlib import Path

    from sysgen.cli import main
    from sysgen.config import RunConfig

    sample = Path(__file__).resolve().parents[2] / "sysgen" / "samples" / "demo_mixed.jsonl"
    with StandInOpenAIServer() as srv:
        code = main(
            [
                "run",
                str(sample),
                "--out",
                str(tmp_path / "out"),
                "--engine",
                "openai",
                "--url",
                srv.url,
                "--model",
                "llama-8b",
                "--openai-server",
                "vllm",
                "--limit",
                "2",
                "--no-progress",
                "--no-report",
            ]
        )
    # --p1-max-tokens default; an unparsable P1 answer is retried once, sampled
    p1 = [b for b, _ in srv.seen if b["max_tokens"] == 320]
    assert code == 0 and len(p1) >= 2
    assert all("<Role>" in b["structured_outputs"]["regex"] for b in p1)
    with pytest.raises(ValueError, match="--openai-server applies to --engine openai only"):
        RunConfig(inputs=("a.jsonl",), out="o", engine="vllm_http", url="http://h", openai_server="vllm")


def test_a_server_that_never_answers_is_a_configuration_error_within_seconds():
    """A mistyped --url used to wait out --engine-down-s (600 s) before saying anything."""
    with LocalHTTPServer(_Handler) as srv:
        url = srv.url
    t0 = time.monotonic()
    with pytest.raises(NeverAnswered, match=f"nothing answers at {url}.*check --url"):
        call(url, chat())
    assert time.monotonic() - t0 < 10


def test_cli_with_a_mistyped_url_fails_at_once_with_exit_2(tmp_path, capsys):
    from pathlib import Path

    from sysgen.cli import main

    with LocalHTTPServer(_Handler) as srv:
        url = srv.url
    sample = Path(__file__).resolve().parents[2] / "sysgen" / "samples" / "demo_mixed.jsonl"
    t0 = time.monotonic()
    code = main(
        [
            "run",
            str(sample),
            "--out",
            str(tmp_path / "out"),
            "--engine",
            "openai",
            "--url",
            url,
            "--model",
            "m",
            "--no-progress",
            "--no-report",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and f"nothing answers at {url}" in err and "check --url" in err
    assert time.monotonic() - t0 < 15 and "Traceback" not in err


def test_a_refused_key_at_start_stops_before_any_request():
    with StandInOpenAIServer() as srv:
        srv.inject("/v1/models", Canned(401, {"error": {"message": f"Incorrect API key provided: {KEY}"}}))
        with pytest.raises(EngineAuthError, match="401") as e:
            call(srv.url, chat())
        assert KEY not in str(e.value) and not srv.seen  # no completion was asked for


@pytest.mark.parametrize("finish", ["abort", "error", None, "something_new"])
def test_unknown_finish_reasons_are_transient_never_a_success(finish):
    with StandInOpenAIServer() as srv:
        srv.inject("/v1/chat/completions", Canned(200, answer(finish, "half an ans")))
        with pytest.raises(TransientEngineError, match=f"finish_reason {finish!r}"):
            call(srv.url, chat())


def test_repetition_is_an_answer_cut_short():
    with StandInOpenAIServer() as srv:
        srv.inject("/v1/chat/completions", Canned(200, answer("repetition", "la la la")))
        assert call(srv.url, chat()).finish_reason == "length"


def test_a_server_reporting_no_cached_tokens_is_warned_about_once_with_its_fix(caplog):
    caplog.set_level(logging.WARNING)
    with StandInOpenAIServer() as srv:
        # the start-up regex probe's answer (five digits), then the three answers generate() gets
        srv.inject("/v1/chat/completions", Canned(200, answer("stop", "12345")), *[Canned(200, answer())] * 3)

        async def go():
            async with OpenAIBackend(srv.url, model="m", api_key=None, server="sglang") as b:
                return [await b.generate(constrained()) for _ in range(3)]

        asyncio.run(go())
    warned = [r for r in caplog.records if "no cached-token counts" in r.getMessage()]
    assert len(warned) == 1 and "--enable-cache-report" in warned[0].getMessage()
    caplog.clear()
    with StandInOpenAIServer() as srv:  # its answers carry cached_tokens: no warning
        call(srv.url, chat())
    assert not [r for r in caplog.records if "no cached-token counts" in r.getMessage()]


def test_cli_stops_when_a_router_drops_the_regex_field(tmp_path, capsys):
    """sglang-router drops `structured_outputs` on chat requests: every P1 answer comes back free text,
    ended with `stop`. The run stops on the first answers, exit 1, instead of dropping every row."""
    from pathlib import Path

    from sysgen.cli import main

    sample = Path(__file__).resolve().parents[2] / "sysgen" / "samples" / "demo_mixed.jsonl"
    with StandInOpenAIServer() as srv:
        # The start-up probe (five digits) is answered within the regex, as a router whose first worker
        # honours it would; every row's P1 after it comes back free text.
        srv.inject(
            "/v1/chat/completions",
            Canned(200, answer("stop", "12345")),
            *[Canned(200, answer("stop", "Sure! A system message."))] * 40,
        )
        code = main(
            [
                "run",
                str(sample),
                "--out",
                str(tmp_path / "out"),
                "--engine",
                "openai",
                "--url",
                srv.url,
                "--model",
                "llama-8b",
                "--openai-server",
                "vllm",
                "--no-progress",
                "--no-report",
            ]
        )
        answered = 41 - len(srv._canned["/v1/chat/completions"]) - 1  # the probe is not a row
    err = capsys.readouterr().err
    assert code == 1 and "ignoring the regex field" in err and srv.url in err, err
    assert answered < 7 + 7  # stopped on the first answers: not every row's P1 and its retry


@pytest.mark.parametrize("server", ["vllm", "sglang"])
def test_a_chat_route_that_drops_the_regex_is_refused_at_start(server):
    """sglang-router forwards chat requests without vLLM's structured_outputs: the run stops before
    its first row, naming the launch line that keeps the regex."""

    async def go():
        async with OpenAIBackend(srv.url, model="m", api_key=None, server=server):
            raise AssertionError("started against a server that ignores the regex")

    with (
        StandInOpenAIServer(honours_regex=False) as srv,
        pytest.raises(EngineConfigError, match=r"ignores the regex field.*smg launch --backend vllm"),
    ):
        asyncio.run(go())
    assert len(srv.seen) == 1  # the probe only: no row was spent
