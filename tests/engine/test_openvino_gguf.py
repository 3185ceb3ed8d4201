"""The GGUF file OpenVINO loads: Q4_1 tensors re-encoded as F16 (engine/backends/model_cache.py).

First on small GGUF files written here (no model), then on the real SmolLM2 GGUF against the exact
dequantization run by transformers (marked `model`)."""

from __future__ import annotations

import numpy as np
import pytest

from engine.backends.model_cache import openvino_gguf

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType


def _write(path, tensors: dict[str, tuple[np.ndarray, Q]]) -> None:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_string("general.name", "tiny test model")
    w.add_array("tokenizer.ggml.tokens", ["<a>", "<b>", "c"])
    w.add_float32("llama.rope.freq_base", 100000.0)
    for name, (x, qtype) in tensors.items():
        if qtype == Q.F32:
            w.add_tensor(name, x)
        else:
            q = gguf.quants.quantize(x, qtype)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _types(path) -> set[str]:
    return {t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


def _fields(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def test_q4_1_tensors_become_their_exact_values_in_f16_and_the_rest_is_copied(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "m.gguf"
    _write(
        src,
        {
            "blk.0.attn_q.weight": (rng.standard_normal((8, 64)).astype(np.float32), Q.Q4_1),
            "token_embd.weight": (rng.standard_normal((4, 64)).astype(np.float32), Q.Q8_0),
            "output_norm.weight": (rng.standard_normal(64).astype(np.float32), Q.F32),
        },
    )
    assert _types(src) == {"Q4_1", "Q8_0", "F32"}

    out, kind = openvino_gguf(src, cache_root=tmp_path / "cache")
    assert kind == "f16" and out != src and out.name == src.name
    assert out.is_relative_to(tmp_path / "cache" / "gguf")

    before, after = gguf.GGUFReader(str(src)), gguf.GGUFReader(str(out))
    assert _fields(after) == _fields(before)
    old = {t.name: t for t in before.tensors}
    new = {t.name: t for t in after.tensors}
    assert list(new) == list(old)
    q = new["blk.0.attn_q.weight"]
    assert q.tensor_type == Q.F16
    exact = gguf.quants.dequantize(old["blk.0.attn_q.weight"].data, Q.Q4_1)
    np.testing.assert_array_equal(np.asarray(q.data), exact.astype(np.float16))
    for name in ("token_embd.weight", "output_norm.weight"):  # not re-encoded: the same bytes
        assert new[name].tensor_type == old[name].tensor_type
        np.testing.assert_array_equal(np.asarray(new[name].data), np.asarray(old[name].data))
    assert "Q4_1" not in _types(out)


def test_past_the_f16_size_limit_the_copy_holds_q8_0(tmp_path):
    rng = np.random.default_rng(1)
    src = tmp_path / "m.gguf"
    _write(src, {"blk.0.attn_q.weight": (rng.standard_normal((8, 64)).astype(np.float32), Q.Q4_1)})
    out, kind = openvino_gguf(src, cache_root=tmp_path / "cache", f16_max_bytes=1000)  # F16 would be 1,024
    assert kind == "q8_0" and _types(out) == {"Q8_0"}
    exact = gguf.quants.dequantize(gguf.GGUFReader(str(src)).tensors[0].data, Q.Q4_1)
    near = gguf.quants.dequantize(gguf.GGUFReader(str(out)).tensors[0].data, Q.Q8_0)
    step = np.abs(exact).reshape(8, 2, 32).max(axis=2, keepdims=True) / 127  # Q8_0's step per block
    assert np.all(np.abs(near - exact).reshape(8, 2, 32) <= step * 0.51 + 1e-3)
    assert openvino_gguf(src, cache_root=tmp_path / "cache", f16_max_bytes=1000) == (out, "q8_0")


def test_the_copy_is_written_once_and_a_changed_source_gets_a_new_one(tmp_path, monkeypatch):
    src = tmp_path / "m.gguf"
    _write(src, {"blk.0.ffn_up.weight": (np.ones((2, 32), np.float32), Q.Q4_1)})
    cache = tmp_path / "cache"
    first, _ = openvino_gguf(src, cache_root=cache)
    stamp = first.stat().st_mtime_ns

    def no_reading(path):
        raise AssertionError("the GGUF was read again although its copy exists")

    monkeypatch.setattr(gguf, "GGUFReader", no_reading)
    assert openvino_gguf(src, cache_root=cache) == (first, "f16") and first.stat().st_mtime_ns == stamp
    monkeypatch.undo()

    _write(src, {"blk.0.ffn_up.weight": (np.full((2, 32), 2.0, np.float32), Q.Q4_1)})
    second, _ = openvino_gguf(src, cache_root=cache)
    assert second != first
    values = np.asarray(gguf.GGUFReader(str(second)).tensors[0].data)
    np.testing.assert_allclose(values, 2.0, rtol=1e-3)


def test_a_gguf_without_q4_1_is_loaded_as_it_is(tmp_path):
    src = tmp_path / "m.gguf"
    _write(src, {"blk.0.attn_k.weight": (np.ones((2, 32), np.float32), Q.Q8_0)})
    assert openvino_gguf(src, cache_root=tmp_path / "cache") == (src, "")
    assert not (tmp_path / "cache" / "gguf").exists()


# -- the real model ----------------------------------------------------------------------------------


@pytest.mark.model
def test_openvino_runs_the_model_the_gguf_holds(smol_gguf, smol_dir):
    """Teacher-forced greedy choices of OpenVINO (fp32 compute) against transformers on the exact
    dequantized weights, over 40 tokens OpenVINO generated itself. The Q4_1 file as OpenVINO reads it
    disagrees (measured 40 of 60 on this prompt, logits up to 4.5 apart); the re-encoded copy agrees."""
    import openvino
    import openvino_genai as og
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_dir)
    model = AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.float32).eval()
    msgs = [
        {"role": "system", "content": "You are a running coach. Give practical advice."},
        {"role": "user", "content": "I want to start running. How far should I run in my first week?"},
    ]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    ids = tok.encode(ids, add_special_tokens=False)

    def agreement(path) -> float:
        pipe = og.LLMPipeline(str(path), "CPU", INFERENCE_PRECISION_HINT="f32", KV_CACHE_PRECISION="f32")
        out = pipe.generate(
            openvino.Tensor(np.array([ids], dtype=np.int64)),
            og.GenerationConfig(max_new_tokens=40, ignore_eos=True),
        )
        gen = list(out.tokens[0])
        with torch.no_grad():
            logits = model(torch.tensor([ids + gen])).logits[0, len(ids) - 1 : -1]
        return float((logits.argmax(-1) == torch.tensor(gen)).float().mean())

    assert agreement(openvino_gguf(smol_gguf)[0]) >= 0.95
    # Why the copy exists: if this starts to pass, OpenVINO reads Q4_1 right and the copy can go.
    assert agreement(smol_gguf) < 0.9
