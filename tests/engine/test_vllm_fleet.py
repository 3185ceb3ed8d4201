"""engine/backends/vllm_fleet.py on the shapes the real routers and vLLM answer (smg 1.13.0's
/workers as captured from tests/real's fleet; vLLM 0.32's /metrics lines)."""

from __future__ import annotations

from engine.backends.vllm_fleet import (
    fleet_context,
    fleet_running,
    healthy_workers,
    stall_reason,
    worker_urls,
)

SMG = [
    {
        "id": "w1",
        "model_id": "/m",
        "url": "http://127.0.0.1:8311",
        "models": [{"id": "/m", "model_type": ["chat", "completions"], "context_length": 2048}],
        "connection_mode": "http",
        "runtime_type": "vllm",
        "labels": {"max_model_len": "2048"},
        "is_healthy": True,
        "status": "ready",
        "engine_load": {"dp_rank_count": 1, "loads": [{"dp_rank": 0, "max_running_requests": 0}]},
    }
]
SGLANG_ROUTER = [{"id": "w", "url": "http://127.0.0.1:8311", "model_id": "unknown", "is_healthy": True}]
METRICS = """# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="/m"} %s
vllm:num_requests_waiting{engine="0",model_name="/m"} 0.0
process_start_time_seconds %s
"""


def test_smg_fleet_gives_context_and_summed_capacity():
    fleet = healthy_workers(SMG + [{**SMG[0], "url": "http://b", "is_healthy": False}] + SMG)
    assert len(fleet) == 2
    assert fleet_context(fleet, {}) == 2048
    assert fleet_running(fleet, 256) == 2 * 256  # no max_running_requests reported: the default each


def test_a_reported_capacity_and_dp_ranks_count():
    w = {**SMG[0], "engine_load": {"dp_rank_count": 2, "loads": [{"max_running_requests": 48}] * 2}}
    ranks = {**SMG[0], "engine_load": {"dp_rank_count": 4, "loads": []}}
    assert fleet_running([w, ranks], 256) == 96 + 4 * 256


def test_sglang_router_says_nothing_but_its_worker_card_does():
    assert fleet_context(SGLANG_ROUTER, {}) is None
    assert fleet_context(SGLANG_ROUTER, {"id": "/m", "max_model_len": 4096}) == 4096
    assert healthy_workers({"not": "a list"}) == []


def test_stall_reasons_of_one_server():
    url, busy, idle = "http://s", METRICS % ("3.0", "1700000000.5"), METRICS % ("0.0", "1700000000.5")
    starts = {url: 1700000000.5}
    assert stall_reason({url: busy}, starts, 3) is None  # busy: alive
    assert "http://s reports nothing running or waiting while 3" in stall_reason({url: idle}, starts, 3)
    new = stall_reason({url: METRICS % ("0.0", "1700000099.0")}, starts, 3)
    assert new and "new server process answers at http://s" in new
    assert stall_reason({url: "# a proxy's own metrics\n"}, starts, 3) is None  # nothing to judge by
    assert stall_reason({url: None}, starts, 3) is None  # answered, but no metrics route
    silent = stall_reason({url: TimeoutError("no answer in 5s")}, starts, 3)
    assert silent == "http://s/metrics does not answer (no answer in 5s)"


def test_stall_reasons_of_a_fleet_judge_every_worker():
    a, b = "http://a", "http://b"
    starts = {a: 1.0, b: 2.0}
    one_idle = {a: METRICS % ("0.0", "1.0"), b: METRICS % ("2.0", "2.0")}
    assert stall_reason(one_idle, starts, 4) is None  # the other worker runs ours: alive
    both_idle = {a: METRICS % ("0.0", "1.0"), b: METRICS % ("0.0", "2.0")}
    assert "none of the 2 workers reports anything" in stall_reason(both_idle, starts, 4)
    restarted = {a: METRICS % ("1.0", "1.0"), b: METRICS % ("1.0", "9.0")}
    assert "new server process answers at http://b" in stall_reason(restarted, starts, 4)
    hung = {a: METRICS % ("1.0", "1.0"), b: OSError("refused")}
    assert stall_reason(hung, starts, 4) == "http://b/metrics does not answer (refused)"
    assert "http://b left the router's healthy workers" in stall_reason(
        {a: one_idle[a]}, starts, 4, ["http://b"]
    )
    assert worker_urls([{"url": "http://a/"}, {"url": "http://a"}, {"url": "grpc://c"}, {}]) == ["http://a"]
