"""bench.sim: the simulated SGLang engine (cost model, prefix cache, scheduler), its calibration, and
a small streaming run of the real pipeline against it. Small sizes: seconds, not minutes."""

from __future__ import annotations

import random
from array import array
from dataclasses import replace

import pytest

from bench.sim.cache import BLOCK, PrefixCache, block_chain, compact_ids
from bench.sim.cost import CostModel, ModelSpec, engine_spec
from bench.sim.engine import SimEngine, SimReq


def _spec(**kw):
    return replace(engine_spec("h100-80gb"), **kw)


def _req(rid, prompt, out, shared=0, max_new=None, seed=None):
    """A request whose first `shared` tokens are a common template; the rest unique to it."""
    rng = random.Random(rid if seed is None else seed)
    ids = list(range(1, shared + 1)) + [rng.randrange(10**6, 10**7) for _ in range(prompt - shared)]
    return SimReq(rid, prompt, block_chain(ids), max_new or out, out, ids=array("i", ids))


def _drain(eng):
    done, t = [], 0.0
    while (out := eng.step()) is not None:
        t += out[0]
        done += out[1]
    return done, t


def test_decode_run_is_the_sum_of_its_steps():
    c = CostModel("h100-80gb", 3.35e12, 989e12, ModelSpec())
    n, ctx0, k = 200, 200 * 900, 37
    steps = sum(c.step_s(decode=n, decode_ctx=ctx0 + i * n, constrained=50) for i in range(k))
    assert c.decode_run_s(k, n, ctx0, 50) == pytest.approx(steps, rel=1e-9)


def test_decode_is_bandwidth_bound_and_prefill_compute_bound():
    c = CostModel("h100-80gb", 3.35e12, 989e12, ModelSpec())
    # 8B bf16 at 256 x 1000 context: (15 GB weights + 33.5 GB KV) / (0.8 x 3.35 TB/s) ~ 18 ms
    assert 0.015 < c.step_s(decode=256, decode_ctx=256_000) < 0.022
    assert c.step_s(decode=0, decode_ctx=0, prefill=8192) > 10 * c.step_s(decode=1, decode_ctx=1000)


def test_cache_shares_prefixes_and_evicts_leaves_first():
    cache = PrefixCache()
    a = block_chain(list(range(64)) + [7] * 32)  # 4 template blocks + 2 own
    b = block_chain(list(range(64)) + [9] * 32)
    assert cache.lock(a) == 6 and cache.match(b) == 4 and cache.lock(b) == 2
    cache.unlock(a)
    assert cache.evictable_tokens == 2 * BLOCK  # the template is still held by b
    cache.unlock(b)
    cache.evict(4 * BLOCK)  # the four leaves go first, never a template block
    assert cache.match(a) == 4 and cache.match(b) == 4


def test_a_match_goes_on_to_the_token_past_the_last_shared_block():
    """SGLang (page_size 1 on CUDA) matches a prompt to the token; memory stays in blocks here."""
    cache = PrefixCache()
    template = list(range(1, 75))  # 4 blocks + 10 tokens
    a = template + [7] * 40
    b = template + [9] * 40
    ca, cb = block_chain(a), block_chain(b)
    assert cache.match_tokens(cb, b) == 0
    cache.lock(ca, a)
    assert cache.match(cb) == 4 and cache.match_tokens(cb, b) == 74
    assert cache.match_tokens(cb, None) == 64  # without its ids, whole blocks only
    assert cache.match_tokens(ca, a) == len(ca) * BLOCK  # its own blocks; its 2-token tail is private
    short = template[:70]  # ends inside the fifth block: all 70 tokens are cached
    assert cache.match_tokens(block_chain(short), short) == 70
    cache.unlock(ca)
    cache.evict(3 * BLOCK)  # a's three leaves (the 10 shared tokens' block among them) go first
    assert cache.match_tokens(cb, b) == 64 and not cache.kids.get(ca[3])
    cache.evict(10**6)
    assert cache.match_tokens(cb, b) == 0 and not cache.kids and not cache.filed


