"""How fast the HTTP client path can feed a server: `python -m bench.http [--json FILE]`.

The real Scheduler and SGLangHTTPBackend (no store) send /generate requests over loopback to the
stand-in server of bench/http_server.py, run in its own process (pinned to another core when there
is one) so that this process's CPU time is the client's alone. `inflight` coroutines each submit
a fresh request as soon as the previous one returns, so exactly `inflight` requests are
outstanding; after a warm-up (one latency plus a little), completions are counted over a fixed
window. Measured:
- requests/s at 1 s server latency and 512 (and 2,048) in flight; the bound is inflight / latency;
- requests/s against a zero-latency server, and the client's CPU ms per request there
  (time.process_time of this process over the window / requests completed);
- the share of a core the client actually got (requests/s x CPU s per request): on a machine
  shared with other work the client waits for a CPU, and requests/s understate what it can do;
  1000 / CPU ms per request is what one whole core would sustain.
With --candidates, also bare httpx and aiohttp loops (no backend, no scheduler) on the same server:
the numbers behind the choice of client (engine/backends/http_client.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time

TARGETS = {
    "http_requests_per_s_latency1s_inflight512": (">=", 300),
    "http_requests_per_s_zero_latency": (">=", 1500),
    "latency1s_inflight2048_share_of_bound": (">=", 0.6),
}


def cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


class Server:
    """bench/http_server.py in a child process, on its own core where there are two or more."""

    def __init__(self, delay_s: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.http_server", "--delay", str(delay_s)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
        line = self.proc.stdout.readline()
        if not line.startswith("PORT "):
            self.proc.kill()
            raise SystemExit(f"bench.http: the stand-in server did not start ({line!r})")
        self.url = f"http://127.0.0.1:{int(line.split()[1])}"
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        self.cores = set(cores)  # restored on exit
        if len(cores) >= 2:
            os.sched_setaffinity(self.proc.pid, {cores[-1]})
            os.sched_setaffinity(0, {cores[0]})

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.proc.kill()
        self.proc.wait()
        if len(self.cores) >= 2:
            os.sched_setaffinity(0, self.cores)


async def _drive(send, inflight: int, warmup_s: float, window_s: float) -> tuple[float, float]:
    """(requests/s, client CPU ms per request) with `inflight` loops calling `send(i)`."""
    done = 0
    stop = False

    async def loop(w: int) -> None:
        nonlocal done
        i = w
        while not stop:
            await send(i)
            done += 1
            i += inflight

    tasks = [asyncio.create_task(loop(w)) for w in range(inflight)]
    await asyncio.sleep(warmup_s)
    n0, c0, t0 = done, time.process_time(), time.perf_counter()
    await asyncio.sleep(window_s)
    n, cpu, wall = done - n0, time.process_time() - c0, time.perf_counter() - t0
    stop = True
    await asyncio.gather(*tasks, return_exceptions=True)
    return n / wall, 1000 * cpu / max(n, 1)


async def _through_backend(url: str, inflight: int, warmup_s: float, window_s: float) -> tuple[float, float]:
    from engine.backends.sglang_http import SGLangHTTPBackend
    from engine.request import Request, SamplingParams
    from engine.scheduler import Scheduler, SchedulerConfig

    sampling = SamplingParams(max_new_tokens=1)
    prompt = tuple(range(1000, 1200))  # ~200 prompt tokens, as small P1/P3 prompts are larger still
    async with SGLangHTTPBackend(url, model_path=None, max_concurrency=inflight, timeout_s=60) as backend:
        sched = Scheduler(backend, None, SchedulerConfig(max_inflight=inflight, timeout_s=60))

        async def send(i: int) -> None:
            r = await sched.submit(Request(prompt=(i, *prompt), sampling=sampling, model="bench"))
            if not r.ok:
                raise SystemExit(f"bench.http: a request failed: {r.error}")

        return await _drive(send, inflight, warmup_s, window_s)


async def _bare(
    client: str, url: str, inflight: int, warmup_s: float, window_s: float
) -> tuple[float, float]:
    import orjson

    body = orjson.dumps({"input_ids": list(range(200)), "sampling_params": {"max_new_tokens": 1}})
    headers = {"Content-Type": "application/json"}
    if client == "httpx":
        import httpx

        limits = httpx.Limits(max_connections=inflight, max_keepalive_connections=inflight)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as c:

            async def send(i: int) -> None:
                orjson.loads((await c.post("/generate", content=body, headers=headers)).content)

            return await _drive(send, inflight, warmup_s, window_s)
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=inflight)) as s:

        async def send(i: int) -> None:
            async with s.post(url + "/generate", data=body, headers=headers) as r:
                orjson.loads(await r.read())

        return await _drive(send, inflight, warmup_s, window_s)


def measure(latency_s: float, inflight: int, window_s: float, client: str = "backend") -> tuple[float, float]:
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    warmup = latency_s + 0.5
    with Server(latency_s) as srv:
        if client == "backend":
            return runner(_through_backend(srv.url, inflight, warmup, window_s))
        return runner(_bare(client, srv.url, inflight, warmup, window_s))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.http", description=__doc__.split("\n")[0])
    p.add_argument("--json", help="write the figures to this file")
    p.add_argument("--latency-s", type=float, default=1.0, help="server latency of the loaded runs")
    p.add_argument("--inflight", default="512,2048", help="requests in flight at that latency (first: 512)")
    p.add_argument("--zero-inflight", type=int, default=64, help="requests in flight at zero latency")
    p.add_argument("--window-s", type=float, default=5.0, help="seconds counted per measurement")
    p.add_argument("--candidates", action="store_true", help="also bare httpx and aiohttp loops")
    a = p.parse_args(argv)
    inflights = [int(x) for x in a.inflight.split(",")]
    res: dict = {
        "cpu_model": cpu_model(),
        "cpus": os.cpu_count(),
        "latency_s": a.latency_s,
        "window_s": a.window_s,
        "zero_latency_inflight": a.zero_inflight,
    }
    rows = []
    for n in inflights:
        rps, cpu = measure(a.latency_s, n, a.window_s)
        tag = f"latency{a.latency_s:g}s_inflight{n}".replace(".", "_")
        res[f"http_requests_per_s_{tag}"] = round(rps, 1)
        res[f"{tag}_share_of_bound"] = round(rps * a.latency_s / n, 3)
        res[f"{tag}_client_cpu_ms_per_request"] = round(cpu, 3)
        res[f"{tag}_client_core_share"] = round(rps * cpu / 1000, 3)
        rows.append((f"latency {a.latency_s:g}s, {n} in flight", rps, cpu, n / a.latency_s))
    rps, cpu = measure(0.0, a.zero_inflight, a.window_s)
    res["http_requests_per_s_zero_latency"] = round(rps, 1)
    res["client_cpu_ms_per_request"] = round(cpu, 3)
    res["zero_latency_client_core_share"] = round(rps * cpu / 1000, 3)
    res["one_core_requests_per_s_from_cpu"] = round(1000 / max(cpu, 1e-9), 1)
    rows.append((f"zero latency, {a.zero_inflight} in flight", rps, cpu, None))
    if a.candidates:
        for client in ("httpx", "aiohttp"):
            for lat, n in ((0.0, a.zero_inflight), (a.latency_s, inflights[0])):
                try:
                    rps, cpu = measure(lat, n, a.window_s, client)
                except ImportError:
                    continue
                res.setdefault("candidates", {})[f"{client}_latency{lat:g}s_inflight{n}"] = {
                    "requests_per_s": round(rps, 1),
                    "client_cpu_ms_per_request": round(cpu, 3),
                }
                name = f"bare {client}: latency {lat:g}s, {n} in flight"
                rows.append((name, rps, cpu, n / lat if lat else None))
    print(f"{'run':<44} {'req/s':>9} {'CPU ms/req':>11} {'bound':>8} {'core share':>11}")
    for name, rps, cpu, bound in rows:
        print(f"{name:<44} {rps:>9.1f} {cpu:>11.3f} {bound or float('nan'):>8.0f} {rps * cpu / 1000:>11.2f}")
    print(f"client on one core of: {res['cpu_model']} ({res['cpus']} CPUs)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
