"""SGLang in-process: `sglang.Engine(model_path=..., **server_args)` and `async_generate` per request.

Names follow sglang 0.5.23 (srt/entrypoints/engine.py, srt/sampling/sampling_params.py). When an
SGLang child process dies, SGLang's own watchdog sends SIGQUIT to this process and its handler
kills the whole process tree, this one included, mid-write. We take that signal over, and also
watch the child pids ourselves: either way every request in flight fails with EngineDied naming
the exit code, the run stops cleanly and resumes from the store. A request that never answers
times out (request_timeout_s) and is aborted inside SGLang. Nothing waits forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import uuid
from pathlib import Path
from typing import Any

from engine.backend import (
    BackendBase,
    Capabilities,
    EngineDied,
    EngineError,
    RequestRejected,
    TransientEngineError,
)
from engine.request import Request, Result, prompt_messages

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install -e '.[sglang]' (Linux, NVIDIA GPU, CUDA 13 drivers)"
OOM_HINT = "exit code -9 is SIGKILL, usually the kernel's OOM killer: check `dmesg -T | grep -i oom`"
# SGLang gives up on a grammar compile after SGLANG_GRAMMAR_MAX_POLL_ITERATIONS polls and caches the
# grammar as invalid until flush_cache (constrained/grammar_manager.py): the timed-out request and
# every later one with that regex are aborted with a 400 carrying this text. It says the engine was
# slow (or overloaded), not that the request is wrong.
GRAMMAR_TIMEOUT = "Grammar preprocessing timed out"
GRAMMAR_TIMEOUT_HINT = (
    "SGLang timed out compiling a regex grammar and now refuses every request with that regex until "
    "it restarts; the run stops and resumes from the store. If it happens again, let SGLang wait "
    "longer (environment SGLANG_GRAMMAR_MAX_POLL_ITERATIONS, default 10000 polls of 5 ms) or use "
    "a smaller regex"
)


class GrammarTimeout(TransientEngineError):
    """SGLang's grammar compile timed out: the engine's failure, not the request's."""


class GrammarTimeouts:
    """Grammar compile timeouts per regex, for both SGLang backends: the first is retried; another
    for the same regex proves SGLang cached the grammar as invalid, so every later request with it
    would fail until the server restarts: `stop_reason()` then says why the run stops (resumable)
    instead of failing them one by one."""

    def __init__(self, before_stop: int = 2) -> None:
        self.before_stop = before_stop
        self._counts: dict[str, int] = {}

    def stop_reason(self, error: GrammarTimeout, request: Request) -> str | None:
        regex = request.regex or ""
        n = self._counts[regex] = self._counts.get(regex, 0) + 1
        if n < self.before_stop:
            return None
        return f"{error} ({n} times for this regex). {GRAMMAR_TIMEOUT_HINT}."


def abort_error(message: str, status: int | None, request: Request | None = None) -> EngineError:
    """The error for an SGLang abort (Engine: a ValueError or HTTPException; HTTP: a 4xx body;
    either: finish_reason {"type": "abort"}). 4xx is the request's fault (RequestRejected) except a
    grammar compile timeout, which is the engine's (GrammarTimeout, retryable); other aborts (load
    shedding, our own abort) are transient."""
    if GRAMMAR_TIMEOUT in message:
        return GrammarTimeout(f"SGLang: {message}", request)
    if isinstance(status, int) and 400 <= status < 500:
        return RequestRejected(f"SGLang rejected the request: {message}", request)
    return TransientEngineError(f"SGLang aborted the request: {message}", request)


def capacity_from_states(states: Any) -> tuple[int, int, int] | None:
    """(max running requests over all ranks, DP ranks, KV-cache tokens per rank, 0 if unknown) from
    SGLang's internal states (Engine: tokenizer_manager.get_internal_state(); HTTP: /server_info
    "internal_states"), one per DP rank (managers/scheduler_components/internal_state.py:
    effective_max_running_requests_per_dp, memory_usage.token_capacity = max_total_num_tokens).
    None when they do not say."""
    if not isinstance(states, list) or not states or not all(isinstance(s, dict) for s in states):
        return None
    running = [
        s.get("effective_max_running_requests_per_dp") or s.get("max_running_requests") for s in states
    ]
    if not all(pos_int(n) for n in running):
        return None
    kv = [_memory(s).get("token_capacity") or s.get("max_total_num_tokens") for s in states]
    kv_per_rank = min(kv) if all(pos_int(k) for k in kv) else 0
    return sum(running), len(states), kv_per_rank


