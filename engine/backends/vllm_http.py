"""vLLM over HTTP: the OpenAI-compatible server of `vllm serve` (pinned: vLLM 0.33.0), or a router
in front of several of them. Prompts go out as token ids, so our template-first prefix layout
reaches the engine as built and its prefix cache sees every shared template.

The request and answer fields, and how /metrics sizes the window: engine/backends/vllm_wire.py.
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
import dataclasses
import logging
import random
import time
from pathlib import Path
from typing import Any

from engine.backend import (
    BackendBase,
    Capabilities,
    EngineAuthError,
    EngineDied,
    EngineError,
    EngineOverloaded,
    EngineUnreachable,
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
    wire_text,
)
from engine.backends.vllm_fleet import (
    ROUTER_UNKNOWN_MODEL,
    fleet_context,
    fleet_running,
    healthy_workers,
    positive_int,
)
from engine.backends.vllm_watch import MetricsWatch
from engine.backends.vllm_wire import (
    DEFAULT_RUNNING,
    NEUTRAL_SAMPLING,
    completion_result,
    pick_card,
    server_capacity,
)
from engine.liveness import LatencyTimeout, Liveness
from engine.request import Request, Result

log = logging.getLogger(__name__)

VLLM_PIN = "0.33.0"  # the version whose request/response fields this module speaks (pyproject [vllm])
# Before start(), or while nothing has said (a router's /v1/models has no max_model_len): never
# planned with, start() replaces it or stops.
UNKNOWN_CONTEXT = 1 << 20


class VLLMHTTPBackend(HTTPEndpoint, BackendBase):
    """`async with VLLMHTTPBackend(url, model_path=...) as b:` reads the served model, its context
    length and (where the server says) its capacity, and fails fast when nothing answers."""

    name = "vllm_http"

    def __init__(
        self,
        base_url: str,
        *,
        model_path: str | None = None,
        api_key: str | None = None,
        max_concurrency: int | None = None,
        timeout_s: float = 600,
        retries: int = 3,
        tokenizer: Any = None,
    ) -> None:
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
        self.capabilities = Capabilities(
            regex=True,
            token_ids=self.tokenizer is not None,
            max_running=self.max_concurrency,
            max_context=UNKNOWN_CONTEXT,
        )
        self.server_version: str | None = None
        self.capacity_source = "default"
        self.context_source = "/v1/models max_model_len"
        self._sem = asyncio.Semaphore(self.max_concurrency)
        self._warned_no_cache_counts = False
        # Set behind a router that refuses token-id prompts (smg, sglang-router: 400/422 "did not
        # match any variant of untagged enum StringOrArray"): prompts then go out as text.
        self.ids_refused = False
        self.watch = MetricsWatch(self.base_url, lambda: self._client, self._client_for)
        self.liveness = Liveness(self.watch)
        self.request_timeout = LatencyTimeout(timeout_s)

    def __repr__(self) -> str:
        return (
            f"VLLMHTTPBackend(base_url={self.base_url!r}, model={self.served_model!r}, "
            f"api_key=<{self._key_shown}>)"
        )

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
            fleet = await self._fleet()
            if self.served_model == ROUTER_UNKNOWN_MODEL or self.capabilities.max_context == UNKNOWN_CONTEXT:
                worker = await self._worker_card(fleet)
                if self.served_model == ROUTER_UNKNOWN_MODEL:
                    self._name_from(worker)
                if self.capabilities.max_context == UNKNOWN_CONTEXT:
                    self._context_from(fleet, worker)
            metrics = await self._metrics_text()
            if self._cap is None:
                if fleet:
                    self._size_from_fleet(fleet)
                else:
                    await self._size_from_server(metrics)
            await self._choose_prompt_form()
            await self.watch.begin(metrics, fleet)
        except BaseException:
            await self.close()  # no pool left open: __aexit__ does not run when __aenter__ fails
            self.served_model = None
            raise
        if self.server_version and self.server_version != VLLM_PIN:
            log.warning(
                "the server at %s runs vLLM %s; sysgen speaks the fields of vLLM %s",
                self.base_url,
                self.server_version,
                VLLM_PIN,
            )
        # One keep-alive connection per request in flight (the first pool had the default size).
        await self._http.resize(self.max_concurrency)
        log.info(
            "vllm_http: %s serves %s (context %d, %s prompts); window sized from %s: %d running",
            self.base_url,
            self.served_model,
            self.capabilities.max_context,
            self.prompt_form,
            self.capacity_source,
            self.capabilities.max_running,
        )

    async def _choose_prompt_form(self) -> None:
        """Token ids where the server takes them (vLLM itself), else text: the routers in front of
        several servers (smg, sglang-router, vllm-router) refuse token-id prompts with a 400/422, and
        every request would be dropped as rejected. One 1-token request tells."""
        encode = getattr(self.tokenizer, "encode", None)
        if encode is None or self._client is None:
            return
        ids = list(encode("Hello", add_special_tokens=False)) or [0]
        body = {"model": self.served_model, "prompt": ids, "max_tokens": 1, "temperature": 0.0}
        try:
            reply = await self._client.post(
                "/v1/completions", body, max_bytes=max_body_bytes(1), timeout_s=60.0
            )
        except EngineError as e:
            log.debug("prompt-form probe at %s: %s", self.base_url, e)
            return
        self.ids_refused = reply.status in (400, 422)
        if self.ids_refused:
            log.warning(
                "%s refuses token-id prompts (%d %s; a router such as smg, sglang-router or "
                "vllm-router): prompts go out as text, rendered with the model's chat template",
                self.base_url,
                reply.status,
                self._scrub(error_message(reply))[:120],
            )

    @property
    def prompt_form(self) -> str:
        return "ids" if self.tokenizer is not None and not self.ids_refused else "text"

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
                raise EngineAuthError(
                    f"{url}: {e.status} {self._scrub(error_message(reply))}. The server "
                    "refused our key: pass --api-key (or OPENAI_API_KEY), the key the "
                    "server was started with",
                    None,
                    e.status,
                ) from e
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
            raise EngineDied(
                f"the server at {self.base_url} answered something that is not vLLM: GET "
                f"/v1/models gave {reply.content_type or 'no type'} {snippet!r} (no model "
                "listed); check --url"
            )
        raise NeverAnswered(
            f"no vLLM server answers at {self.base_url} ({type(last).__name__}: {last}); "
            "start one with `vllm serve MODEL --port PORT --enable-prompt-tokens-details` "
            "or check --url"
        )

    def _apply_models(self, models: dict) -> None:
        cards = [c for c in models["data"] if isinstance(c, dict) and isinstance(c.get("id"), str)]
        if not cards:
            raise EngineDied(f"{self.base_url}/v1/models: no model card with an id")
        card = pick_card(cards, self.model_path)
        self.served_model = card["id"]
        self.model_id = model_name(card["id"])
        root: str = card["root"] if isinstance(card.get("root"), str) else card["id"]
        wanted = model_name(self.model_path) if self.model_path else None
        if (
            wanted
            and card["id"] != ROUTER_UNKNOWN_MODEL
            and wanted not in (model_name(root), model_name(card["id"]))
        ):
            log.warning(
                "the server at %s serves %s but --model is %s: the tokenizer may not match",
                self.base_url,
                root,
                self.model_path,
            )
        if self.tokenizer is None and Path(root).is_dir():  # same node: the server's own tokenizer
            self.tokenizer = load_tokenizer(root, "vllm_http")
        # A LoRA adapter's card has no max_model_len: its base model's card does.
        parent = next((c for c in cards if c["id"] == card.get("parent")), {})
        ctx = card.get("max_model_len") or parent.get("max_model_len")
        self.capabilities = Capabilities(
            regex=True,
            token_ids=self.tokenizer is not None,
            max_running=min(self.max_concurrency, self.capabilities.max_running),
            max_context=positive_int(ctx) or UNKNOWN_CONTEXT,
        )

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

    async def _fleet(self) -> list[dict]:
        """The healthy workers behind a router that lists them (GET /workers); [] for a plain vLLM
        server (no such route)."""
        return healthy_workers(await self._optional_json("/workers", "workers"))

    async def _worker_card(self, fleet: list[dict]) -> dict:
        """The model card of a router's first worker, asked directly (sglang-router knows neither
        the model's name nor its context); {} when none answers from here."""
        for w in fleet:
            url = w.get("url")
            if not isinstance(url, str) or not url.startswith("http"):
                continue
            client = self._client_for(url)
            try:
                body = (await client.get("/v1/models", timeout_s=10.0)).json()
                cards = [
                    c for c in body.get("data") or [] if isinstance(c, dict) and isinstance(c.get("id"), str)
                ]
            except (EngineError, ValueError, AttributeError) as e:
                log.debug("GET %s/v1/models: %s", url, e)
                continue
            finally:
                await client.close()
            if cards:
                return pick_card(cards, self.model_path)
        return {}

    def _name_from(self, worker: dict) -> None:
        """sglang-router lists its model as "unknown" and forwards the name we send to a worker,
        which refuses any name but its own: the worker's own card names it, else --model."""
        name = worker.get("id") or self.model_path
        if not name:
            raise EngineDied(
                f"{self.base_url} does not say which model it serves (a router listing "
                '"unknown") and its workers do not answer from here. Fix: pass --model, '
                "the served model name (`vllm serve` default: the path it was given)"
            )
        self.served_model = name
        log.warning(
            "%s lists its model as %r: sending the name %s", self.base_url, ROUTER_UNKNOWN_MODEL, name
        )

    def _context_from(self, fleet: list[dict], worker: dict) -> None:
        """A router's /v1/models has no max_model_len: take the smallest context its workers report,
        else the local model's config.json, else stop (planning with a guess would overflow)."""
        ctx, source = fleet_context(fleet, worker), f"the smallest of {len(fleet)} worker(s)"
        if ctx is None and self.model_path and Path(self.model_path, "config.json").is_file():
            from engine.backends.model_cache import context_length

            ctx, source = context_length(Path(self.model_path)), f"{self.model_path}/config.json"
            log.warning(
                "%s reports no context length (a router?): assuming %d from %s; a server started "
                "with a smaller --max-model-len rejects longer prompts",
                self.base_url,
                ctx,
                source,
            )
        if ctx is None:
            raise EngineDied(
                f"{self.base_url} reports no context length (/v1/models has no max_model_len: "
                "a router?) and --model names no local model folder to read it from. Fix: "
                "pass --model DIR (a local copy of the served model), or point --url at a vLLM "
                "server or an smg router (its /workers lists each worker's context)"
            )
        self.context_source = source
        self.capabilities = dataclasses.replace(self.capabilities, max_context=ctx)

    def _size_from_fleet(self, fleet: list[dict]) -> None:
        """The fleet's capacity summed over the router's workers (see vllm_fleet)."""
        self._set_running(fleet_running(fleet, DEFAULT_RUNNING), f"router /workers: {len(fleet)} worker(s)")
        log.warning(
            "%s is a router in front of %d worker(s): %d requests in flight in all (pass "
            "--max-inflight to choose)",
            self.base_url,
            len(fleet),
            self.max_concurrency,
        )

    def _set_running(self, running: int, source: str, dp_size: int = 1, kv_tokens: int = 0) -> None:
        self.capacity_source = source
        self.max_concurrency = max(DEFAULT_RUNNING, running + 128)
        self._sem = asyncio.Semaphore(self.max_concurrency)
        self.capabilities = dataclasses.replace(
            self.capabilities, max_running=running, dp_size=dp_size, kv_tokens=kv_tokens
        )

    async def _size_from_server(self, metrics: str) -> None:
        """The running capacity from /server_info (dev mode) and /metrics (see vllm_wire.server_capacity)."""
        config = await self._optional_json("/server_info?config_format=json", "vllm_config")
        capacity = server_capacity(config, metrics)
        if capacity is not None:
            self._set_running(capacity.running, capacity.source, capacity.dp_size, capacity.kv_tokens)

    # -- requests ------------------------------------------------------------------------------

    def payload(self, request: Request) -> dict[str, Any]:
        s = request.sampling
        body: dict[str, Any] = {
            "model": self.served_model,
            "max_tokens": s.max_new_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "seed": s.seed,
            **NEUTRAL_SAMPLING,
        }
        body["prompt"] = (wire_text if self.ids_refused else wire_prompt)(request, self.tokenizer)
        if body["prompt"] is None:
            raise RequestRejected(
                "a chat-messages prompt needs --model (a local copy of the served model, "
                "for its chat template) with vllm_http",
                request,
            )
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
            t0 = time.monotonic()
            try:
                # The exception texts name the URL only; the key is in a header never printed.
                reply = await self.liveness.guard(
                    self._http.post(
                        "/v1/completions",
                        body,
                        request=request,
                        timeout_s=self.request_timeout.seconds,
                        max_bytes=max_body_bytes(request.sampling.max_new_tokens),
                    ),
                    request,
                )
                result = self.result_from_completion(self._json(reply, "/v1/completions", request), request)
            except (EngineOverloaded, EngineUnreachable):
                raise
            except TransientEngineError as e:
                raise await self._unless_gone(e, request) from e
        self.request_timeout.observe(time.monotonic() - t0)
        return result

    async def _unless_gone(self, error: TransientEngineError, request: Request) -> EngineError:
        """A 5xx, an `abort` or a dropped connection while the server shuts down (a restart) is
        waited out like an unreachable server, not spent as a retry: EngineUnreachable when GET
        /health gets no answer or a 5xx (vLLM: 503 once its engine died), else the error itself."""
        if self._client is None:
            return error
        # A new connection: a server shutting down stops listening first but may still answer on
        # the keep-alive connections our pool holds.
        fresh = self._client_for(self.base_url)
        try:
            reply = await fresh.get("/health", timeout_s=5.0)
            healthy = reply.status < 500  # a 404 is a server without the route, not a dying one
        except EngineError:
            healthy = False
        finally:
            await fresh.close()
        if healthy:
            return error
        return EngineUnreachable(
            f"{error} (and {self.base_url}/health fails: the server is going away)", request
        )

    async def _metrics_text(self) -> str:
        reply = await self._optional("/metrics")
        return reply.body.decode("utf-8", "replace") if reply is not None else ""

    def result_from_completion(self, body: Any, request: Request | None = None) -> Result:
        """The Result of a CompletionResponse (vllm_wire.completion_result); a warning, once, when
        the server reports no cached-token counts."""
        result, counted = completion_result(body, f"{self.base_url}/v1/completions", request, self._scrub)
        if not counted and not self._warned_no_cache_counts:
            self._warned_no_cache_counts = True
            log.warning(
                "%s reports no cached-token counts; start vLLM with --enable-prompt-tokens-details "
                "to see prefix-cache hits",
                self.base_url,
            )
        return result

    async def close(self) -> None:
        self.liveness.close()
        client, self._client = self._client, None
        if client is not None:
            await client.close()
