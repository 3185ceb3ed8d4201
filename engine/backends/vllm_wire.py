"""vLLM's wire format, as plain functions over what it sends and answers (no I/O): the request
fields every request carries, the completion answer mapped to a Result, the running capacity and KV
cache read from /server_info and /metrics, and the model card that matches --model.

Request (0.33.0 entrypoints/openai/completion/protocol.py, CompletionRequest): POST /v1/completions
{"model", "prompt": [ids] | str, "max_tokens", "temperature", "top_p", "seed", "stop",
"structured_outputs": {"regex"}} (StructuredOutputsParams in sampling_params.py). vLLM accepts and
*ignores* unknown fields (OpenAIBaseModel has extra="allow"; the old `guided_regex` is dropped with a
warning), so a misspelt constraint field would silently unconstrain the output: the tests check
every field we send against the pinned source's field list.
Response (CompletionResponse): {"model", "choices": [{"text", "finish_reason", "stop_reason"}],
"usage": {"prompt_tokens", "completion_tokens", "prompt_tokens_details": {"cached_tokens"}}}.
`prompt_tokens_details` is filled only by a server started with `--enable-prompt-tokens-details`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.backend import TransientEngineError
from engine.backends.http_client import model_name
from engine.request import FinishReason, Request, Result

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
# top_k -1: "disabled" to vLLM (which prefers 0 but accepts -1, sampling_params.py) and the only
# "disabled" the routers take (smg 1.13 refuses 0: "top_k must be -1 (disabled) or at least 1").
NEUTRAL_SAMPLING = {"top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0}


@dataclass(frozen=True, slots=True)
class Capacity:
    """What a server says it runs at once: requests, where that figure came from, data-parallel
    engines sharing it, and each one's KV-cache tokens (0: unknown)."""

    running: int
    source: str
    dp_size: int = 1
    kv_tokens: int = 0


def server_capacity(config: Any, metrics: str) -> Capacity | None:
    """vLLM reports no running capacity in production. Dev mode (VLLM_SERVER_DEV_MODE=1) has
    /server_info with the scheduler's max_num_seqs (`config`, its vllm_config). /metrics shows how
    many engines (data parallel ranks) run and, in `vllm:cache_config_info`, each one's KV cache:
    with it the window starts at KV_SIZED_RUNNING per engine and the scheduler sizes it from the KV
    cache; without it each engine is assumed to take DEFAULT_RUNNING. None when neither says."""
    running, source = None, ""
    if isinstance(config, dict):
        seqs = (config.get("scheduler_config") or {}).get("max_num_seqs")
        dp = (config.get("parallel_config") or {}).get("data_parallel_size") or 1
        if isinstance(seqs, int) and seqs > 0 and isinstance(dp, int) and dp > 0:
            running, source = seqs * dp, "/server_info max_num_seqs x data_parallel_size"
    engines = set(_ENGINE_LABEL.findall(metrics))
    kv_engines, kv_tokens = kv_cache_tokens(metrics)
    if running is None and kv_tokens:
        n = max(len(engines), kv_engines)
        running = KV_SIZED_RUNNING * n
        source = (
            f"/metrics cache_config_info: {n} engine(s) x {kv_tokens:,} KV tokens, "
            f"up to {KV_SIZED_RUNNING} running each"
        )
    elif running is None and engines:
        running = DEFAULT_RUNNING * len(engines)
        source = f"/metrics: {len(engines)} engine(s) x {DEFAULT_RUNNING}"
    if not running:
        return None
    dp = max(1, len(engines), kv_engines)
    return Capacity(running, source, dp_size=dp if kv_tokens else 1, kv_tokens=kv_tokens)


def completion_result(
    body: Any, url: str, request: Request | None, scrub: Callable[[str], str]
) -> tuple[Result, bool]:
    """A CompletionResponse's types validated and mapped: (the Result, whether the server reported
    cached-token counts). A malformed answer, and vLLM's own finish_reason "abort"/"error" or none
    we know, are transient errors, never successes. `scrub` blanks the API key from server text."""

    def bad(what: str) -> TransientEngineError:
        return TransientEngineError(f"{url}: malformed answer ({what}): {scrub(str(body)[:200])!r}", request)

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
    if reason in ("abort", "error"):  # "abort": the server is shutting down
        raise TransientEngineError(f"vLLM ended the request with finish_reason {reason!r}", request)
    if reason not in _FINISH:
        raise TransientEngineError(f"vLLM returned no known finish reason (got {reason!r})", request)
    result = Result(
        text=text,
        finish_reason=_FINISH[reason],
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        cached_tokens=cached,
    )
    return result, details is not None


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


def pick_card(cards: list[dict], model_path: str | None) -> dict:
    """The served model matching --model by name, else the first base model (LoRA adapters have a
    parent)."""
    if model_path:
        for c in cards:
            if model_name(model_path) in (model_name(c["id"]), model_name(str(c.get("root") or ""))):
                return c
    return next((c for c in cards if not c.get("parent")), cards[0])
