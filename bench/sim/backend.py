"""SimBackend: a SIMULATED engine (no model, no GPU) behind the real Backend protocol, in virtual time.

For bench.sim only. It is not in engine/backends/ and `--engine auto` never picks it: the bench
builds it and hands it to sysgen's real pipeline (run_stream), scheduler and store.

generate() turns a request into a SimReq (prompt block hashes, the output length it will produce)
and waits for the simulated engine (engine.py) to finish it. Requests submitted while a forward
runs join the engine's queue after it (one forward of lag, as SGLang forms the next batch while
results travel back). A driver task alternates:
  1. let the wrapper run until the event loop has nothing ready (it reacts to finished requests:
     store writes, parsing, next-phase prompts, new submissions), measuring the process CPU time it
     took, minus the simulation's own share;
  2. run one engine step (or a run of decode steps up to the next finish).
Virtual time advances by max(step time, wrapper CPU time of the preceding reaction): a wrapper
slower than the GPU step holds the GPU up (pessimistic: real SGLang keeps decoding meanwhile).
Answers: P1 a tagged message (tag frequencies of the paper's Table 8, Llama-3.1-8B column), P3
verdict lines, P4 the real row's answer length (workload marker), text ~4 characters a token.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import xxhash

from bench.sim.cache import block_chain, compact_ids
from bench.sim.engine import SimEngine, SimReq
from bench.sim.workload import Workload, parse_marker
from engine.backend import BackendBase, Capabilities
from engine.request import Request, Result
from sysgen.tags import TAGS

# Paper Table 8 (LLaMA-3.1-8B-instruct) tag counts / 806,796 instances: how often P1 writes each tag.
_TAG_COUNTS = (576_341, 580_231, 579_558, 495_301, 283_579, 293_791, 10_238, 327_909)
TAG_RATE = {t: c / 806_796 for t, c in zip(TAGS, _TAG_COUNTS, strict=True)}
GOOD_RATE = 0.93  # P3 verdicts Good; the paper keeps 586,831 of 602,750 after P3 (97%) with ~4 tags
_WORDS = ("clear", "user", "answer", "steps", "concise", "math", "code", "explain", "task", "style")


@dataclass
class Recorded:
    """Every engine call of a run, by phase, for the phase-by-phase batch replay."""

    calls: dict[str, list[tuple]] = field(default_factory=dict)

    def add(self, group: str, r: SimReq) -> None:
        # Token ids, not block chains: the replay matches to the token too (chains are rebuilt from them).
        self.calls.setdefault(group, []).append(
            (r.prompt_len, r.ids, r.max_new, r.out_len, r.constrained, r.keep_ids)
        )


class SimBackend(BackendBase):
    name = "sim"

    def __init__(
        self,
        engine: SimEngine,
        tokenizer,
        workload: Workload | None = None,
        *,
        model_id: str = "sim:Llama-3.1-8B",
        record: bool = True,
        charge_wrapper: bool = True,
        keep_outputs: bool = False,
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.workload = workload
        self.model_id = model_id
        self.capabilities = Capabilities(
            regex=True, token_ids=True, max_running=engine.spec.max_running, max_context=131_072
        )
        self.record = Recorded() if record else None
        self.charge_wrapper = charge_wrapper
        # cache prompt + answer token ids of P1 and P4: the next request extending them (a later P4
        # turn, a --p3-context continue P3) hits them, as in SGLang's radix cache
        self.keep_outputs = keep_outputs
        self.vt = 0.0  # virtual seconds
        self.wrapper_cpu_s = 0.0  # charged wrapper CPU
        self.wrapper_bound_s = 0.0  # virtual time where the wrapper, not the GPU, set the pace
        self.sim_cpu_s = 0.0  # the simulation's own CPU (not charged)
        self.expected_p1: int | None = None  # instances; "feeding" lasts until that many P1s arrived
        self.p1_seen = 0
        self._futs: dict[int, tuple[asyncio.Future, SimReq, str, str]] = {}
        self._arriving: list[SimReq] = []  # submitted during the wrapper's last reaction
        self._next = 0
        self._wake = asyncio.Event()
        self._driver: asyncio.Task | None = None
        self._closed = False

    async def __aenter__(self) -> SimBackend:
        self._driver = asyncio.create_task(self._drive())
        return self

    async def close(self) -> None:
        self._closed = True
        self._wake.set()
        if self._driver is not None:
            await asyncio.gather(self._driver, return_exceptions=True)

    async def generate(self, request: Request) -> Result:
        t0 = time.process_time()
        rid = self._next
        self._next += 1
        text, out_len, finish = self._respond(request)
        prompt = request.prompt
        r = SimReq(
            rid,
            len(prompt),
            block_chain(prompt),
            request.sampling.max_new_tokens,
            out_len,
            constrained=request.regex is not None,
            group=request.group,
            ids=compact_ids(prompt),
        )
        if request.group == "p1":
            self.p1_seen += 1
            if self.expected_p1 is not None and self.p1_seen >= self.expected_p1:
                self.engine.feeding = False
        if self.keep_outputs and self.tokenizer is not None and request.group in ("p1", "p4"):
            out_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            r.keep_ids = compact_ids(list(prompt) + list(out_ids))
            r.keep = block_chain(r.keep_ids)
        self._arriving.append(r)
        if self.record is not None:
            self.record.add(request.group or "other", r)
        fut = asyncio.get_running_loop().create_future()
        self._futs[rid] = (fut, r, text, finish)
        self._wake.set()
        self.sim_cpu_s += time.process_time() - t0
        return await fut

    # ---- answers ----
    def _respond(self, request: Request) -> tuple[str, int, str]:
        h = xxhash.xxh3_64_intdigest(request.key)
        budget = request.sampling.max_new_tokens
        if request.group == "p1":
            text, n = _p1_text(h)
        elif request.group == "p3":
            tags = [t for t in TAGS if f"{t}: " in (request.regex or "")]
            text = "".join(
                f"{t}: {'Good' if (h >> (7 * i)) % 100 < GOOD_RATE * 100 else 'Bad'}\n"
                for i, t in enumerate(tags)
            )
            n = 4 * len(tags) + 1
        else:
            n = self._answer_tokens(request) or 64 + h % 448
            text = _filler(h, n)
        if n > budget:
            return text[: 4 * budget], budget, "length"
        return text, n, "stop"

    def _answer_tokens(self, request: Request) -> int | None:
        if self.workload is None or self.tokenizer is None:
            return None
        where = parse_marker(self.tokenizer.decode(list(request.prompt[-24:])))
        return self.workload.answer_tokens(*where) if where else None

    def _admit_arrivals(self) -> None:
        for r in self._arriving:
            self.engine.add(r)
        self._arriving.clear()

    # ---- the virtual clock ----
    async def _settle(self) -> None:
        """Yield until the event loop has no ready callbacks (asyncio's default loop keeps them in
        `_ready`; other loops get a fixed number of passes)."""
        loop = asyncio.get_running_loop()
        ready = getattr(loop, "_ready", None)
        for _ in range(10_000):
            await asyncio.sleep(0)
            if ready is not None and not ready:
                return
            if ready is None and _ >= 32:
                return

    async def _drive(self) -> None:
        eng = self.engine
        while not self._closed:
            c0, s0 = time.process_time(), self.sim_cpu_s
            await self._settle()
            wrapper = max(0.0, time.process_time() - c0 - (self.sim_cpu_s - s0))
            wrapper = wrapper if self.charge_wrapper else 0.0
            t0 = time.process_time()
            # Requests submitted while the engine ran the last forward reach its queue one forward
            # later (SGLang forms the next batch while the wrapper reacts), unless it is idle.
            if eng.idle:
                self._admit_arrivals()
            eng.max_run = 1 if self._arriving else None
            out = eng.step()
            self._admit_arrivals()
            if out is None:
                self.vt += wrapper
                self.wrapper_cpu_s += wrapper
                self.wrapper_bound_s += wrapper
                self._wake.clear()
                self.sim_cpu_s += time.process_time() - t0
                # Nothing queued: wait for a submission (or for real time to pass: the pipeline's
                # feeder may be sleeping on a full store queue).
                try:
                    await asyncio.wait_for(self._wake.wait(), 0.05)
                except asyncio.TimeoutError:
                    pass
                continue
            dur, done = out
            self.vt += max(dur, wrapper)
            self.wrapper_cpu_s += wrapper
            self.wrapper_bound_s += max(0.0, wrapper - dur)
            for r in done:
                fut, _r, text, finish = self._futs.pop(r.rid)
                if not fut.done():
                    fut.set_result(
                        Result(
                            text=text,
                            finish_reason=finish,
                            prompt_tokens=r.prompt_len,
                            completion_tokens=r.out_len,
                            cached_tokens=r.cached,
                        )
                    )
            self.sim_cpu_s += time.process_time() - t0


def _filler(h: int, tokens: int) -> str:
    words = []
    chars = 0
    i = 0
    while chars < 4 * tokens:
        w = _WORDS[(h >> (i % 60)) % len(_WORDS)]
        words.append(w)
        chars += len(w) + 1
        i += 1
    return " ".join(words)[: 4 * tokens]


def _p1_text(h: int) -> tuple[str, int]:
    """A tagged system message: tags drawn with the paper's frequencies (at least one), phrases of
    8-30 tokens, a per-request detail so P3 prompts differ as with a real model."""
    lines, n = [], 0
    for i, t in enumerate(TAGS):
        u = ((h >> (3 * i)) * 2654435761 % 1000) / 1000
        if u < TAG_RATE[t] or (not lines and t == TAGS[-1]):
            k = 8 + (h >> (2 * i)) % 23
            phrase = _filler(h >> i, k).strip() or "answer"
            if not lines:
                phrase += f" (case {h % 1_000_003})"
                k += 4
            lines.append(f"<{t}>{phrase}</{t}>\n")
            n += k + 7  # the two tags and the newline
    return "".join(lines), n + 1
