"""What our regex constraints cost in xgrammar on the CPU, and what that means next to a GPU step.

    python -m bench.grammar --json bench-grammar.json

Per regex shape: compile time, the time to fill one sequence's next-token mask (walking realistic
tagged outputs token by token), and the time to fill a whole decode step's masks for 256 sequences.
The step time is then set against a modelled 8B-on-H100 decode step (arithmetic in `gpu_step_ms`).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson
import xgrammar as xgr

TAGS = ("Role", "Content", "Task", "Action", "Style", "Background", "Tool", "Format")

# Phrase bodies to compare. sysgen.tags used "bound300" until this benchmark showed its cost; it
# now uses the "star" shape and enforces the length in P2.
# Nested bounded repeats such as (?:[^<>\n]{0,20}){0,15} are left out: compiling one took > 10 min.
PHRASES = {
    "bound300": r"[^<>\n ][^<>\n]{0,299}",
    "bound100": r"[^<>\n ][^<>\n]{0,99}",
    "words60": r"[^<>\n ]+(?: [^<>\n ]+){0,59}",
    "star": r"[^<>\n ][^<>\n]*",
}

# Tagged system messages of the kind P1 produces (written for this benchmark), walked token by token.
TAGGED_OUTPUTS = (
    "<Role>You are a patient math tutor for high-school students.</Role>\n"
    "<Task>Solve the word problem step by step and state the final number clearly.</Task>\n"
    "<Style>Use short sentences and plain language.</Style>\n"
    "<Format>End with a line of the form 'Answer: N'.</Format>\n",
    "<Role>You are a senior Python engineer reviewing code.</Role>\n"
    "<Content>Focus on correctness, edge cases and readability of the submitted function.</Content>\n"
    "<Action>Point out each bug, explain why it is wrong, then give a corrected version.</Action>\n"
    "<Tool>You may assume the standard library only; no third-party packages.</Tool>\n"
    "<Format>Answer in Markdown with one fenced code block.</Format>\n",
    "<Task>Summarise the passage in three sentences for a general audience.</Task>\n",
    "<Role>You are a friendly travel assistant.</Role>\n"
    "<Style>Warm, encouraging, concrete; avoid jargon.</Style>\n"
    "<Background>The user is planning a first trip abroad on a limited budget.</Background>\n",
    "<Content>Questions about European history between 1815 and 1914.</Content>\n"
    "<Task>Answer the question accurately, citing the key events and their dates.</Task>\n"
    "<Action>If the question is ambiguous, state the interpretation you chose before answering.</Action>\n"
    "<Format>Two or three paragraphs, no bullet points.</Format>\n",
    "<Role>You are an assistant that writes SQL for a PostgreSQL 15 database.</Role>\n"
    "<Tool>The schema is given in the user's message; do not invent tables or columns.</Tool>\n"
    "<Format>Return only the query, then one sentence explaining it.</Format>\n",
    # Verbose phrases (150-290 characters), as larger models often write for Content and Background:
    # mask cost inside a bounded repeat grows with the position in the phrase, so these matter.
    "<Role>You are a meticulous research assistant for graduate students in molecular biology.</Role>\n"
    "<Background>The user is preparing a literature review on CRISPR off-target effects, has read the "
    "foundational papers already, and needs help organising recent findings by method, organism and year "
    "of publication.</Background>\n"
    "<Format>A table followed by a short paragraph.</Format>\n",
    "<Content>Questions about personal finance for young adults, including budgeting on an irregular "
    "income, building an emergency fund, paying down high-interest debt first, choosing between a "
    "workplace pension and a private account, and avoiding common scams aimed at first-time investors."
    "</Content>\n"
    "<Style>Practical and non-judgemental.</Style>\n",
)


def tag_line(tag: str, phrase: str) -> str:
    return f"<{tag}>{phrase}</{tag}>\n"


def p1_branching(phrase: str) -> str:
    """At least one tag, in order, each at most once: branch on the first tag (sysgen.tags' shape)."""
    branches = []
    for i, tag in enumerate(TAGS):
        rest = "".join(f"(?:{tag_line(t, phrase)})?" for t in TAGS[i + 1 :])
        branches.append(tag_line(tag, phrase) + rest)
    return "(?:" + "|".join(branches) + ")"


def p1_optional(phrase: str) -> str:
    """Every tag optional (admits the empty string: P2 must then drop empty outputs)."""
    return "".join(f"(?:{tag_line(t, phrase)})?" for t in TAGS)


def p1_shapes() -> dict[str, str]:
    shapes = {f"branch_{k}": p1_branching(v) for k, v in PHRASES.items()}
    shapes |= {f"optional_{k}": p1_optional(v) for k, v in PHRASES.items() if k in ("bound300", "star")}
    return shapes


@dataclass
class ShapeCost:
    name: str
    regex_chars: int
    walked: int  # walk texts this shape admits
    compile_s: float
    grammar_bytes: int
    mask_us_p50: float
    mask_us_p90: float
    mask_us_p99: float
    mask_us_max: float
    step_ms_bs: dict[str, float]  # method -> median ms to fill the masks of `batch` sequences


def measure_shape(
    info: xgr.TokenizerInfo,
    name: str,
    regex: str,
    walks: Sequence[Sequence[int]],
    *,
    batch: int,
    steps: int,
    threads: Sequence[int],
) -> ShapeCost:
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    t0 = time.perf_counter()
    grammar = compiler.compile_regex(regex)
    compile_s = time.perf_counter() - t0
    per_token = walk_mask_us(grammar, info.vocab_size, walks)
    step = batch_step_ms(grammar, info.vocab_size, walks, batch=batch, steps=steps, threads=threads)
    return ShapeCost(
        name,
        len(regex),
        len(walks),
        compile_s,
        grammar.memory_size_bytes,
        _pct(per_token, 50),
        _pct(per_token, 90),
        _pct(per_token, 99),
        max(per_token),
        step,
    )


def walk_mask_us(
    grammar: xgr.CompiledGrammar, vocab_size: int, walks: Sequence[Sequence[int]]
) -> list[float]:
    """Microseconds per fill_next_token_bitmask, one per token of every walk (EOS position included)."""
    bitmask = xgr.allocate_token_bitmask(1, vocab_size)
    times = []
    for ids in walks:
        m = xgr.GrammarMatcher(grammar)
        for tok in ids:
            t0 = time.perf_counter()
            m.fill_next_token_bitmask(bitmask, 0)
            times.append((time.perf_counter() - t0) * 1e6)
            if not m.accept_token(tok):
                raise ValueError(f"walk text is not in the grammar (token {tok} rejected)")
    return times


def batch_step_ms(
    grammar: xgr.CompiledGrammar,
    vocab_size: int,
    walks: Sequence[Sequence[int]],
    *,
    batch: int,
    steps: int,
    threads: Sequence[int],
) -> dict[str, float]:
    """Median ms to fill `batch` masks per decode step, sequences spread over random walk offsets."""
    rng = random.Random(0)
    bitmask = xgr.allocate_token_bitmask(batch, vocab_size)
    cursors = []
    for _ in range(batch):
        walk = rng.choice(walks)
        m = xgr.GrammarMatcher(grammar)
        pos = rng.randrange(len(walk))
        for tok in walk[:pos]:
            m.accept_token(tok)
        cursors.append([m, walk, pos])

    def advance() -> None:
        for c in cursors:
            m, walk, pos = c
            if pos + 1 >= len(walk):  # restart finished sequences, as new requests would
                m.reset()
                c[2] = 0
            else:
                m.accept_token(walk[pos])
                c[2] = pos + 1

    matchers = [c[0] for c in cursors]
    fills: dict[str, Callable[[], None]] = {
        "loop_1thread": lambda: [m.fill_next_token_bitmask(bitmask, i) for i, m in enumerate(matchers)],
    }
    for n in threads:
        bm = xgr.BatchGrammarMatcher(max_threads=n)
        fills[f"batch_{n}threads"] = lambda bm=bm: bm.batch_fill_next_token_bitmask(matchers, bitmask)
    out: dict[str, list[float]] = {k: [] for k in fills}
    for _ in range(steps):
        for name, fill in fills.items():
            t0 = time.perf_counter()
            fill()
            out[name].append((time.perf_counter() - t0) * 1e3)
        advance()
    return {k: statistics.median(v) for k, v in out.items()}


@dataclass(frozen=True)
class GpuModel:
    """A decode step of an 8B model at batch 256 on one H100 SXM, bandwidth-bound.

    weights 8e9 params x 2 B (bf16) = 16 GB; KV per token (Llama-3-8B: 32 layers x 8 KV heads x 128
    dims x 2 (K,V) x 2 B) = 131,072 B, times 256 sequences x `context` tokens; both read once per step
    at the 3.35 TB/s HBM peak. Peak bandwidth makes the step a lower bound, so the ratios an upper bound.
    """

    params: float = 8e9
    bytes_per_param: int = 2
    kv_bytes_per_token: int = 32 * 8 * 128 * 2 * 2
    batch: int = 256
    context: int = 1200  # P1 prompt (shared template + conversation) plus its output, on average
    hbm_bytes_per_s: float = 3.35e12

    def step_ms(self) -> float:
        weights = self.params * self.bytes_per_param
        kv = self.kv_bytes_per_token * self.batch * self.context
        return (weights + kv) / self.hbm_bytes_per_s * 1e3

    def arithmetic(self) -> str:
        w = self.params * self.bytes_per_param / 1e9
        kv = self.kv_bytes_per_token * self.batch * self.context / 1e9
        bw = self.hbm_bytes_per_s / 1e12
        return (
            f"({w:.1f} GB weights + {kv:.1f} GB KV [{self.kv_bytes_per_token} B/token x {self.batch} "
            f"seqs x {self.context} tokens]) / {bw:.2f} TB/s = {self.step_ms():.2f} ms"
        )


def run(
    info: xgr.TokenizerInfo,
    encode: Callable[[str], list[int]],
    *,
    eos_id: int,
    shapes: dict[str, str],
    p3: str,
    texts: Sequence[str] = TAGGED_OUTPUTS,
    batch: int = 256,
    steps: int = 20,
    threads: Sequence[int] = (),
    gpu: GpuModel | None = None,
    reference: str | None = None,
) -> dict[str, Any]:
    """The benchmark's core: costs per shape plus the GPU comparison for `reference` (default: first)."""
    threads = tuple(threads) or tuple(sorted({1, os.cpu_count() or 1}))
    costs = []
    for name, rx in shapes.items():
        # A shape walks only the texts it admits (a 100-character bound cannot express a 280-character
        # phrase); `walked` says how many that was.
        walks = [encode(t) + [eos_id] for t in texts if re.fullmatch(rx, t)]
        if not walks:
            raise ValueError(f"shape {name} admits none of the walk texts")
        costs.append(measure_shape(info, name, rx, walks, batch=batch, steps=steps, threads=threads))
    p3_walks = [encode(v) + [eos_id] for v in _p3_texts()]
    p3_cost = measure_shape(info, "p3_all_tags", p3, p3_walks, batch=batch, steps=steps, threads=threads)
    gpu = gpu or GpuModel(batch=batch)
    ref = next(c for c in costs if c.name == (reference or costs[0].name))
    step_gpu = gpu.step_ms()
    mask_step = min(ref.step_ms_bs.values())
    result = {
        "reference_shape": ref.name,
        "mask_us_p50": ref.mask_us_p50,
        "mask_us_p90": ref.mask_us_p90,
        f"step_ms_bs{batch}": mask_step,
        "gpu_step_ms": step_gpu,
        "gpu_step_arithmetic": gpu.arithmetic(),
        "predicted_constrained_ratio": (step_gpu + mask_step) / step_gpu,
        "predicted_constrained_ratio_overlapped": max(step_gpu, mask_step) / step_gpu,
        "batch": batch,
        "cpu_count": os.cpu_count(),
        "loadavg_1min": os.getloadavg()[0],  # other processes distort these timings
        "predicted_ratio_by_shape": {
            c.name: {
                "no_overlap": (step_gpu + min(c.step_ms_bs.values())) / step_gpu,
                "overlap": max(step_gpu, min(c.step_ms_bs.values())) / step_gpu,
            }
            for c in [*costs, p3_cost]
        },
        "shapes": [asdict(c) for c in costs],
        "p3": asdict(p3_cost),
        "regexes": {**shapes, "p3_all_tags": p3},
    }
    if batch == 256:
        result["step_ms_bs256"] = mask_step
    return result


def _p3_texts() -> list[str]:
    rng = random.Random(1)
    return ["".join(f"{t}: {rng.choice(('Good', 'Bad', 'None'))}\n" for t in TAGS) for _ in range(6)]


def _pct(values: Sequence[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def _tags_module_regexes() -> tuple[dict[str, str], str]:
    """The P1/P3 regexes the pipeline uses today, plus the alternative shapes to compare."""
    from sysgen import tags

    shapes = {"sysgen.tags.p1_regex": tags.p1_regex()} | p1_shapes()
    return shapes, tags.p3_regex(list(tags.TAGS))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m bench.grammar", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--steps", type=int, default=8, help="decode steps timed at batch 256")
    ap.add_argument(
        "--context",
        type=int,
        default=GpuModel.context,
        help="average tokens per sequence in the modelled GPU batch",
    )
    ap.add_argument(
        "--cache-root", type=Path, default=None, help="model cache root (default ~/.cache/sysgen)"
    )
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    from engine.backends.model_cache import default_model_dir

    tok = AutoTokenizer.from_pretrained(default_model_dir(args.cache_root))
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok), stop_token_ids=[tok.eos_token_id])
    shapes, p3 = _tags_module_regexes()
    res = run(
        info,
        lambda s: tok.encode(s, add_special_tokens=False),
        eos_id=tok.eos_token_id,
        shapes=shapes,
        p3=p3,
        steps=args.steps,
        gpu=GpuModel(context=args.context),
    )
    _print(res)
    if args.json:
        args.json.write_bytes(orjson.dumps(res, option=orjson.OPT_INDENT_2))
    return res


