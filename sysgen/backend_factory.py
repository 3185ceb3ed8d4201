"""Backends built from CLI choices. Each backend module (openvino, sglang, aiohttp, kernels_cfg's
profiles) is imported only when chosen: together they take seconds to import."""

from __future__ import annotations

import logging
from typing import Any

from engine.backend import Backend
from engine.backends.select import choose_backend
from engine.scheduler import SchedulerConfig
from sysgen.config import OLD_ENGINE_NAMES

log = logging.getLogger(__name__)


def resolve_engine(name: str) -> tuple[str, str]:
    """(backend name, why) for --engine; `auto` looks for CUDA and sglang."""
    if name in OLD_ENGINE_NAMES:
        new = OLD_ENGINE_NAMES[name]
        return new, f"--engine {name} is the old name of the CPU engine, now {new}"
    if name != "auto":
        return name, "chosen with --engine"
    return choose_backend("auto")


# --deterministic (batch-invariant outputs; docs/determinism.md): why an engine cannot offer it.
# SGLang can (enable_deterministic_inference; for sglang_http the server must run with it); the
# stand-in's answers never depend on batching.
NOT_DETERMINISTIC = {
    "openvino": "OpenVINO GenAI has no batch-invariant mode (an answer can change with the requests "
    "batched beside it and with prefix-cache hits); the store keeps each first answer, so a "
    "resumed run stays stable. For batch-invariant output use --engine sglang",
    "vllm_http": "vLLM's batch invariance is switched on where the server starts and cannot be checked over "
    "HTTP: start it with VLLM_BATCH_INVARIANT=1 (NVIDIA GPUs of compute capability 9.0 or "
    "newer) and run without --deterministic",
    "openai": "an OpenAI-compatible endpoint has no batch-invariant mode sysgen can ask for or check",
}


def make_backend(
    name: str,
    *,
    model: str | None,
    url: str | None = None,
    api_key: str | None = None,
    gpu_profile: str | None = None,
    max_batch: int = 32,
    fp8: bool = False,
    max_inflight: int | None = None,
    standin: dict[str, Any] | None = None,
    timeout_s: float = SchedulerConfig.timeout_s,
    openai_server: str | None = None,
    kv_cache_gb: int | None = None,
    deterministic: bool = False,
) -> Backend:
    """timeout_s: the scheduler's per-request timeout (--timeout-s); the GPU backends' own request
    timeouts match it, so neither cuts a request the other still allows."""
    name, why = resolve_engine(name)
    log.info("engine: %s (%s)", name, why)
    if deterministic and name in NOT_DETERMINISTIC:
        raise ValueError(f"--deterministic is not offered with --engine {name}: {NOT_DETERMINISTIC[name]}")
    if name == "openvino":
        from engine.backends.openvino import OpenVINOBackend

        return OpenVINOBackend(model, max_num_seqs=max_batch, kv_cache_gb=kv_cache_gb)
    if name == "sglang":
        if not model:
            raise ValueError("--engine sglang needs --model /path/to/hf/model")
        from engine.backends.sglang import SGLangBackend
        from kernels_cfg import estimate_model_size_b, load_profile

        # Size decides tp_size and memory fractions: a 70B model must not get the 8B numbers.
        args = load_profile(gpu_profile, model_size_b=estimate_model_size_b(model), fp8=fp8)
        if deterministic:  # batch-invariant kernels, seeded sampling; costs throughput
            args = {**args, "enable_deterministic_inference": True}
        return SGLangBackend(model, server_args=args, request_timeout_s=timeout_s)
    if name == "sglang_http":
        from engine.backends.sglang_http import SGLangHTTPBackend

        return SGLangHTTPBackend(
            url,
            model_path=model,
            max_concurrency=max_inflight,
            timeout_s=timeout_s,
            api_key=api_key,
            deterministic=deterministic,
        )
    if name == "vllm_http":
        from engine.backends.vllm_http import VLLMHTTPBackend

        return VLLMHTTPBackend(
            url, model_path=model, api_key=api_key, max_concurrency=max_inflight, timeout_s=timeout_s
        )
    if name == "openai":
        from engine.backends.openai_http import OpenAIBackend

        if not model:
            raise ValueError("--engine openai needs --model NAME (the endpoint's model name)")
        return OpenAIBackend(url, model=model, api_key=api_key, timeout_s=timeout_s, server=openai_server)
    if name == "standin":
        # Not a model: canned answers, for tests and benchmarks. Delay and fault injection come
        # from SYSGEN_STANDIN_DELAY / SYSGEN_STANDIN_FAULTS, read by the CLI (see sysgen/standin.py).
        from sysgen.standin import make_backend as make_standin

        return make_standin(**(standin or {}))
    raise ValueError(f"unknown engine {name!r}")
