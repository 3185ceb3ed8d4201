"""The whole pipeline on the real SmolLM2 model through the CLI: a few instances, small limits."""

from __future__ import annotations

import json

import pytest

from sysgen.cli import main
from tests.conftest import REPO

pytestmark = pytest.mark.model
SAMPLES = [str(REPO / "sysgen" / "samples" / "demo_mixed.jsonl")]
# P1 gets its default budget: SmolLM2 needs ~110 tokens for six tags of its own words (96 only fitted
# while it copied the old prompt's short examples), and a parse rate needs one P1 answer that ends.
SMALL = [
    "--limit",
    "2",
    "--p1-max-tokens",
    "320",
    "--p3-max-tokens",
    "40",
    "--p4-max-tokens",
    "40",
    "--no-progress",
    "--no-report",
    "--engine",
    "openvino",
    "--max-batch",
    "4",
]


def _stats(out):
    return json.loads((out / "stats.json").read_text())


def test_real_model_end_to_end_then_rerun_makes_no_engine_call(tmp_path, smol_gguf):
    out = tmp_path / "run"
    assert main(["run", *SAMPLES, "--out", str(out), *SMALL]) == 0
    st = _stats(out)
    assert st["input"] == 2 and st["accounted"]
    assert st["p1_parse_rate"] == 1.0, "constrained P1 must always parse"
    assert st["this_run"]["scheduler"]["engine_calls"] >= 2
    lines = (out / "data.jsonl").read_text().splitlines() + (out / "dropped.jsonl").read_text().splitlines()
    assert sorted(json.loads(x)["id"] for x in lines) == ["demo_mixed:1", "demo_mixed:2"]
    for rec in map(json.loads, (out / "data.jsonl").read_text().splitlines()):
        assert [m["role"] for m in rec["messages"]] == ["system", "user", "assistant"]
        assert all(m["content"].strip() for m in rec["messages"])
        assert "<" not in rec["messages"][0]["content"]

    # Same command again: every request is a store hit, nothing is recomputed or written twice.
    assert main(["run", *SAMPLES, "--out", str(out), *SMALL]) == 0
    again = _stats(out)
    assert again["input"] == 2
    assert again["this_run"]["scheduler"]["engine_calls"] == 0

    # A larger --limit resumes: only the new instance costs engine calls.
    assert main(["run", *SAMPLES, "--out", str(out), "--limit", "3", *SMALL[2:]]) == 0
    grown = _stats(out)
    assert grown["input"] == 3 and grown["this_run"]["scheduler"]["engine_calls"] >= 1
