"""The simulated engine's prefix cache: SGLang's radix cache reduced to chained block hashes, matched
to the token.

A prompt is a chain of block hashes (block i's hash covers blocks 0..i, as in nano-vllm's block
manager), so two prompts share exactly the blocks of their common prefix. Blocks held by running
requests are locked; unlocked blocks are evicted least recently used first. Unlocking walks a chain
from its last block to its first, so a parent always becomes "used" after its children and eviction
takes leaves first, as SGLang's radix tree does.

Granularity: SGLang 0.5.23 runs with page_size 1 on CUDA (`_page_size_default` in
srt/arg_groups/overrides.py), so its radix tree matches a prompt to the token. Here memory is kept
in BLOCK-token blocks, and a match goes on into the first unmatched block: each cached block is
also filed, by its tokens, under its parent, and the longest common prefix with a sibling (the
neighbours in sorted order) counts as cached too. A prompt's partial last block is private to its
request (never filed), so a prompt extending a finished one loses < BLOCK tokens.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, insort
from collections import OrderedDict
from collections.abc import Sequence

BLOCK = 16


def block_chain(ids: Sequence[int], block: int = BLOCK) -> array:
    """Chained hashes of the full blocks of `ids`."""
    out = array("q")
    h = 0
    for i in range(0, len(ids) - block + 1, block):
        h = hash((h, tuple(ids[i : i + block])))
        out.append(h)
    return out


def compact_ids(ids: Sequence[int]) -> array:
    """Token ids in 2 bytes each where the vocabulary allows (kept for every recorded request)."""
    return array("H" if not ids or max(ids) < 65536 else "i", ids)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class PrefixCache:
    def __init__(self, block: int = BLOCK) -> None:
        self.block = block
        self.ref: dict[int, int] = {}  # cached block -> running requests holding it
        self.lru: OrderedDict[int, None] = OrderedDict()  # unlocked blocks, least recently used first
        self.kids: dict[int, list[tuple[int, ...]]] = {}  # parent (0: none) -> its children's tokens, sorted
        self.filed: dict[int, tuple[int, tuple[int, ...]]] = {}  # cached block -> (parent, its tokens)

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

    def match_tokens(self, chain: Sequence[int], ids: Sequence[int] | None) -> int:
        """Tokens of the prompt (`ids`, its blocks `chain`) already cached: the cached blocks of its
        longest cached prefix, then the tokens of the next block that a cached sibling starts with."""
        m = self.match(chain)
        if ids is None:
            return m * self.block
        b = self.block
        q = tuple(ids[m * b : (m + 1) * b])
        kids = self.kids.get(chain[m - 1] if m else 0) if q else None
        if not kids:
            return m * b
        i = bisect_left(kids, q)
        best = max((common_prefix(kids[j], q) for j in (i - 1, i) if 0 <= j < len(kids)), default=0)
        return m * b + best

    def lock(self, chain: Sequence[int], ids: Sequence[int] | None = None) -> int:
        """Hold every block of `chain` (inserting the missing ones, filed by their tokens when `ids`
        are given); returns the blocks added."""
        added = 0
        ref, lru, b = self.ref, self.lru, self.block
        for i, h in enumerate(chain):
            r = ref.get(h)
            if r is None:
                ref[h] = 1
                added += 1
                if ids is not None:
                    parent, toks = (chain[i - 1] if i else 0), tuple(ids[i * b : (i + 1) * b])
                    self.filed[h] = (parent, toks)
                    insort(self.kids.setdefault(parent, []), toks)
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
            filed = self.filed.pop(h, None)
            if filed is not None:
                kids = self.kids[filed[0]]
                del kids[bisect_left(kids, filed[1])]
                if not kids:
                    del self.kids[filed[0]]
        return freed
