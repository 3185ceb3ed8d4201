"""SGLang over HTTP: the native `/generate` of `sglang.launch_server`, or of a router (smg /
sglang-router) in front of many of them: the path to many GPUs and many nodes.

Request: POST /generate {"input_ids" | "text", "sampling_params", "rid"}; response {"text",
"meta_info": {"prompt_tokens", "completion_tokens", "cached_tokens", "finish_reason"}} (sglang
0.5.23 api/v1 GenerateRequest / GenerateResponse). Errors are classified by type: HTTP 4xx ->
RequestRejected, 5xx, connection errors and timeouts -> TransientEngineError. Retries are the
scheduler's job (it backs off with jitter); `retries` here only covers reaching the server at start.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

from engine.backend import BackendBase, Capabilities, EngineDied, RequestRejected, TransientEngineError
from engine.backends.sglang import default_model_id, result_from_output, sampling_params_for
from engine.request import Request, Result, prompt_messages

log = logging.getLogger(__name__)

HTTPX_HINT = "pip install -e '.[http]'"


def _httpx():
    try:
        import httpx
    except ImportError as e:
        raise ImportError(f"the sglang_http backend needs httpx: {HTTPX_HINT}") from e
    return httpx


def error_message(response: Any) -> str:
    """The server's own words from an error response: {"error": {"message"}} | {"error": str} |
    FastAPI's {"detail": ...} | plain text."""
    try:
        body = response.json()
    except ValueError:
        return (response.text or response.reason_phrase or "").strip()[:500]
    if isinstance(body, dict):
        err = body.get("error", body.get("detail", body.get("message")))
        if isinstance(err, dict):
            err = err.get("message", err)
        return str(err)[:500]
    return str(body)[:500]


