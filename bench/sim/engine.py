"""A simulated SGLang scheduler in virtual time: what runs in each forward pass and how long it takes.

Modelled on SGLang's scheduler (srt/managers/scheduler.py, schedule_policy.py), one DP rank:
- continuous batching: requests join and leave the running batch between forward passes, at most
  `max_running_requests` at once, admitted only while the KV pool (minus what running requests are
  expected to still generate, x new_token_ratio, which decays from 0.7 as SGLang's does) has room;
- chunked prefill: at most `chunked_prefill_size` new prompt tokens per forward, a long prompt split
  over several; with enable_mixed_chunk the chunk rides in the same forward as the decode batch;
- the prefix cache (cache.py): cached prompt tokens are not recomputed and are reported per request,
  like meta_info.cached_tokens; finished requests' blocks stay cached until evicted (LRU);
- waiting order: longest cached prefix first while at most 128 wait (lpm), arrival order beyond;
- retraction: when decode would overflow the pool, the newest request goes back to the queue;
- a finished request's prompt and output stay cached when the caller passes their ids (`keep`),
  so a multi-turn chain's next prompt (this one plus its answer plus the next user turn) hits.
Decode steps between events are summed in closed form (cost.py), so hours of GPU time take seconds.
The match used for lpm ordering is taken when a request arrives (SGLang recomputes it each round;
the difference is small here: the shared templates are cached from the first request on).
"""

from __future__ import annotations

import heapq
from array import array
from collections import deque
from dataclasses import dataclass, field

from bench.sim.cache import BLOCK, PrefixCache
from bench.sim.cost import EngineSpec

INIT_NEW_TOKEN_RATIO = 0.7  # SGLang: init_new_token_ratio; min = 0.7 x 0.14; decays over 600 steps
MIN_NEW_TOKEN_RATIO = 0.7 * 0.14
RATIO_DECAY = (INIT_NEW_TOKEN_RATIO - MIN_NEW_TOKEN_RATIO) / 600
CLIP_MAX_NEW = 4096  # SGLang's CLIP_MAX_NEW_TOKENS in admission


@dataclass(slots=True)
class SimReq:
    rid: int
    prompt_len: int
    chain: array  # block hashes of the prompt (cache.block_chain)
    max_new: int
    out_len: int  # tokens it will generate before stopping (<= max_new)
    constrained: bool = False
    group: str = ""
    match: int = 0  # cached prompt tokens when it arrived (lpm key)
    cached: int = 0  # prompt tokens served from the cache
    done: int = 0  # prompt tokens prefilled (cached ones included)
    start: int = 0  # decode-step counter at which its first output token counted
    finish_at: int = 0
    keep: array | None = None  # prompt + output blocks left in the cache when it finishes
    ids: array | None = None  # the prompt's token ids (cache.compact_ids): the match goes on past blocks
    keep_ids: array | None = None  # ... and those of `keep`

    @property
    def tail(self) -> int:
        return self.prompt_len - len(self.chain) * BLOCK


@dataclass
class EngineStats:
    forwards: int = 0  # forward passes (decode steps inside a summed run counted one by one)
    busy: int = 0  # ... of which at full running capacity (max_running, or KV pool full)
    feeding_forwards: int = 0  # forwards while the driver said more work was still coming
    feeding_busy: int = 0
    gpu_s: float = 0.0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    retractions: int = 0
    by_group: dict = field(default_factory=dict)  # group -> [requests, prompt tokens, cached, output]

    def add(self, req: SimReq) -> None:
        g = self.by_group.setdefault(req.group, [0, 0, 0, 0])
        g[0] += 1
        g[1] += req.prompt_len
        g[2] += req.cached
        g[3] += req.out_len
        self.prompt_tokens += req.prompt_len
        self.cached_tokens += req.cached
        self.output_tokens += req.out_len


def _lpm_key(r: SimReq) -> int:
    return r.match


