"""SGLangBackend against a stand-in `sglang` module (no GPU here). The stand-in records what the
backend passes, and the tests check those names against the pinned SGLang's real signatures,
read from its source with ast: a wrong argument or sampling-param name fails here, not on a GPU.
Child-process death must surface as EngineDied within seconds, never a hang."""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import sys
import time
import types

import pytest

from engine.backend import Backend, EngineDied, RequestRejected, TransientEngineError
from engine.backends.sglang import (
    GrammarTimeout,
    SGLangBackend,
    capacity_from_states,
    child_exit,
    result_from_output,
    sampling_params_for,
)
from engine.request import Request, SamplingParams, messages_prompt
from kernels_cfg.fields import class_field_names, method_params, server_arg_fields, sglang_root


@pytest.fixture(scope="module")
def pinned():
    root = sglang_root()
    if root is None:
        pytest.skip("sglang source not installed: pip install --no-deps sglang==<pin> (the Makefile does)")
    engine_py = root / "srt" / "entrypoints" / "engine.py"
    return types.SimpleNamespace(
        server_args=set(server_arg_fields(root)),
        init=method_params(engine_py, "Engine", "__init__"),
        async_generate=method_params(engine_py, "Engine", "async_generate")[0],
        sampling=class_field_names(root / "srt" / "sampling" / "sampling_params.py", "SamplingParams"),
        meta_info=class_field_names(root / "api" / "v1" / "api_types.py", "GenerateMetaInfo"),
    )


class StandInTokenizer:
    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        assert add_generation_prompt and tokenize
        return [ord(c) for m in messages for c in m["content"]] + [0]


class StandInTokenizerManager:
    """Stand-in for SGLang's TokenizerManager: only what the backend touches."""

    context_len = 8192

    def __init__(self) -> None:
        self.aborted: list[str] = []
        self.tokenizer = StandInTokenizer()

    async def get_internal_state(self):
        # Shaped like sglang 0.5.23 managers/scheduler_components/internal_state.py, one per DP rank.
        return [
            {"effective_max_running_requests_per_dp": 48, "memory_usage": {"token_capacity": 200_000}}
            for _ in range(2)
        ]

    def abort_request(self, rid: str = "", abort_all: bool = False) -> None:
        self.aborted.append(rid)


GRAMMAR_TIMEOUT_FIRST = "Grammar preprocessing timed out: req.grammar_key=('regex', '(a|b)')"
GRAMMAR_TIMEOUT_CACHED = "Failed to compile regex grammar: Grammar preprocessing timed out"


def stand_in_sglang(behaviour="ok", child_pids=(), shutdown_error=None):
    """A module named like sglang whose Engine records calls. behaviour: ok | hang | reject | abort |
    grammar_timeout (SGLang's ValueError for a 400 abort: the first request gets the timeout itself,
    later ones the cached invalid grammar, as in constrained/grammar_manager.py)."""
    calls: dict = {"init": None, "generate": [], "shutdown": 0}

    class StandInEngine:
        def __init__(self, **kwargs):
            calls["init"] = kwargs
            self.tokenizer_manager = StandInTokenizerManager()
            # What sglang's configure_logger does at Engine start (utils/common.py).
            logging.basicConfig(level=logging.ERROR, format="[%(asctime)s] %(message)s", force=True)

        def get_all_child_pids(self):
            return list(child_pids)

        async def async_generate(self, **kwargs):
            calls["generate"].append(kwargs)
            if behaviour == "hang":
                await asyncio.sleep(3600)
            if behaviour == "reject":
                raise ValueError(
                    "The input (9000 tokens) is longer than the model's context length (8192 tokens)."
                )
            if behaviour == "grammar_timeout":
                first = len(calls["generate"]) == 1
                raise ValueError(GRAMMAR_TIMEOUT_FIRST if first else GRAMMAR_TIMEOUT_CACHED)
            reason = (
                {"type": "abort", "message": "server busy"}
                if behaviour == "abort"
                else {"type": "length", "length": 5}
            )
            return {
                "text": "<Role>x</Role>\n",
                "meta_info": {
                    "id": kwargs.get("rid"),
                    "finish_reason": reason,
                    "prompt_tokens": 12,
                    "completion_tokens": 5,
                    "cached_tokens": 8,
                    "e2e_latency": 0.1,
                },
            }

        def shutdown(self):
            calls["shutdown"] += 1
            if shutdown_error is not None:
                raise shutdown_error

    mod = types.ModuleType("sglang")
    mod.Engine = StandInEngine
    return mod, calls


