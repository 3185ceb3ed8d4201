"""vLLM over HTTP: the OpenAI-compatible server of `vllm serve` (pinned: vLLM 0.33.0), or a router
in front of several of them. Prompts go out as token ids, so our template-first prefix layout
reaches the engine as built and its prefix cache sees every shared template.

Request (0.33.0 entrypoints/openai/completion/protocol.py, CompletionRequest): POST /v1/completions
{"model", "prompt": [ids] | str, "max_tokens", "temperature", "top_p", "seed", "stop",
"structured_outputs": {"regex"}} (StructuredOutputsParams in sampling_params.py). vLLM accepts and
*ignores* unknown fields (OpenAIBaseModel has extra="allow"; the old `guided_regex` is dropped with a
warning), so a misspelt constraint field would silently unconstrain the output: the tests check
every field we send against the pinned source's field list.
Response (CompletionResponse): {"model", "choices": [{"text", "finish_reason", "stop_reason"}],
"usage": {"prompt_tokens", "completion_tokens", "prompt_tokens_details": {"cached_tokens"}}}.
`prompt_tokens_details` is filled only by a server started with `--enable-prompt-tokens-details`;
without it cached_tokens reads 0 (a warning says so once).
Served model and context length come from GET /v1/models (ModelCard.id, root, max_model_len).
Every request also carries top_k, min_p and repetition_penalty (NEUTRAL_SAMPLING): vLLM would fill
them from the model's generation_config.json. The window is sized from /metrics (the KV cache in
`vllm:cache_config_info`) unless --max-inflight sets it.

Transport and status errors come from the shared client (engine/backends/http_client.py): bounded
reads, 429/503 -> EngineOverloaded (retried after Retry-After), 401/403 -> EngineAuthError (the run
stops), 5xx/408/timeouts/malformed answers -> TransientEngineError, refused connections ->
EngineUnreachable (the scheduler's circuit breaker), other 4xx -> RequestRejected. vLLM's own
finish_reason "abort"/"error" is transient too. The API key travels only in the Authorization header
and is scrubbed from any server text we repeat.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
from pathlib import Path
from typing import Any

from engine.backend import (
    BackendBase,
    Capabilities,
    EngineAuthError,
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
from engine.request import FinishReason, Request, Result

log = logging.getLogger(__name__)

VLLM_PIN = "0.33.0"  # the version whose request/response fields this module speaks (pyproject [vllm])
# vLLM's default --max-num-seqs on GPUs below the H100 class (1024 on H100/H200/B200): used per
# engine when the server does not say, so the window never starves a default server.
DEFAULT_RUNNING = 256
# v1 FinishReason strings. "repetition" (repetition_detection, which we never request) ends a
# looping output early: treated as running out of tokens, so a constrained phase retries sampled.
_FINISH: dict[str, FinishReason] = {"stop": "stop", "length": "length", "repetition": "length"}
_ENGINE_LABEL = re.compile(r'^vllm:num_requests_running\{[^}]*engine="(\d+)"', re.M)
_CACHE_INFO = re.compile(r"^vllm:cache_config_info\{(.*)\}\s+\S+\s*$", re.M)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')  # a value may hold escaped quotes
# vLLM's largest default --max-num-seqs (H100 class and up). With the KV cache's size known, each
# engine's window starts here and the scheduler shrinks it to what the KV cache holds for the
# requests' observed sizes, as it does for SGLang.
KV_SIZED_RUNNING = 1024
# vLLM fills every sampling parameter a request leaves out from the model's generation_config.json
# (`--generation-config auto`, its default): these are sent explicitly, so a request means the same
# on vLLM as on SGLang and OpenVINO (whose defaults these are: no top-k, no min-p, no penalty).
# top_k 0 is "disabled" in vLLM 0.33 (sampling_params.py; -1 is still accepted).
NEUTRAL_SAMPLING = {"top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}


class VLLMHTTPBackend(HTTPEndpoint, BackendBase):
    """`async with VLLMHTTPBackend(url, model_path=...) as b:` reads the served model, its context
    length and (where the server says) its capacity, and fails fast when nothing answers."""

    name = "vllm_http"

    def __init__(self, base_url: str, *, model_path: str | None = None, api_key: str | None = None,
                 max_concurrency: int | None = None, timeout_s: float = 600, retries: int = 3,
                 tokenizer: Any = None) -> None:
        if max_concurrency is not None and max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self._init_endpoint(base_url, api_key, timeout_s)
        self.model_path = model_path
        self.retries = retries
        self._cap = max_concurrency  # an int is a hard cap; None: sized from the server at start
        self.max_concurrency = max_concurrency or DEFAULT_RUNNING
        self.served_model: str | None = None
        self.model_id = model_name(model_path) if model_path else f"vllm@{self.base_url}"
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_path, "vllm_http")
        self.capabilities = Capabilities(regex=True, token_ids=self.tokenizer is not None,
                                         max_running=self.max_concurrency, max_context=1 << 20)
        self.server_version: str | None = None
        self.capacity_source = "default"
        self._sem = asyncio.Semaphore(self.max_concurrency)
        self._warned_no_cache_counts = False

    def __repr__(self) -> str:
        return (f"VLLMHTTPBackend(base_url={self.base_url!r}, model={self.served_model!r}, "
                f"api_key=<{self._key_shown}>)")

    async def __aenter__(self) -> VLLMHTTPBackend:
        await self.start()
        return self

    # -- transport: the shared client ----------------------------------------------------------

    def _json(self, reply: Reply, path: str, request: Request | None = None) -> Any:
        """The JSON body of a 2xx reply, else the engine error its status means (server text scrubbed)."""
        url = f"{self.base_url}{path}"
        if not 200 <= reply.status < 300:
            raise status_error(url, reply, request, self._scrub(error_message(reply)))
        try:
            return reply.json()
        except ValueError as e:
            text = reply.body[:200].decode("utf-8", "replace")
            raise TransientEngineError(f"{url}: answer is not JSON: {self._scrub(text)!r}", request) from e

    # -- start: what the server serves ---------------------------------------------------------

    async def start(self) -> None:
        """Read /v1/models (required), then /version, /server_info and /metrics (optional); then
        size the connection pool to the window."""
        if self.served_model is not None and self._client is not None:
            return
        self._open()
        try:
            self._apply_models(await self._models())
            self.server_version = await self._optional_json("/version", "version")
            if self._cap is None:
                await self._size_from_server()
        except BaseException:
            await self.close()  # no pool left open: __aexit__ does not run when __aenter__ fails
            self.served_model = None
            raise
        if self.server_version and self.server_version != VLLM_PIN:
            log.warning("the server at %s runs vLLM %s; sysgen speaks the fields of vLLM %s",
                        self.base_url, self.server_version, VLLM_PIN)
        # One keep-alive connection per request in flight (the first pool had the default size).
        await self._http.resize(self.max_concurrency)
        log.info("vllm_http: %s serves %s (context %d); window sized from %s: %d running",
                 self.base_url, self.served_model, self.capabilities.max_context, self.capacity_source,
                 self.capabilities.max_running)

    async def _models(self) -> dict:
        """GET /v1/models. Refused credentials, a wrong URL or an answer that is not vLLM's stop at
        once (retrying cannot fix them); no answer, 5xx or load shedding is retried `retries` times."""
        url = f"{self.base_url}/v1/models"
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                reply = await self._http.get("/v1/models", timeout_s=30.0)
                if reply.status >= 400:
                    raise status_error(url, reply, None, self._scrub(error_message(reply)))
            except EngineAuthError as e:
                raise EngineAuthError(f"{url}: {e.status} {self._scrub(error_message(reply))}. The server "
                                      "refused our key: pass --api-key (or OPENAI_API_KEY), the key the "
                                      "server was started with", None, e.status) from e
            except RequestRejected as e:  # 404 and the like: a wrong URL, not a vLLM server
                raise EngineDied(f"{e}; is --url a vLLM server? (`vllm serve` answers GET /v1/models)") from e
            except EngineError as e:
                last = e
                if attempt < self.retries:
                    await asyncio.sleep(min(8.0, 0.5 * 2**attempt) * (0.5 + random.random()))
                continue
            try:
                body = reply.json()
            except ValueError:
                body = None
            if isinstance(body, dict) and isinstance(body.get("data"), list) and body["data"]:
                return body
            snippet = self._scrub(reply.body[:120].decode("utf-8", "replace"))
            raise EngineDied(f"the server at {self.base_url} answered something that is not vLLM: GET "
                             f"/v1/models gave {reply.content_type or 'no type'} {snippet!r} (no model "
                             "listed); check --url")
        raise NeverAnswered(f"no vLLM server answers at {self.base_url} ({type(last).__name__}: {last}); "
                         "start one with `vllm serve MODEL --port PORT --enable-prompt-tokens-details` "
                         "or check --url")

    def _apply_models(self, models: dict) -> None:
        cards = [c for c in models["data"] if isinstance(c, dict) and isinstance(c.get("id"), str)]
        if not cards:
            raise EngineDied(f"{self.base_url}/v1/models: no model card with an id")
        card = _pick_card(cards, self.model_path)
        self.served_model = card["id"]
        self.model_id = model_name(card["id"])
        root: str = card["root"] if isinstance(card.get("root"), str) else card["id"]
        wanted = model_name(self.model_path) if self.model_path else None
        if wanted and wanted not in (model_name(root), model_name(card["id"])):
            log.warning("the server at %s serves %s but --model is %s: the tokenizer may not match",
                        self.base_url, root, self.model_path)
        if self.tokenizer is None and Path(root).is_dir():  # same node: the server's own tokenizer
            self.tokenizer = load_tokenizer(root, "vllm_http")
        ctx = card.get("max_model_len")
        self.capabilities = Capabilities(
            regex=True, token_ids=self.tokenizer is not None,
            max_running=min(self.max_concurrency, self.capabilities.max_running),
            max_context=ctx if isinstance(ctx, int) and not isinstance(ctx, bool) and ctx > 0 else 1 << 20)

    async def _optional(self, path: str) -> Reply | None:
        """A 200 reply from an optional route, else None (logged at debug: most servers lack them)."""
        try:
            reply = await self._http.get(path, timeout_s=10.0)
        except EngineError as e:
            log.debug("GET %s%s: %s", self.base_url, path, e)
            return None
        return reply if reply.status == 200 else None

    async def _optional_json(self, path: str, key: str) -> Any:
        reply = await self._optional(path)
        try:
            body = reply.json() if reply is not None else None
        except ValueError:
            return None
        return body.get(key) if isinstance(body, dict) else None

    async def _size_from_server(self) -> None:
        """vLLM reports no running capacity in production. Dev mode (VLLM_SERVER_DEV_MODE=1) has
        /server_info with the scheduler's max_num_seqs. /metrics shows how many engines (data
        parallel ranks) run and, in `vllm:cache_config_info`, each one's KV cache: with it the window
        starts at KV_SIZED_RUNNING per engine and the scheduler sizes it from the KV cache; without
        it each engine is assumed to take DEFAULT_RUNNING."""
        running = None
        config = await self._optional_json("/server_info?config_format=json", "vllm_config")
        if isinstance(config, dict):
            seqs = (config.get("scheduler_config") or {}).get("max_num_seqs")
            dp = (config.get("parallel_config") or {}).get("data_parallel_size") or 1
            if isinstance(seqs, int) and seqs > 0 and isinstance(dp, int) and dp > 0:
                running, self.capacity_source = seqs * dp, "/server_info max_num_seqs x data_parallel_size"
        reply = await self._optional("/metrics")
        text = reply.body.decode("utf-8", "replace") if reply is not None else ""
        engines = set(_ENGINE_LABEL.findall(text))
        kv_engines, kv_tokens = kv_cache_tokens(text)
        if running is None and kv_tokens:
            n = max(len(engines), kv_engines)
            running = KV_SIZED_RUNNING * n
            self.capacity_source = (f"/metrics cache_config_info: {n} engine(s) x {kv_tokens:,} KV tokens, "
                                    f"up to {KV_SIZED_RUNNING} running each")
        elif running is None and engines:
            running = DEFAULT_RUNNING * len(engines)
            self.capacity_source = f"/metrics: {len(engines)} engine(s) x {DEFAULT_RUNNING}"
        if running:
            self.max_concurrency = max(DEFAULT_RUNNING, running + 128)
            self._sem = asyncio.Semaphore(self.max_concurrency)
            dp = max(1, len(engines), kv_engines)
            self.capabilities = Capabilities(regex=True, token_ids=self.capabilities.token_ids,
                                             max_running=running, max_context=self.capabilities.max_context,
                                             dp_size=dp if kv_tokens else 1, kv_tokens=kv_tokens)

    # -- requests ------------------------------------------------------------------------------

    def payload(self, request: Request) -> dict[str, Any]:
        s = request.sampling
        body: dict[str, Any] = {"model": self.served_model, "max_tokens": s.max_new_tokens,
                                "temperature": s.temperature, "top_p": s.top_p, "seed": s.seed,
                                **NEUTRAL_SAMPLING}
        body["prompt"] = wire_prompt(request, self.tokenizer)
        if body["prompt"] is None:
            raise RequestRejected("a chat-messages prompt needs --model (a local copy of the served model, "
                                  "for its chat template) with vllm_http", request)
        if s.stop:
            body["stop"] = list(s.stop)
        if request.regex is not None:
            body["structured_outputs"] = {"regex": request.regex}
        return body

    async def generate(self, request: Request) -> Result:
        if self.served_model is None or self._client is None:  # not entered, or closed since
            await self.start()
        body = self.payload(request)
        async with self._sem:
            # The exception texts name the URL only; the key is in a header never printed.
            reply = await self._http.post("/v1/completions", body, request=request,
                                            max_bytes=max_body_bytes(request.sampling.max_new_tokens))
        return self.result_from_completion(self._json(reply, "/v1/completions", request), request)

    def result_from_completion(self, body: Any, request: Request | None = None) -> Result:
        """Validate a CompletionResponse's types and map it; a malformed answer is transient."""
        def bad(what: str) -> TransientEngineError:
            return TransientEngineError(f"{self.base_url}/v1/completions: malformed answer ({what}): "
                                        f"{self._scrub(str(body)[:200])!r}", request)

        choices = body.get("choices") if isinstance(body, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise bad("no choices")
        choice, usage = choices[0], body.get("usage")
        text, reason = choice.get("text"), choice.get("finish_reason")
        if not isinstance(text, str):
            raise bad("text is not a string")
        if not isinstance(usage, dict):
            raise bad("no usage")
        prompt_tokens = _count(usage.get("prompt_tokens"))
        completion_tokens = _count(usage.get("completion_tokens"), none_ok=True)
        details = usage.get("prompt_tokens_details")
        if prompt_tokens is None or completion_tokens is None or not isinstance(details, (dict, type(None))):
            raise bad("usage counts are not integers")
        cached = _count((details or {}).get("cached_tokens"), none_ok=True)
        if cached is None:
            raise bad("cached_tokens is not an integer")
        if details is None and not self._warned_no_cache_counts:
            self._warned_no_cache_counts = True
            log.warning("%s reports no cached-token counts; start vLLM with --enable-prompt-tokens-details "
                        "to see prefix-cache hits", self.base_url)
        if reason in ("abort", "error"):
            raise TransientEngineError(f"vLLM ended the request with finish_reason {reason!r}", request)
        if reason not in _FINISH:
            raise TransientEngineError(f"vLLM returned no known finish reason (got {reason!r})", request)
        return Result(text=text, finish_reason=_FINISH[reason], prompt_tokens=prompt_tokens,
                      completion_tokens=completion_tokens, cached_tokens=cached)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()


def openai_regex_body(server: str, regex: str) -> dict[str, Any]:
    """Extra body fields that carry a regex constraint through an OpenAI-compatible route of a
    self-hosted server (for `--engine openai`): vLLM 0.33.0's `structured_outputs.regex`, SGLang
    0.5.23's top-level `regex` (its Chat/CompletionRequest). Hosted APIs take neither."""
    if server == "vllm":
        return {"structured_outputs": {"regex": regex}}
    if server == "sglang":
        return {"regex": regex}
    raise ValueError(f"no known regex field for server {server!r}; expected 'vllm' or 'sglang'")


def kv_cache_tokens(metrics: str) -> tuple[int, int]:
    """(engines reporting, KV-cache tokens of the smallest) from /metrics' `vllm:cache_config_info`:
    one line per engine whose labels are the CacheConfig fields as strings (0.33: v1/metrics/loggers.py
    log_metrics_info): kv_cache_size_tokens where set, else num_gpu_blocks x block_size. (0, 0) when
    absent or unreadable ("None" before an engine has profiled its memory)."""
    sizes = []
    for labels in _CACHE_INFO.findall(metrics):
        info = dict(_LABEL.findall(labels))
        tokens = _int(info.get("kv_cache_size_tokens"))
        if tokens is None:
            blocks, block_size = _int(info.get("num_gpu_blocks")), _int(info.get("block_size"))
            tokens = blocks * block_size if blocks and block_size else None
        if tokens:
            sizes.append(tokens)
    return (len(sizes), min(sizes)) if sizes else (0, 0)


def _int(label: str | None) -> int | None:
    try:
        value = int(label) if label is not None else None
    except ValueError:
        return None
    return value if value is not None and value > 0 else None


def _count(value: Any, none_ok: bool = False) -> int | None:
    """A non-negative int token count (None -> 0 where allowed); None when the type is wrong."""
    if value is None and none_ok:
        return 0
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _pick_card(cards: list[dict], model_path: str | None) -> dict:
    """The served model matching --model by name, else the first base model (LoRA adapters have a
    parent)."""
    if model_path:
        for c in cards:
            if model_name(model_path) in (model_name(c["id"]), model_name(str(c.get("root") or ""))):
                return c
    return next((c for c in cards if not c.get("parent")), cards[0])

