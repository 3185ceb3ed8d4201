"""Does the server behind an OpenAI-compatible chat route honour our regex field? Asked once at
start, before any row is spent: sglang-router 0.3.2 forwards chat requests without vLLM's
`structured_outputs` (it rebuilds the body from its own request type), so a run through it was
silently unconstrained (P1 parse rate 0%, every row dropped at P2, exit 0).

The probe asks for a short answer the model would never give unconstrained (five digits to
"Say hello") and checks the answer is exactly that."""

from __future__ import annotations

import re
from typing import Any

from engine.backend import EngineConfigError, EngineError

PROBE_REGEX = "[0-9]{5}"


def probe_body(model: str, regex_fields: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 8,
        "temperature": 0.0,
        **regex_fields,
    }


def ignored_regex_error(url: str, server: str, answer: str) -> EngineConfigError:
    return EngineConfigError(
        f"{url}/v1/chat/completions ignores the regex field of --openai-server {server} (asked for "
        f"{PROBE_REGEX!r}, got {answer[:60]!r}): a router in front of the server drops it (sglang-router "
        "does). Fix: put the server behind `smg launch --backend vllm --worker-urls URL ...` or "
        "`vllm-router --worker-urls URL ...`, or use --engine vllm_http --url (the router's completions "
        "route keeps the regex)"
    )


async def check_regex_honoured(
    client: Any, url: str, server: str, model: str, regex_fields: dict[str, Any]
) -> None:
    """Raise EngineConfigError (the run stops at start, exit 2) when the chat route answers
    outside PROBE_REGEX; nothing when it honours it, or when the probe gets no usable answer (the
    run's own requests will meet whatever went wrong, with its usual handling)."""
    try:
        reply = await client.post(
            "/v1/chat/completions", probe_body(model, regex_fields), max_bytes=1 << 20, timeout_s=60.0
        )
        body = reply.json() if reply.status == 200 else None
        answer = body["choices"][0]["message"]["content"] if isinstance(body, dict) else None
    except (EngineError, ValueError, KeyError, IndexError, TypeError):
        return
    if isinstance(answer, str) and re.fullmatch(PROBE_REGEX, answer) is None:
        raise ignored_regex_error(url, server, answer)
