"""New vs original answers, as the paper's Table 1: ROUGE-1/2/L F1, GLEU, length ratio.

Conventions (stated again in the report): every score is a mean over instance pairs, scaled to
0-100, the original answer is the reference and the new answer the candidate. GLEU is nltk's
`corpus_gleu` over all pairs (the paper's number), with the mean `sentence_gleu` beside it.
"Len." is mean new length / mean original length, in words (whitespace split) and in characters.
Instances without an original answer (prompt-only data) take part only in the new-answer length.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import fmean
from typing import Any

_GLEU_TOKEN = re.compile(r"\w+|[^\w\s]")


@dataclass(frozen=True, slots=True)
class Pair:
    """One instance's answers; `original` is None for prompt-only data."""

    id: str
    source: str
    new: str
    original: str | None

    @property
    def has_original(self) -> bool:
        return bool(self.original and self.original.strip())


def gleu_tokens(text: str) -> list[str]:
    """Lower-cased words and punctuation marks: GLEU needs tokens, and nltk's punkt models are a
    download we cannot make offline, so a regex splits instead."""
    return _GLEU_TOKEN.findall(text.lower())


def rouge_scores(pairs: Sequence[Pair], use_stemmer: bool = True) -> list[dict[str, float]]:
    """ROUGE-1/2/L F1 (0-100) per pair, original as reference; pairs must all have an original."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=use_stemmer)
    out = []
    for p in pairs:
        s = scorer.score(target=p.original or "", prediction=p.new)
        out.append({k: 100.0 * v.fmeasure for k, v in s.items()})
    return out


def gleu(pairs: Sequence[Pair]) -> tuple[float, list[float]]:
    """(corpus GLEU over all pairs, per-pair sentence GLEU), both 0-100."""
    from nltk.translate.gleu_score import corpus_gleu, sentence_gleu

    refs = [[gleu_tokens(p.original or "")] for p in pairs]
    hyps = [gleu_tokens(p.new) for p in pairs]
    if not pairs:
        return float("nan"), []
    corpus = 100.0 * corpus_gleu(refs, hyps)
    per = [100.0 * sentence_gleu(r, h) for r, h in zip(refs, hyps, strict=True)]
    return corpus, per


def lengths(pairs: Sequence[Pair]) -> dict[str, Any]:
    """Mean lengths in words and characters and the ratio new/original (ratio of the means, over
    the pairs that have an original, so both means cover the same instances)."""
    with_orig = [p for p in pairs if p.has_original]
    out: dict[str, Any] = {
        "new_words_all": _mean([len(p.new.split()) for p in pairs]),
        "new_chars_all": _mean([len(p.new) for p in pairs]),
    }
    for unit, size in (("words", lambda s: len(s.split())), ("chars", len)):
        orig = _mean([size(p.original or "") for p in with_orig])
        new = _mean([size(p.new) for p in with_orig])
        out[f"original_{unit}"] = orig
        out[f"new_{unit}"] = new
        out[f"ratio_{unit}"] = new / orig if with_orig and orig else float("nan")
    return out


def _mean(values: Sequence[float]) -> float:
    return fmean(values) if values else float("nan")


def answer_metrics(
    pairs: Sequence[Pair],
    *,
    extra_per_pair: dict[str, Sequence[float]] | None = None,
    use_stemmer: bool = True,
) -> dict[str, Any]:
    """Table 1 for one group of pairs. `extra_per_pair` holds per-pair scores computed elsewhere
    (BERTScore, BLEURT), aligned with the pairs that have an original answer, in order."""
    with_orig = [p for p in pairs if p.has_original]
    out: dict[str, Any] = {
        "instances": len(pairs),
        "with_original": len(with_orig),
        "without_original": len(pairs) - len(with_orig),
    }
    rouge = rouge_scores(with_orig, use_stemmer=use_stemmer)
    for key in ("rouge1", "rouge2", "rougeL"):
        out[key] = _mean([r[key] for r in rouge])
    corpus, per = gleu(with_orig)
    out["gleu_corpus"] = corpus
    out["gleu_sentence_mean"] = _mean(per)
    for name, values in (extra_per_pair or {}).items():
        if len(values) != len(with_orig):
            raise ValueError(f"{name}: {len(values)} scores for {len(with_orig)} pairs with an original")
        out[name] = _mean(list(values))
    out["length"] = lengths(pairs)
    return out


def by_source(
    pairs: Sequence[Pair], extra_per_pair: dict[str, Sequence[float]] | None = None, use_stemmer: bool = True
) -> dict[str, dict[str, Any]]:
    """answer_metrics per source, plus "all"; extra scores are split along with their pairs."""
    extra = extra_per_pair or {}
    index = {id(p): i for i, p in enumerate(p for p in pairs if p.has_original)}
    groups: dict[str, list[Pair]] = {}
    for p in pairs:
        groups.setdefault(p.source, []).append(p)
    out = {}
    for source, group in groups.items():
        sub = {k: [v[index[id(p)]] for p in group if p.has_original] for k, v in extra.items()}
        out[source] = answer_metrics(group, extra_per_pair=sub, use_stemmer=use_stemmer)
    out["all"] = answer_metrics(pairs, extra_per_pair=extra, use_stemmer=use_stemmer)
    return out
