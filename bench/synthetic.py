"""Synthetic SFT input of realistic size for the overhead and crash benchmarks, written streaming.

Rows cycle through the common shapes (alpaca, sharegpt with a system turn, messages, question/answer)
and are about `row_bytes` long (~2 KB by default, the size of a typical instruction + answer pair).
Every row's text is unique, so no two instances share a request key: the store never answers one
instance from another's work and the measured rate is the rate of real misses.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import orjson

_WORDS = (
    "data model system user answer question explain function value list result number example "
    "python code error step first second then because which where about table method test file "
    "string return loop array memory time simple reason compute write read check class object"
).split()


def _pool(rng: random.Random, n: int, words: int) -> list[str]:
    return [" ".join(rng.choice(_WORDS) for _ in range(words)) for _ in range(n)]


def rows(n: int, *, seed: int = 0, row_bytes: int = 2000, bad_every: int = 0) -> Iterator[bytes]:
    """`n` JSON Lines rows (bytes, newline included). With `bad_every` > 0, every bad_every-th row
    is malformed (cut-off JSON), so drops through the input path are exercised too."""
    rng = random.Random(seed)
    # Pools of ready-made sentences, combined per row with the row number: unique text at the cost
    # of a few string joins per row, so 800k rows take seconds, not minutes.
    q_words, a_words = max(8, row_bytes // 4 // 7), max(16, row_bytes * 3 // 4 // 7)
    questions, answers = _pool(rng, 257, q_words), _pool(rng, 263, a_words)
    for i in range(n):
        q = f"Task {i}{seed}: {questions[i % 257]} ({questions[(i * 7) % 257][:40]})?"
        a = f"Answer {i}. {answers[(i * 13) % 263]}."
        kind = i % 4
        if kind == 0:
            row = {"instruction": q, "input": "", "output": a}
        elif kind == 1:
            row = {
                "conversations": [
                    {"from": "system", "value": "You are a helpful assistant."},
                    {"from": "human", "value": q},
                    {"from": "gpt", "value": a},
                ]
            }
        elif kind == 2:
            row = {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        else:
            row = {"question": q, "answer": a}
        line = orjson.dumps(row) + b"\n"
        if bad_every and i % bad_every == bad_every - 1:
            line = line[: len(line) // 2] + b"\n"
        yield line


def write(path: str | Path, n: int, *, seed: int = 0, row_bytes: int = 2000, bad_every: int = 0) -> int:
    """Write `n` rows to `path`; returns the bytes written. Memory stays flat whatever `n` is."""
    size = 0
    with open(path, "wb", buffering=1 << 20) as f:
        for line in rows(n, seed=seed, row_bytes=row_bytes, bad_every=bad_every):
            f.write(line)
            size += len(line)
    return size
