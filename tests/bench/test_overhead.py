"""bench.overhead on a small input: the numbers it reports are there and consistent."""

from __future__ import annotations

import json

from bench import overhead, synthetic


def test_synthetic_rows_are_about_the_size_asked_and_unique(tmp_path):
    size = synthetic.write(tmp_path / "s.jsonl", 400, row_bytes=2000)
    lines = (tmp_path / "s.jsonl").read_bytes().splitlines()
    assert len(lines) == 400 and len(set(lines)) == 400
    assert 1500 < size / 400 < 2500


def test_overhead_measures_a_small_run(tmp_path):
    res = overhead.measure(1500, tmp_path, row_bytes=1000, full_scan=True)
    for key in ("requests_per_s", "peak_rss_mb", "resume_s", "instances", "resume_full_scan_s"):
        assert key in res
    assert res["instances"] == 1500 and res["accounted"]
    assert res["kept"] + res["dropped"] == 1500
    assert res["requests"] >= 3 * res["kept"]  # P1 + P3 + P4 for every kept instance
    assert res["requests_per_s"] > 0 and 10 < res["peak_rss_mb"] < 2000
    assert 0 < res["resume_s"] < 10


def test_overhead_cli_writes_json(tmp_path):
    assert overhead.main(["--instances", "300", "--row-bytes", "800", "--json", str(tmp_path / "o.json"),
                          "--workdir", str(tmp_path / "w")]) == 0
    res = json.loads((tmp_path / "o.json").read_text())
    assert res["instances"] == 300 and res["accounted"]
