"""The HTTP client every HTTP backend shares: one aiohttp session with a fixed keep-alive pool,
bounded response reads, and failures mapped to engine error kinds by type and status.

Why aiohttp: measured on loopback against a stand-in server in its own process (bench/http.py),
httpx 0.28 spent ~3 ms of CPU per request at 64 in flight and ~25 ms at 512 (its pool bookkeeping
grows with the pool: 29 req/s at 1 s latency and 512 in flight), aiohttp ~0.1-0.25 ms at any size.

Status mapping: 401/403 -> EngineAuthError (stop the run); 429/503 -> EngineOverloaded (retry after
Retry-After), and so are 502/504, a router or proxy in front saying the server behind it is down, restarting
or not answering in time (`sglang-router` while a worker restarts): waited out, bounded by --engine-down-s,
instead of spending each request's retries; other 5xx and 408 -> TransientEngineError; other 4xx ->
RequestRejected. Connection refused or
a connect timeout -> EngineUnreachable (the scheduler's circuit breaker); a dropped connection or a
read timeout -> TransientEngineError. A body larger than `max_bytes` is refused unread (transient).
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from dataclasses import dataclass
from typing import Any, cast

import orjson

from engine.backend import (
    EngineAuthError,
    EngineError,
    EngineOverloaded,
    EngineUnreachable,
    RequestRejected,
    TransientEngineError,
)
from engine.request import Request, prompt_messages

HTTP_HINT = "pip install -e '.[http]'"
RETRY_AFTER_CAP_S = 300.0  # a server asking for more than this is not believed
_JSON = {"Content-Type": "application/json"}
BYTES_PER_TOKEN = 64  # a token is at most a few characters; JSON escapes (\uXXXX) and ids stay under this
BODY_SLACK = 64 * 1024  # meta_info, usage and the JSON around the text


def _aiohttp():
    try:
        import aiohttp
    except ImportError as e:
        raise ImportError(f"the HTTP backends need aiohttp: {HTTP_HINT}") from e
    return aiohttp


def max_body_bytes(max_new_tokens: int) -> int:
    """The largest answer `max_new_tokens` tokens can honestly produce; anything larger is refused."""
    return max_new_tokens * BYTES_PER_TOKEN + BODY_SLACK


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes
    retry_after: str | None = None
    content_type: str = ""

    def json(self) -> Any:
        return orjson.loads(self.body)  # orjson.JSONDecodeError is a ValueError


def error_message(reply: Reply) -> str:
    """The server's own words from an error response: {"error": {"message"}} | {"error": str} |
    FastAPI's {"detail": ...} | plain text."""
    try:
        body = reply.json()
    except ValueError:
        return reply.body.decode("utf-8", "replace").strip()[:500]
    if isinstance(body, dict):
        err = body.get("error", body.get("detail", body.get("message")))
        if isinstance(err, dict):
            err = err.get("message", err)
        return str(err)[:500]
    return str(body)[:500]


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds: delta-seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    try:
        s = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        s = when.timestamp() - (time.time() if now is None else now)
    return min(RETRY_AFTER_CAP_S, max(0.0, s))


def status_error(url: str, reply: Reply, request: Request | None, message: str | None = None) -> EngineError:
    """The engine error for a non-2xx reply (see the module docstring). `message` replaces the
    server's text (a backend scrubs secrets from it)."""
    status = reply.status
    text = f"{url}: {status} {error_message(reply) if message is None else message}"
    if status in (401, 403):
        return EngineAuthError(
            f"{text}. The server refused our credentials: check --api-key (or "
            "OPENAI_API_KEY) and the server's auth settings",
            request,
            status,
        )
    if status in (429, 502, 503, 504):
        return EngineOverloaded(text, request, status, retry_after_s(reply.retry_after))
    if status >= 500 or status == 408:  # 408: the server gave up waiting for us, try again
        return TransientEngineError(text, request, status)
    return RequestRejected(text, request, status)


