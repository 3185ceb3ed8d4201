"""engine/backends/vllm_watch.py: the liveness check reads the server behind the URL or, behind a
router, each worker directly (the router's own /metrics is one worker of its choosing). Stand-in
clients answer each GET from a table the test changes between checks."""

from __future__ import annotations

import asyncio

import orjson

from engine.backend import EngineUnreachable
from engine.backends.http_client import Reply
from engine.backends.vllm_watch import MetricsWatch

METRICS = (
    'vllm:num_requests_running{engine="0"} %s\n'
    'vllm:num_requests_waiting{engine="0"} 0.0\n'
    "process_start_time_seconds %s\n"
)
ROUTER = "http://router"


class StandInClients:
    """GET answers by URL: a Reply, or an exception (no answer). `closed` counts worker clients let go."""

    def __init__(self, table: dict[str, Reply | Exception]) -> None:
        self.table, self.closed = table, 0

    def client_for(self, base: str):
        clients = self

        class Client:
            async def get(self, path, timeout_s=None):
                answer = clients.table.get(base + path, Reply(404, b""))
                if isinstance(answer, Exception):
                    raise answer
                return answer

            async def close(self):
                clients.closed += 1

        return Client()


def metrics(running: float, start: float) -> Reply:
    return Reply(200, (METRICS % (running, start)).encode())


def workers(*urls: str) -> Reply:
    return Reply(200, orjson.dumps({"workers": [{"url": u, "is_healthy": True} for u in urls]}))


def watch_of(clients: StandInClients) -> MetricsWatch:
    router = clients.client_for(ROUTER)
    return MetricsWatch(ROUTER, lambda: router, clients.client_for)


def test_behind_a_router_each_worker_is_read_not_the_routers_pick():
    table = {
        f"{ROUTER}/metrics": metrics(0, 7.0),  # the router's pick: an idle worker, or another one each time
        f"{ROUTER}/workers": workers("http://a", "http://b"),
        "http://a/metrics": metrics(0, 1.0),
        "http://b/metrics": metrics(2, 2.0),
    }
    clients = StandInClients(table)
    watch = watch_of(clients)

    async def go():
        await watch.begin("", [{"url": "http://a"}, {"url": "http://b"}])
        alive = await watch(3)
        table["http://b/metrics"] = metrics(0, 2.0)
        idle = await watch(3)
        table["http://b/metrics"] = EngineUnreachable("no answer in 5s")
        hung = await watch(3)
        table["http://b/metrics"] = metrics(1, 5.0)
        restarted = await watch(3)
        again = await watch(3)  # a restart is reported once
        table[f"{ROUTER}/workers"] = workers("http://a")
        left = await watch(3)
        table[f"{ROUTER}/workers"] = workers("http://a", "http://b")
        table["http://b/metrics"] = EngineUnreachable("no answer in 5s")
        back = await watch(3)  # listed again but silent: it answered before, so it is judged
        return alive, idle, hung, restarted, again, left, back

    alive, idle, hung, restarted, again, left, back = asyncio.run(go())
    assert watch.workers and alive is None
    assert "none of the 2 workers" in idle
    assert hung.startswith("http://b/metrics does not answer")
    assert "new server process answers at http://b" in restarted and again is None
    assert "http://b left the router's healthy workers" in left
    assert back.startswith("http://b/metrics does not answer") and list(watch.starts) == [
        "http://a",
        "http://b",
    ]
    assert clients.closed >= 8  # each worker read on a client of its own, closed after


def test_workers_that_do_not_answer_from_here_are_never_judged():
    """Workers on a network this machine cannot reach are never judged, whether listed from the
    start or later, and while any is listed an idle fleet is not judged either (ours may wait
    there); one listed later that answers is watched."""
    table = {
        f"{ROUTER}/metrics": metrics(0, 7.0),
        f"{ROUTER}/workers": workers("http://unreachable:8000"),
        "http://unreachable:8000/metrics": EngineUnreachable("cannot connect"),
    }
    watch = watch_of(StandInClients(table))

    async def go():
        await watch.begin("", [{"url": "http://unreachable:8000"}])
        alone = await watch(5)
        table[f"{ROUTER}/workers"] = workers("http://unreachable:8000", "http://far:8000", "http://c")
        table["http://far:8000/metrics"] = EngineUnreachable("cannot connect")
        table["http://c/metrics"] = metrics(0, 3.0)
        partial = await watch(5)  # http://c idle, but ours may wait on the workers not read
        table["http://c/metrics"] = metrics(0, 4.0)
        restarted = await watch(5)
        table[f"{ROUTER}/workers"] = workers("http://c")
        whole = await watch(5)
        return alone, partial, restarted, whole

    alone, partial, restarted, whole = asyncio.run(go())
    assert alone is None and partial is None and list(watch.starts) == ["http://c"]
    assert restarted == "a new server process answers at http://c"  # seen on any worker read
    assert whole == "http://c reports nothing running or waiting while 5 of ours are out"


def test_a_plain_server_is_read_at_its_url():
    table = {f"{ROUTER}/metrics": metrics(1, 3.0)}
    watch = watch_of(StandInClients(table))

    async def go():
        await watch.begin((METRICS % (1, 3.0)), [])
        alive = await watch(2)
        table[f"{ROUTER}/metrics"] = metrics(0, 4.0)
        return alive, await watch(2)

    alive, restarted = asyncio.run(go())
    assert alive is None and "new server process answers at http://router" in restarted
