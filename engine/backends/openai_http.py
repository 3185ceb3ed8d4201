"""Any OpenAI-compatible `/v1/chat/completions` endpoint (judges, hosted models, a vLLM or SGLang
server's OpenAI route). Prompts are chat messages, or a string sent as one user message; token-id
prompts are not part of that API. Neither are regex constraints: a hosted endpoint runs
unconstrained (capabilities say so, and callers parse leniently). A self-hosted vLLM or SGLang
server takes the regex in its own extra body field; the caller says which server it is
(`server="vllm" | "sglang"`, the CLI's --openai-server), since guessing from the answers of a proxy
or router would be a guess, and a field the server does not know is silently ignored (vLLM) or
refused. The API key is sent as a bearer header and appears in no log line, error or repr.

Entering the backend asks GET /v1/models once: a server that never answers there (refused, no
route) is a configuration error within seconds (NeverAnswered, naming the URL), not an outage to
wait out for --engine-down-s; any HTTP answer will do (a proxy without that route still answered),
except 401/403, which stop the run at once.

Errors by status as in engine/backends/http_client.py (429/503 are load shedding, retried after
Retry-After; 401/403 stop the run). An answer is checked before it becomes a Result; finish_reason
"content_filter" is a drop with that reason (ContentFiltered), not a success; "repetition" (vLLM's
loop detection) is an output cut short, like "length"; any other ("abort" from a server shutting
down, "error", none at all) is a transient error, retried and finally dropped, never a success.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any, cast

from engine.backend import (
    BackendBase,
    Capabilities,
    ContentFiltered,
    EngineError,
    NeverAnswered,
    RequestRejected,
    TransientEngineError,
)
from engine.backends.http_client import HTTPEndpoint, error_message, max_body_bytes, status_error
from engine.backends.regex_probe import PROBE_REGEX, check_regex_honoured
from engine.backends.vllm_wire import NEUTRAL_SAMPLING, openai_regex_body
from engine.request import FinishReason, Request, Result, prompt_messages

log = logging.getLogger(__name__)

_FINISH: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "stop",
    "function_call": "stop",
    "repetition": "length",
}
STARTUP_TRIES = 3  # GET /v1/models at start; refused connections fail in milliseconds, so ~2 s in all
# How a self-hosted server is told to report cached prompt tokens on its OpenAI routes.
_CACHE_REPORT_HINT = {
    "vllm": "start vLLM with --enable-prompt-tokens-details",
    "sglang": "start SGLang with --enable-cache-report",
}


class OpenAIBackend(HTTPEndpoint, BackendBase):
    name = "openai"
    tokenizer = None
    ping_path = "/v1/models"  # the one GET every OpenAI-compatible server answers

    def __init__(
        self,
        base_url: str,
        *,
        model: str,
        api_key: str | None,
        max_concurrency: int = 32,
        timeout_s: float = 120,
        server: str | None = None,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if server is not None:
            openai_regex_body(server, "")  # raises for a server whose regex field we do not know
        self.server = server  # "vllm" | "sglang": a self-hosted server taking our regex; None: hosted
        self._init_endpoint(base_url, api_key, timeout_s)
        self.model = model
        self.model_id = f"openai:{model}@{self.base_url}"
        self.max_concurrency = max_concurrency
        self.capabilities = Capabilities(
            regex=server is not None, token_ids=False, max_running=max_concurrency, max_context=1 << 20
        )
        self._sem = asyncio.Semaphore(max_concurrency)
        self._warned_no_cache_counts = False

    def __repr__(self) -> str:
        return f"OpenAIBackend(base_url={self.base_url!r}, model={self.model!r}, api_key=<{self._key_shown}>)"

    async def __aenter__(self) -> OpenAIBackend:
        await self.start()
        return self

    async def start(self) -> None:
        """The server must answer once (see the module docstring), and a self-hosted one must honour
        the regex field (a router may drop it); closes the pool if either fails."""
        client = self._open()
        url = f"{self.base_url}/v1/models"
        last: EngineError | None = None
        for attempt in range(STARTUP_TRIES):
            try:
                reply = await client.get("/v1/models", timeout_s=5.0)
            except EngineError as e:  # refused, connect timeout, no answer
                last = e
                if attempt + 1 < STARTUP_TRIES:
                    await asyncio.sleep(0.5 * 2**attempt * (0.5 + random.random()))
                continue
            if reply.status in (401, 403):
                await self.close()
                raise status_error(url, reply, None, self._scrub(error_message(reply)))  # EngineAuthError
            break
        else:
            await self.close()
            raise NeverAnswered(
                f"nothing answers at {self.base_url} ({last}): check --url (an "
                "OpenAI-compatible server answers GET /v1/models) and that the server is "
                "running"
            )
        if self.server is not None:  # a router may drop the regex field: refuse before any row is spent
            try:
                await check_regex_honoured(
                    client,
                    self.base_url,
                    self.server,
                    self.model,
                    openai_regex_body(self.server, PROBE_REGEX),
                )
            except BaseException:
                await self.close()
                raise

    def payload(self, request: Request) -> dict[str, Any]:
        if request.kind == "messages":
            messages = prompt_messages(request.prompt)
        elif request.kind == "text":
            messages = [{"role": "user", "content": cast(str, request.prompt)}]
        else:
            raise RequestRejected(
                "an OpenAI-compatible endpoint takes text or chat messages, not token ids", request
            )
        s = request.sampling
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "max_tokens": s.max_new_tokens,
            "seed": s.seed,
        }
        if s.stop:
            body["stop"] = list(s.stop)
        if self.server == "vllm":  # else vLLM fills them from the model's generation_config.json
            body.update(NEUTRAL_SAMPLING)
        if request.regex is not None and self.server is not None:
            body.update(openai_regex_body(self.server, request.regex))
        return body

    async def generate(self, request: Request) -> Result:
        client = self._open()
        url = f"{self.base_url}/v1/chat/completions"
        async with self._sem:
            # The exception texts name the URL only; the key is in a header never printed.
            r = await client.post(
                "/v1/chat/completions",
                self.payload(request),
                request=request,
                max_bytes=max_body_bytes(request.sampling.max_new_tokens),
            )
        if r.status >= 400:
            raise status_error(url, r, request, self._scrub(error_message(r)))
        try:
            body = r.json()
        except ValueError as e:
            raise TransientEngineError(f"{url}: answer is not JSON: {r.body[:200]!r}", request) from e
        result = checked_result(body, request, url)
        if not self._warned_no_cache_counts and not _reports_cached(body):
            self._warned_no_cache_counts = True
            hint = _CACHE_REPORT_HINT.get(self.server or "", "the endpoint may not report them")
            log.warning(
                "%s reports no cached-token counts (usage.prompt_tokens_details.cached_tokens), so "
                "prefix-cache hits read 0: %s",
                self.base_url,
                hint,
            )
        return result

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


def checked_result(body: Any, request: Request, url: str) -> Result:
    """A chat completion as a Result, once its shape is checked: a malformed answer is a transient
    engine error (retried, never stored as a success)."""
    bad = _problem(body)
    if bad:
        raise TransientEngineError(f"{url}: malformed answer ({bad}): {str(body)[:200]!r}", request)
    choice = body["choices"][0]
    finish = choice.get("finish_reason")
    if finish == "content_filter":
        raise ContentFiltered(
            f"{url}: content_filter: the endpoint's content filter withheld the answer", request
        )
    if finish not in _FINISH:  # "abort" (a server shutting down), "error", none: never a success
        raise TransientEngineError(
            f"{url}: the server ended the answer with finish_reason {finish!r}", request
        )
    usage = body.get("usage") or {}
    return Result(
        text=choice["message"].get("content") or "",
        finish_reason=_FINISH[finish],
        prompt_tokens=usage.get("prompt_tokens") or 0,
        completion_tokens=usage.get("completion_tokens") or 0,
        cached_tokens=(usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0,
    )


def _reports_cached(body: dict) -> bool:
    details = (body.get("usage") or {}).get("prompt_tokens_details")
    return isinstance(details, dict) and details.get("cached_tokens") is not None


def _problem(body: Any) -> str | None:
    """What is wrong with a chat completion's shape, or None."""
    if not isinstance(body, dict):
        return f"a JSON {type(body).__name__}, not an object"
    choices = body.get("choices")
    if not (isinstance(choices, list) and choices and isinstance(choices[0], dict)):
        return "no choices[0]"
    message = choices[0].get("message")
    if not isinstance(message, dict):
        return "no choices[0].message"
    if not isinstance(message.get("content") or "", str):
        return f"message.content is a {type(message['content']).__name__}"
    if not isinstance(choices[0].get("finish_reason") or "", str):
        return "finish_reason is not a string"
    usage = body.get("usage") or {}
    details = usage.get("prompt_tokens_details") or {} if isinstance(usage, dict) else None
    if not isinstance(usage, dict) or not isinstance(details, dict):
        return "usage is not an object"
    counts = {
        "usage.prompt_tokens": usage.get("prompt_tokens"),
        "usage.completion_tokens": usage.get("completion_tokens"),
        "usage.prompt_tokens_details.cached_tokens": details.get("cached_tokens"),
    }
    return next(
        (
            f"{k} is {v!r}"
            for k, v in counts.items()
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0)
        ),
        None,
    )