def _memory(state: dict[str, Any]) -> dict[str, Any]:
    usage = state.get("memory_usage")
    return usage if isinstance(usage, dict) else {}  # a malformed one says nothing


def pos_int(v: Any) -> int | None:
    """`v` when it is a positive int, else None (a server's JSON true is not 1)."""
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def sampling_params_for(request: Request) -> dict[str, Any]:
    """SGLang's sampling_params for a request (the same dict for Engine and HTTP /generate).

    The seed goes in as `sampling_seed`, but SGLang samples with it only when the server runs with
    enable_deterministic_inference (sampling/sampling_batch_info.py), which we keep off because it
    costs throughput: seeded sampled outputs vary run to run (the store keeps the first answer, so
    a resumed run is stable anyway). Greedy decoding needs no seed."""
    s = request.sampling
    params: dict[str, Any] = {
        "temperature": s.temperature,
        "top_p": s.top_p,
        "max_new_tokens": s.max_new_tokens,
    }
    if s.stop:
        params["stop"] = list(s.stop)
    if request.regex is not None:
        params["regex"] = request.regex
    if s.temperature > 0:
        params["sampling_seed"] = s.seed
    return params


def result_from_output(out: dict[str, Any], request: Request | None = None) -> Result:
    """Map one SGLang generate output {"text", "meta_info": {...}} to a Result.

    finish_reason is {"type": "stop"|"length"|"abort", ...}. An abort carries a message and,
    when it is the request's fault, an HTTP-like status_code: classified by abort_error()."""
    meta = out.get("meta_info") or {}
    reason = meta.get("finish_reason")
    kind = reason.get("type") if isinstance(reason, dict) else reason
    if kind == "abort":
        message = reason.get("message", "aborted") if isinstance(reason, dict) else "aborted"
        status = reason.get("status_code") if isinstance(reason, dict) else None
        raise abort_error(str(message), status, request)
    if kind not in ("stop", "length"):
        raise TransientEngineError(f"SGLang returned no finish reason (got {reason!r})", request)
    return Result(
        text=out.get("text") or "",
        finish_reason=kind,
        prompt_tokens=int(meta.get("prompt_tokens") or 0),
        completion_tokens=int(meta.get("completion_tokens") or 0),
        cached_tokens=int(meta.get("cached_tokens") or 0),
    )


def default_model_id(model_path: str, server_args: dict[str, Any]) -> str:
    """Model name plus what changes its outputs (quantization, KV dtype): part of every store key,
    so fp8 and bf16 results never answer for each other."""
    mid = Path(model_path.rstrip("/")).name or model_path
    if server_args.get("quantization"):
        mid += f"+{server_args['quantization']}"
    kv = server_args.get("kv_cache_dtype")
    if kv and kv not in ("auto", "bf16", "bfloat16"):
        mid += f"+kv_{kv}"
    return mid