class SimEngine:
    def __init__(self, spec: EngineSpec) -> None:
        self.spec = spec
        self.cost = spec.cost
        self.cache = PrefixCache()
        self.block = self.cache.block
        self.waiting: deque[SimReq] = deque()
        self.chunked: SimReq | None = None
        self.running: dict[int, SimReq] = {}
        self._heap: list[tuple[int, int]] = []
        self.S = 0  # decode steps so far
        # Sums over the running set, kept incrementally so a step costs O(events), not O(batch).
        self._sum_start = 0
        self._sum_prompt = 0
        self._sum_max_new = 0
        self._tails = 0  # prompt tokens of partial last blocks (private to their request)
        self._constrained = 0
        self.ratio = INIT_NEW_TOKEN_RATIO
        self.feeding = True  # set by the driver: more requests may still arrive
        self.max_run: int | None = None  # set by the driver: cap on decode steps summed at once
        self.stats = EngineStats()

    # ---- bookkeeping ----
    @property
    def idle(self) -> bool:
        return not self.running and not self.waiting and self.chunked is None

    @property
    def generated(self) -> int:
        return len(self.running) * self.S - self._sum_start

    @property
    def used(self) -> int:
        return self.cache.tokens + self._tails + self.generated

    def add(self, req: SimReq) -> None:
        req.match = self.cache.match_tokens(req.chain, req.ids)
        self.waiting.append(req)

    def _available(self) -> float:
        reserved = self.ratio * (self._sum_max_new - self.generated)
        return self.spec.kv_tokens - self.used - reserved + self.cache.evictable_tokens

    def _make_room(self) -> None:
        over = self.used - self.spec.kv_tokens
        if over > 0:
            self.cache.evict(over)

    # ---- scheduling ----
    def _admit(self) -> tuple[list[tuple[SimReq, int]], bool]:
        """New prefill work for this forward: (request, tokens) pairs, and whether admission
        stopped for lack of KV room."""
        budget = self.spec.chunked_prefill
        work: list[tuple[SimReq, int]] = []
        if self.chunked is not None:
            r = self.chunked
            n = min(budget, r.prompt_len - r.done)
            work.append((r, n))
            budget -= n
        kv_full = False
        while self.waiting and budget > 0:
            if len(self.running) + len(work) >= self.spec.max_running:
                break
            lpm = len(self.waiting) <= self.spec.lpm_limit
            r = max(self.waiting, key=_lpm_key) if lpm else self.waiting[0]  # first of the longest
            m = self.cache.match_tokens(r.chain, r.ids)
            extend = r.prompt_len - m
            if extend + min(r.max_new, CLIP_MAX_NEW) > self._available():
                kv_full = True
                break
            if lpm:
                self.waiting.remove(r)
            else:
                self.waiting.popleft()
            self.cache.lock(r.chain, r.ids)
            self._tails += r.tail
            self._make_room()
            r.cached = r.done = m
            n = min(budget, r.prompt_len - r.done)
            if n <= 0:  # fully cached: SGLang still runs one token to produce logits
                n = 1
                r.done -= 1
                r.cached -= 1
            work.append((r, n))
            budget -= n
        return work, kv_full

    def step(self) -> tuple[float, list[SimReq]] | None:
        """Run one forward (or a run of decode steps with nothing else changing). Returns its
        duration in seconds and the requests that finished, or None when there is nothing to do."""
        if self.idle:
            return None
        work, kv_full = self._admit()
        n_run = len(self.running)
        if work:
            decode = n_run if (self.spec.mixed_chunk or not work) else 0
            ptoks, pairs, ctx_read = 0, 0.0, 0
            for r, n in work:
                p0 = r.done
                ptoks += n
                pairs += n * p0 + n * (n + 1) / 2
                ctx_read += p0
                r.done += n
            ctx = self._sum_prompt + self.generated if decode else 0
            dur = self.cost.step_s(
                decode=decode,
                decode_ctx=ctx,
                prefill=ptoks,
                prefill_pairs=pairs,
                prefill_ctx_read=ctx_read,
                constrained=self._constrained if decode else 0,
            )
            if decode:
                self.S += 1
            self.chunked = None
            for r, _n in work:
                if r.done < r.prompt_len:
                    self.chunked = r
                else:
                    self._start_decoding(r)
            k = 1
        else:
            k = self._decode_run_length()
            if k == 0:
                self._retract()
                return 0.0, []
            ctx0 = self._sum_prompt + self.generated + n_run
            dur = self.cost.decode_run_s(k, n_run, ctx0, self._constrained)
            self.S += k
            self.ratio = max(MIN_NEW_TOKEN_RATIO, self.ratio - RATIO_DECAY * k)
        self._count(k, n_run + len(work), kv_full, dur)
        done = self._finished()
        self._make_room()
        return dur, done

    def _decode_run_length(self) -> int:
        n = len(self.running)
        k = self._heap[0][0] - self.S
        if self.max_run is not None:
            k = min(k, self.max_run)
        if self.waiting and n < self.spec.max_running:
            k = min(k, 8)  # admission may open up as new_token_ratio decays: look again soon
        room = self.spec.kv_tokens - self.used + self.cache.evictable_tokens
        if n * k > room:
            k = max(0, room // n)
        return k

    def _start_decoding(self, r: SimReq) -> None:
        r.start = self.S - 1  # the prefill forward produced its first token
        r.finish_at = r.start + r.out_len
        self.running[r.rid] = r
        heapq.heappush(self._heap, (r.finish_at, r.rid))
        self._sum_start += r.start
        self._sum_prompt += r.prompt_len
        self._sum_max_new += r.max_new
        self._constrained += r.constrained

    def _leave(self, r: SimReq) -> None:
        del self.running[r.rid]
        self._sum_start -= r.start
        self._sum_prompt -= r.prompt_len
        self._sum_max_new -= r.max_new
        self._constrained -= r.constrained
        self._tails -= r.tail
        self.cache.unlock(r.chain)

    def _finished(self) -> list[SimReq]:
        out = []
        heap, running = self._heap, self.running
        while heap and heap[0][0] <= self.S:
            at, rid = heapq.heappop(heap)
            r = running.get(rid)
            if r is None or r.finish_at != at:
                continue  # retracted
            self._leave(r)
            if r.keep is not None:  # SGLang caches prompt + output: a next turn extending it hits
                self.cache.lock(r.keep, r.keep_ids)
                self.cache.unlock(r.keep)
            self.stats.add(r)
            out.append(r)
        return out

    def _retract(self) -> None:
        r = max(self.running.values(), key=lambda q: q.start)
        self._leave(r)
        r.done = r.cached = 0
        self.waiting.appendleft(r)
        self.ratio = INIT_NEW_TOKEN_RATIO
        self.stats.retractions += 1

    def _count(self, k: int, active: int, kv_full: bool, dur: float) -> None:
        s = self.stats
        busy = active >= self.spec.max_running or kv_full
        s.forwards += k
        s.busy += k if busy else 0
        s.gpu_s += dur
        if self.feeding:
            s.feeding_forwards += k
            s.feeding_busy += k if busy else 0