def make(monkeypatch, behaviour="ok", child_pids=(), shutdown_error=None, **kw):
    mod, calls = stand_in_sglang(behaviour, child_pids, shutdown_error)
    monkeypatch.setitem(sys.modules, "sglang", mod)
    server_args = {"mem_fraction_static": 0.8, "max_running_requests": 64, "schedule_policy": "lpm"}
    backend = SGLangBackend("/models/Llama-3.1-8B-Instruct", server_args=server_args, **kw)
    return backend, calls


def req(regex=None, temperature=0.0, prompt=(1, 2, 3)) -> Request:
    return Request(
        prompt=prompt,
        sampling=SamplingParams(temperature=temperature, max_new_tokens=5, seed=7, stop=("</s>",)),
        model="m",
        regex=regex,
    )


def test_calls_match_the_pinned_sglang_signatures(monkeypatch, pinned):
    backend, calls = make(monkeypatch)

    async def run():
        async with backend:
            return await backend.generate(req(regex="(a|b)", temperature=0.7))

    result = asyncio.run(run())
    init = calls["init"]
    assert pinned.init[1], "sglang.Engine.__init__ no longer takes **kwargs"
    assert set(init) <= pinned.server_args, f"not ServerArgs fields: {set(init) - pinned.server_args}"
    assert init["model_path"] == "/models/Llama-3.1-8B-Instruct" and init["log_level"] == "info"
    (kwargs,) = calls["generate"]
    assert set(kwargs) <= pinned.async_generate, f"unknown arguments: {set(kwargs) - pinned.async_generate}"
    assert kwargs["input_ids"] == [1, 2, 3]
    sp = kwargs["sampling_params"]
    assert set(sp) <= pinned.sampling, f"unknown sampling params: {set(sp) - pinned.sampling}"
    assert sp == {
        "temperature": 0.7,
        "top_p": 1.0,
        "max_new_tokens": 5,
        "stop": ["</s>"],
        "regex": "(a|b)",
        "sampling_seed": 7,
    }
    assert {"prompt_tokens", "completion_tokens", "cached_tokens", "finish_reason"} <= pinned.meta_info
    assert (
        result.text,
        result.finish_reason,
        result.prompt_tokens,
        result.completion_tokens,
        result.cached_tokens,
    ) == ("<Role>x</Role>\n", "length", 12, 5, 8)
    assert calls["shutdown"] == 1


def test_protocol_capacity_and_model_id(monkeypatch):
    backend, _ = make(monkeypatch)
    assert isinstance(backend, Backend)
    assert backend.capabilities.max_running == 64  # from server args until entered
    assert backend.capabilities.max_context == 8192
    assert backend.model_id == "Llama-3.1-8B-Instruct"

    async def run():
        async with backend:
            return backend.capabilities.max_running

    assert asyncio.run(run()) == 96  # 2 data-parallel ranks x 48, as the engine reports
    assert (backend.capabilities.dp_size, backend.capabilities.kv_tokens) == (2, 200_000)


def test_capacity_from_states_reads_every_rank():
    rank = {"effective_max_running_requests_per_dp": 256, "memory_usage": {"token_capacity": 400_000}}
    assert capacity_from_states([rank] * 4) == (1024, 4, 400_000)
    assert capacity_from_states([{"effective_max_running_requests_per_dp": 64}]) == (64, 1, 0)  # KV unknown
    assert capacity_from_states([{"effective_max_running_requests_per_dp": None}]) is None
    assert capacity_from_states([]) is None and capacity_from_states(None) is None


def test_fp8_changes_the_model_id(monkeypatch):
    mod, _ = stand_in_sglang()
    monkeypatch.setitem(sys.modules, "sglang", mod)
    b = SGLangBackend("/m/Qwen2.5-14B/", server_args={"quantization": "fp8", "kv_cache_dtype": "fp8_e4m3"})
    assert b.model_id == "Qwen2.5-14B+fp8+kv_fp8_e4m3"


def test_greedy_sends_no_seed_and_text_prompts_go_as_prompt(monkeypatch):
    assert "sampling_seed" not in sampling_params_for(req())
    backend, calls = make(monkeypatch)

    async def run():
        async with backend:
            await backend.generate(req(prompt="hello"))

    asyncio.run(run())
    assert calls["generate"][0]["prompt"] == "hello" and "input_ids" not in calls["generate"][0]


