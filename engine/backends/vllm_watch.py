"""vllm_http's liveness check, which engine/liveness.py calls once none of our requests has finished
for a while: what `/metrics` says of the vLLM server behind the URL or, behind a router, of each of
its workers, asked directly. A router forwards `/metrics` to one worker of its choosing (vllm_fleet),
so its own answer would judge a fleet by one member, and a new process start each time it chose
another. The judgement itself is vllm_fleet.stall_reason."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from engine.backend import EngineError
from engine.backends.http_client import HTTPClient
from engine.backends.vllm_fleet import healthy_workers, process_start, stall_reason, worker_urls

log = logging.getLogger(__name__)

# The wait for /metrics: a server still starting (a new one on the port) or a front end hung in
# shutdown accepts the connection and never answers; two such checks resubmit.
CHECK_TIMEOUT_S = 5.0
Reading = str | Exception | None


class MetricsWatch:
    """`begin(metrics, fleet)` once the server answered; then `await watch(outstanding)` is why it is
    not serving our requests, or None."""

    def __init__(
        self,
        base_url: str,
        client: Callable[[], HTTPClient | None],
        client_for: Callable[[str], HTTPClient],
        timeout_s: float = CHECK_TIMEOUT_S,
    ) -> None:
        self.base_url, self._client, self._client_for = base_url, client, client_for
        self.timeout_s = timeout_s
        self.starts: dict[str, float | None] = {}  # each server watched -> its process start
        self.workers = False  # watching a router's workers, not the URL itself
        self._ignored: set[str] = set()  # workers that did not answer from here when first listed
        self._reached: set[str] = set()  # workers that did

    async def begin(self, metrics: str, fleet: list[dict]) -> None:
        urls = worker_urls(fleet)
        if not urls:
            self.starts = {self.base_url: process_start(metrics)}
            return
        self.workers = True
        await self._take(urls)
        if not self.starts:
            log.warning(
                "liveness: the workers behind %s do not answer /metrics from here; a worker that "
                "hangs is noticed only by the request timeout",
                self.base_url,
            )
            return
        log.info("liveness: watching the %d worker(s) behind %s directly", len(self.starts), self.base_url)

    async def __call__(self, outstanding: int) -> str | None:
        if self._client() is None:
            return None
        if not self.workers:
            readings = {self.base_url: await self._read(self._client(), self.base_url)}
            return self._judged(readings, outstanding, [], whole=True)
        listed = worker_urls(healthy_workers(await self._workers_listed()))
        gone = [url for url in self.starts if listed and url not in listed]  # none if the router is silent
        for url in gone:
            del self.starts[url]
        # A worker listed since is watched from now on, if it answers from here.
        await self._take([url for url in listed if url not in self.starts and url not in self._ignored])
        if not self.starts and not gone:
            return None  # nothing to judge by
        whole = not self._ignored.intersection(listed)  # ours may wait on a worker not read
        return self._judged(await self._read_each(list(self.starts)), outstanding, gone, whole)

    def _judged(
        self, readings: dict[str, Reading], outstanding: int, gone: list[str], whole: bool
    ) -> str | None:
        why = stall_reason(readings, self.starts, outstanding, gone, whole)
        for url, r in readings.items():  # a restart is reported once
            if isinstance(r, str):
                self.starts[url] = process_start(r) or self.starts.get(url)
        return why

    async def _take(self, urls: list[str]) -> None:
        """Watch those of `urls` that answer /metrics from here; never judge the others (a worker
        on a network this machine cannot reach would read as a stall at every check)."""
        for url, r in (await self._read_each(urls)).items():
            if isinstance(r, str) or url in self._reached:  # back after it left: judged at once
                self.starts[url] = process_start(r) if isinstance(r, str) else None
                self._reached.add(url)
            else:
                self._ignored.add(url)

    async def _workers_listed(self) -> object:
        client = self._client()
        try:
            reply = await client.get("/workers", timeout_s=self.timeout_s) if client else None
            body = reply.json() if reply is not None and reply.status == 200 else None
        except (EngineError, ValueError):
            return None
        return body.get("workers") if isinstance(body, dict) else None

    async def _read_each(self, urls: list[str]) -> dict[str, Reading]:
        async def one(url: str) -> Reading:
            client = self._client_for(url)
            try:
                return await self._read(client, url)
            finally:
                await client.close()

        return dict(zip(urls, await asyncio.gather(*(one(u) for u in urls)), strict=True))

    async def _read(self, client: HTTPClient | None, url: str) -> Reading:
        """/metrics text; None when it answers without (a proxy); the error when it does not answer."""
        if client is None:
            return None
        try:
            reply = await client.get("/metrics", timeout_s=self.timeout_s)
        except EngineError as e:
            return e
        return reply.body.decode("utf-8", "replace") if reply.status == 200 else None
