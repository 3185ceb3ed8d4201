"""A stand-in engine (no model) for tests and benchmarks: answers come from a `respond` function,
latency and faults from optional hooks. It is never used for real data."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from engine.backend import BackendBase, Capabilities, EngineDied, RequestRejected, TransientEngineError
from engine.request import FinishReason, Request, Result

Fault = str | None  # "error" | "hang" | "truncate" | "reject" | "die" | None


class StandInBackend(BackendBase):
    name = "standin"
    tokenizer = None

    def __init__(
        self,
        respond: Callable[[Request], str],
        *,
        model_id: str = "standin",
        max_running: int = 64,
        delay_s: Callable[[Request], float] | float = 0.0,
        fault: Callable[[Request, int], Fault] | None = None,
    ) -> None:
        self.respond = respond
        self.model_id = model_id
        self.capabilities = Capabilities(
            regex=True, token_ids=True, max_running=max_running, max_context=1 << 20
        )
        self.delay_s = delay_s
        self.fault = fault
        self.calls = 0
        self._attempts: dict[bytes, int] = {}

    async def generate(self, request: Request) -> Result:
        self.calls += 1
        what = None
        if self.fault is not None:  # attempts are counted only while faults are injected
            n = self._attempts[request.key] = self._attempts.get(request.key, 0) + 1
            what = self.fault(request, n)
            if what is None:
                self._attempts.pop(request.key, None)
        delay = self.delay_s(request) if callable(self.delay_s) else self.delay_s
        if what == "hang":
            await asyncio.sleep(3600)
        if delay:
            await asyncio.sleep(delay)
        if what == "error":
            raise TransientEngineError("stand-in: injected engine error", request)
        if what == "reject":
            raise RequestRejected("stand-in: injected rejection", request)
        if what == "die":
            raise EngineDied("stand-in: injected engine death", request)
        text = self.respond(request)
        finish: FinishReason = "stop"
        if what == "truncate":
            text, finish = text[: len(text) // 2], "length"
        n_prompt = len(request.prompt) if isinstance(request.prompt, tuple) else len(str(request.prompt)) // 4
        return Result(
            text=text, finish_reason=finish, prompt_tokens=n_prompt, completion_tokens=max(1, len(text) // 4)
        )
