"""What a router in front of several vLLM servers says about them, and what a server's /metrics
says about its liveness: plain functions over the JSON and text they answer (no I/O).

Routers (checked against smg 1.13.0, sglang-router 0.3.2 and vllm-router 0.1.17 in tests/real):
`GET /workers` lists the fleet, {"workers": [{"url", "is_healthy", "models": [{"context_length"}],
"labels": {"max_model_len"}, "engine_load": {"dp_rank_count", "loads": [{"max_running_requests"}]}}]}
(smg fills all of it; sglang-router and vllm-router only url and is_healthy). A router forwards
`/metrics` and `/server_info` to one worker, so capacity read there is one worker's share, and
liveness is read from each worker directly (vllm_watch).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

# sglang-router's name for its workers' model: it never asks them, and forwards whatever we send.
ROUTER_UNKNOWN_MODEL = "unknown"
_QUEUED = re.compile(r"^vllm:num_requests_(?:running|waiting)(?:\{[^}]*\})? ([0-9.eE+-]+)$", re.M)
_START_TIME = re.compile(r"^process_start_time_seconds ([0-9.eE+-]+)$", re.M)


def positive_int(value: Any) -> int | None:
    """A positive int from a JSON number or numeric string (router labels are strings), else None."""
    if isinstance(value, bool):
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        return None
    return n if n > 0 else None


def healthy_workers(workers: Any) -> list[dict]:
    """The healthy entries of a /workers list ([] for anything else)."""
    if not isinstance(workers, list):
        return []
    return [w for w in workers if isinstance(w, dict) and w.get("is_healthy", True)]


def fleet_context(fleet: list[dict], worker_card: dict) -> int | None:
    """The smallest context any worker reports (on /workers, or a worker's own model card)."""
    lens = [
        positive_int(m.get("context_length"))
        for w in fleet
        for m in (w.get("models") or [])
        if isinstance(m, dict)
    ]
    lens += [positive_int((w.get("labels") or {}).get("max_model_len")) for w in fleet]
    lens.append(positive_int(worker_card.get("max_model_len")))
    return min((n for n in lens if n), default=None)


def fleet_running(fleet: list[dict], per_rank_default: int) -> int:
    """Requests the fleet runs at once: each worker's reported max_running_requests, else
    `per_rank_default` per data-parallel rank."""
    running = 0
    for w in fleet:
        load = w.get("engine_load") or {}
        reported = sum(
            positive_int(x.get("max_running_requests")) or 0
            for x in load.get("loads") or []
            if isinstance(x, dict)
        )
        running += reported or per_rank_default * (positive_int(load.get("dp_rank_count")) or 1)
    return running


def process_start(metrics: str) -> float | None:
    m = _START_TIME.search(metrics)
    return float(m.group(1)) if m else None


def worker_urls(fleet: list[dict]) -> list[str]:
    """The http(s) URLs of a fleet's workers, once each, in order."""
    urls = [w.get("url") for w in fleet]
    return list(dict.fromkeys(u.rstrip("/") for u in urls if isinstance(u, str) and u.startswith("http")))


def stall_reason(
    readings: Mapping[str, str | Exception | None],
    starts: Mapping[str, float | None],
    outstanding: int,
    gone: Sequence[str] = (),
    whole: bool = True,
) -> str | None:
    """Why the servers read are not serving our `outstanding` requests, else None. `readings` maps
    each server (the one behind the URL, or each worker of a router) to its /metrics text, None when
    it answered without metrics (a proxy: nothing to judge by), or the error when it did not answer;
    `starts` to the process start seen before; `gone`: workers that left the router's healthy list;
    `whole`: whether those read are all that may hold ours (not when some workers cannot be read from
    here). Not serving: one left or does not answer, one is a new process, or none runs or queues
    anything (judged only over the whole fleet)."""
    if gone:
        return f"{', '.join(gone)} left the router's healthy workers"
    silent = [f"{u}/metrics does not answer ({r})" for u, r in readings.items() if isinstance(r, Exception)]
    if silent:
        return "; ".join(silent)
    texts = {url: r for url, r in readings.items() if isinstance(r, str)}
    for url, text in texts.items():
        start, known = process_start(text), starts.get(url)
        if start is not None and known is not None and start != known:
            return f"a new server process answers at {url}"
    queued = [_QUEUED.findall(text) for text in texts.values()]
    if not whole or not texts or len(texts) < len(readings) or not all(queued):
        return None
    if sum(float(x) for q in queued for x in q) > 0:
        return None
    (only, *others) = texts
    where = f"{only} reports" if not others else f"none of the {len(texts)} workers reports anything:"
    return f"{where} nothing running or waiting while {outstanding} of ours are out"
