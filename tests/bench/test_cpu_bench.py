"""bench.cpu end to end at toy size on the real model: every side runs and the JSON carries the keys
the README and issue 11 name, with ratios computed from the measured rates."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.model


def test_bench_cpu_writes_the_ratios(tmp_path, smol_gguf):
    from bench.cpu import main

    out = tmp_path / "cpu.json"
    res = main(["--prompts", "2", "--max-new-tokens", "4", "--max-batch", "2", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["engine"] == "openvino" and saved["prompts"] == 2
    for key in ("speedup_vs_sequential", "constrained_vs_unconstrained", "p1_tok_s", "prefix_cache_speedup"):
        assert saved[key] > 0, key
    assert saved["p1_tok_s"] == res["p1_unconstrained"]["tok_s"]
    assert saved["speedup_vs_sequential"] == round(res["p1_tok_s"] / res["sequential_generate"]["tok_s"], 3)
    assert saved["p1_prompt_tokens_mean"] > 400  # P1 prompts: the shared template comes first
