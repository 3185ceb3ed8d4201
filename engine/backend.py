"""The one small protocol every backend speaks, and the errors it raises (classified by type)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from engine.request import Request, Result


class EngineError(Exception):
    """Base of all backend failures. `retryable` tells the scheduler whether to try again."""

    retryable = False

    def __init__(self, message: str, request: Request | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.request = request
        self.status = status  # the HTTP status behind it, where there is one

    @property
    def kind(self) -> str:
        """What went wrong, coarsely (type and status): the scheduler stops the run when the most
        recent requests all failed the same kind of way."""
        return f"{type(self).__name__} {self.status}" if self.status else type(self).__name__


class TransientEngineError(EngineError):
    """Worth retrying: a 5xx, a dropped connection, a timeout, an overloaded engine."""

    retryable = True


class EngineUnreachable(TransientEngineError):
    """Nothing accepts a connection at the engine's address (refused, no route, connect timeout).
    The scheduler pauses every request (a circuit breaker) rather than spend their retries."""


class EngineOverloaded(TransientEngineError):
    """The engine shed load (HTTP 429 or 503; 502/504 from a router or proxy in front of it): retry after
    `retry_after_s` (the server's Retry-After,
    or a backoff when it gave none), without spending the request's retries."""

    def __init__(
        self,
        message: str,
        request: Request | None = None,
        status: int | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message, request, status)
        self.retry_after_s = retry_after_s


class RequestRejected(EngineError):
    """The engine refused this request for what it is (4xx, prompt too long): retrying cannot help."""


class ContentFiltered(RequestRejected):
    """The endpoint's content filter withheld the answer (OpenAI finish_reason "content_filter"): a
    drop with that reason, never a success. Not evidence of a broken engine, so it never counts
    toward the scheduler's same-failure streak."""


class EngineDied(EngineError):
    """The engine itself is gone (child process killed, server unreachable for good): stop the run."""


class EngineAuthError(EngineDied):
    """HTTP 401/403: every request would be refused the same way; stop the run at once."""


class EngineDown(EngineDied):
    """The engine stayed unreachable (or kept shedding load) longer than the configured bound: the
    run stops, resumable, instead of dropping the instances it could not serve."""


class EngineConfigError(EngineDied):
    """The engine is not set up as the run needs (found at start): a configuration error to fix,
    not an outage."""


class NeverAnswered(EngineConfigError):
    """Nothing has answered at the engine's address since the run started (a wrong --url, a server
    not started): a configuration error, reported within seconds. The outage wait (EngineDown) is
    for a server that answered and went away."""


class FailureStreak(EngineDied):
    """The most recent requests all failed the same way: something systematic is wrong, so the run
    stops (resumable) instead of dropping the rest of the input."""


@dataclass(frozen=True, slots=True)
class Capabilities:
    regex: bool  # constrained decoding by regex
    token_ids: bool  # accepts token-id prompts
    max_running: int  # requests the engine decodes at once; the scheduler sizes its window from it
    max_context: int  # prompt + completion tokens
    dp_size: int = 1  # data-parallel ranks (schedulers) sharing max_running; each has its own queue
    kv_tokens: int = 0  # KV-cache tokens per rank (SGLang's max_total_num_tokens); 0 = unknown


@runtime_checkable
class Backend(Protocol):
    name: str
    model_id: str  # model and revision; part of every request key
    tokenizer: Any  # a Hugging Face tokenizer, or None for text-only endpoints
    capabilities: Capabilities

    async def generate(self, request: Request) -> Result: ...

    async def close(self) -> None: ...

    async def __aenter__(self) -> Backend: ...

    async def __aexit__(self, *exc: object) -> None: ...


class BackendBase:
    """Shared async-context-manager plumbing; subclasses implement generate() and close()."""

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        return None
