"""The run: stream instances through the four phases, exactly once, resumable after any crash.

Every stream item (an instance, or an unreadable row) ends as exactly one line in data.jsonl or
dropped.jsonl, written by the store's writer in the same transaction that marks the item done.
Where a re-run starts, and which items it skips, is sysgen/run/resume.py.

SIGINT/SIGTERM stop the feeding at once, give in-flight instances DRAIN_S seconds to finish (a
second signal cuts that short), cancel the rest, commit, and raise RunInterrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import orjson

from engine.backend import Backend
from engine.progress import Progress
from engine.scheduler import Scheduler, SchedulerConfig
from engine.store import Store, StoreError
from sysgen.config import RunConfig
from sysgen.datasets import Source
from sysgen.datasets.instance import Instance, Known, Rejected
from sysgen.run.instance_flow import Outcome, rejected_outcome, run_instance
from sysgen.run.limit_check import check_limit
from sysgen.run.phases import PhaseSettings, PromptBuilder
from sysgen.run.plan import phase_settings, scheduler_config
from sysgen.run.resume import Position, Resume, Watermark, fingerprint

log = logging.getLogger(__name__)
DRAIN_S = 6.0  # on SIGINT/SIGTERM: let in-flight instances finish this long, then cancel them
MAX_BACKLOG = 20_000  # store writes queued; past this the feeder waits (bounds memory if the disk is slow)
MAX_SPREAD = 50_000  # items between the oldest unfinished one and the newest (a hung request holds the head)


class RunInterrupted(Exception):
    """Stopped by a signal; everything finished so far is committed and a re-run resumes."""


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


async def run_stream(
    cfg: RunConfig,
    backend: Backend,
    store: Store,
    out: Path,
    progress_enabled: bool = True,
    sched_config: SchedulerConfig | None = None,
    sources: Sequence[Source] | None = None,
) -> dict:
    """Stream every item to completion (or to a signal). Returns this run's counters; raises
    RunInterrupted after a signal, EngineDied or StoreError when the run cannot go on (in every
    case with everything finished before committed). `sources`: the inputs as the run plan
    resolved them (else resolved from `cfg`)."""
    settings = phase_settings(cfg, backend)
    fp = fingerprint(cfg, settings)
    check_limit(store, cfg, fp)
    resume = Resume.open(store, out, cfg, fp, settings, sources)
    sched = Scheduler(backend, store, sched_config or scheduler_config(cfg))
    build = PromptBuilder(
        backend.tokenizer if backend.capabilities.token_ids else None,
        max_context=backend.capabilities.max_context,
    )
    stream = _Stream(resume, sched, store, settings, build, progress_enabled)
    with _signals_to(stream.on_signal):
        await stream.run()
    counters = stream.counters()
    if stream.stop.is_set():
        raise RunInterrupted(counters)
    counters["rows_read"] = stream.frac.read  # every item of the stream, this run's and earlier runs'
    _mark_finished(store, resume, stream.frac.read)
    return counters


@contextlib.contextmanager
def _signals_to(handler: Callable[[], None]) -> Iterator[None]:
    """SIGINT and SIGTERM call `handler` on the running loop while inside (where signals can be
    handled: the main thread of a platform that has them)."""
    loop = asyncio.get_running_loop()
    handled = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, handler)
            handled.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no signals
            pass
    try:
        yield
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)


def _mark_finished(store: Store, resume: Resume, rows_read: int) -> None:
    """Only now is the run complete: `merge` refuses a shard without this mark."""
    store.set_meta("run", orjson.dumps({**resume.run_info, "finished": True, "rows_read": rows_read}))
    store.flush()


class _Stream:
    """One run's items: fed from the resume point through a bounded window, each run through the
    phases and finished as one output line; on a signal the feeding stops and in-flight items drain."""

    def __init__(
        self,
        resume: Resume,
        sched: Scheduler,
        store: Store,
        settings: PhaseSettings,
        build: PromptBuilder,
        progress_enabled: bool,
    ) -> None:
        self.resume, self.sched, self.store, self.settings, self.build = resume, sched, store, settings, build
        self.stop = asyncio.Event()
        self.hurry = asyncio.Event()  # a second signal: skip the drain
        self.idle = asyncio.Event()  # feeder finished and no work left
        self.fatal: BaseException | None = None
        self.tasks: set[asyncio.Task] = set()
        self.feeding = True
        self.kept = self.dropped = self.skipped_done = 0
        # The inputs expanded: a file added to a folder moves positions.
        self.wm = Watermark(store, resume.fp, resume.files)
        self.frac = InputFraction(resume.files)
        self.progress = Progress(sched.metrics, self.frac, enabled=progress_enabled)
        self.before_watermark = resume.watermark["seq"] if resume.watermark else 0  # done, not read again
        self.frac.read = self.progress.done = self.before_watermark
        if resume.resuming:
            self.progress.kept_label = "kept this run"
        self.window = asyncio.Semaphore(max(4, sched.window * 2))

    def on_signal(self) -> None:
        if self.stop.is_set():
            self.hurry.set()
            print("\nsysgen: stopping now", file=sys.stderr, flush=True)
        else:
            print(
                f"\nsysgen: stopping: no new instances; those in flight get up to {DRAIN_S:g} s to "
                "finish (press Ctrl-C again to stop at once; either way the run resumes)",
                file=sys.stderr,
                flush=True,
            )
        self.stop.set()

    def counters(self) -> dict:
        return {
            "kept": self.kept,
            "dropped": self.dropped,
            "skipped_done": self.skipped_done,
            "already_done": self.before_watermark + self.skipped_done,
            "scheduler": self.sched.metrics.to_dict(),
            "interrupted": self.stop.is_set(),
            "sources": self.resume.source_report(),
        }

    async def run(self) -> None:
        """Until every item is finished, or a signal's drain is over; raises what stopped the run."""
        feeder = asyncio.create_task(self._feed())
        feeder.add_done_callback(self._fed)
        try:
            await _first(self.idle, self.stop)
            if not feeder.done():
                feeder.cancel()
            if self.tasks:  # stopped: a short drain, then cancel what is left
                await _first(self.idle, self.hurry, timeout=DRAIN_S)
                for t in list(self.tasks):
                    t.cancel()
                await asyncio.gather(*self.tasks, return_exceptions=True)
            await asyncio.gather(feeder, return_exceptions=True)
        finally:
            await self._shutdown(feeder)
        if self.fatal is not None:
            raise self.fatal

    async def _shutdown(self, feeder: asyncio.Task) -> None:
        """Leave nothing running (also when cancelled from outside) and commit what is finished."""
        if self.tasks or not feeder.done():
            feeder.cancel()
            for t in list(self.tasks):
                t.cancel()
            await asyncio.gather(feeder, *self.tasks, return_exceptions=True)
        if not isinstance(self.fatal, StoreError):
            try:
                self.wm.advance(time.monotonic(), force=True)
                self.store.flush()
            except StoreError as e:
                self.fatal = self.fatal or e
        self.progress.tick(force=True)
        self.build.close()

    def _fail(self, e: BaseException) -> None:
        self.fatal = self.fatal or e
        self.stop.set()
        self.hurry.set()

    async def _feed(self) -> None:
        resume, wm = self.resume, self.wm
        for seq, item in resume.stream():
            self.frac.update(item)
            key = resume.item_key(item)
            if resume.is_done(item):
                self.skipped_done += 1
                self.progress.done += 1
                wm.add(seq, item, done=True)
                wm.advance(time.monotonic())
                continue
            # The backlog drains on the store's writer thread, which sets no event this loop could await.
            while self.store.backlog > MAX_BACKLOG or wm.spread > MAX_SPREAD:  # noqa: ASYNC110
                await asyncio.sleep(0.005)
            await self.window.acquire()
            task = asyncio.create_task(self._work(wm.add(seq, item), key, item))
            self.tasks.add(task)
            task.add_done_callback(self._task_done)

    def _fed(self, task: asyncio.Task) -> None:
        self.feeding = False
        failed = not task.cancelled() and task.exception() is not None
        self.frac.exhausted = not task.cancelled() and not failed
        if failed:
            self._fail(task.exception())  # e.g. a bad row with --strict, or a store error
        if not self.tasks:
            self.idle.set()

    def _task_done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not self.tasks and not self.feeding:
            self.idle.set()

    async def _work(self, pos: Position, key: bytes, item: Instance | Rejected) -> None:
        try:
            if isinstance(item, Rejected):
                outcome = rejected_outcome(item)
            else:
                outcome = await run_instance(item, self.sched.submit, self.build, self.settings)
            self._finish(pos, key, outcome)
        except Exception as e:  # EngineDied, StoreError, or a bug: stop loudly, never lose the item quietly
            self._fail(e)
        finally:
            self.window.release()
            self.progress.tick()

    def _finish(self, pos: Position, key: bytes, outcome: Outcome) -> None:
        sink, obj = outcome.to_line()
        self.store.finish_item(key, None, ((sink, orjson.dumps(obj) + b"\n"),))
        if outcome.record is not None:
            self.kept += 1
            self.progress.kept += 1
        else:
            self.dropped += 1
        pos.done = True
        self.progress.done += 1
        self.wm.advance(time.monotonic())


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
