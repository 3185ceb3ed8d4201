"""bench.overhead on a small input: the numbers it reports are there and consistent."""

from __future__ import annotations

import json

import pytest

from bench import overhead, synthetic


def test_synthetic_rows_are_about_the_size_asked_and_unique(tmp_path):
    size = synthetic.write(tmp_path / "s.jsonl", 400, row_bytes=2000)
    lines = (tmp_path / "s.jsonl").read_bytes().splitlines()
    assert len(lines) == 400 and len(set(lines)) == 400
    assert 1500 < size / 400 < 2500


@pytest.mark.slow
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
    assert (
        overhead.main(
            [
                "--instances",
                "300",
                "--row-bytes",
                "800",
                "--json",
                str(tmp_path / "o.json"),
                "--workdir",
                str(tmp_path / "w"),
            ]
        )
        == 0
    )
    res = json.loads((tmp_path / "o.json").read_text())
    assert res["instances"] == 300 and res["accounted"]


def test_rss_growth_is_per_100k_instances_over_the_second_half_of_the_run():
    start_up_then_flat = [(0, 0.0)] + [(t, min(300.0, 100.0 * t)) for t in range(1, 11)]
    assert overhead.rss_growth_per_100k(start_up_then_flat, 50_000) == 0.0
    growing = [(t, 100.0 + 10 * t) for t in range(9)]  # +40 MB from t=4 (half of 8 s) to t=8
    assert overhead.rss_growth_per_100k(growing, 40_000) == round(40 / 20_000 * 100_000, 1)
    assert overhead.rss_growth_per_100k(growing[:5], 40_000) is None


@pytest.mark.slow
def test_tokenized_mode_builds_prompts_with_the_real_tokenizer(tmp_path):
    pytest.importorskip("transformers")
    from engine.backends.model_cache import ModelNotFound, default_gguf_path

    try:
        default_gguf_path()
    except ModelNotFound as e:
        pytest.skip(str(e))
    res = overhead.measure(60, tmp_path, row_bytes=800, tokenized=True)
    assert res["accounted_tokenized"] and res["requests_per_s_tokenized"] > 0
    assert "SmolLM2" in res["tokenizer"]
    assert 200 < res["prompt_tokens_mean_tokenized"] < 5000  # the P1 template alone is hundreds of tokens

    # The prompts really were token ids: every request differs from the plain run's chat messages.
    def p1_keys(out: str) -> dict:
        lines = (tmp_path / out / "data.jsonl").read_text().splitlines()
        return {r["id"]: r["request_keys"]["p1"] for r in map(json.loads, lines)}

    plain, tok = p1_keys("out"), p1_keys("out_tokenized")
    assert plain.keys() == tok.keys() and all(plain[i] != tok[i] for i in plain)
    assert 10 < res["peak_rss_mb_tokenized"] < 2000 and res["rss_mb_samples_tokenized"]
    assert res["tokenized_vs_plain"] == round(res["requests_per_s_tokenized"] / res["requests_per_s"], 4)