def test_messages_use_the_chat_template_and_need_a_tokenizer(monkeypatch):
    backend, calls = make(monkeypatch)
    chat = req(prompt=messages_prompt([{"role": "user", "content": "hi"}]))

    async def run():
        async with backend:
            await backend.generate(chat)
            backend.tokenizer = None
            await backend.generate(chat)

    with pytest.raises(RequestRejected, match="chat template"):
        asyncio.run(run())
    assert calls["generate"][0]["input_ids"] == [ord("h"), ord("i"), 0]


def test_validation_error_is_a_rejection(monkeypatch):
    backend, _ = make(monkeypatch, behaviour="reject")

    async def run():
        async with backend:
            await backend.generate(req())

    with pytest.raises(RequestRejected, match="context length"):
        asyncio.run(run())


def test_abort_finish_is_transient_and_4xx_abort_is_rejection():
    with pytest.raises(TransientEngineError, match="server busy"):
        result_from_output(
            {"text": "", "meta_info": {"finish_reason": {"type": "abort", "message": "server busy"}}}
        )
    with pytest.raises(RequestRejected, match="bad regex"):
        result_from_output(
            {
                "text": "",
                "meta_info": {"finish_reason": {"type": "abort", "message": "bad regex", "status_code": 400}},
            }
        )
    r = result_from_output({"text": "ok", "meta_info": {"finish_reason": {"type": "stop", "matched": 2}}})
    assert r.finish_reason == "stop" and r.ok


def test_timeout_aborts_inside_sglang(monkeypatch):
    backend, calls = make(monkeypatch, behaviour="hang", request_timeout_s=0.2)

    async def run():
        async with backend:
            try:
                await backend.generate(req())
            finally:
                assert backend._engine.tokenizer_manager.aborted == [calls["generate"][0]["rid"]]

    with pytest.raises(TransientEngineError, match="no answer"):
        asyncio.run(run())


def test_cancelled_request_is_aborted_inside_sglang(monkeypatch):
    backend, calls = make(monkeypatch, behaviour="hang")

    async def run():
        async with backend:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(backend.generate(req()), 0.2)  # the scheduler's own timeout
            return backend._engine.tokenizer_manager.aborted

    assert asyncio.run(run()) == [calls["generate"][0]["rid"]]


