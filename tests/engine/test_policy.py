"""Scheduling decisions as plain functions: window size, group choice, backoff, retry sampling."""

from __future__ import annotations

import random

from engine.policy import (
    LPM_WAITING_LIMIT,
    backoff_s,
    engine_window,
    pick_group,
    rank_running,
    retry_sampling,
    tokens_per_request,
    window_size,
)
from engine.request import SamplingParams


def test_window_is_capacity_plus_a_margin_kept_under_the_lpm_limit():
    assert window_size(1) == 3
    assert window_size(64) == 64 + 16
    big = window_size(1024)
    assert big == 1024 + LPM_WAITING_LIMIT // 2 and big - 1024 < LPM_WAITING_LIMIT
    assert window_size(0) >= 1


def test_window_follows_what_the_kv_cache_lets_the_engine_run():
    """256 running slots but KV for only 100,000 tokens: at 2,000 tokens a request a rank runs 50;
    a window from max_running alone (320) would leave 270 waiting, far past lpm's 128."""
    assert rank_running(256, kv_tokens=100_000, tokens_per_request=2000) == 50
    window = engine_window(256, 1, kv_tokens=100_000, tokens_per_request=2000)
    assert window - 50 < LPM_WAITING_LIMIT and window > 50
    assert window_size(256) - 50 > LPM_WAITING_LIMIT  # what sizing from max_running alone leaves waiting
    assert engine_window(256, 1, kv_tokens=10_000_000, tokens_per_request=2000) == window_size(256)
    assert engine_window(256) == window_size(256)  # unknown KV or sizes: max_running as before


def test_window_is_per_data_parallel_rank():
    """8 ranks of 256, each with its own scheduler and waiting queue: each gets its own margin, and
    with KV-limited ranks no rank's queue passes the lpm limit."""
    assert engine_window(2048, dp_size=8) == 8 * window_size(256)
    w = engine_window(2048, dp_size=8, kv_tokens=60_000, tokens_per_request=1500)
    assert w == 8 * window_size(40) and w / 8 - 40 < LPM_WAITING_LIMIT


def test_tokens_per_request_counts_unshared_prompt_and_answer():
    assert tokens_per_request(10_000, cached_tokens=8_000, completion_tokens=1_000, calls=10) == 300
    assert tokens_per_request(0, 0, 0, 0) is None


def test_pick_group_stays_on_the_current_template_then_takes_the_largest():
    assert pick_group({"p1": 3, "p3": 10}, "p1") == "p1"
    assert pick_group({"p1": 0, "p3": 10, "p4": 2}, "p1") == "p3"
    assert pick_group({"p3": 4, "p4": 4}, None) == "p4"  # ties broken by name, deterministically


def test_backoff_is_full_jitter_under_an_exponential_cap():
    rng = random.Random(0)
    for attempt in range(1, 12):
        cap = min(30.0, 0.5 * 2 ** (attempt - 1))
        draws = [backoff_s(attempt, 0.5, 30.0, rng) for _ in range(200)]
        assert all(0 <= d <= cap for d in draws)
        assert max(draws) > cap / 2  # it does spread over the range


def test_retry_sampling_leaves_greedy_and_moves_the_seed():
    s = SamplingParams(temperature=0.0, seed=3, max_new_tokens=40)
    first, second = retry_sampling(s, 1), retry_sampling(s, 2)
    assert first.temperature > 0 and first.seed != s.seed and second.seed != first.seed
    assert first.max_new_tokens == s.max_new_tokens
    assert retry_sampling(SamplingParams(temperature=1.2), 1).temperature == 1.2
