"""The run: stream instances through the four phases, exactly once, resumable after any crash.

Every stream item (an instance, or an unreadable row) ends as exactly one line in data.jsonl or
dropped.jsonl, written by the store's writer in the same transaction that marks the item done.
A watermark (the last position before which everything is done) lets a re-run seek past finished
input instead of re-reading it; items after the watermark are checked against their done markers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import xxhash

from engine.backend import Backend, EngineDied
from engine.progress import Progress
from engine.scheduler import Scheduler, SchedulerConfig
from engine.store import Store, StoreError
from sysgen import prompts
from sysgen.config import RunConfig
from sysgen.datasets import iter_instances
from sysgen.datasets.instance import Instance, Rejected
from sysgen.instance_flow import Outcome, rejected_outcome, run_instance
from sysgen.phases import PhaseSettings, PromptBuilder

log = logging.getLogger(__name__)
DRAIN_S = 6.0  # on SIGINT/SIGTERM: let in-flight instances finish this long, then cancel them


class RunInterrupted(Exception):
    """Stopped by a signal; everything finished so far is committed and a re-run resumes."""


@dataclass
class _Position:
    seq: int
    item: Instance | Rejected
    done: bool = False


@dataclass
class RunState:
    """What the stream loop tracks between items."""

    fingerprint: str
    inputs: tuple[str, ...]
    order: deque = field(default_factory=deque)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    fatal: BaseException | None = None
    skipped_done: int = 0
    wm_pending: _Position | None = None
    wm_set_at: float = 0.0


def fingerprint(cfg: RunConfig, settings: PhaseSettings) -> str:
    """What makes outputs comparable across runs: a change here starts the outputs afresh (stored
    requests are still reused wherever their own inputs did not change)."""
    payload = {"settings": settings.__dict__, "prompts": prompts.digests(), "format": cfg.format,
               "shard": cfg.shard}
    return xxhash.xxh3_64_hexdigest(orjson.dumps(payload, option=orjson.OPT_SORT_KEYS))


def item_key(fp: str, item_id: str) -> bytes:
    return xxhash.xxh3_128_digest(f"{fp}\x00{item_id}".encode())


def _item_id(item: Instance | Rejected) -> str:
    return item.id if isinstance(item, Instance) else f"{item.path}:{item.line}"


def open_outputs(store: Store, out: Path, fp: str) -> bool:
    """Register the sinks; start them afresh if the configuration changed. Returns True if resuming."""
    store.add_sink("data", out / "data.jsonl")
    store.add_sink("dropped", out / "dropped.jsonl")
    old = store.get_meta("fingerprint")
    if old is not None and old.decode() != fp:
        log.warning("configuration changed since the last run in %s: outputs start afresh; stored requests "
                    "whose inputs did not change are reused", out)
        store.reset_sinks()
    store.set_meta("fingerprint", fp)
    return old is not None and old.decode() == fp


def _watermark(store: Store, fp: str, inputs: tuple[str, ...]) -> dict | None:
    raw = store.get_meta("watermark")
    if raw is None:
        return None
    wm = orjson.loads(raw)
    return wm if wm.get("fingerprint") == fp and tuple(wm.get("inputs", ())) == inputs else None


def stream(cfg: RunConfig, wm: dict | None):
    """(seq, item) for the configured inputs, shard and limit, starting at the watermark."""
    inputs = list(cfg.inputs)
    seq = 0
    start = None
    if wm is not None:
        inputs = inputs[inputs.index(wm["path"]):]
        start = {wm["path"]: (wm["line"], wm["offset"])}
        seq = wm["seq"]
    shard = cfg.shard_spec
    for item in iter_instances(inputs, fmt=cfg.format, strict=cfg.strict, start=start):
        if shard and isinstance(item, Instance) and item.content_hash % shard[1] != shard[0]:
            continue
        if cfg.limit is not None and seq >= cfg.limit:
            return
        yield seq, item
        seq += 1


class InputFraction:
    """Share of input bytes consumed, from jsonl offsets; None for formats without offsets."""

    def __init__(self, paths: tuple[str, ...]) -> None:
        self.sizes = {p: os.path.getsize(p) for p in paths if os.path.exists(p)}
        self.total = sum(self.sizes.values()) or 1
        self.before = {}
        acc = 0
        for p in paths:
            self.before[p] = acc
            acc += self.sizes.get(p, 0)
        self.current: float | None = None

    def update(self, item: Instance | Rejected) -> None:
        if isinstance(item, Instance) and item.offset >= 0:
            self.current = (self.before.get(item.path, 0) + item.offset) / self.total

    def __call__(self) -> float | None:
        return self.current


async def run_stream(cfg: RunConfig, backend: Backend, store: Store, out: Path,
                     progress_enabled: bool = True) -> dict:
    """Stream every item to completion (or to a signal). Returns this run's counters."""
    settings = PhaseSettings(model_id=backend.model_id, constrain=cfg.constrain and backend.capabilities.regex,
                             p1_max_tokens=cfg.p1_max_tokens, p3_max_tokens=cfg.p3_max_tokens,
                             p4_max_tokens=cfg.p4_max_tokens, temperature=cfg.temperature, seed=cfg.seed,
                             max_turn_chars=cfg.max_turn_chars)
    fp = fingerprint(cfg, settings)
    resuming = open_outputs(store, out, fp)
    wm = _watermark(store, fp, cfg.inputs) if resuming else None
    sched = Scheduler(backend, store, SchedulerConfig(max_inflight=cfg.max_inflight, timeout_s=cfg.timeout_s,
                                                      max_retries=cfg.max_retries,
                                                      retry_stored_failures=cfg.retry_failed))
    build = PromptBuilder(backend.tokenizer if backend.capabilities.token_ids else None)
    state = RunState(fingerprint=fp, inputs=cfg.inputs)
    frac = InputFraction(cfg.inputs)
    progress = Progress(sched.metrics, frac, enabled=progress_enabled)
    window = asyncio.Semaphore(max(4, sched.window * 2))
    tasks: set[asyncio.Task] = set()
    kept = dropped = 0

    def finish(pos: _Position, outcome: Outcome) -> None:
        nonlocal kept, dropped
        sink, obj = outcome.to_line()
        store.finish_item(item_key(fp, _item_id(pos.item)), None, [(sink, orjson.dumps(obj) + b"\n")])
        kept += outcome.kept
        dropped += not outcome.kept
        pos.done = True
        progress.done += 1
        progress.kept += outcome.kept
        _advance_watermark(store, state)

    async def work(pos: _Position) -> None:
        try:
            item = pos.item
            if isinstance(item, Rejected):
                outcome = rejected_outcome(item)
            else:
                outcome = await run_instance(item, sched.submit, build, settings)
            finish(pos, outcome)
        except (EngineDied, StoreError) as e:
            state.fatal = state.fatal or e
            state.stop.set()
        finally:
            window.release()
            progress.tick()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, state.stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    try:
        for seq, item in stream(cfg, wm):
            if state.stop.is_set():
                break
            frac.update(item)
            if store.has_item(item_key(fp, _item_id(item))):
                state.skipped_done += 1
                pos = _Position(seq, item, done=True)
                state.order.append(pos)
                _advance_watermark(store, state)
                continue
            await window.acquire()
            if state.stop.is_set():
                window.release()
                break
            pos = _Position(seq, item)
            state.order.append(pos)
            task = asyncio.create_task(work(pos))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks and not state.stop.is_set():
            stop_wait = asyncio.create_task(state.stop.wait())
            while tasks and not state.stop.is_set():
                await asyncio.wait([*tasks, stop_wait], return_when=asyncio.FIRST_COMPLETED)
            stop_wait.cancel()
        if tasks:  # interrupted: give in-flight work a short drain, then cancel
            drain = 0.0 if state.fatal else DRAIN_S
            _, still = await asyncio.wait(list(tasks), timeout=drain)
            for t in still:
                t.cancel()
            await asyncio.gather(*still, return_exceptions=True)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.remove_signal_handler(sig)
            except (NotImplementedError, RuntimeError):
                pass
        _advance_watermark(store, state, force=True)
        store.flush()
        progress.tick(force=True)
    if state.fatal is not None:
        raise state.fatal
    counters = {"kept": kept, "dropped": dropped, "skipped_done": state.skipped_done,
                "scheduler": sched.metrics.to_dict(), "interrupted": state.stop.is_set()}
    if state.stop.is_set():
        raise RunInterrupted(counters)
    return counters


def _advance_watermark(store: Store, state: RunState, force: bool = False) -> None:
    """Pop the finished head of the stream; record the last popped instance's position (at most
    twice a second: a stale watermark only means a few more done-marker lookups on resume)."""
    while state.order and state.order[0].done:
        pos = state.order.popleft()
        if isinstance(pos.item, Instance):
            state.wm_pending = pos
    now = time.monotonic()
    last = state.wm_pending
    if last is not None and (force or now - state.wm_set_at >= 0.5):
        state.wm_pending, state.wm_set_at = None, now
        it = last.item
        store.set_meta("watermark", orjson.dumps({
            "fingerprint": state.fingerprint, "inputs": list(state.inputs), "seq": last.seq,
            "path": it.path, "line": it.line, "offset": it.offset}))