def test_killed_child_fails_inflight_requests_fast(monkeypatch):
    """A real child process killed with SIGKILL (what the OOM killer does) while requests hang."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        backend, _ = make(monkeypatch, behaviour="hang", child_pids=[child.pid], watch_interval_s=0.05)

        async def run():
            async with backend:
                tasks = [asyncio.ensure_future(backend.generate(req())) for _ in range(3)]
                await asyncio.sleep(0.2)
                child.send_signal(signal.SIGKILL)  # not reaped: it stays a zombie, as under multiprocessing
                t0 = time.monotonic()
                results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
                return results, time.monotonic() - t0

        results, waited = asyncio.run(run())
        assert waited < 5
        for r in results:
            assert isinstance(r, EngineDied)
            assert f"process {child.pid} exited with code -9" in str(r) and "dmesg" in str(r)
    finally:
        child.kill()
        child.wait()


def test_sglang_sigquit_is_taken_over(monkeypatch):
    """SGLang's watchdog signals SIGQUIT when a child dies; the backend turns it into EngineDied for
    every waiting request instead of letting SGLang kill this process."""
    backend, _ = make(monkeypatch, behaviour="hang")

    async def run():
        async with backend:
            task = asyncio.ensure_future(backend.generate(req()))
            await asyncio.sleep(0.05)
            backend._on_child_failure_signal()  # what the SIGQUIT handler runs
            with pytest.raises(EngineDied, match="exit code is in SGLang's log"):
                await asyncio.wait_for(task, 5)
            with pytest.raises(EngineDied):  # and every later request too
                await backend.generate(req())
            assert asyncio.get_running_loop().remove_signal_handler(signal.SIGQUIT)  # it was installed

    asyncio.run(run())


def test_child_exit_reads_a_zombie_without_reaping():
    child = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    deadline = time.monotonic() + 10
    while child_exit(child.pid)[0] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert child_exit(child.pid) == (False, 3)
    assert child.wait() == 3  # still ours to reap
    assert child_exit(child.pid) == (False, None)
    assert child_exit(1)[0]


def test_missing_sglang_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sglang", None)  # import sglang -> ImportError
    with pytest.raises(ImportError, match=r"pip install -e '\.\[sglang\]'"):
        SGLangBackend("/m", server_args={})


def test_engine_start_failure_is_engine_died(monkeypatch):
    mod = types.ModuleType("sglang")

    def boom(**kw):
        raise RuntimeError("Rank 0 scheduler died during initialization (exit code: -9).")

    mod.Engine = boom
    monkeypatch.setitem(sys.modules, "sglang", mod)
    with pytest.raises(EngineDied, match="exit code: -9"):
        SGLangBackend("/m", server_args={})


def test_misspelt_server_arg_fails_before_loading(monkeypatch, pinned):
    backend_calls = stand_in_sglang()
    monkeypatch.setitem(sys.modules, "sglang", backend_calls[0])
    with pytest.raises(ValueError, match="max_runing_requests"):
        SGLangBackend("/m", server_args={"max_runing_requests": 4})
    assert backend_calls[1]["init"] is None


def test_grammar_timeout_is_the_engines_failure_not_the_requests():
    """SGLang caches a timed-out grammar as invalid and aborts every later request with that regex
    (400): stored as RequestRejected, one slow compile would reject every remaining P1 request."""
    for message in (GRAMMAR_TIMEOUT_FIRST, GRAMMAR_TIMEOUT_CACHED):
        with pytest.raises(GrammarTimeout) as info:
            result_from_output(
                {
                    "text": "",
                    "meta_info": {"finish_reason": {"type": "abort", "message": message, "status_code": 400}},
                }
            )
        assert info.value.retryable and not isinstance(info.value, RequestRejected)


def test_repeated_grammar_timeout_stops_the_run_instead_of_rejecting_requests(monkeypatch, tmp_path):
    from engine.scheduler import Scheduler
    from engine.store import Store

    backend, calls = make(monkeypatch, behaviour="grammar_timeout")

    async def run():
        async with backend:
            with Store.open(tmp_path / "s.db") as store:
                scheduler = Scheduler(
                    backend, store, max_retries=3, backoff_base_s=0.001, backoff_max_s=0.002
                )
                with pytest.raises(EngineDied, match="SGLANG_GRAMMAR_MAX_POLL_ITERATIONS"):
                    await scheduler.submit(req(regex="(a|b)"))
                with pytest.raises(EngineDied):  # the engine is unusable for the rest of the run
                    await backend.generate(req(regex="(c|d)", prompt=(4,)))
                return store.get(req(regex="(a|b)").key)

    assert asyncio.run(run()) is None  # nothing stored: a resumed run asks again
    assert len(calls["generate"]) == 2  # retried once, then stopped


def test_shutdown_error_does_not_hide_the_engine_death(monkeypatch, caplog):
    backend, calls = make(monkeypatch, shutdown_error=RuntimeError("kill_process_tree: timed out"))

    async def run():
        async with backend:
            raise EngineDied("SGLang child process 7 exited with code -9")

    with pytest.raises(EngineDied, match="code -9"):
        asyncio.run(run())
    assert calls["shutdown"] == 1 and "kill_process_tree: timed out" in caplog.text


def test_sigquit_is_ignored_during_shutdown_not_reset_to_core_dump(monkeypatch):
    backend, _ = make(monkeypatch)
    before = signal.getsignal(signal.SIGQUIT)
    try:

        async def run():
            async with backend:
                pass

        asyncio.run(run())
        assert signal.getsignal(signal.SIGQUIT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGQUIT, before)


def test_our_logging_survives_sglangs_configure_logger(monkeypatch):
    root = logging.getLogger()
    handler = logging.StreamHandler()
    old_handlers, old_level = list(root.handlers), root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)  # what --verbose sets
    try:
        make(monkeypatch)  # the stand-in Engine calls logging.basicConfig(force=True, level=ERROR)
        assert handler in root.handlers and root.level == logging.DEBUG
        assert all(h in old_handlers or h is handler for h in root.handlers)
    finally:
        root.handlers[:] = old_handlers
        root.setLevel(old_level)


def test_request_timeout_follows_the_schedulers(monkeypatch):
    from engine.scheduler import SchedulerConfig
    from sysgen.backend_factory import make_backend

    mod, _ = stand_in_sglang()
    monkeypatch.setitem(sys.modules, "sglang", mod)
    backend = make_backend(
        "sglang", model="/models/Llama-3.1-8B-Instruct", gpu_profile="h100-80gb", timeout_s=1234.0
    )
    assert backend.request_timeout_s == 1234.0
    assert SGLangBackend("/m", server_args={}).request_timeout_s == SchedulerConfig().timeout_s
