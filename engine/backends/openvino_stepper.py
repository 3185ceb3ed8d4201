"""The thread that owns one OpenVINO GenAI ContinuousBatchingPipeline: add waiting jobs, step the
pipeline once (every running request advances a token; new prompts prefill in the same step), hand
finished jobs back to their event loops; repeat.

The pipeline's Python binding holds the GIL during step(), so the event loop runs between steps (a
busy loop still gets its 5 ms switch interval after each one). Nothing here touches the event loop
except loop.call_soon_threadsafe.

A step() that raises leaves the pipeline in an unknown state (a bad regex did exactly that in a
spike: every later step failed). So everything that can be checked is checked before add_request
(see openvino.py), and a failed step fails the running jobs (retryable) and rebuilds the pipeline.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine.backend import EngineDied, EngineError, RequestRejected, TransientEngineError
from engine.request import Request, Result

log = logging.getLogger(__name__)

MAX_REBUILDS = 3  # consecutive failed steps (each followed by a rebuild) before the engine is declared dead


@dataclass(eq=False, slots=True)
class Job:
    request: Request
    ids: tuple[int, ...]
    config: Any  # openvino_genai.GenerationConfig
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    handle: Any = None  # openvino_genai.GenerationHandle once added
    out: list[int] = field(default_factory=list)
    finish: str | None = None

    @property
    def abandoned(self) -> bool:
        # Cancelled or timed out on the event loop; read without a lock: a stale answer costs one step.
        return self.future.done()

    def resolve(self, result: Result | None = None, error: EngineError | None = None) -> None:
        try:
            self.loop.call_soon_threadsafe(_settle, self.future, result, error)
        except RuntimeError:  # that loop is closed: nobody is waiting any more
            pass


def _settle(future: asyncio.Future, result: Result | None, error: EngineError | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class Stepper:
    """`finish(job, status)` turns a job whose handle stopped running into a Result (or raises an
    EngineError); it runs on this thread, so decoding stays off the event loop."""

    def __init__(
        self,
        make_pipeline: Callable[[], Any],
        finish: Callable[[Job, Any], Result],
        tensor: Callable[[tuple[int, ...]], Any],
        running_status: Any,
    ) -> None:
        self._make_pipeline, self._finish, self._tensor = make_pipeline, finish, tensor
        self._running = running_status
        self.pipe = make_pipeline()  # in the caller's thread: a model that cannot load fails there
        self.inbox: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self.live: dict[int, Job] = {}
        self._ids = itertools.count()
        self.stopping = False
        self.reason = "backend closed"  # what callers are told once the loop has ended
        self._lock = threading.Lock()
        self.steps = self.peak_running = self.rebuilds = 0
        self.thread = threading.Thread(target=self._run, name="openvino-engine", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        # Under the lock the final drain takes: a job is either drained (and failed) or refused,
        # never left in the inbox of a thread that has exited.
        with self._lock:
            if self.stopping:
                raise EngineDied(self.reason, job.request)
            self.inbox.put(job)

    def stop(self) -> None:
        self.stopping = True
        self.inbox.put(None)

    def _run(self) -> None:
        try:
            while not self.stopping:
                busy = bool(self.live) or self.pipe.has_non_finished_requests()
                self._admit(block=not busy)
                if not self.stopping and (self.live or self.pipe.has_non_finished_requests()):
                    self._step()
        except BaseException as exc:  # a bug or a dead engine must not leave callers waiting forever
            log.exception("openvino engine thread died")
            self.reason = f"openvino engine died: {exc!r}"
        finally:
            with self._lock:
                self.stopping = True
            for job in self.live.values():
                job.resolve(error=EngineDied(self.reason, job.request))
            self.live.clear()
            while True:
                try:
                    queued = self.inbox.get_nowait()
                except queue.Empty:
                    break
                if queued is not None:
                    queued.resolve(error=EngineDied(self.reason, queued.request))
            self.pipe = None  # frees the pipeline and its KV cache on this thread

    def _admit(self, block: bool) -> None:
        """Move waiting jobs into the pipeline; blocks for the first one only when idle."""
        while True:
            try:
                job = self.inbox.get(block=block)
            except queue.Empty:
                return
            block = False
            if job is None or self.stopping:
                self.stopping = True
                if job is not None:
                    self.inbox.put(job)  # failed with the rest in _run's finally
                return
            if job.abandoned:
                continue
            rid = next(self._ids)
            try:
                job.handle = self.pipe.add_request(rid, self._tensor(job.ids), job.config)
            except Exception as exc:  # this request's fault alone: nothing was scheduled yet
                job.resolve(error=RequestRejected(f"openvino refused the request: {exc}", job.request))
                continue
            self.live[rid] = job

    def _step(self) -> None:
        for rid, job in list(self.live.items()):
            if job.abandoned:  # between steps, as the pipeline requires: it drops the request next step
                job.handle.cancel()
                del self.live[rid]
        self.peak_running = max(self.peak_running, len(self.live))
        try:
            self.pipe.step()
        except Exception as exc:
            self._rebuild(exc)
            return
        self.steps += 1
        self.rebuilds = 0
        for rid, job in list(self.live.items()):
            handle = job.handle
            while handle.can_read():
                for output in handle.read().values():
                    job.out.extend(output.generated_ids)
                    name = output.finish_reason.name
                    if name != "NONE" or job.finish is None:  # a later empty output must not erase it
                        job.finish = name
            status = handle.get_status()
            if status == self._running:
                continue
            del self.live[rid]
            try:
                job.resolve(self._finish(job, status))
            except EngineError as exc:
                job.resolve(error=exc)
            except Exception as exc:  # decoding this one output failed: its neighbours are fine
                job.resolve(error=TransientEngineError(f"openvino result: {exc!r}", job.request))

    def _rebuild(self, exc: Exception) -> None:
        """A failed step: fail what was running (retryable) and start from a fresh pipeline."""
        log.warning(
            "openvino step failed with %d request(s) running: %r; rebuilding the pipeline",
            len(self.live),
            exc,
        )
        for job in self.live.values():
            job.resolve(error=TransientEngineError(f"openvino step failed: {exc}", job.request))
        self.live.clear()
        self.rebuilds += 1
        if self.rebuilds > MAX_REBUILDS:
            raise EngineDied(f"openvino step failed {self.rebuilds} times in a row; last error: {exc}")
        self.pipe = None
        self.pipe = self._make_pipeline()
