"""The grammar benchmark's core on a tiny workload: a byte-level vocabulary (no model files needed)."""

from __future__ import annotations

import math
import re

import pytest
import xgrammar as xgr

from bench import grammar

EOS = 256


def _byte_vocab() -> xgr.TokenizerInfo:
    vocab = [bytes([b]) for b in range(256)] + ["</s>"]
    return xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, stop_token_ids=[EOS])


def _encode(text: str) -> list[int]:
    return list(text.encode())


P3 = "".join(f"{t}: (?:Good|Bad|None)\n" for t in grammar.TAGS)


def _run(**kw):
    shapes = {
        "branch_star": grammar.p1_branching(grammar.PHRASES["star"]),
        "optional_bound100": grammar.p1_optional(grammar.PHRASES["bound100"]),
    }
    return grammar.run(
        _byte_vocab(),
        _encode,
        eos_id=EOS,
        shapes=shapes,
        p3=P3,
        texts=grammar.TAGGED_OUTPUTS[:2],
        batch=8,
        steps=3,
        threads=(1, 2),
        **kw,
    )


def _positive_finite(x: object) -> bool:
    return isinstance(x, float | int) and math.isfinite(x) and x > 0


def test_core_reports_required_keys_as_positive_finite_numbers():
    res = _run()
    for key in (
        "mask_us_p50",
        "mask_us_p90",
        "step_ms_bs8",
        "predicted_constrained_ratio",
        "predicted_constrained_ratio_overlapped",
        "gpu_step_ms",
    ):
        assert _positive_finite(res[key]), (key, res[key])
    assert res["mask_us_p90"] >= res["mask_us_p50"]
    assert res["predicted_constrained_ratio"] >= res["predicted_constrained_ratio_overlapped"] >= 1.0
    names = [s["name"] for s in res["shapes"]] + [res["p3"]["name"]]
    assert names == ["branch_star", "optional_bound100", "p3_all_tags"]
    assert [s["walked"] for s in res["shapes"]] == [2, 2]
    assert set(res["predicted_ratio_by_shape"]) == set(names)
    assert all(r["no_overlap"] >= r["overlap"] >= 1.0 for r in res["predicted_ratio_by_shape"].values())
    for shape in [*res["shapes"], res["p3"]]:
        assert _positive_finite(shape["compile_s"]) and _positive_finite(shape["mask_us_p50"])
        assert set(shape["step_ms_bs"]) == {"loop_1thread", "batch_1threads", "batch_2threads"}
        assert all(_positive_finite(v) for v in shape["step_ms_bs"].values())


def test_batch_256_names_the_key_the_brief_asks_for():
    res = _run(reference="optional_bound100")
    assert res["reference_shape"] == "optional_bound100"
    assert "step_ms_bs256" not in res  # batch 8 here; the key appears only for the real batch size
    shapes = {"s": grammar.p1_optional(grammar.PHRASES["star"])}
    full = grammar.run(
        _byte_vocab(),
        _encode,
        eos_id=EOS,
        shapes=shapes,
        p3=P3,
        texts=grammar.TAGGED_OUTPUTS[:1],
        steps=1,
        threads=(1,),
    )
    assert _positive_finite(full["step_ms_bs256"])


def test_walk_texts_are_in_every_shape_and_shapes_require_a_tag():
    for name, rx in grammar.p1_shapes().items():
        for text in grammar.TAGGED_OUTPUTS:
            if "bound100" in name and any(len(p) > 100 for p in re.findall(r">([^<]*)</", text)):
                continue
            assert re.fullmatch(rx, text), (name, text)
        assert (re.fullmatch(rx, "") is None) == name.startswith("branch_"), name


def test_a_shape_that_admits_no_walk_text_is_an_error():
    with pytest.raises(ValueError, match="admits none"):
        grammar.run(
            _byte_vocab(),
            _encode,
            eos_id=EOS,
            shapes={"tiny": grammar.p1_optional(r"[a-z]{1,3}")},
            p3=P3,
            texts=grammar.TAGGED_OUTPUTS[:1],
            batch=2,
            steps=1,
            threads=(1,),
        )


def test_walk_rejects_text_outside_the_grammar():
    compiled = xgr.GrammarCompiler(_byte_vocab()).compile_regex(grammar.p1_branching(grammar.PHRASES["star"]))
    with pytest.raises(ValueError, match="not in the grammar"):
        grammar.walk_mask_us(compiled, 257, [_encode("<Task>x</Task>\n<Role>y</Role>\n") + [EOS]])


def test_gpu_model_arithmetic():
    m = grammar.GpuModel(context=1000)
    expected_ms = (16e9 + 131072 * 256 * 1000) / 3.35e12 * 1e3
    assert m.step_ms() == pytest.approx(expected_ms)
    assert f"{expected_ms:.2f} ms" in m.arithmetic()