class HTTPClient:
    """`await client.post(path, body, max_bytes=..., request=...)` -> Reply; raises engine errors.

    One aiohttp session; its connector keeps up to `max_connections` keep-alive connections (the
    backend bounds requests in flight to the same number, so no request waits for a connection)."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 600.0,
        connect_timeout_s: float = 10.0,
        max_connections: int = 256,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.max_connections = max_connections
        # The key travels in this header only, and the headers are never formatted anywhere.
        self._headers = {**_JSON, **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
        self._session = None
        self._aiohttp = _aiohttp()

    def _open(self):
        if self._session is None:
            aiohttp = self._aiohttp
            connector = aiohttp.TCPConnector(
                limit=self.max_connections, limit_per_host=0, keepalive_timeout=75, ttl_dns_cache=300
            )
            timeout = aiohttp.ClientTimeout(total=self.timeout_s, sock_connect=self.connect_timeout_s)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=timeout,
                headers=self._headers,
                raise_for_status=False,
                trust_env=False,
            )
        return self._session

    async def get(
        self,
        path: str,
        *,
        max_bytes: int = 4 << 20,
        timeout_s: float | None = None,
        request: Request | None = None,
    ) -> Reply:
        return await self._call("GET", path, None, max_bytes, timeout_s, request)

    async def post(
        self,
        path: str,
        body: Any,
        *,
        max_bytes: int,
        timeout_s: float | None = None,
        request: Request | None = None,
    ) -> Reply:
        return await self._call("POST", path, orjson.dumps(body), max_bytes, timeout_s, request)

    async def _call(
        self,
        method: str,
        path: str,
        data: bytes | None,
        max_bytes: int,
        timeout_s: float | None,
        request: Request | None,
    ) -> Reply:
        aiohttp = self._aiohttp
        session = self._open()
        url = self.base_url + path
        kw = (
            {}
            if timeout_s is None
            else {
                "timeout": aiohttp.ClientTimeout(
                    total=timeout_s, sock_connect=min(timeout_s, self.connect_timeout_s)
                )
            }
        )
        try:
            async with session.request(method, url, data=data, **kw) as resp:
                size = resp.content_length
                if size is not None and size > max_bytes:
                    resp.close()  # never read it: drop the connection instead
                    raise _too_large(url, f"{size:,}", max_bytes, request)
                if size is not None:
                    body = await resp.read()
                else:
                    body = await _read_bounded(resp, max_bytes, url, request)
                return Reply(
                    resp.status, body, resp.headers.get("Retry-After"), resp.headers.get("Content-Type", "")
                )
        except aiohttp.ClientConnectorError as e:
            raise EngineUnreachable(f"{url}: cannot connect ({e.os_error or e})", request) from e
        except aiohttp.ConnectionTimeoutError as e:
            raise EngineUnreachable(f"{url}: no connection in {self.connect_timeout_s:g}s", request) from e
        except asyncio.TimeoutError as e:
            waited = timeout_s or self.timeout_s
            raise TransientEngineError(f"{url}: no answer in {waited:g}s", request) from e
        except aiohttp.ClientError as e:  # disconnected mid-answer, a broken body, a reset
            raise TransientEngineError(f"{url}: {type(e).__name__}: {e}", request) from e

    async def resize(self, max_connections: int) -> None:
        """Change the pool size (a backend learns the server's capacity after its first calls)."""
        if max_connections != self.max_connections:
            await self.close()  # the next call opens a pool of the new size
            self.max_connections = max_connections

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


async def _read_bounded(resp, max_bytes: int, url: str, request: Request | None) -> bytes:
    chunks, total = [], 0
    async for chunk in resp.content.iter_any():
        total += len(chunk)
        if total > max_bytes:
            resp.close()
            raise _too_large(url, f"over {max_bytes:,}", max_bytes, request)
        chunks.append(chunk)
    return b"".join(chunks)


class HTTPEndpoint:
    """What the HTTP backends share: the server's URL, the API key and the one client. The key is
    name-mangled here, so no repr or message of a backend formats it; `_scrub` blanks it from server
    text, `_key_shown` is what a repr may say of it."""

    max_concurrency: int
    ping_path = "/health"  # answered by vLLM and SGLang without touching the engine
    ping_timeout_s = 5.0

    def _init_endpoint(self, base_url: str, api_key: str | None, timeout_s: float) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.__key = api_key
        self._client: HTTPClient | None = None

    @property
    def _key_shown(self) -> str:
        return "set" if self.__key else "none"

    def _scrub(self, text: str) -> str:
        return scrub_key(text, self.__key)

    @property
    def _http(self) -> HTTPClient:
        """The open client (between start and close)."""
        if self._client is None:
            raise RuntimeError(f"{type(self).__name__} used before start() or after close()")
        return self._client

    async def ping(self) -> bool:
        """Whether the server answers anything at all at `ping_path` within `ping_timeout_s`: the
        engine breaker's probe (engine/breaker.py). A server still starting, or a front end hung in
        shutdown, accepts the connection and never answers."""
        client = self._client
        if client is None:
            return False
        try:
            await client.get(self.ping_path, max_bytes=1 << 20, timeout_s=self.ping_timeout_s)
        except EngineError:
            return False
        return True

    def _client_for(self, url: str) -> HTTPClient:
        """A client of its own for another server of the same deployment (a router's worker), with
        the same key."""
        return HTTPClient(url, api_key=self.__key, timeout_s=self.timeout_s, max_connections=4)

    def _open(self) -> HTTPClient:
        """The client, created on first use with one keep-alive connection per request in flight."""
        if self._client is None:
            self._client = HTTPClient(
                self.base_url,
                api_key=self.__key,
                timeout_s=self.timeout_s,
                max_connections=self.max_concurrency,
            )
        return self._client


def model_name(path: str) -> str:
    """The last component of a model path or served name ("/models/Llama-3.1-8B/" -> "Llama-3.1-8B")."""
    return str(path).rstrip("/").rsplit("/", 1)[-1]


def scrub_key(text: str, key: str | None) -> str:
    """`text` with the API key (and its first 8 characters) blanked: servers and proxies sometimes
    echo the key they refused ("Incorrect API key provided: sk-...")."""
    if key:
        text = text.replace(key, "<api key>")
        if len(key) > 8:
            text = text.replace(key[:8], "<api key>")
    return text


def wire_prompt(request: Request, tokenizer: Any) -> list[int] | str | None:
    """What an HTTP backend sends as the prompt: token ids (chat messages rendered by the model's
    own chat template when a tokenizer is at hand), the text of a text prompt, or None for chat
    messages without a tokenizer (the caller says what to do about it)."""
    if request.kind == "ids":
        return list(cast("tuple[int, ...]", request.prompt))
    if request.kind == "text":
        return cast(str, request.prompt)
    if tokenizer is None:
        return None
    ids = tokenizer.apply_chat_template(
        prompt_messages(request.prompt), add_generation_prompt=True, tokenize=True
    )
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def wire_text(request: Request, tokenizer: Any) -> str | None:
    """The prompt as text, for servers that refuse token ids (routers): token ids decoded, chat
    messages rendered by the model's chat template; None for chat messages without a tokenizer."""
    if request.kind == "text":
        return str(request.prompt)
    if tokenizer is None:
        return None
    if request.kind == "ids":
        return tokenizer.decode(list(cast("tuple[int, ...]", request.prompt)), skip_special_tokens=False)
    return tokenizer.apply_chat_template(
        prompt_messages(request.prompt), add_generation_prompt=True, tokenize=False
    )


def load_tokenizer(model_path: str | None, engine: str):
    """The tokenizer of a local copy of the served model (prompts go out as token ids), or None."""
    if not model_path:
        return None
    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise ImportError(
            f"--model for {engine} loads its tokenizer with transformers: "
            "pip install -e '.[cpu]' (or pass no --model for text-only prompts)"
        ) from e
    return AutoTokenizer.from_pretrained(model_path)


def _too_large(url: str, size: str, limit: int, request: Request | None) -> TransientEngineError:
    return TransientEngineError(
        f"{url}: refused an answer of {size} bytes, more than the request's token "
        f"budget can produce ({limit:,} bytes)",
        request,
    )
