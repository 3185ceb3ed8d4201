"""The one small protocol every backend speaks, and the errors it raises (classified by type)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from engine.request import Request, Result


class EngineError(Exception):
    """Base of all backend failures. `retryable` tells the scheduler whether to try again."""

    retryable = False

    def __init__(self, message: str, request: Request | None = None) -> None:
        super().__init__(message)
        self.request = request


class TransientEngineError(EngineError):
    """Worth retrying: a 5xx, a dropped connection, a timeout, an overloaded engine."""

    retryable = True


class RequestRejected(EngineError):
    """The engine refused this request for what it is (4xx, prompt too long): retrying cannot help."""


class EngineDied(EngineError):
    """The engine itself is gone (child process killed, server unreachable for good): stop the run."""


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