def child_exit(pid: int) -> tuple[bool, int | None]:
    """(alive, exit code) of a child pid from /proc without reaping it (which would steal the
    status from multiprocessing). A zombie's exit status is field 52 of /proc/PID/stat."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False, None  # gone and already reaped (by SGLang's watchdog)
    except OSError:
        return True, None
    fields = raw[raw.rfind(")") + 2 :].split()
    if not fields or fields[0] not in ("Z", "X"):
        return True, None
    status = int(fields[49]) if len(fields) > 49 else None
    if status is None:
        return False, None
    return False, (-(status & 0x7F) if status & 0x7F else (status >> 8) & 0xFF)


def death_message(pid: int | None, code: int | None) -> str:
    who = f"SGLang child process {pid}" if pid is not None else "An SGLang child process"
    what = f"exited with code {code}" if code is not None else "died (its exit code is in SGLang's log above)"
    hint = OOM_HINT if code in (-9, None) else "see SGLang's log above for its traceback"
    return f"{who} {what}; the engine cannot go on. {hint}. The run stops and resumes from the store."


class SGLangBackend(BackendBase):
    """In-process SGLang engine. Enter it (`async with`) before building the scheduler: entering
    learns the engine's real running capacity and arms the child-process watch.

    request_timeout_s should be the scheduler's per-attempt timeout (the CLI passes --timeout-s):
    a shorter one would cut requests the user allowed to run longer. grammar_timeouts_before_stop:
    grammar compile timeouts (see GRAMMAR_TIMEOUT) for one regex before the engine is declared
    unusable; the first is retried, the next proves SGLang has cached the grammar as invalid."""

    name = "sglang"

    def __init__(
        self,
        model_path: str,
        *,
        server_args: dict[str, Any],
        model_id: str | None = None,
        request_timeout_s: float | None = 600.0,
        watch_interval_s: float = 1.0,
        grammar_timeouts_before_stop: int = 2,
    ) -> None:
        if "model_path" in server_args:
            raise ValueError("pass the model as SGLangBackend(model_path, ...), not in server_args")
        self.model_path = model_path
        self.server_args = {"log_level": "info", **server_args}  # SGLang's Engine defaults to "error"
        _check_server_args(self.server_args)
        self.model_id = model_id or default_model_id(model_path, self.server_args)
        self.request_timeout_s = request_timeout_s
        self.watch_interval_s = watch_interval_s
        self._grammar_timeouts = GrammarTimeouts(grammar_timeouts_before_stop)
        sglang = _import_sglang()
        with _kept_logging():  # SGLang's configure_logger re-configures the root logger (force=True)
            try:
                self._engine = sglang.Engine(model_path=model_path, **self.server_args)
            except Exception as e:
                raise EngineDied(f"SGLang failed to start for {model_path}: {type(e).__name__}: {e}") from e
        tm = getattr(self._engine, "tokenizer_manager", None)
        self.tokenizer = getattr(tm, "tokenizer", None) or _auto_tokenizer(model_path)
        self.capabilities = Capabilities(
            regex=self.server_args.get("grammar_backend") != "none",
            token_ids=True,
            max_running=int(self.server_args.get("max_running_requests") or 256),
            max_context=int(getattr(tm, "context_len", 0) or 0) or 1 << 20,
        )
        self._dead: asyncio.Future[str] | None = None
        self._watch_task: asyncio.Task | None = None
        self._sigquit_loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    async def __aenter__(self) -> SGLangBackend:
        await self.start()
        return self

    async def start(self) -> None:
        """Arm death detection on the running loop and read the effective running capacity."""
        if self._dead is not None:
            return
        loop = asyncio.get_running_loop()
        self._dead = loop.create_future()
        tm = getattr(self._engine, "tokenizer_manager", None)
        get_state = getattr(tm, "get_internal_state", None)
        if get_state is not None:  # also starts SGLang's handle loop, which installs its SIGQUIT handler
            try:
                capacity = capacity_from_states(await asyncio.wait_for(get_state(), timeout=60))
                if capacity is not None:
                    running, dp, kv = capacity
                    self.capabilities = dataclasses.replace(
                        self.capabilities, max_running=running, dp_size=dp, kv_tokens=kv
                    )
            except Exception as e:  # capacity stays as configured
                log.warning(
                    "could not read SGLang's running capacity (%s); using %d",
                    e,
                    self.capabilities.max_running,
                )
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
            loop.add_signal_handler(signal.SIGQUIT, self._on_child_failure_signal)  # replaces SGLang's
            self._sigquit_loop = loop
        self._watch_task = loop.create_task(self._watch(), name="sglang-child-watch")

    def _declare_dead(self, message: str) -> None:
        if self._dead is not None and not self._dead.done():
            log.error("%s", message)
            self._dead.set_result(message)

    def _on_child_failure_signal(self) -> None:
        pid, code = self._find_dead_child()
        self._declare_dead(death_message(pid, code))

    def _find_dead_child(self) -> tuple[int | None, int | None]:
        for pid in self._child_pids():
            alive, code = child_exit(pid)
            if not alive:
                return pid, code
        return None, None

    def _child_pids(self) -> list[int]:
        try:
            return list(self._engine.get_all_child_pids())
        except Exception:
            return []

    async def _watch(self) -> None:
        while self._dead is not None and not self._dead.done():
            await asyncio.sleep(self.watch_interval_s)
            pid, code = self._find_dead_child()
            if pid is not None:
                self._declare_dead(death_message(pid, code))

    async def generate(self, request: Request) -> Result:
        await self.start()
        assert self._dead is not None
        if self._dead.done():
            raise EngineDied(self._dead.result(), request)
        rid = uuid.uuid4().hex
        task = asyncio.ensure_future(
            self._engine.async_generate(
                sampling_params=sampling_params_for(request), rid=rid, **self._prompt_kwargs(request)
            )
        )
        try:
            done, _ = await asyncio.wait(
                {task, self._dead}, timeout=self.request_timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
            if task in done:
                try:
                    return result_from_output(self._output(task, request), request)
                except GrammarTimeout as e:
                    self._on_grammar_timeout(e, request)
                    raise
            if self._dead.done():
                raise EngineDied(self._dead.result(), request)
            raise TransientEngineError(
                f"SGLang gave no answer in {self.request_timeout_s:g}s; aborted it", request
            )
        finally:
            if not task.done():
                task.cancel()
                self._abort(rid)

    def _on_grammar_timeout(self, error: GrammarTimeout, request: Request) -> None:
        reason = self._grammar_timeouts.stop_reason(error, request)
        if reason is not None:
            self._declare_dead(reason)
            assert self._dead is not None
            raise EngineDied(self._dead.result(), request) from error

    def _prompt_kwargs(self, request: Request) -> dict[str, Any]:
        if request.kind == "ids":
            return {"input_ids": list(request.prompt)}
        if request.kind == "text":
            return {"prompt": request.prompt}
        if self.tokenizer is None:
            raise RequestRejected("a chat-messages prompt needs a tokenizer with a chat template", request)
        ids = self.tokenizer.apply_chat_template(
            prompt_messages(request.prompt), add_generation_prompt=True, tokenize=True
        )
        return {"input_ids": list(ids["input_ids"] if hasattr(ids, "keys") else ids)}

    def _output(self, task: asyncio.Future, request: Request) -> dict[str, Any]:
        try:
            return task.result()
        except EngineError:
            raise
        except ValueError as e:  # SGLang's validation (prompt too long, bad regex) and 400 aborts
            raise abort_error(str(e), 400, request) from e
        except Exception as e:
            status = getattr(e, "status_code", None)  # fastapi.HTTPException from an abort
            if isinstance(status, int) and 400 <= status < 500:
                raise abort_error(f"({status}) {getattr(e, 'detail', None) or e}", status, request) from e
            raise TransientEngineError(f"SGLang failed: {type(e).__name__}: {e}", request) from e

    def _abort(self, rid: str) -> None:
        tm = getattr(self._engine, "tokenizer_manager", None)
        if tm is not None and hasattr(tm, "abort_request"):
            try:
                tm.abort_request(rid)
            except Exception as e:  # the engine may be gone; nothing left to abort
                log.debug("abort of %s failed: %s", rid, e)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watch_task
        if self._sigquit_loop is not None:
            with contextlib.suppress(Exception):
                self._sigquit_loop.remove_signal_handler(signal.SIGQUIT)
        # Children killed by shutdown() make SGLang's watchdog send SIGQUIT; the default action
        # would dump core over the message that matters. Ignore it from here on.
        with contextlib.suppress(ValueError, OSError):  # ValueError: not the main thread
            signal.signal(signal.SIGQUIT, signal.SIG_IGN)
        self._declare_dead("the SGLang engine was shut down")  # fail anything still waiting
        try:
            self._engine.shutdown()  # kills every child and waits up to 60 s: it can raise
        except Exception as e:  # the error that brought us here (often EngineDied) must stay the one shown
            log.warning("SGLang shutdown did not finish cleanly: %s: %s", type(e).__name__, e)


@contextlib.contextmanager
def _kept_logging():
    """Put the root logger back as it was (handlers, level: the CLI's format and --verbose) after
    SGLang's start, which calls logging.basicConfig(force=True) with its own."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        if root.handlers != handlers or root.level != level:
            for h in list(root.handlers):
                if h not in handlers:
                    root.removeHandler(h)
            for h in handlers:
                if h not in root.handlers:
                    root.addHandler(h)
            root.setLevel(level)


def _import_sglang():
    try:
        import sglang
    except ImportError as e:
        raise ImportError(f"the sglang backend needs SGLang: {INSTALL_HINT} ({e})") from e
    if not hasattr(sglang, "Engine"):
        raise ImportError(f"this sglang has no Engine: {INSTALL_HINT}")
    return sglang


def _check_server_args(args: dict[str, Any]) -> None:
    """Catch a misspelt server argument before minutes of model loading."""
    try:
        from kernels_cfg import validate_server_args
    except ImportError:
        return
    validate_server_args(args, source="SGLang server args")


def _auto_tokenizer(model_path: str):
    try:
        from transformers import AutoTokenizer
    except ImportError:
        return None
    return AutoTokenizer.from_pretrained(model_path)
