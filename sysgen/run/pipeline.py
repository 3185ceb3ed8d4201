"""The run: stream instances through the four phases, exactly once, resumable after any crash.

Every stream item (an instance, or an unreadable row) ends as exactly one line in data.jsonl or
dropped.jsonl, written by the store's writer in the same transaction that marks the item done.
Where a re-run starts, and which items it skips, is sysgen/run/resume.py.

SIGINT/SIGTERM stop the feeding at once, give in-flight instances DRAIN_S seconds to finish (a
second signal cuts that short), cancel the rest, commit, and raise RunInterrupted.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from engine.backend import Backend
from engine.progress import Progress
from engine.scheduler import Scheduler, SchedulerConfig
from engine.store import Store, StoreError
from sysgen.config import RunConfig
from sysgen.datasets.instance import Instance, Known, Rejected
from sysgen.run.instance_flow import Outcome, rejected_outcome, run_instance
from sysgen.run.phases import PhaseSettings, PromptBuilder
from sysgen.run.resume import Position, Resume, Watermark, fingerprint

log = logging.getLogger(__name__)
DRAIN_S = 6.0  # on SIGINT/SIGTERM: let in-flight instances finish this long, then cancel them
MAX_BACKLOG = 20_000  # store writes queued; past this the feeder waits (bounds memory if the disk is slow)
MAX_SPREAD = 50_000  # items between the oldest unfinished one and the newest (a hung request holds the head)


class RunInterrupted(Exception):
    """Stopped by a signal; everything finished so far is committed and a re-run resumes."""


@dataclass
class _Run:
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    hurry: asyncio.Event = field(default_factory=asyncio.Event)  # a second signal: skip the drain
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # feeder finished and no work left
    fatal: BaseException | None = None
    tasks: set = field(default_factory=set)
    feeding: bool = True
    kept: int = 0
    dropped: int = 0
    skipped_done: int = 0

    def on_signal(self) -> None:
        if self.stop.is_set():
            self.hurry.set()
            print("\nsysgen: stopping now", file=sys.stderr, flush=True)
        else:
            print(f"\nsysgen: stopping: no new instances; those in flight get up to {DRAIN_S:g} s to "
                  "finish (press Ctrl-C again to stop at once; either way the run resumes)",
                  file=sys.stderr, flush=True)
        self.stop.set()

    def fail(self, e: BaseException) -> None:
        self.fatal = self.fatal or e
        self.stop.set()
        self.hurry.set()

    def task_done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not self.tasks and not self.feeding:
            self.idle.set()


class InputFraction:
    """Estimated instance total, from input bytes consumed (jsonl offsets) and rows read so far; exact
    once the input is exhausted. None until something with an offset has been read."""

    def __init__(self, paths: tuple[str, ...]) -> None:
        # Only files have byte offsets; a Hugging Face dataset's rows count, but give no estimate.
        self.sizes = {p: os.path.getsize(p) for p in paths if os.path.isfile(p)}
        self.total = sum(self.sizes.values()) or 1
        self.before: dict[str, int] = {}
        acc = 0
        for p in paths:
            self.before[p] = acc
            acc += self.sizes.get(p, 0)
        self.bytes_frac: float | None = None
        self.read = 0
        self.exhausted = False

    def update(self, item: Instance | Rejected | Known) -> None:
        self.read += 1
        if isinstance(item, (Instance, Known)) and item.offset >= 0:
            # The row's end is unknown here; its start plus one average row is a fair stand-in.
            start = (self.before.get(item.path, 0) + item.offset) / self.total
            self.bytes_frac = min(1.0, start + start / self.read)

    def __call__(self) -> float | None:
        if self.exhausted:
            return float(self.read)
        if not self.bytes_frac:
            return None
        return max(self.read / self.bytes_frac, float(self.read))


def phase_settings(cfg: RunConfig, backend: Backend) -> PhaseSettings:
    return PhaseSettings(model_id=backend.model_id, constrain=cfg.constrain and backend.capabilities.regex,
                         p1_max_tokens=cfg.p1_max_tokens, p3_max_tokens=cfg.p3_max_tokens,
                         p4_max_tokens=cfg.p4_max_tokens, temperature=cfg.temperature, seed=cfg.seed,
                         max_turn_chars=cfg.max_turn_chars, turns=cfg.turns, history=cfg.history,
                         keep_partial=cfg.keep_partial, p4_budget_factor=cfg.p4_budget_factor,
                         p4_budget_cap=cfg.p4_budget_cap, p3_context=cfg.p3_context,
                         keep_copies=cfg.keep_copies,
                         max_context=backend.capabilities.max_context if cfg.turns == "all" else 0)


async def run_stream(cfg: RunConfig, backend: Backend, store: Store, out: Path, progress_enabled: bool = True,
                     sched_config: SchedulerConfig | None = None) -> dict:
    """Stream every item to completion (or to a signal). Returns this run's counters; raises
    RunInterrupted after a signal, EngineDied or StoreError when the run cannot go on (in every
    case with everything finished before committed)."""
    settings = phase_settings(cfg, backend)
    fp = fingerprint(cfg, settings)
    resume = Resume.open(store, out, cfg, fp, settings)
    sched = Scheduler(backend, store, sched_config or SchedulerConfig(
        max_inflight=cfg.max_inflight, timeout_s=cfg.timeout_s, max_retries=cfg.max_retries,
        retry_stored_failures=cfg.retry_failed, engine_down_s=cfg.engine_down_s))
    build = PromptBuilder(backend.tokenizer if backend.capabilities.token_ids else None)
    wm = Watermark(store, fp, resume.files)  # inputs expanded: a file added to a folder moves positions
    frac = InputFraction(resume.files)
    progress = Progress(sched.metrics, frac, enabled=progress_enabled)
    before_watermark = resume.watermark["seq"] if resume.watermark else 0  # done, and not read again
    frac.read = progress.done = before_watermark
    if resume.resuming:
        progress.kept_label = "kept this run"
    window = asyncio.Semaphore(max(4, sched.window * 2))
    run = _Run()
    clock = time.monotonic

    def finish(pos: Position, key: bytes, outcome: Outcome) -> None:
        sink, obj = outcome.to_line()
        store.finish_item(key, None, ((sink, orjson.dumps(obj) + b"\n"),))
        if outcome.record is not None:
            run.kept += 1
            progress.kept += 1
        else:
            run.dropped += 1
        pos.done = True
        progress.done += 1
        wm.advance(clock())

    async def work(pos: Position, key: bytes, item: Instance | Rejected) -> None:
        try:
            if isinstance(item, Rejected):
                outcome = rejected_outcome(item)
            else:
                outcome = await run_instance(item, sched.submit, build, settings)
            finish(pos, key, outcome)
        except Exception as e:  # EngineDied, StoreError, or a bug: stop loudly, never lose the item quietly
            run.fail(e)
        finally:
            window.release()
            progress.tick()

    async def feed() -> None:
        for seq, item in resume.stream():
            frac.update(item)
            key = resume.item_key(item)
            if resume.is_done(item):
                run.skipped_done += 1
                progress.done += 1
                wm.add(seq, item, done=True)
                wm.advance(clock())
                continue
            while store.backlog > MAX_BACKLOG or wm.spread > MAX_SPREAD:
                await asyncio.sleep(0.005)
            await window.acquire()
            task = asyncio.create_task(work(wm.add(seq, item), key, item))
            run.tasks.add(task)
            task.add_done_callback(run.task_done)

    def fed(task: asyncio.Task) -> None:
        run.feeding = False
        frac.exhausted = not task.cancelled() and task.exception() is None
        if not task.cancelled() and task.exception() is not None:
            run.fail(task.exception())  # e.g. a bad row with --strict, or a store error
        if not run.tasks:
            run.idle.set()

    loop = asyncio.get_running_loop()
    handled = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, run.on_signal)
            handled.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no signals
            pass
    feeder = asyncio.create_task(feed())
    feeder.add_done_callback(fed)
    try:
        await _first(run.idle, run.stop)
        if not feeder.done():
            feeder.cancel()
        if run.tasks:  # stopped: a short drain, then cancel what is left
            await _first(run.idle, run.hurry, timeout=DRAIN_S)
            for t in list(run.tasks):
                t.cancel()
            await asyncio.gather(*run.tasks, return_exceptions=True)
        await asyncio.gather(feeder, return_exceptions=True)
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
        if run.tasks or not feeder.done():  # cancelled from outside: leave nothing running
            feeder.cancel()
            for t in list(run.tasks):
                t.cancel()
            await asyncio.gather(feeder, *run.tasks, return_exceptions=True)
        if not isinstance(run.fatal, StoreError):
            try:
                wm.advance(clock(), force=True)
                store.flush()
            except StoreError as e:
                run.fatal = run.fatal or e
        progress.tick(force=True)
    if run.fatal is not None:
        raise run.fatal
    counters = {"kept": run.kept, "dropped": run.dropped, "skipped_done": run.skipped_done,
                "already_done": before_watermark + run.skipped_done,
                "scheduler": sched.metrics.to_dict(), "interrupted": run.stop.is_set(),
                "sources": resume.source_report()}
    if run.stop.is_set():
        raise RunInterrupted(counters)
    counters["rows_read"] = frac.read  # every item of the stream, this run's and earlier runs'
    # Only now is the run complete: `merge` refuses a shard without this mark.
    store.set_meta("run", orjson.dumps({**resume.run_info, "finished": True, "rows_read": frac.read}))
    store.flush()
    return counters


async def _first(*events: asyncio.Event, timeout: float | None = None) -> None:
    """Wait until any of `events` is set (or `timeout` passes)."""
    if any(e.is_set() for e in events):
        return
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
