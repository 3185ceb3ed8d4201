"""Any OpenAI-compatible `/v1/chat/completions` endpoint (judges, hosted models, a vLLM or SGLang
server's OpenAI route). Prompts are chat messages, or a string sent as one user message; token-id
prompts and regex constraints are not part of that API (capabilities say so, and callers parse
leniently). The API key is sent as a bearer header and appears in no log line, error or repr.
"""

from __future__ import annotations

import asyncio
from typing import Any

from engine.backend import BackendBase, Capabilities, RequestRejected, TransientEngineError
from engine.backends.sglang_http import _httpx, error_message
from engine.request import Request, Result, prompt_messages

_FINISH = {"stop": "stop", "length": "length", "content_filter": "abort", "tool_calls": "stop",
           "function_call": "stop"}


class OpenAIBackend(BackendBase):
    name = "openai"
    tokenizer = None

    def __init__(self, base_url: str, *, model: str, api_key: str | None, max_concurrency: int = 32,
                 timeout_s: float = 120) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.model_id = f"openai:{model}@{self.base_url}"
        self.timeout_s = timeout_s
        self.max_concurrency = max_concurrency
        self.capabilities = Capabilities(regex=False, token_ids=False, max_running=max_concurrency,
                                         max_context=1 << 20)
        self.__key = api_key  # name-mangled and never formatted anywhere
        self._client = None
        self._sem = asyncio.Semaphore(max_concurrency)

    def __repr__(self) -> str:
        key = "set" if self.__key else "none"
        return f"OpenAIBackend(base_url={self.base_url!r}, model={self.model!r}, api_key=<{key}>)"

    async def __aenter__(self) -> OpenAIBackend:
        self._open()
        return self

    def _open(self):
        if self._client is None:
            httpx = _httpx()
            headers = {"Authorization": f"Bearer {self.__key}"} if self.__key else {}
            limits = httpx.Limits(max_connections=self.max_concurrency,
                                  max_keepalive_connections=self.max_concurrency)
            self._client = httpx.AsyncClient(base_url=self.base_url, headers=headers, limits=limits,
                                             timeout=httpx.Timeout(self.timeout_s, connect=10.0))
        return self._client

    def payload(self, request: Request) -> dict[str, Any]:
        if request.kind == "messages":
            messages = prompt_messages(request.prompt)
        elif request.kind == "text":
            messages = [{"role": "user", "content": request.prompt}]
        else:
            raise RequestRejected("an OpenAI-compatible endpoint takes text or chat messages, not token ids",
                                  request)
        s = request.sampling
        body: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": s.temperature,
                                "top_p": s.top_p, "max_tokens": s.max_new_tokens, "seed": s.seed}
        if s.stop:
            body["stop"] = list(s.stop)
        return body

    async def generate(self, request: Request) -> Result:
        httpx = _httpx()
        client = self._open()
        url = f"{self.base_url}/v1/chat/completions"
        async with self._sem:
            try:
                r = await client.post("/v1/chat/completions", json=self.payload(request))
            except httpx.TimeoutException as e:
                raise TransientEngineError(f"{url}: no answer in {self.timeout_s:g}s", request) from e
            except httpx.TransportError as e:
                # The exception text names the URL only; the key is in a header httpx never prints.
                raise TransientEngineError(f"{url}: {type(e).__name__}: {e}", request) from e
        if r.status_code == 429 or r.status_code >= 500:
            raise TransientEngineError(f"{url}: {r.status_code} {self._scrub(error_message(r))}", request)
        if r.status_code >= 400:
            raise RequestRejected(f"{url}: {r.status_code} {self._scrub(error_message(r))}", request)
        try:
            body = r.json()
            choice = body["choices"][0]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise TransientEngineError(f"{url}: unexpected answer {r.text[:200]!r}", request) from e
        usage = body.get("usage") or {}
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        return Result(
            text=(choice.get("message") or {}).get("content") or "",
            finish_reason=_FINISH.get(choice.get("finish_reason") or "stop", "stop"),
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            cached_tokens=int(cached),
        )

    def _scrub(self, text: str) -> str:
        """Servers sometimes echo the key they refused ("Incorrect API key provided: sk-...")."""
        key = self.__key
        if key:
            text = text.replace(key, "<api key>")
            if len(key) > 8:
                text = text.replace(key[:8], "<api key>")
        return text

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
