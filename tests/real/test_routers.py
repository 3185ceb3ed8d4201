"""Through each router users put in front of vLLM servers (smg, sglang-router, vllm-router, one
worker each here: the session's server): `--engine vllm_http` keeps rows with P1 inside its regex
(prompts go as text where the router refuses token ids), reads the context through the router and
watches the worker's own /metrics for stalls;
`--engine openai --openai-server vllm` works through smg and is refused before any row through
sglang-router, whose chat route drops the regex field."""

from __future__ import annotations

import pytest

try:
    from tests.real.checks import ids_once, lines, p1_violations, stats, stored_p1
    from tests.real.runs import run, sysgen_cmd, write_inputs
    from tests.real.servers import MAX_MODEL_LEN
except ImportError:
    from checks import ids_once, lines, p1_violations, stats, stored_p1
    from runs import run, sysgen_cmd, write_inputs
    from servers import MAX_MODEL_LEN

pytestmark = pytest.mark.real_engine
ROWS = 2
SHORT = ("--p1-max-tokens", "48", "--p4-max-tokens", "16")


def engine_drops(s: dict) -> dict:
    return {k: v for k, v in s["dropped"].items() if "engine" in k}


@pytest.mark.parametrize("name", ["smg", "sglang-router", "vllm-router"])
def test_vllm_http_through_a_router_keeps_the_regex(name, router_factory, model_dir, tmp_path):
    url = router_factory(name)
    inp, out = write_inputs(tmp_path / "in.jsonl", ROWS), tmp_path / "out"
    done = run(sysgen_cmd(inp, out, url, model_dir, *SHORT))
    assert done.returncode == 0, done.stderr[-3000:]
    s = stats(out)
    assert engine_drops(s) == {} and s["this_run"]["scheduler"]["engine_calls"] >= ROWS, s["dropped"]
    assert set(ids_once(out).values()) == {1} and len(ids_once(out)) == ROWS
    results = stored_p1(out)
    assert len(results) == ROWS and p1_violations(results) == []
    # The context comes through the router (its /workers, or a worker's own card), never 1,048,576.
    assert f"(context {MAX_MODEL_LEN}," in done.stderr, done.stderr[-2000:]
    # Liveness reads the worker behind the router, not the router's pick of /metrics.
    assert "liveness: watching the 1 worker(s) behind" in done.stderr, done.stderr[-2000:]
    if name in ("smg", "sglang-router"):
        assert "refuses token-id prompts" in done.stderr


def test_openai_route_through_sglang_router_is_refused_before_any_row(router_factory, model_dir, tmp_path):
    url = router_factory("sglang-router")
    inp, out = write_inputs(tmp_path / "in.jsonl", ROWS), tmp_path / "out"
    done = run(sysgen_cmd(inp, out, url, model_dir, *SHORT, "--openai-server", "vllm", engine="openai"))
    assert done.returncode == 2, done.stderr[-2000:]  # a configuration error, like a wrong --url
    assert "ignores the regex field" in done.stderr and "smg launch --backend vllm" in done.stderr
    assert lines(out / "data.jsonl") == [] and lines(out / "dropped.jsonl") == []


def test_openai_route_through_smg_keeps_the_regex(router_factory, model_dir, tmp_path):
    url = router_factory("smg")
    inp, out = write_inputs(tmp_path / "in.jsonl", ROWS), tmp_path / "out"
    done = run(sysgen_cmd(inp, out, url, model_dir, *SHORT, "--openai-server", "vllm", engine="openai"))
    assert done.returncode == 0, done.stderr[-3000:]
    results = stored_p1(out)
    assert len(results) == ROWS and p1_violations(results) == []