def _print(res: dict[str, Any]) -> None:
    head = (
        f"{'shape':22} {'chars':>5} {'walked':>6} {'compile s':>9} {'mask us p50':>11} {'p90':>8} {'p99':>8}"
    )
    print(f"{head}  step ms @bs{res['batch']}")
    for c in [*res["shapes"], res["p3"]]:
        steps = "  ".join(f"{k}={v:.2f}" for k, v in c["step_ms_bs"].items())
        print(
            f"{c['name']:22} {c['regex_chars']:5d} {c['walked']:6d} {c['compile_s']:9.3f} "
            f"{c['mask_us_p50']:11.1f} {c['mask_us_p90']:8.1f} {c['mask_us_p99']:8.1f}  {steps}"
        )
    print(f"{'shape':22} predicted constrained/unconstrained GPU step: no overlap | overlapped")
    for name, r in res["predicted_ratio_by_shape"].items():
        print(f"{name:22} {r['no_overlap']:8.3f} | {r['overlap']:.3f}")
    print(f"GPU step: {res['gpu_step_arithmetic']}")
    print(
        f"{res['reference_shape']}: predicted constrained/unconstrained step ratio "
        f"{res['predicted_constrained_ratio']:.3f} without overlap, "
        f"{res['predicted_constrained_ratio_overlapped']:.3f} with mask filling overlapped"
    )


if __name__ == "__main__":
    main()
