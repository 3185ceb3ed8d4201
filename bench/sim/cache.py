"""The simulated engine's prefix cache: SGLang's radix cache reduced to chained block hashes.

A prompt is a chain of block hashes (block i's hash covers blocks 0..i, as in nano-vllm's block
manager), so two prompts share exactly the blocks of their common prefix. Blocks held by running
requests are locked; unlocked blocks are evicted least recently used first. Unlocking walks a chain
from its last block to its first, so a parent always becomes "used" after its children and eviction
takes leaves first, as SGLang's radix tree does. Granularity: BLOCK tokens (SGLang matches to the
token; a prompt's partial last block is never shared here, a loss of < BLOCK tokens per request).
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Sequence

BLOCK = 16


def block_chain(ids: Sequence[int], block: int = BLOCK) -> array:
    """Chained hashes of the full blocks of `ids`."""
    out = array("q")
    h = 0
    for i in range(0, len(ids) - block + 1, block):
        h = hash((h, tuple(ids[i:i + block])))
        out.append(h)
    return out


class PrefixCache:
    def __init__(self, block: int = BLOCK) -> None:
        self.block = block
        self.ref: dict[int, int] = {}  # cached block -> running requests holding it
        self.lru: OrderedDict[int, None] = OrderedDict()  # unlocked blocks, least recently used first

    @property
    def tokens(self) -> int:
        return len(self.ref) * self.block

    @property
    def evictable_tokens(self) -> int:
        return len(self.lru) * self.block

    def match(self, chain: Sequence[int]) -> int:
        """Blocks of `chain` already cached (its longest cached prefix)."""
        n = 0
        ref = self.ref
        for h in chain:
            if h not in ref:
                break
            n += 1
        return n

    def lock(self, chain: Sequence[int]) -> int:
        """Hold every block of `chain` (inserting the missing ones); returns the blocks added."""
        added = 0
        ref, lru = self.ref, self.lru
        for h in chain:
            r = ref.get(h)
            if r is None:
                ref[h] = 1
                added += 1
            else:
                if r == 0:
                    del lru[h]
                ref[h] = r + 1
        return added

    def unlock(self, chain: Sequence[int]) -> None:
        ref, lru = self.ref, self.lru
        for h in reversed(chain):
            r = ref[h] - 1
            ref[h] = r
            if r == 0:
                lru[h] = None

    def evict(self, tokens: int) -> int:
        """Drop unlocked blocks, oldest first, until `tokens` are freed or none is left; returns the
        tokens freed."""
        freed = 0
        while freed < tokens and self.lru:
            h, _ = self.lru.popitem(last=False)
            del self.ref[h]
            freed += self.block
        return freed