def test_compact_ids_keep_large_vocabularies():
    assert compact_ids([1, 65535]).typecode == "H" and compact_ids([1, 128_000]).typecode == "i"
    assert list(compact_ids([5, 128_000])) == [5, 128_000]


def test_running_batch_never_exceeds_max_running_and_reports_cached_tokens():
    eng = SimEngine(_spec(max_running=8))
    peak = 0
    for i in range(40):
        eng.add(_req(i, 300, 20, shared=160))
    while eng.step() is not None:
        peak = max(peak, len(eng.running) + (eng.chunked is not None))
    assert peak == 8
    s = eng.stats
    assert s.output_tokens == 40 * 20
    assert s.cached_tokens == 39 * 160  # every request after the first finds the template cached

    eng = SimEngine(_spec(max_running=8))  # a template that ends inside a block: cached to the token
    for i in range(40):
        eng.add(_req(i, 300, 20, shared=170))
    _drain(eng)
    assert eng.stats.cached_tokens == 39 * 170


def test_kv_pool_limits_admission():
    eng = SimEngine(_spec(max_running=256, kv_tokens=4000))
    for i in range(50):
        eng.add(_req(i, 500, 100))
    eng.step()
    assert 0 < len(eng.running) + (eng.chunked is not None) < 8  # 600 tokens each, 4000 in the pool
    done, _ = _drain(eng)
    assert len(done) == 50


def test_chunked_prefill_splits_a_long_prompt():
    eng = SimEngine(_spec(chunked_prefill=1024))
    eng.add(_req(0, 5000, 5))
    forwards = 0
    while not eng.running:
        eng.step()
        forwards += 1
    assert forwards == 5  # ceil(5000 / 1024)


def test_lpm_while_few_wait_fcfs_beyond():
    def order(n_waiting):
        eng = SimEngine(_spec(max_running=1, lpm_limit=128))
        eng.add(_req(0, 512, 1, shared=512, seed=0))  # caches a 512-token template
        _drain(eng)
        for i in range(1, n_waiting):
            eng.add(_req(i, 512, 1, seed=i))  # nothing shared
        eng.add(_req(n_waiting, 512, 1, shared=512, seed=0))  # the template: longest match, last in
        return [r.rid for r in _drain(eng)[0]]

    assert order(10)[0] == 10  # lpm: the cached one first
    fcfs = order(200)  # over 128 waiting: arrival order, until the queue is down to 128
    assert fcfs[:71] == list(range(1, 72)) and fcfs[72] == 200


def test_calibration_lands_near_the_published_figure():
    from bench.sim.calibrate import PUBLISHED, calibrate

    res = calibrate()  # 5000 requests, as published (~1 s)
    assert res["published"] is PUBLISHED
    assert 0.85 <= res["calibration_ratio"] <= 1.15


@pytest.mark.slow
def test_prefill_check_on_the_h100():
    from bench.sim.calibrate import prefill_check

    assert 0.85 <= prefill_check()["ratio"] <= 1.15


def test_the_simulation_is_never_an_auto_choice():
    from engine.backends.select import _NAMES, choose_backend

    assert "sim" not in _NAMES
    for cuda in (True, False):
        for sg in (True, False):
            chosen = choose_backend("auto", cuda_available=cuda, sglang_available=sg)[0]
            assert chosen in ("openvino", "sglang")


def test_workload_markers(tmp_path, shared_data, smol_tokenizer):
    from bench.sim.workload import build, parse_marker

    wl = build(tmp_path / "w.jsonl", 30, smol_tokenizer, data_dir=shared_data, turns=2)
    lines = (tmp_path / "w.jsonl").read_text().splitlines()
    assert len(lines) == 30 and sum(d["drawn"] for d in wl.datasets.values()) == 30
    assert parse_marker(lines[7]) is not None and "[#7.0]" in lines[7]
    assert all(len(a) <= 2 for a in wl.answers)
    longer = build(
        tmp_path / "p.jsonl", 30, smol_tokenizer, data_dir=shared_data, turns=2, paper_answers=True
    )
    assert sum(a[0] for a in longer.answers) > 1.3 * sum(a[0] for a in wl.answers)  # samples answer shorter


