"""What goes into an engine and what comes out: Request, SamplingParams, Result.

A request's key is a hash of exactly what determines its output (model, prompt, sampling, regex),
so a stored result can stand in for an engine call and any change to those inputs misses the store.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from functools import lru_cache
from typing import Any, Literal

import orjson
import xxhash

FinishReason = Literal["stop", "length", "abort", "error"]


class ErrorKind(str, Enum):
    """Why a request finally failed; stored with the result as its readable value."""

    REJECTED = "rejected"  # the engine refused this request for what it is (4xx): retrying cannot help
    ENGINE = "engine_error"  # an engine error not worth retrying
    GAVE_UP = "gave_up"  # transient errors or timeouts, retried until the retries ran out

    @classmethod
    def of_legacy(cls, error: str) -> ErrorKind:
        """The kind of a failure stored before kinds were stored: read from its message's prefix."""
        if error.startswith("rejected"):
            return cls.REJECTED
        return cls.GAVE_UP if error.startswith("gave up") else cls.ENGINE


# A prompt is token ids (preferred: the engine skips tokenization and prefix reuse is exact),
# plain text, or chat messages (for endpoints that apply their own chat template).
Prompt = tuple[int, ...] | str | tuple[tuple[tuple[str, str], ...], ...]


@dataclass(frozen=True, slots=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    def to_dict(self) -> dict[str, Any]:
        # Spelled out, not asdict(): this runs for every request key, and asdict() deep-copies
        # (it was ~7% of the event loop's time). Same dict, so the same keys.
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_new_tokens": self.max_new_tokens,
            "seed": self.seed,
            "stop": self.stop,
        }


def messages_prompt(messages: list[dict[str, str]]) -> Prompt:
    """Chat messages as a hashable prompt: ((("role", r), ("content", c)), ...)."""
    return tuple((("role", m["role"]), ("content", m["content"])) for m in messages)


def prompt_messages(prompt: Prompt) -> list[dict[str, str]]:
    return [dict(m) for m in prompt]  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Request:
    """One generation. `model` names model and revision; `group` (not hashed) lets the scheduler
    submit requests that share a template together so the engine's prefix cache sees them as a run."""

    prompt: Prompt
    sampling: SamplingParams
    model: str
    regex: str | None = None
    group: str = ""
    key: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.prompt, list):
            object.__setattr__(self, "prompt", tuple(self.prompt))
        object.__setattr__(self, "key", request_key(self.model, self.prompt, self.sampling, self.regex))

    @property
    def kind(self) -> Literal["ids", "text", "messages"]:
        if isinstance(self.prompt, str):
            return "text"
        if self.prompt and isinstance(self.prompt[0], tuple):
            return "messages"
        return "ids"

    @property
    def prompt_len(self) -> int:
        return len(self.prompt) if self.kind == "ids" else 0


def request_key(model: str, prompt: Prompt, sampling: SamplingParams, regex: str | None) -> bytes:
    """xxh3_128 of orjson.dumps({"model", "prompt", "regex", "sampling"}, OPT_SORT_KEYS). The bytes
    are assembled from parts (keys in sorted order, orjson's compact separators) so that the model
    and the regex, the same for most requests, are serialized once: the P1 regex alone is ~1.4 KB.
    Same bytes as serializing the whole dict (tested), so the same keys."""
    return xxhash.xxh3_128_digest(
        b"".join(
            (
                b'{"model":',
                _json(model),
                b',"prompt":',
                orjson.dumps(prompt, option=orjson.OPT_SORT_KEYS),
                b',"regex":',
                _json(regex),
                b',"sampling":',
                _sampling_json(sampling),
                b"}",
            )
        )
    )


@lru_cache(maxsize=1024)
def _json(value: str | None) -> bytes:
    return orjson.dumps(value)


def _sampling_json(s: SamplingParams) -> bytes:
    # Not cached: equal params can serialize apart (0 == 0.0 == -0.0, True == 1), and it is cheap.
    return orjson.dumps(s.to_dict(), option=orjson.OPT_SORT_KEYS)


@dataclass(slots=True)
class Result:
    """An engine's answer, or a recorded failure (`error` set, `finish_reason` "error")."""

    text: str
    finish_reason: FinishReason
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    attempts: int = 1
    error: str | None = None
    error_kind: ErrorKind | None = None

    def __post_init__(self) -> None:
        if self.error is not None and not isinstance(self.error_kind, ErrorKind):
            # A stored failure comes back with the kind's value, or none if stored before kinds were
            kind = self.error_kind
            self.error_kind = ErrorKind(kind) if kind else ErrorKind.of_legacy(self.error)

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def failure(cls, error: str, attempts: int = 1, kind: ErrorKind = ErrorKind.ENGINE) -> Result:
        return cls(text="", finish_reason="error", attempts=attempts, error=error, error_kind=kind)
