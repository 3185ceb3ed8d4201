"""SGLang over HTTP: the native `/generate` of `sglang.launch_server`, or of a router (smg /
sglang-router) in front of many of them: the path to many GPUs and many nodes.

Request: POST /generate {"input_ids" | "text", "sampling_params", "rid"}; response {"text",
"meta_info": {"prompt_tokens", "completion_tokens", "cached_tokens", "finish_reason"}} (sglang
0.5.23 api/v1 GenerateRequest / GenerateResponse). Errors are classified by type and status in
engine/backends/http_client.py, except SGLang's grammar compile timeout (a 4xx, or an abort
finish_reason in a 200): the engine's failure, retried once per regex, then the run stops
(GrammarTimeout, as in engine/backends/sglang.py). Capacity (running requests, DP ranks, KV tokens per
rank) comes from /server_info's internal_states, one per DP rank, when given. Every answer is
checked before it becomes a Result: a body that is not an object, non-string text or non-integer
token counts are a transient engine error, never a stored success. Retries are the scheduler's job;
`retries` here only covers reaching the server at start.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

from engine.backend import (
    BackendBase,
    Capabilities,
    EngineConfigError,
    EngineDied,
    EngineError,
    NeverAnswered,
    RequestRejected,
    TransientEngineError,
)
from engine.backends.http_client import (
    HTTPEndpoint,
    Reply,
    error_message,
    load_tokenizer,
    max_body_bytes,
    model_name,
    status_error,
    wire_prompt,
)
from engine.backends.sglang import (
    GRAMMAR_TIMEOUT,
    GrammarTimeout,
    GrammarTimeouts,
    abort_error,
    capacity_from_states,
    default_model_id,
    pos_int,
    result_from_output,
    sampling_params_for,
)
from engine.request import Request, Result

log = logging.getLogger(__name__)

# No server runs this many requests at once per client; a report above it (10**9 has been seen from
# a misconfigured router) would put the whole input in flight. --max-inflight raises the cap.
MAX_REPORTED_RUNNING = 4096


class SGLangHTTPBackend(HTTPEndpoint, BackendBase):
    """`async with SGLangHTTPBackend(url, model_path=...) as b:`: entering asks the server what it
    serves and how many requests it runs at once (for the scheduler's window), and fails fast
    with a clear message when nothing answers at `base_url`."""

    name = "sglang_http"

    def __init__(
        self,
        base_url: str,
        *,
        model_path: str | None,
        model_id: str | None = None,
        max_concurrency: int | None = None,
        timeout_s: float = 600,
        retries: int = 3,
        tokenizer: Any = None,
        api_key: str | None = None,
        deterministic: bool = False,
    ) -> None:
        if max_concurrency is not None and max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self._init_endpoint(base_url, api_key, timeout_s)  # `sglang.launch_server --api-key`
        self.model_path = model_path
        self.retries = retries
        # None: sized from the server's running capacity at start (capacity + 128, at least 256),
        # so an 8-GPU server is not starved by a client-side cap; an int is a hard cap.
        self._cap = max_concurrency
        self.max_concurrency = max_concurrency or 256
        self._explicit_model_id = model_id
        self.deterministic = deterministic  # the server must run with --enable-deterministic-inference
        fallback = default_model_id(model_path, {}) if model_path else f"sglang@{self.base_url}"
        self.model_id = model_id or fallback
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_path, "sglang_http")
        self.capabilities = Capabilities(
            regex=True,
            token_ids=self.tokenizer is not None,
            max_running=self.max_concurrency,
            max_context=1 << 20,
        )
        self.server_info: dict[str, Any] = {}
        self.model_info: dict[str, Any] = {}
        self._sem = asyncio.Semaphore(self.max_concurrency)
        self._grammar_timeouts = GrammarTimeouts()
        self._stopped: str | None = None  # once set, the run is over

    def __repr__(self) -> str:
        return f"SGLangHTTPBackend(base_url={self.base_url!r}, api_key=<{self._key_shown}>)"

    async def __aenter__(self) -> SGLangHTTPBackend:
        await self.start()
        return self

    async def start(self) -> None:
        """Open the connection pool and read /model_info and /server_info."""
        if self._client is not None:
            return
        self._open()
        try:
            self.model_info = await self._get_info("model_info")
            self.server_info = await self._get_info("server_info")
        except BaseException:
            await self.close()  # no pool left open: __aexit__ does not run when __aenter__ fails
            raise
        if self.deterministic and self.server_info.get("enable_deterministic_inference") is not True:
            await self.close()
            raise EngineConfigError(
                f"--deterministic: the SGLang server at {self.base_url} does not run with "
                "enable_deterministic_inference (its /server_info says "
                f"{self.server_info.get('enable_deterministic_inference')!r}); restart it with "
                "--enable-deterministic-inference, or run without --deterministic"
            )
        self._apply_info()
        # The pool holds one keep-alive connection per request in flight (the first pool, opened
        # before the capacity was known, had the default size: a 256-connection pool capped a
        # 2,048-request window at 256 requests/s at 1 s latency).
        await self._http.resize(self.max_concurrency)

    async def _get_info(self, what: str) -> dict[str, Any]:
        """GET /<what>, falling back to the older /get_<what> that routers still serve. Connection
        failures are retried `retries` times with backoff, then the run stops: no server, no run."""
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                for path in (f"/{what}", f"/get_{what}"):
                    r = await self._http.get(path, timeout_s=30.0)
                    if r.status == 404:
                        continue
                    if r.status in (401, 403):
                        raise status_error(self.base_url + path, r, None)
                    if r.status >= 400:
                        log.warning("GET %s%s: %d %s", self.base_url, path, r.status, error_message(r))
                        return {}
                    return self._info_body(path, r)
                return {}  # neither path: a router that does not say
            except EngineDied:  # refused credentials, or not an SGLang server
                raise
            except EngineError as e:
                last = e
                if attempt < self.retries:
                    await asyncio.sleep(min(8.0, 0.5 * 2**attempt) * (0.5 + random.random()))
        raise NeverAnswered(
            f"no SGLang server answers at {self.base_url} ({type(last).__name__}: {last}); "
            "start one with `python -m sglang.launch_server --model-path MODEL --port PORT` "
            "or check --url"
        )

    def _info_body(self, path: str, r: Reply) -> dict[str, Any]:
        try:
            body = r.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            snippet = r.body[:80].decode("utf-8", "replace")
            raise EngineDied(
                f"the server at {self.base_url} answered something that is not SGLang: "
                f"GET {path} gave {r.content_type or 'no type'} {snippet!r}; check --url "
                "(an SGLang server or router answers /server_info with JSON)"
            )
        return body

    def _apply_info(self) -> None:
        info, model = self.server_info, self.model_info
        served = model.get("model_path") or info.get("model_path")
        served = served if isinstance(served, str) else None
        if self._explicit_model_id is None and served:
            self.model_id = default_model_id(served, {k: v for k, v in info.items() if isinstance(v, str)})
        if self.model_path and served and model_name(served) != model_name(self.model_path):
            log.warning(
                "the server at %s serves %s but --model is %s: the tokenizer may not match",
                self.base_url,
                served,
                self.model_path,
            )
        # internal_states: one per DP rank (sglang 0.5.23 http_server.server_info), giving each rank's
        # running capacity and KV-cache size; older servers and routers give only the flat fields.
        capacity = capacity_from_states(info.get("internal_states"))
        running: int | None
        if capacity is not None:
            running, dp, kv = capacity
        else:
            running, dp, kv = _running_capacity(info), pos_int(info.get("dp_size")) or 1, 0
        if running is not None and running > MAX_REPORTED_RUNNING:
            log.warning(
                "the server at %s reports %d requests running at once; using %d (pass --max-inflight "
                "to go higher)",
                self.base_url,
                running,
                MAX_REPORTED_RUNNING,
            )
            running = MAX_REPORTED_RUNNING
        dp = min(dp, running) if running else 1  # no more ranks than requests: each rank runs one
        context = pos_int(info.get("context_length")) or pos_int(info.get("max_req_input_len"))
        grammar = info.get("grammar_backend")
        if self._cap is None and running:
            self.max_concurrency = max(256, running + 128)
            self._sem = asyncio.Semaphore(self.max_concurrency)
        self.capabilities = Capabilities(
            regex=grammar != "none",
            token_ids=self.tokenizer is not None,
            max_running=min(self.max_concurrency, running) if running else self.max_concurrency,
            max_context=context or 1 << 20,
            dp_size=dp,
            kv_tokens=kv,
        )

    def payload(self, request: Request) -> dict[str, Any]:
        body: dict[str, Any] = {"sampling_params": sampling_params_for(request)}
        prompt = wire_prompt(request, self.tokenizer)
        if isinstance(prompt, list):
            body["input_ids"] = prompt
        elif prompt is not None:
            body["text"] = prompt
        else:
            raise RequestRejected(
                "a chat-messages prompt needs --model (for its chat template) with "
                "sglang_http; or use the openai backend",
                request,
            )
        return body

    async def generate(self, request: Request) -> Result:
        if self._stopped is not None:
            raise EngineDied(self._stopped, request)
        if self._client is None:
            await self.start()
        body = self.payload(request)
        url = f"{self.base_url}/generate"
        async with self._sem:
            r = await self._http.post(
                "/generate", body, request=request, max_bytes=max_body_bytes(request.sampling.max_new_tokens)
            )
        try:
            if r.status >= 400:
                raise generate_error(url, r, request)
            try:
                out = r.json()
            except ValueError as e:
                raise TransientEngineError(f"{url}: answer is not JSON: {r.body[:200]!r}", request) from e
            if isinstance(out, list) and len(out) == 1:  # a batch answer to a single request
                out = out[0]
            return checked_result(out, request, url)
        except GrammarTimeout as e:  # a 4xx body, or finish_reason {"type": "abort"} in a 200 one
            self._on_grammar_timeout(e, request)
            raise

    def _on_grammar_timeout(self, error: GrammarTimeout, request: Request) -> None:
        reason = self._grammar_timeouts.stop_reason(error, request)
        if reason is not None:
            self._stopped = self._stopped or reason
            log.error("%s", self._stopped)
            raise EngineDied(self._stopped, request) from error

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()


def generate_error(url: str, reply: Reply, request: Request) -> EngineError:
    """status_error() for a /generate reply, except that a 4xx saying SGLang's grammar compile timed
    out is the engine's failure (GrammarTimeout, retryable), not the request's (sglang 0.5.23 answers
    a 400 abort as {"error": {"message"}}: entrypoints/http_server.py generate_request)."""
    error = status_error(url, reply, request)
    if isinstance(error, RequestRejected):
        message = error_message(reply)
        if GRAMMAR_TIMEOUT in message:
            return abort_error(f"{url}: {reply.status} {message}", reply.status, request)
    return error


def checked_result(out: Any, request: Request, url: str) -> Result:
    """result_from_output() for an answer that has been checked to have SGLang's shape; anything
    else is a transient engine error (retried, never stored as a success)."""
    meta = out.get("meta_info") if isinstance(out, dict) else None
    bad = None
    if not isinstance(out, dict):
        bad = f"a JSON {type(out).__name__}, not an object"
    elif not isinstance(out.get("text", ""), str):
        bad = f"text is a {type(out['text']).__name__}"
    elif meta is not None and not isinstance(meta, dict):
        bad = "meta_info is not an object"
    else:
        for k in ("prompt_tokens", "completion_tokens", "cached_tokens"):
            v = (meta or {}).get(k)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                bad = f"meta_info.{k} is {v!r}"
                break
    if bad:
        raise TransientEngineError(f"{url}: malformed answer ({bad}): {str(out)[:200]!r}", request)
    return result_from_output(out, request)


def _running_capacity(info: dict[str, Any]) -> int | None:
    """Requests the server runs at once when it gives no internal_states: max_running_requests x
    dp_size. A value of the wrong type counts as not given."""
    running = pos_int(info.get("max_running_requests"))
    if running is None:
        return None
    dp = info.get("dp_size")
    if dp is not None and pos_int(dp) is None:
        log.warning("ignoring dp_size=%r from /server_info (not a positive integer)", dp)
    return running * (pos_int(dp) or 1)
