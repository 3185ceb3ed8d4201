"""bench.gpu: the dry run builds real P1 prompts without SGLang; the measuring path runs end to end
against a stand-in engine (same loop rules as SGLang's: Engine.generate and flush_cache run the
engine's loop themselves); the real thing is a GPU test, skipped here."""

from __future__ import annotations

import asyncio
import os
import sys
import types
from pathlib import Path

import orjson
import pytest

from bench import gpu
from engine.backends.select import detect_gpu, sglang_installed
from engine.request import Request, Result, SamplingParams

REPO = Path(__file__).resolve().parents[2]


def test_dry_run_builds_p1_prompts_without_sglang(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert gpu.main(["--dry-run", "--n", "40", "--profile", "a100-40gb", "--json", str(out)]) == 0
    plan = orjson.loads(out.read_bytes())
    assert plan["dry_run"] and plan["n"] == 40
    assert plan["parts"] == ["raw_free", "raw_regex", "sysgen_regex"]
    assert plan["server_args"]["attention_backend"] == "flashinfer"
    assert plan["regex_chars"] > 100 and plan["prompt_len_mean"] > 0
    assert orjson.loads(capsys.readouterr().out) == plan
    real = sys.modules.get("sglang")
    assert real is None or not hasattr(real, "__file__"), "the dry run imported sglang"


def test_dry_run_on_a_small_input_uses_what_is_there(tmp_path, capsys):
    sample = REPO / "sysgen" / "samples" / "demo_mixed.jsonl"
    rows = sum(1 for line in sample.read_text().splitlines() if line.strip())
    assert gpu.main(["--dry-run", "--n", "500", "--input", str(sample), "--profile", "h100-80gb"]) == 0
    captured = capsys.readouterr()
    assert orjson.loads(captured.out)["n"] <= rows and "usable instances" in captured.err


def test_without_model_or_profile_it_says_what_to_pass(capsys):
    with pytest.raises(SystemExit):
        gpu.main([])
    assert "--model is required" in capsys.readouterr().err


def results(n: int, out_tokens: int, cached: int) -> list[Result]:
    return [
        Result(
            text="x",
            finish_reason="stop",
            prompt_tokens=100,
            completion_tokens=out_tokens,
            cached_tokens=cached,
        )
        for _ in range(n)
    ]


def test_part_stats_and_ratio():
    rs = results(4, 50, 80) + [Result.failure("boom")]
    s = gpu.part_stats("raw_regex", rs, 2.0)
    assert s["failed"] == 1 and s["output_tokens"] == 4 * 50
    assert s["output_tokens_per_s"] == 4 * 50 / 2.0 and s["cached_ratio"] == 80 / 100
    assert gpu.ratio(90.0, 100.0) == 0.9 and gpu.ratio(1.0, 0.0) is None
    assert "raw_regex" in gpu.table([s])


class StandInEngine:
    """Stand-in for sglang.Engine with its loop rules: generate/flush_cache call run_until_complete
    on the engine's own loop (so calling them from inside that loop fails, as in SGLang)."""

    bad_prompt = None  # a prompt whose last id is this is aborted with a 400, as SGLang does

    def __init__(self, **kwargs):
        self.loop = asyncio.new_event_loop()
        self.flushes = 0
        self.outstanding = self.peak = 0
        self.tokenizer_manager = types.SimpleNamespace(
            tokenizer=object(), context_len=4096, abort_request=lambda rid: None
        )

    @staticmethod
    def _out(ids, sp):
        n = 7 if sp.get("regex") else 9
        return {
            "text": "t" * n,
            "meta_info": {
                "finish_reason": {"type": "stop"},
                "prompt_tokens": len(ids),
                "completion_tokens": n,
                "cached_tokens": len(ids) // 2,
            },
        }

    def generate(self, input_ids, sampling_params):  # SGLang's: one 400 abort raises for the whole list
        sps = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(input_ids)
        if any(ids[-1] == self.bad_prompt for ids in input_ids):
            raise ValueError("The input (9000 tokens) is longer than the model's context length")
        return self.loop.run_until_complete(self._batch(input_ids, sps))

    async def _batch(self, input_ids, sps):
        await asyncio.sleep(0.01)
        return [self._out(i, s) for i, s in zip(input_ids, sps, strict=True)]

    async def async_generate(self, input_ids, sampling_params, rid=None):
        self.outstanding += 1
        self.peak = max(self.peak, self.outstanding)
        try:
            await asyncio.sleep(0.001)
            if input_ids[-1] == self.bad_prompt:
                raise ValueError("The input (9000 tokens) is longer than the model's context length")
            return self._out(input_ids, sampling_params)
        finally:
            self.outstanding -= 1

    async def get_internal_state(self):  # via tokenizer_manager in SGLang; see make_engine below
        return [{"effective_max_running_requests_per_dp": 4}]

    def flush_cache(self):
        self.flushes += 1
        return self.loop.run_until_complete(asyncio.sleep(0))

    def get_all_child_pids(self):
        return []

    def shutdown(self):  # SGLang's kills the child processes; it leaves the loop alone
        self.shut = True


def test_measure_end_to_end_on_a_stand_in_engine(tmp_path, monkeypatch, capsys):
    mod = types.ModuleType("sglang")
    mod.Engine = StandInEngine
    monkeypatch.setitem(sys.modules, "sglang", mod)

    def fake_requests(n, *, constrain, **kw):
        return [
            Request(
                prompt=(1, 2, 3, i),
                sampling=SamplingParams(max_new_tokens=16),
                model="m",
                regex="[a-z]+" if constrain else None,
            )
            for i in range(n)
        ]

    monkeypatch.setattr(gpu, "build_requests", fake_requests)
    out = tmp_path / "bench.json"
    assert (
        gpu.main(
            [
                "--model",
                str(tmp_path),
                "--profile",
                "h100-80gb",
                "--n",
                "30",
                "--warmup",
                "4",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    info = orjson.loads(out.read_bytes())
    by = {r["part"]: r for r in info["results"]}
    assert set(by) == {"raw_free", "raw_regex", "sysgen_regex"}
    assert by["raw_free"]["output_tokens"] == 30 * 9 and by["raw_regex"]["output_tokens"] == 30 * 7
    assert by["sysgen_regex"]["output_tokens"] == 30 * 7 and by["sysgen_regex"]["failed"] == 0
    assert by["sysgen_regex"]["cached_ratio"] == pytest.approx(0.5)
    want = round(by["sysgen_regex"]["output_tokens_per_s"] / by["raw_regex"]["output_tokens_per_s"], 3)
    assert info["ratios"]["sysgen_vs_raw_output_tok_s"] == want
    assert "sysgen_regex" in capsys.readouterr().out


def test_baseline_runs_in_the_same_window_and_survives_an_abort(tmp_path, monkeypatch):
    """The raw parts keep at most the scheduler's window outstanding (the same lpm regime as ours);
    the batch baseline sends all n at once; a 400 abort is one failed request, not a crash."""
    engines = []

    class Engine(StandInEngine):
        bad_prompt = 13

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.tokenizer_manager.get_internal_state = self.get_internal_state
            engines.append(self)

    mod = types.ModuleType("sglang")
    mod.Engine = Engine
    monkeypatch.setitem(sys.modules, "sglang", mod)

    def fake_requests(n, *, constrain, **kw):
        return [
            Request(
                prompt=(1, 2, 3, i),
                sampling=SamplingParams(max_new_tokens=16),
                model="m",
                regex="[a-z]+" if constrain else None,
            )
            for i in range(n)
        ]

    monkeypatch.setattr(gpu, "build_requests", fake_requests)
    out = tmp_path / "bench.json"
    peaks = []
    real_run_raw = gpu.run_raw

    def spy(engine, requests, window):
        engine.peak = 0
        got = real_run_raw(engine, requests, window)
        peaks.append((window, engine.peak))
        return got

    monkeypatch.setattr(gpu, "run_raw", spy)
    assert (
        gpu.main(
            [
                "--model",
                str(tmp_path),
                "--profile",
                "h100-80gb",
                "--n",
                "40",
                "--warmup",
                "0",
                "--batch-baseline",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    info = orjson.loads(out.read_bytes())
    by = {r["part"]: r for r in info["results"]}
    assert all(by[p]["failed"] == 1 for p in ("raw_free", "raw_regex", "sysgen_regex", "raw_batch"))
    window = info["regime"]["window"]
    assert window == 4 + 2 and info["regime"]["waiting_per_rank_max"] == 2
    assert peaks[:2] == [(window, window), (window, window)]  # raw_free, raw_regex: windowed
    assert peaks[2] == (None, 40)  # raw_batch: everything at once
    assert "windowed_vs_batch_output_tok_s" in info["ratios"]


@pytest.mark.gpu
@pytest.mark.skipif(
    "SYSGEN_GPU_TEST_MODEL" not in os.environ,
    reason="set SYSGEN_GPU_TEST_MODEL=/path/to/a/local/instruct/model",
)
@pytest.mark.skipif(not (sglang_installed() and detect_gpu()), reason="needs a CUDA GPU and SGLang")
def test_real_engine_small_run(tmp_path):
    out = tmp_path / "bench.json"
    assert (
        gpu.main(
            ["--model", os.environ["SYSGEN_GPU_TEST_MODEL"], "--n", "64", "--warmup", "8", "--json", str(out)]
        )
        == 0
    )
    info = orjson.loads(out.read_bytes())
    assert all(r["failed"] == 0 for r in info["results"])
    # Our path may cost something, but not half the engine's throughput.
    assert info["ratios"]["sysgen_vs_raw_output_tok_s"] > 0.5
