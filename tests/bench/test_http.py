"""bench.http at a tiny size: it runs, writes every JSON key, and the figures are sane."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("aiohttp", reason="bench.http needs aiohttp: pip install -e '.[http]'")


@pytest.mark.slow
def test_bench_http_tiny(tmp_path):
    from bench import http as bench_http

    out = tmp_path / "http.json"
    assert (
        bench_http.main(
            [
                "--latency-s",
                "1",
                "--inflight",
                "16",
                "--zero-inflight",
                "4",
                "--window-s",
                "1",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())
    # 16 in flight at 1 s: at most 16 requests/s, and a working client gets most of that.
    assert 4 < res["http_requests_per_s_latency1s_inflight16"] <= 16 * 1.2
    assert res["http_requests_per_s_zero_latency"] > 20
    assert 0 < res["client_cpu_ms_per_request"] < 50
    assert res["cpu_model"] and res["one_core_requests_per_s_from_cpu"] > 0