@pytest.mark.slow
def test_missing_data_is_a_clear_error(tmp_path, smol_tokenizer):
    from bench.sim.workload import NoData, build

    with pytest.raises(NoData, match="absent"):
        build(tmp_path / "w.jsonl", 5, smol_tokenizer, data_dir=tmp_path / "nope")


def test_streaming_run_through_the_real_pipeline(tmp_path, shared_data, smol_tokenizer):
    from bench.sim.run import batch, stream
    from bench.sim.workload import build

    n = 60
    wl = build(tmp_path / "w.jsonl", n, smol_tokenizer, data_dir=shared_data)
    spec = _spec(max_running=16)
    res, rec = stream(wl, spec, smol_tokenizer, workdir=tmp_path)
    assert res["kept"] + res["dropped"] == n
    assert len(rec.calls["p1"]) == n  # every instance reached the engine: markers keep rows distinct
    assert res["engine_calls"] == sum(map(len, rec.calls.values()))
    assert res["virtual_s"] > 0 and res["wrapper_cpu_s"] > 0
    p4 = res["by_phase"]["p4"]
    real = sum(sum(a) for a in wl.answers)  # the real rows' answer lengths, every turn (P4 answers all)
    assert p4["requests"] > 0.9 * n and p4["output_tokens"] <= real
    assert res["by_phase"]["p1"]["cached_tokens"] > 0.4 * res["by_phase"]["p1"]["prompt_tokens"]
    base = batch(spec, rec)
    assert base["output_tokens"] == res["output_tokens"]
    assert 0.5 < base["virtual_s"] / res["virtual_s"] < 2


def test_a_kept_answer_serves_the_next_turn():
    """Multi-turn chains: turn j+1's prompt is turn j's prompt + answer + the next user turn."""
    eng = SimEngine(_spec())
    turn1 = list(range(1000, 1320))
    answer = list(range(5000, 5160))
    first = SimReq(0, len(turn1), block_chain(turn1), 160, 160, keep=block_chain(turn1 + answer))
    eng.add(first)
    _drain(eng)
    nxt = turn1 + answer + list(range(9000, 9100))
    eng.add(SimReq(1, len(nxt), block_chain(nxt), 10, 10))
    (second,), _ = _drain(eng)
    assert second.cached == 480  # 320 + 160: the whole first turn, answer included


def test_block_chain_of_a_partial_block():
    assert len(block_chain(array("q", range(BLOCK * 3 + 5)))) == 3


def test_p3_continuing_p1_is_served_from_p1s_cached_prompt_and_answer(tmp_path, shared_data, smol_tokenizer):
    from bench.sim.run import stream
    from bench.sim.workload import build

    n = 20
    wl = build(tmp_path / "w.jsonl", n, smol_tokenizer, data_dir=shared_data, turns=1)
    spec = _spec(max_running=16)
    by = {}
    for mode in ("standalone", "continue"):
        res, _ = stream(wl, spec, smol_tokenizer, workdir=tmp_path, keep_outputs=True, p3_context=mode)
        assert res["kept"] + res["dropped"] == n
        by[mode] = res["by_phase"]
    p1, p3 = by["continue"]["p1"], by["continue"]["p3"]
    # each P3 prompt starts with its P1 prompt + answer, kept in the cache: more than all of P1's
    # prompts is served (the simulated P1 reports an estimate of its answer's tokens, not the count)
    assert p3["cached_tokens"] > p1["prompt_tokens"]
    assert p3["cached_tokens"] > 3 * by["standalone"]["p3"]["cached_tokens"]
    assert by["standalone"]["p1"] == p1  # P1 is the same either way
