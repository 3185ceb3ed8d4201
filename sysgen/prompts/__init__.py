"""Prompt templates (text files beside this module) and their content hashes."""

from __future__ import annotations

from functools import cache
from importlib import resources

import xxhash

NAMES = ("p1_generate", "p1_user", "p3_verify", "p3_user", "p3_chat_system", "p3_chat_user")


@cache
def load(name: str) -> str:
    try:
        return resources.files(__package__).joinpath(f"{name}.txt").read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"prompt template {name}.txt missing from {__package__}") from None


def digest(name: str) -> str:
    return xxhash.xxh3_64_hexdigest(load(name).encode())


def digests() -> dict[str, str]:
    return {n: digest(n) for n in NAMES}
