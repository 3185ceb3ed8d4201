"""VLLMHTTPBackend against a stand-in vLLM server (canned answers, no model) on 127.0.0.1 that
speaks vLLM 0.33.0's OpenAI routes: /v1/models, /v1/completions, /version, /metrics and the
dev-mode /server_info. The JSON we send is checked against the pinned vLLM's field names
(tests/engine/vllm_fields.json, extracted from the 0.33.0 wheel; re-checked against the source
when one is at hand), since vLLM silently ignores fields it does not know."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import socket
import time
import zipfile
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from engine.backend import (
    EngineAuthError,
    EngineDied,
    EngineOverloaded,
    EngineUnreachable,
    RequestRejected,
    TransientEngineError,
)
from engine.backends.vllm_http import VLLM_PIN, VLLMHTTPBackend
from engine.backends.vllm_wire import openai_regex_body
from engine.request import Request, SamplingParams, messages_prompt
from engine.scheduler import SchedulerConfig
from tests.engine import vllm_fields
from tests.local_http import QUICK, Canned, LocalHTTPServer, scheduled, tiny_tokenizer_dir

pytest.importorskip("aiohttp", reason="the vllm_http backend needs aiohttp: pip install -e '.[http]'")

REPO = Path(__file__).resolve().parents[2]
FIELDS = vllm_fields.shipped()["classes"]
# First prompt id -> what the stand-in does with the request.
BAD, MISSING, BUSY, CRASH, DOWN, SLOW, ABORT, ERROR, LENGTH, REPEAT, JUNK, NOTJSON = range(900, 912)
KEY = "sk-vllm-test-0123456789abcdef"


class StandInVLLMServer(LocalHTTPServer):
    """A stand-in for `vllm serve /models/Llama-3.1-8B-Instruct --served-model-name llama-8b`:
    canned text, real shapes. `details` plays --enable-prompt-tokens-details, `engines` the data
    parallel ranks /metrics shows, `dev` VLLM_SERVER_DEV_MODE=1, `api_key` --api-key."""

    def __init__(
        self,
        *,
        details: bool = True,
        engines: int = 0,
        dev: bool = False,
        api_key: str | None = None,
        kv_blocks: int = 0,
    ) -> None:
        super().__init__(_Handler)
        self.details, self.engines, self.dev, self.api_key = details, engines, dev, api_key
        self.kv_blocks = kv_blocks  # num_gpu_blocks in /metrics' cache_config_info (0: not shown)
        self.bodies: list[dict] = []
        self.auth: list[str | None] = []
        self.prompts: list[list[int]] = []


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send(self, status: int, body, headers: dict | None = None) -> None:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def _error(self, status: int, message: str, kind: str = "BadRequestError", **headers) -> None:
        error = {"message": message, "type": kind, "param": None, "code": status}
        self._send(status, {"error": error}, headers)

    def _authorized(self) -> bool:
        srv = self.server
        got = self.headers.get("Authorization")
        srv.auth.append(got)
        if srv.api_key and self.path.startswith("/v1") and got != f"Bearer {srv.api_key}":
            # vLLM answers {"error": "Unauthorized"}; this stand-in also echoes what it got, as some
            # proxies do, to prove the client scrubs it.
            self._send(401, {"error": f"Unauthorized: bad token {got}"})
            return False
        return True

    def do_GET(self):
        srv = self.server
        if srv.canned(self):
            return
        if not self._authorized():
            return
        if self.path == "/v1/models":
            lora = {
                "id": "tutor-lora",
                "object": "model",
                "root": "/loras/tutor",
                "parent": "llama-8b",
                "max_model_len": None,
            }
            base = {
                "id": "llama-8b",
                "object": "model",
                "owned_by": "vllm",
                "created": 0,
                "root": "/models/Llama-3.1-8B-Instruct",
                "parent": None,
                "max_model_len": 8192,
                "permission": [],
            }
            return self._send(200, {"object": "list", "data": [lora, base]})
        if self.path == "/version":
            return self._send(200, {"version": VLLM_PIN})
        if self.path == "/metrics" and srv.engines:
            # prometheus_client's order: label names as declared (model_name, engine)
            lines = [
                f'vllm:num_requests_running{{model_name="llama-8b",engine="{i}"}} 0.0'
                for i in range(srv.engines)
            ]
            lines += [
                f'vllm:cache_config_info{{block_size="16",cache_dtype="auto",'
                f'enable_prefix_caching="True",engine="{i}",num_cpu_blocks="None",'
                f'num_gpu_blocks="{srv.kv_blocks + i}"}} 1.0'
                for i in range(srv.engines)
                if srv.kv_blocks
            ]
            return self._send(200, ("# TYPE vllm:num_requests_running gauge\n" + "\n".join(lines)).encode())
        if self.path.startswith("/server_info") and srv.dev:
            return self._send(
                200,
                {
                    "vllm_config": {
                        "scheduler_config": {"max_num_seqs": 384},
                        "parallel_config": {"data_parallel_size": 2},
                    }
                },
            )
        self._send(404, {"detail": "Not Found"})

    def do_POST(self):
        srv = self.server
        if srv.canned(self):
            return
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = json.loads(raw) if raw else {}
        srv.bodies.append(body)
        if not self._authorized():
            return
        if self.path == "/reset_prefix_cache" and srv.dev:
            srv.prompts.clear()
            return self._send(200, b"")
        if self.path != "/v1/completions":
            return self._send(404, {"detail": "Not Found"})
        if body.get("model") not in (None, "llama-8b", "tutor-lora"):
            return self._error(404, f"The model `{body.get('model')}` does not exist.", "NotFoundError")
        prompt = body.get("prompt")
        ids = prompt if isinstance(prompt, list) else [ord(c) for c in prompt]
        first = ids[0]
        reply = {
            BAD: lambda: self._error(400, "Invalid regex: unbalanced parenthesis"),
            MISSING: lambda: self._error(404, "The model `x` does not exist.", "NotFoundError"),
            BUSY: lambda: self._error(429, "Too many requests", "RateLimitError", **{"Retry-After": "3"}),
            CRASH: lambda: self._error(500, "Internal server error", "InternalServerError"),
            DOWN: lambda: self._error(503, "Service Unavailable", "ServiceUnavailableError"),
            NOTJSON: lambda: self._send(200, b"<html>502 Bad Gateway</html>"),
            JUNK: lambda: self._send(
                200, {"choices": [{"text": 7, "finish_reason": "stop"}], "usage": {"prompt_tokens": 3}}
            ),
        }.get(first)
        if reply is not None:
            return reply()
        if first == SLOW:  # far past any timeout a test sets: one that did not fire shows
            time.sleep(3.0)
        if srv.delay_s:
            time.sleep(srv.delay_s)
        reason = {ABORT: "abort", ERROR: "error", LENGTH: "length", REPEAT: "repetition"}.get(first, "stop")
        previous = srv.prompts[-1] if srv.prompts else []
        cached = next(
            (i for i, (a, b) in enumerate(zip(previous, ids, strict=False)) if a != b),
            min(len(previous), len(ids)),
        )
        srv.prompts.append(ids)
        usage = {
            "prompt_tokens": len(ids),
            "total_tokens": len(ids) + 6,
            "completion_tokens": 6,
            "prompt_tokens_details": {"cached_tokens": cached} if srv.details else None,
        }
        self._send(
            200,
            {
                "id": "cmpl-1",
                "object": "text_completion",
                "created": 0,
                "model": body.get("model"),
                "choices": [
                    {
                        "index": 0,
                        "text": "<Role>A tutor.</Role>\n",
                        "logprobs": None,
                        "finish_reason": reason,
                        "stop_reason": None,
                    }
                ],
                "usage": usage,
            },
        )


def req(
    *ids: int,
    regex: str | None = "(<Role>[^<>\\n]{1,300}</Role>\\n)",
    stop: tuple[str, ...] = (),
    temperature: float = 0.0,
    seed: int = 0,
) -> Request:
    return Request(
        prompt=ids or (1, 2, 3),
        model="m",
        regex=regex,
        sampling=SamplingParams(temperature=temperature, max_new_tokens=64, seed=seed, stop=stop),
    )


def serve_and_run(srv: StandInVLLMServer, body, **kw):
    """Enter a backend on `srv`, await body(backend), return (backend, its result)."""

    async def go():
        async with VLLMHTTPBackend(srv.url, **kw) as b:
            return b, await body(b)

    with srv:
        return asyncio.run(go())


def pinned_vllm() -> str:
    from kernels_cfg import tomllib

    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["vllm"]
    m = next((re.match(r"vllm==([\w.]+)$", r) for r in extra if r.startswith("vllm==")), None)
    assert m, f"pyproject.toml [vllm] extra pins no vllm version: {extra}"
    return m.group(1)


def test_vllm_pin_is_one_version_in_pyproject_readme_fields_and_backend():
    pin = pinned_vllm()
    assert vllm_fields.shipped()["vllm"] == pin == VLLM_PIN
    assert f"vLLM {pin}" in (REPO / "README.md").read_text()


def test_vllm_shipped_field_list_matches_the_pinned_source():
    source = vllm_fields.find_source()
    if source is None:
        pytest.skip(
            f"no vLLM source here (the wheel is ~340 MB): pip download --no-deps vllm=={VLLM_PIN} "
            "-d /tmp/vllm, then SYSGEN_VLLM_SOURCE=/tmp/vllm/vllm-*.whl"
        )
    got = vllm_fields.extract(source)
    assert got["vllm"] == VLLM_PIN, f"{source} is vLLM {got['vllm']}, the pin is {VLLM_PIN}"
    assert got == vllm_fields.shipped(), (
        "regenerate: python -m tests.engine.vllm_fields WHEEL > tests/engine/vllm_fields.json"
    )


def test_vllm_field_reader_on_a_synthetic_wheel(tmp_path):
    """The extractor, without the real wheel: pydantic models, a dataclass with private fields,
    ClassVar left out, the finish-reason tuple and the version."""
    model = (
        "from typing import ClassVar\nclass A(Base):\n    names: ClassVar[set] = None\n"
        "    x: int = 0\n    y: str | None = Field(None)\n    def f(self): z: int = 1\n"
    )
    files = {
        "_version.py": "__version__ = version = '9.9.9'\n",
        "sampling_params.py": "class StructuredOutputsParams:\n    regex: str | None = None\n"
        "    _backend: str | None = field(default=None)\n",
        "v1/engine/__init__.py": "FINISH_REASON_STRINGS = ('stop', 'length')\n",
    }
    for cls, rel in vllm_fields.CLASSES.items():
        files.setdefault(rel, "")
        if cls != "StructuredOutputsParams":
            files[rel] += model.replace("class A", f"class {cls}")
    wheel = tmp_path / "vllm-9.9.9-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for rel, text in files.items():
            z.writestr(f"vllm/{rel}", text)
    got = vllm_fields.extract(wheel)
    assert got["vllm"] == "9.9.9" and got["finish_reasons"] == ["stop", "length"]
    assert got["classes"]["StructuredOutputsParams"] == ["regex"]
    assert got["classes"]["CompletionRequest"] == ["x", "y"]


def test_vllm_token_ids_regex_and_sampling_reach_the_server_in_pinned_fields():
    srv = StandInVLLMServer()
    ids = (128000, 128006, 9125, 128007, 271, 42, 0, 7)  # template first, as our prefix split builds
    _backend, result = serve_and_run(
        srv, lambda b: b.generate(req(*ids, stop=("</Role>",), temperature=0.7, seed=11))
    )
    (body,) = srv.bodies
    assert set(body) <= set(FIELDS["CompletionRequest"]), (
        f"not CompletionRequest fields of vLLM {VLLM_PIN}: {set(body) - set(FIELDS['CompletionRequest'])}"
    )
    assert set(body["structured_outputs"]) <= set(FIELDS["StructuredOutputsParams"])
    assert body["prompt"] == list(ids) and all(type(i) is int for i in body["prompt"])
    assert body["structured_outputs"] == {"regex": "(<Role>[^<>\\n]{1,300}</Role>\\n)"}
    assert (body["model"], body["max_tokens"], body["temperature"], body["seed"], body["stop"]) == (
        "llama-8b",
        64,
        0.7,
        11,
        ["</Role>"],
    )
    assert not any(k.startswith("guided_") for k in body)  # removed in vLLM: silently ignored
    # Sent, not left to the model's generation_config.json: the same request as on SGLang and OpenVINO.
    assert (body["top_k"], body["min_p"], body["repetition_penalty"]) == (-1, 0.0, 1.0)
    assert result.ok and result.text == "<Role>A tutor.</Role>\n"


def test_vllm_unconstrained_and_text_prompts():
    srv = StandInVLLMServer()

    async def body(b):
        await b.generate(req(regex=None))
        await b.generate(Request(prompt="hello", sampling=SamplingParams(), model="m"))
        chat = Request(
            prompt=messages_prompt([{"role": "user", "content": "hi"}]), sampling=SamplingParams(), model="m"
        )
        with pytest.raises(RequestRejected, match="--model"):
            await b.generate(chat)  # no local tokenizer: ids cannot be built

    serve_and_run(srv, body)
    assert "structured_outputs" not in srv.bodies[0] and "stop" not in srv.bodies[0]
    assert srv.bodies[1]["prompt"] == "hello"


def test_vllm_finish_reasons_and_token_counts_map():
    srv = StandInVLLMServer()

    async def body(b):
        first = await b.generate(req(5, 6, 7, 8))
        second = await b.generate(req(5, 6, 7, 9, 10))  # shares 3 tokens with the first
        length = await b.generate(req(LENGTH, 1))
        repeat = await b.generate(req(REPEAT, 1))
        errors = []
        for code in (ABORT, ERROR):
            with pytest.raises(TransientEngineError, match="finish_reason") as e:
                await b.generate(req(code))
            errors.append(e.value)
        return first, second, length, repeat, errors

    _, (first, second, length, repeat, errors) = serve_and_run(srv, body)
    assert (first.finish_reason, first.prompt_tokens, first.completion_tokens, first.cached_tokens) == (
        "stop",
        4,
        6,
        0,
    )
    assert (second.prompt_tokens, second.cached_tokens) == (5, 3)
    assert length.finish_reason == "length" and repeat.finish_reason == "length"
    assert all(e.retryable for e in errors)
    assert set(vllm_fields.shipped()["finish_reasons"]) == {"stop", "length", "abort", "error", "repetition"}
    # Without --enable-prompt-tokens-details the server sends no details: 0 cached, not an error.
    _, plain = serve_and_run(StandInVLLMServer(details=False), lambda b: b.generate(req(1, 2)))
    assert plain.ok and plain.cached_tokens == 0 and plain.prompt_tokens == 2


@pytest.mark.parametrize(
    "code,kind,match",
    [
        (BAD, RequestRejected, "400 Invalid regex: unbalanced parenthesis"),
        (MISSING, RequestRejected, "404 The model"),
        (BUSY, EngineOverloaded, "429 Too many requests"),
        (CRASH, TransientEngineError, "500 Internal server error"),
        (DOWN, EngineOverloaded, "503 Service Unavailable"),
        (JUNK, TransientEngineError, "malformed answer \\(text is not a string\\)"),
        (NOTJSON, TransientEngineError, "answer is not JSON"),
    ],
)
def test_vllm_http_errors_map_to_their_kinds(code, kind, match):
    async def body(b):
        with pytest.raises(kind, match=match) as e:
            await b.generate(req(code))
        return e.value

    _, err = serve_and_run(StandInVLLMServer(), body)
    assert type(err) is kind and err.retryable == issubclass(kind, TransientEngineError)
    if code == BUSY:
        assert err.retry_after_s == 3.0  # the scheduler waits this long, spending no retry


def test_vllm_slow_answer_times_out_as_transient():
    async def body(b):
        t0 = time.monotonic()
        with pytest.raises(TransientEngineError, match=r"no answer in 0.3s"):
            await b.generate(req(SLOW))
        return time.monotonic() - t0

    _, seconds = serve_and_run(StandInVLLMServer(), body, timeout_s=0.3)
    assert seconds < 2.0  # 0.3 s, with room for a loaded machine


def test_vllm_api_key_never_in_logs_errors_or_repr(caplog):
    caplog.set_level(logging.DEBUG)  # aiohttp's loggers and ours, at their most verbose
    srv = StandInVLLMServer(api_key=KEY)
    backend, result = serve_and_run(srv, lambda b: b.generate(req()), api_key=KEY)
    assert result.ok and set(srv.auth) == {f"Bearer {KEY}"}  # every call, /metrics included
    assert KEY not in repr(backend) and "api_key=<set>" in repr(backend)
    wrong = "sk-wrong-key-9876543210"
    with pytest.raises(EngineAuthError) as e:  # stops the run at once: no retry fixes a key
        serve_and_run(StandInVLLMServer(api_key=KEY), lambda b: b.generate(req()), api_key=wrong)
    assert "401" in str(e.value) and "--api-key" in str(e.value) and "<api key>" in str(e.value)
    assert wrong not in str(e.value) and wrong[:8] not in str(e.value)
    for secret in (KEY, wrong):
        assert secret not in caplog.text and secret[:8] not in caplog.text


@pytest.mark.slow
def test_vllm_served_model_context_and_capacity_read_from_the_server():
    backend, _ = serve_and_run(StandInVLLMServer(), lambda b: asyncio.sleep(0))
    assert backend.served_model == "llama-8b" and backend.model_id == "llama-8b"  # the LoRA card skipped
    assert backend.capabilities.max_context == 8192 and backend.capabilities.regex
    assert backend.server_version == VLLM_PIN
    assert backend.capabilities.max_running == 256 and backend.capacity_source == "default"
    assert backend.capabilities.token_ids is False  # no --model and the root is not on this machine
    dp, _ = serve_and_run(StandInVLLMServer(engines=8), lambda b: asyncio.sleep(0))
    assert dp.capabilities.max_running == 8 * 256 and dp.max_concurrency == 8 * 256 + 128
    dev, _ = serve_and_run(StandInVLLMServer(engines=8, dev=True), lambda b: asyncio.sleep(0))
    assert dev.capabilities.max_running == 384 * 2  # max_num_seqs x data_parallel_size
    capped, _ = serve_and_run(StandInVLLMServer(engines=8), lambda b: asyncio.sleep(0), max_concurrency=40)
    assert capped.capabilities.max_running == 40 and capped.max_concurrency == 40
    lora, _ = serve_and_run(
        StandInVLLMServer(), lambda b: asyncio.sleep(0), tokenizer=object(), model_path="/elsewhere/tutor"
    )
    assert lora.served_model == "tutor-lora" and lora.capabilities.token_ids


def test_vllm_connection_pool_follows_the_window():
    async def pool(b):
        return b._client.max_connections

    backend, size = serve_and_run(StandInVLLMServer(engines=4), pool)
    assert size == backend.max_concurrency == 4 * 256 + 128
    _capped, size = serve_and_run(StandInVLLMServer(engines=4), pool, max_concurrency=40)
    assert size == 40


def test_vllm_unreachable_server_fails_fast_with_the_fix():
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def go():
        async with VLLMHTTPBackend(f"http://127.0.0.1:{port}", retries=1):
            pass

    t0 = time.monotonic()
    with pytest.raises(EngineDied, match=r"no vLLM server answers.*vllm serve"):
        asyncio.run(go())
    assert time.monotonic() - t0 < 5


def through_scheduler(srv: StandInVLLMServer, n: int, config: SchedulerConfig = QUICK, during=None):
    """n distinct requests through a Scheduler; `during(srv)` runs in a thread once they are going."""

    async def go():
        async with VLLMHTTPBackend(srv.url) as b:
            return await scheduled(b, [req(1000 + i) for i in range(n)], config, srv, during)

    with srv:
        return asyncio.run(go())


def test_vllm_load_shedding_is_retried_after_retry_after_without_spending_retries():
    srv = StandInVLLMServer()
    srv.inject(
        "/v1/completions",
        *[Canned(429, {"error": {"message": "slow down"}}, headers={"Retry-After": "0.4"})] * 3,
    )
    t0 = time.monotonic()
    (result,), m = through_scheduler(srv, 1, dataclasses.replace(QUICK, max_retries=0))
    assert result.ok and result.text == "<Role>A tutor.</Role>\n"
    assert m.shed == 3 and m.failures == 0 and time.monotonic() - t0 >= 1.2


@pytest.mark.slow
def test_vllm_connection_refused_is_unreachable_and_a_restart_loses_nothing():
    srv = StandInVLLMServer()

    async def body(b):
        srv.down()
        with pytest.raises(EngineUnreachable, match="cannot connect"):
            await b.generate(req())
        srv.up()

    serve_and_run(srv, body)
    srv = StandInVLLMServer()
    srv.delay_s = 0.05  # 120 requests, 8 at a time: 0.75 s of work, cut by a 1 s outage at 0.05 s
    results, m = through_scheduler(srv, 120, during=lambda s: s.outage(1.0).join())
    assert all(r.ok for r in results), [r.error for r in results if not r.ok][:3]
    assert m.failures == 0 and m.unreachable > 0


@pytest.mark.parametrize("with_length", [True, False])
def test_vllm_a_body_larger_than_the_token_budget_is_refused_unread(with_length):
    huge = {"choices": [{"text": "y" * (1 << 20), "finish_reason": "stop"}], "usage": {"prompt_tokens": 3}}
    srv = StandInVLLMServer()
    srv.inject("/v1/completions", Canned(200, huge, content_length=with_length))

    async def body(b):
        with pytest.raises(TransientEngineError, match="token budget"):
            await b.generate(req())  # max_new_tokens 64: at most 64 x 64 B + 64 KiB

    serve_and_run(srv, body)


def test_vllm_start_stops_at_once_on_a_wrong_url_or_a_server_that_is_not_vllm():
    srv = StandInVLLMServer()
    srv.inject("/v1/models", Canned(404, {"detail": "Not Found"}))
    t0 = time.monotonic()
    with pytest.raises(EngineDied, match="404 Not Found; is --url a vLLM server"):
        serve_and_run(srv, lambda b: asyncio.sleep(0))
    srv = StandInVLLMServer()
    srv.inject("/v1/models", Canned(200, b"<html>hello</html>", content_type="text/html"))
    with pytest.raises(EngineDied, match="not vLLM: GET /v1/models gave text/html '<html>hello"):
        serve_and_run(srv, lambda b: asyncio.sleep(0))
    assert time.monotonic() - t0 < 2  # no retries with backoff: neither can be fixed by waiting
    srv = StandInVLLMServer()  # a server still loading sheds load: waited out at start
    srv.inject("/v1/models", Canned(503, {"error": "loading"}, headers={"Retry-After": "0"}))
    backend, _ = serve_and_run(srv, lambda b: asyncio.sleep(0))
    assert backend.served_model == "llama-8b"


def test_vllm_http_is_an_engine_choice_for_run_and_select(tmp_path):
    from engine.backends.select import choose_backend
    from sysgen.backend_factory import make_backend
    from sysgen.config import RunConfig

    with pytest.raises(ValueError, match="--engine vllm_http needs --url"):
        RunConfig(inputs=("a.jsonl",), out=str(tmp_path), engine="vllm_http")
    assert RunConfig(inputs=("a.jsonl",), out=str(tmp_path), engine="vllm_http", url="http://h:8000").url
    assert choose_backend("vllm_http")[0] == "vllm_http"
    b = make_backend("vllm_http", model=None, url="http://127.0.0.1:8000", api_key=KEY, max_inflight=7)
    assert isinstance(b, VLLMHTTPBackend) and b.capabilities.max_running == 7 and KEY not in repr(b)


def test_vllm_and_sglang_regex_fields_for_the_openai_route():
    body = openai_regex_body("vllm", "a+")
    assert set(body) <= set(FIELDS["CompletionRequest"]) and set(body["structured_outputs"]) == {"regex"}
    assert openai_regex_body("sglang", "a+") == {"regex": "a+"}
    from kernels_cfg.fields import class_field_names, sglang_root

    root = sglang_root()
    if root is not None:  # the pinned SGLang's OpenAI chat route takes a top-level `regex`
        assert "regex" in class_field_names(
            root / "srt" / "entrypoints" / "openai" / "protocol.py", "ChatCompletionRequest"
        )
    with pytest.raises(ValueError, match="vllm"):
        openai_regex_body("tgi", "a+")


def test_vllm_chat_prompts_become_token_ids_with_a_local_tokenizer(tmp_path):
    model = tiny_tokenizer_dir(tmp_path / "Llama-3.1-8B-Instruct")
    srv = StandInVLLMServer()
    chat = Request(
        prompt=messages_prompt([{"role": "user", "content": "there hi"}]),
        sampling=SamplingParams(),
        model="m",
    )
    backend, result = serve_and_run(srv, lambda b: b.generate(chat), model_path=str(model))
    assert backend.capabilities.token_ids and result.ok and srv.bodies[-1]["prompt"] == [2, 1]
    assert backend.served_model == "llama-8b"  # matched by the model directory's name (the card's root)


def test_vllm_bench_gpu_url_mode_drives_a_running_server(tmp_path, capsys):
    import orjson

    from bench import gpu

    model = tiny_tokenizer_dir(tmp_path / "tok")
    out = tmp_path / "bench.json"
    srv = StandInVLLMServer(dev=True)
    with srv:
        assert (
            gpu.main(
                ["--url", srv.url, "--model", str(model), "--n", "5", "--warmup", "2", "--json", str(out)]
            )
            == 0
        )
    info = orjson.loads(out.read_bytes())
    assert [r["part"] for r in info["results"]] == ["raw_free", "raw_regex", "sysgen_regex"]
    assert all(r["requests"] == 5 and r["failed"] == 0 and r["output_tokens"] == 30 for r in info["results"])
    assert info["engine"] == "vllm_http" and info["served_model"] == "llama-8b" and info["capacity"] == 768
    assert all(info["cache_reset"].values())
    regexed = [b for b in srv.bodies if b.get("prompt") and "structured_outputs" in b]
    # warmup 2, raw_regex 5, then sysgen_regex: each distinct prompt once (the tiny vocabulary maps
    # most words to [UNK], so some P1 prompts coincide and the scheduler sends them once)
    distinct = {tuple(b["prompt"]) for b in regexed[2:7]}
    assert len(regexed) == 2 + 5 + len(distinct) and {tuple(b["prompt"]) for b in regexed[7:]} == distinct
    assert "sysgen_regex" in capsys.readouterr().out


def test_vllm_cli_run_sends_token_ids_and_the_p1_regex(tmp_path, caplog):
    """`sysgen run --engine vllm_http` end to end against the stand-in (canned answers: P1 parses,
    later phases drop the instances; what matters here is what reached the server)."""
    from sysgen.cli import main

    model = tiny_tokenizer_dir(tmp_path / "Llama-3.1-8B-Instruct")
    srv = StandInVLLMServer()
    with srv:
        sample = str(REPO / "sysgen" / "samples" / "demo_mixed.jsonl")
        code = main(
            [
                "run",
                sample,
                "--out",
                str(tmp_path / "out"),
                "--engine",
                "vllm_http",
                "--url",
                srv.url,
                "--model",
                str(model),
                "--limit",
                "3",
                "--no-progress",
                "--no-report",
                "--api-key",
                KEY,
            ]
        )
    assert code == 0 and srv.bodies and KEY not in caplog.text
    p1 = [b for b in srv.bodies if b["max_tokens"] == 320]  # --p1-max-tokens default
    assert len(p1) == 3 and all(
        isinstance(b["prompt"], list) and "<Role>" in b["structured_outputs"]["regex"] for b in p1
    )
    assert set(srv.auth) == {f"Bearer {KEY}"}


def test_vllm_backend_used_again_after_close_reopens():
    async def body(b):
        await b.close()
        return await b.generate(req())  # a judge pass after the run's pass, on the same backend

    _, result = serve_and_run(StandInVLLMServer(), body)
    assert result.ok


def test_vllm_window_is_sized_from_the_kv_blocks_in_metrics():
    from engine.policy import engine_window
    from engine.scheduler import Scheduler

    two, _ = serve_and_run(StandInVLLMServer(engines=2, kv_blocks=5000), lambda b: asyncio.sleep(0))
    caps = two.capabilities
    assert caps.kv_tokens == 5000 * 16 and caps.dp_size == 2  # the smaller engine's cache
    assert caps.max_running == 2 * 1024 and "cache_config_info" in two.capacity_source
    sched = Scheduler(two, None)
    assert sched.window == engine_window(2048, 2) and sched._resize_from is not None
    # Without the cache line, as before: DEFAULT_RUNNING per engine, no KV sizing.
    plain, _ = serve_and_run(StandInVLLMServer(engines=2), lambda b: asyncio.sleep(0))
    assert plain.capabilities.kv_tokens == 0 and plain.capabilities.max_running == 2 * 256


def test_vllm_kv_cache_tokens_reads_each_engine_and_skips_unprofiled_ones():
    from engine.backends.vllm_wire import kv_cache_tokens

    text = (
        'vllm:cache_config_info{block_size="16",engine="0",num_gpu_blocks="100"} 1.0\n'
        'vllm:cache_config_info{block_size="32",engine="1",num_gpu_blocks="None"} 1.0\n'
    )
    assert kv_cache_tokens(text) == (1, 1600)
    # kv_cache_size_tokens, where the engine set it, is the exact figure; odd values elsewhere are skipped.
    text = (
        'vllm:cache_config_info{block_size="16",engine="0",kv_cache_size_tokens="1500",'
        'mode="{\\"a\\": \\"}\\"}",num_gpu_blocks="100",skip_layers="[]"} 1.0\n'
    )
    assert kv_cache_tokens(text) == (1, 1500)
    assert kv_cache_tokens("vllm:num_requests_running 0.0") == (0, 0)


# -- through a router (smg / sglang-router shapes, checked against the real ones in tests/real) ------

SMG_WORKERS = {
    "workers": [
        {
            "url": f"http://w{i}:8000",
            "is_healthy": True,
            "labels": {"max_model_len": "4096"},
            "models": [{"id": "llama-8b", "context_length": 4096 if i else 6144}],
            "engine_load": {"dp_rank_count": 1, "loads": [{"dp_rank": 0, "max_running_requests": 0}]},
        }
        for i in range(3)
    ]
    + [{"url": "http://sick:8000", "is_healthy": False}],
    "total": 4,
}
ROUTER_MODELS = {"object": "list", "data": [{"id": "llama-8b", "object": "model", "owned_by": "self_hosted"}]}
STRING_OR_ARRAY = (
    "Failed to deserialize the JSON body into the target type: prompt: data did not match any "
    "variant of untagged enum StringOrArray"
)


def test_through_a_router_prompts_go_as_text_and_the_fleet_is_summed(tmp_path):
    srv = StandInVLLMServer()
    srv.inject("/v1/models", Canned(200, ROUTER_MODELS))  # a router's card: no max_model_len
    srv.inject("/workers", Canned(200, SMG_WORKERS))
    srv.inject("/v1/completions", Canned(400, {"error": {"message": STRING_OR_ARRAY}}))  # the id probe
    chat = Request(
        prompt=messages_prompt([{"role": "user", "content": "hi there"}]),
        model="m",
        sampling=SamplingParams(max_new_tokens=8),
    )
    backend, result = serve_and_run(
        srv, lambda b: b.generate(chat), model_path=str(tiny_tokenizer_dir(tmp_path))
    )
    assert result.ok and backend.prompt_form == "text"
    (sent,) = srv.bodies  # the canned 400 answered the token-id probe, unrecorded
    assert isinstance(sent["prompt"], str) and "hi there" in sent["prompt"]
    assert backend.capabilities.max_context == 4096  # the smallest worker's, never 1,048,576
    assert backend.capabilities.max_running == 3 * 256  # three healthy workers summed, the sick one not
    assert backend.capacity_source.startswith("router /workers: 3 worker(s)")


def test_a_server_that_takes_token_ids_keeps_them(tmp_path):
    srv = StandInVLLMServer()
    backend, _ = serve_and_run(
        srv, lambda b: b.generate(req(5, 6, 7)), model_path=str(tiny_tokenizer_dir(tmp_path))
    )
    assert backend.prompt_form == "ids" and srv.bodies[-1]["prompt"] == [5, 6, 7]


def test_a_router_with_no_context_anywhere_stops_with_the_fix():
    srv = StandInVLLMServer()
    srv.inject("/v1/models", Canned(200, ROUTER_MODELS))
    with pytest.raises(EngineDied, match=r"reports no context length.*pass --model DIR"):
        serve_and_run(srv, lambda b: asyncio.sleep(0))


@pytest.mark.parametrize("first", [ABORT, CRASH])
def test_abort_or_500_from_a_server_going_away_waits_like_unreachable(first):
    srv = StandInVLLMServer()
    srv.inject("/health", Canned(503, {"error": "EngineDeadError"}))  # vLLM once its engine died
    _, err = serve_and_run(srv, lambda b: _raised(b.generate(req(first))))
    assert isinstance(err, EngineUnreachable) and "/health fails" in str(err)


@pytest.mark.parametrize("first", [ABORT, CRASH])
def test_abort_or_500_from_a_healthy_server_is_an_ordinary_retry(first):
    _, err = serve_and_run(StandInVLLMServer(), lambda b: _raised(b.generate(req(first))))
    assert type(err) is TransientEngineError


async def _raised(aw):
    try:
        await aw
    except Exception as e:
        return e
    raise AssertionError("no error")


def test_a_stalled_server_is_resubmitted_through_the_breaker_without_spending_retries():
    """The old server's front end holds our requests without answering (its engine is gone); the
    liveness check finds no request running, the requests go again to what answers now."""
    from engine.liveness import Liveness

    srv = StandInVLLMServer()
    checks = []

    async def stalled(outstanding):
        checks.append(outstanding)
        srv.delay_s = 0.0  # meanwhile a new server took over the URL
        return "nothing running"

    async def go():
        async with VLLMHTTPBackend(srv.url) as b:
            b.liveness = Liveness(stalled, quiet_s=0.3, every_s=0.1)
            srv.delay_s = 30.0  # the hung front end: accepts, never answers in time
            cfg = SchedulerConfig(max_retries=0, timeout_s=60, backoff_base_s=0.05, probe_max_s=0.2)
            return await scheduled(b, [req(i) for i in range(3)], cfg)

    with srv:
        t0 = time.monotonic()
        results, metrics = asyncio.run(go())
        seconds = time.monotonic() - t0
    assert all(r.ok for r in results) and metrics.retries == 0 and metrics.unreachable >= 3
    assert checks and seconds < 10  # not the 30 s hang, nor the request timeout
