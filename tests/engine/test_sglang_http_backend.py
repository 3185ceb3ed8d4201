"""SGLangHTTPBackend against a real HTTP server on 127.0.0.1 that speaks SGLang's native API
(a stand-in: canned answers, no model). Checks the JSON we send against the pinned SGLang's
api/v1 schema (read with ast), and error classification by status: 200, 400, 503, slow, down."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler

import pytest

from engine.backend import EngineDied, RequestRejected, TransientEngineError
from engine.backends.sglang_http import SGLangHTTPBackend
from engine.request import Request, SamplingParams, messages_prompt
from kernels_cfg.fields import class_field_names, sglang_root
from tests.local_http import LocalHTTPServer

pytest.importorskip("httpx", reason="the sglang_http backend needs httpx: pip install -e '.[http]'")

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
        routes = {"/model_info": {"model_path": "/models/Llama-3.1-8B-Instruct", "is_generation": True},
                  "/server_info": {"max_running_requests": 200, "dp_size": 2, "grammar_backend": "xgrammar",
                                   "context_length": 4096, "internal_states": [
                                       {"effective_max_running_requests_per_dp": 100},
                                       {"effective_max_running_requests_per_dp": 100}]}}
        path = self.path.replace("/get_", "/") if srv.router else self.path
        if srv.router and self.path in routes:  # a router serving only the older /get_* paths
            return self._send(404, {"detail": "Not Found"})
        if path in routes:
            return self._send(200, routes[path])
        self._send(404, {"detail": "Not Found"})

    def do_POST(self):
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with srv.lock:
            srv.bodies.append(body)
            srv.inflight += 1
            srv.peak = max(srv.peak, srv.inflight)
        try:
            first = (body.get("input_ids") or [0])[0]
            if srv.delay_s:
                time.sleep(srv.delay_s)
            if first == SLOW:
                time.sleep(1.0)
            if first == BAD:
                return self._send(400, {"error": {"message": "Invalid regex: unbalanced parenthesis"}})
            if first == DOWN:
                return self._send(503, {"error": {"message": "server is shutting down"}})
            n = len(body.get("input_ids") or body.get("text", ""))
            self._send(200, {"text": "<Role>A tutor.</Role>\n", "meta_info": {
                "id": "abc", "finish_reason": {"type": "stop", "matched": 128009}, "prompt_tokens": n,
                "completion_tokens": 6, "cached_tokens": max(0, n - 1), "e2e_latency": 0.01}})
        finally:
            with srv.lock:
                srv.inflight -= 1


def req(first: int = 1, regex: str | None = "(<Role>[^<>\\n]{1,300}</Role>\\n)") -> Request:
    return Request(prompt=(first, 2, 3), sampling=SamplingParams(temperature=0.0, max_new_tokens=64),
                   model="m", regex=regex)


def run(coro):
    return asyncio.run(coro)


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
    assert (result.text, result.finish_reason, result.prompt_tokens, result.cached_tokens) == \
        ("<Role>A tutor.</Role>\n", "stop", 3, 2)
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
                with pytest.raises(TransientEngineError, match="no answer in 0.3s"):
                    await b.generate(req(SLOW))
                return time.monotonic() - t0

        assert run(go()) < 0.9


def test_unreachable_server_fails_fast_with_the_fix():
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def go():
        async with SGLangHTTPBackend(f"http://127.0.0.1:{port}", model_path=None, retries=1):
            pass

    t0 = time.monotonic()
    with pytest.raises(EngineDied, match="no SGLang server answers.*sglang.launch_server"):
        run(go())
    assert time.monotonic() - t0 < 5


def test_text_prompt_and_messages_without_tokenizer():
    with StandInSGLangServer() as srv:
        async def go():
            async with SGLangHTTPBackend(srv.url, model_path=None) as b:
                text = Request(prompt="hello", sampling=SamplingParams(), model="m")
                r = await b.generate(text)
                chat = Request(prompt=messages_prompt([{"role": "user", "content": "hi"}]),
                               sampling=SamplingParams(), model="m")
                with pytest.raises(RequestRejected, match="--model"):
                    await b.generate(chat)
                return r

        assert run(go()).prompt_tokens == 5
    assert srv.bodies[0]["text"] == "hello" and "input_ids" not in srv.bodies[0]


def test_tokenizer_from_a_local_model_dir(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {"[UNK]": 0, "hi": 1, "there": 2}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    fast.save_pretrained(tmp_path)
    with StandInSGLangServer() as srv:
        async def go():
            async with SGLangHTTPBackend(srv.url, model_path=str(tmp_path)) as b:
                ids = tuple(b.tokenizer.encode("hi there", add_special_tokens=False))
                chat = Request(prompt=messages_prompt([{"role": "user", "content": "there hi"}]),
                               sampling=SamplingParams(), model="m")
                await b.generate(chat)  # the chat template is applied here, ids go out
                return b, await b.generate(Request(prompt=ids, sampling=SamplingParams(), model="m"))

        backend, result = run(go())
    assert backend.capabilities.token_ids and result.ok
    assert srv.bodies[0]["input_ids"] == [2, 1] and srv.bodies[1]["input_ids"] == [1, 2]
    # The server's model is what names the results, not the local tokenizer directory.
    assert backend.model_id == "Llama-3.1-8B-Instruct"