class SGLangHTTPBackend(BackendBase):
    """`async with SGLangHTTPBackend(url, model_path=...) as b:`: entering asks the server what it
    serves and how many requests it runs at once (for the scheduler's window), and fails fast
    with a clear message when nothing answers at `base_url`."""

    name = "sglang_http"

    def __init__(self, base_url: str, *, model_path: str | None, model_id: str | None = None,
                 max_concurrency: int | None = None, timeout_s: float = 600, retries: int = 3,
                 tokenizer: Any = None) -> None:
        if max_concurrency is not None and max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.base_url = base_url.rstrip("/")
        self.model_path = model_path
        self.timeout_s = timeout_s
        self.retries = retries
        # None: sized from the server's running capacity at start (capacity + 128, at least 256),
        # so an 8-GPU server is not starved by a client-side cap; an int is a hard cap.
        self._cap = max_concurrency
        self.max_concurrency = max_concurrency or 256
        self._explicit_model_id = model_id
        fallback = default_model_id(model_path, {}) if model_path else f"sglang@{self.base_url}"
        self.model_id = model_id or fallback
        self.tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(model_path)
        self.capabilities = Capabilities(regex=True, token_ids=self.tokenizer is not None,
                                         max_running=self.max_concurrency, max_context=1 << 20)
        self.server_info: dict[str, Any] = {}
        self.model_info: dict[str, Any] = {}
        self._client = None
        self._sem = asyncio.Semaphore(self.max_concurrency)

    async def __aenter__(self) -> SGLangHTTPBackend:
        await self.start()
        return self

    async def start(self) -> None:
        """Open the connection pool and read /model_info and /server_info."""
        if self._client is not None:
            return
        httpx = _httpx()
        # The semaphore bounds requests in flight; the pool keeps one connection per request.
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        self._client = httpx.AsyncClient(base_url=self.base_url, limits=limits,
                                         timeout=httpx.Timeout(self.timeout_s, connect=10.0))
        self.model_info = await self._get_info("model_info")
        self.server_info = await self._get_info("server_info")
        self._apply_info()

    async def _get_info(self, what: str) -> dict[str, Any]:
        """GET /<what>, falling back to the older /get_<what> that routers still serve. Connection
        failures are retried `retries` times with backoff, then the run stops: no server, no run."""
        httpx = _httpx()
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                for path in (f"/{what}", f"/get_{what}"):
                    r = await self._client.get(path, timeout=30.0)
                    if r.status_code == 404:
                        continue
                    if r.status_code >= 400:
                        log.warning("GET %s%s: %d %s", self.base_url, path, r.status_code, error_message(r))
                        return {}
                    body = r.json()
                    return body if isinstance(body, dict) else {}
                return {}  # neither path: a router that does not say
            except (httpx.TransportError, ValueError) as e:
                last = e
                if attempt < self.retries:
                    await asyncio.sleep(min(8.0, 0.5 * 2**attempt) * (0.5 + random.random()))
        raise EngineDied(f"no SGLang server answers at {self.base_url} ({type(last).__name__}: {last}); "
                         "start one with `python -m sglang.launch_server --model-path MODEL --port PORT` "
                         "or check --url")

    def _apply_info(self) -> None:
        info, model = self.server_info, self.model_info
        served = model.get("model_path") or info.get("model_path")
        if self._explicit_model_id is None and served:
            self.model_id = default_model_id(str(served), info)
        if self.model_path and served and _name(served) != _name(self.model_path):
            log.warning("the server at %s serves %s but --model is %s: the tokenizer may not match",
                        self.base_url, served, self.model_path)
        states = info.get("internal_states")
        per_dp = [s.get("effective_max_running_requests_per_dp") for s in states or [] if isinstance(s, dict)]
        if per_dp and all(isinstance(n, int) and n > 0 for n in per_dp):
            running = sum(per_dp)
        else:
            running = info.get("max_running_requests")
            ok = isinstance(running, int) and running > 0
            running = running * int(info.get("dp_size") or 1) if ok else None
        context = info.get("context_length") or info.get("max_req_input_len")
        grammar = info.get("grammar_backend")
        if self._cap is None and running:
            self.max_concurrency = max(256, running + 128)
            self._sem = asyncio.Semaphore(self.max_concurrency)
        self.capabilities = Capabilities(
            regex=grammar != "none",
            token_ids=self.tokenizer is not None,
            max_running=min(self.max_concurrency, running) if running else self.max_concurrency,
            max_context=int(context) if isinstance(context, int) and context > 0 else 1 << 20,
        )

    def payload(self, request: Request) -> dict[str, Any]:
        body: dict[str, Any] = {"sampling_params": sampling_params_for(request)}
        if request.kind == "ids":
            body["input_ids"] = list(request.prompt)
        elif request.kind == "text":
            body["text"] = request.prompt
        elif self.tokenizer is not None:
            ids = self.tokenizer.apply_chat_template(prompt_messages(request.prompt),
                                                     add_generation_prompt=True, tokenize=True)
            body["input_ids"] = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        else:
            raise RequestRejected("a chat-messages prompt needs --model (for its chat template) with "
                                  "sglang_http; or use the openai backend", request)
        return body

    async def generate(self, request: Request) -> Result:
        if self._client is None:
            await self.start()
        httpx = _httpx()
        body = self.payload(request)
        async with self._sem:
            try:
                r = await self._client.post("/generate", json=body, timeout=self.timeout_s)
            except httpx.TimeoutException as e:
                raise TransientEngineError(f"{self.base_url}/generate: no answer in {self.timeout_s:g}s",
                                           request) from e
            except httpx.TransportError as e:
                raise TransientEngineError(f"{self.base_url}/generate: {type(e).__name__}: {e}",
                                           request) from e
        if 400 <= r.status_code < 500:
            raise RequestRejected(f"{self.base_url}/generate: {r.status_code} {error_message(r)}", request)
        if r.status_code >= 500:
            raise TransientEngineError(f"{self.base_url}/generate: {r.status_code} {error_message(r)}",
                                       request)
        try:
            out = r.json()
        except ValueError as e:
            raise TransientEngineError(f"{self.base_url}/generate: answer is not JSON: {r.text[:200]!r}",
                                       request) from e
        if isinstance(out, list):  # a batch answer to a single request: take its only element
            out = out[0] if len(out) == 1 else {}
        return result_from_output(out, request)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def _name(path: str) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1]


def _load_tokenizer(model_path: str | None):
    if not model_path:
        return None
    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise ImportError("--model for sglang_http loads its tokenizer with transformers: "
                          "pip install -e '.[cpu]' (or pass no --model for text-only prompts)") from e
    return AutoTokenizer.from_pretrained(model_path)
