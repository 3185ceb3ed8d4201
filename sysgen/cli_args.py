"""Every numeric flag's type and bounds, checked by the argument parser itself.

A value outside its bounds (huge, negative, zero where that means nothing, NaN, infinite, not a
number) is refused while the command line is parsed, with one line naming the flag and the range,
and exit code 2: it can never reach a step that opens the store or touches the outputs. The bounds
are generous (far past any real run) so they only ever catch mistakes.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import NoReturn

MAX_COUNT = 10**12  # instances, characters: more than any dataset holds
MAX_TOKENS = 10_000_000  # past every model's context
MAX_SECONDS = 7 * 86_400.0


def whole(lo: int, hi: int) -> Callable[[str], int]:
    """A whole number in [lo, hi]."""

    def parse(text: str) -> int:
        try:
            value = int(_ascii(text).strip(), 10)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a whole number from {lo:,} to {hi:,}, got {text!r}"
            ) from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be from {lo:,} to {hi:,}, got {_short(text)}")
        return value

    parse.__name__ = "whole number"
    return parse


def number(lo: float, hi: float, *, above: bool = False) -> Callable[[str], float]:
    """A finite number in [lo, hi] ((lo, hi] with `above`)."""
    low = f"above {lo:g}" if above else f"from {lo:g}"

    def parse(text: str) -> float:
        try:
            value = float(_ascii(text))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number {low} to {hi:g}, got {text!r}") from None
        if not (math.isfinite(value) and (value > lo if above else value >= lo) and value <= hi):
            raise argparse.ArgumentTypeError(f"must be a number {low} to {hi:g}, got {_short(text)}")
        return value

    parse.__name__ = "number"
    return parse


MAX_SHARDS = 1_000_000


def shard(text: str) -> str:
    """`i/N` with 0 <= i < N <= MAX_SHARDS; kept as the text the run config holds."""
    parts = text.split("/")
    try:
        i, n = (int(_ascii(p).strip(), 10) for p in parts) if len(parts) == 2 else (None, None)
    except ValueError:
        i = n = None
    if i is None or n is None:
        raise argparse.ArgumentTypeError(f"expected i/N such as 0/8, got {_short(text)!r}")
    if not (1 <= n <= MAX_SHARDS and 0 <= i < n):
        raise argparse.ArgumentTypeError(f"need 0 <= i < N <= {MAX_SHARDS:,}, got {_short(text)}")
    return f"{i}/{n}"


# `sysgen run`'s numeric flags by RunConfig field; a test checks every int/float field is here.
RUN: dict[str, Callable[[str], object]] = {
    "limit": whole(0, MAX_COUNT),
    "shard": shard,
    "max_inflight": whole(1, 100_000),
    "max_batch": whole(1, 65_536),
    "kv_cache_gb": whole(1, 65_536),
    "p1_max_tokens": whole(1, MAX_TOKENS),
    "p3_max_tokens": whole(1, MAX_TOKENS),
    "p4_max_tokens": whole(1, MAX_TOKENS),
    "p4_budget_factor": number(0, 1000),
    "p4_budget_cap": whole(1, MAX_TOKENS),
    "temperature": number(0, 100),
    "seed": whole(0, 2**32 - 1),  # the widest seed every engine takes (OpenVINO's rng_seed is 32-bit)
    "max_turn_chars": whole(1, MAX_COUNT),
    "timeout_s": number(0, MAX_SECONDS, above=True),
    "max_retries": whole(0, 1000),
    "engine_down_s": number(0, MAX_SECONDS, above=True),
}
# `sysgen eval`'s.
JUDGE_LIMIT = whole(1, MAX_COUNT)
BERTSCORE_LAYER = whole(0, 1000)


def run_type(name: str, default: Callable[[str], object]) -> Callable[[str], object]:
    """The parser type of RunConfig field `name`."""
    return RUN.get(name, default)


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line naming the flag and what it takes, exit code 2 (argparse prints
    the whole usage first, which for `sysgen run` buries the message under 40 lines)."""

    def error(self, message: str) -> NoReturn:
        self.exit(
            2, f"{self.prog}: error: {message}. Fix: correct it (`{self.prog} --help` lists the flags)\n"
        )


def _ascii(text: str) -> str:
    """`text` if it is ASCII; int() and float() also read other scripts' digits ("١٢" is 12), which a
    flag should not."""
    if not text.isascii():
        raise ValueError(text)
    return text


def _short(text: str) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= 40 else text[:20] + "…" + text[-8:]
