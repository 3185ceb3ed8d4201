"""The simulated run's input: real rows from ../shared/data standing in for the paper's five datasets.

The paper (SYSGEN, Table 9) uses 806,796 instances: Capybara 41,301, Airoboros 59,277, OrcaMath
200,035, Magicoder 111,183, MetaMath 395,000. We have real public rows of the same kind for each
(SOURCES.md there): Capybara rows, SlimOrca rows in the ShareGPT-with-system shape Airoboros uses,
GSM8K rows in the question/answer shape of Orca-Math, Magicoder rows, MetaMathQA rows. A workload
of N instances draws a dataset with the paper's weights, then a real row of that dataset uniformly,
so prompt and answer lengths (tokenized with the SmolLM2 tokenizer) come from real rows in the
paper's mix. Each user turn starts and ends with a marker "[#i.j]" (instance i, turn j): the first
keeps resampled rows distinct even where P1 cuts a long turn (identical prompts would be answered
from the store), the last tells the simulated engine, from the end of a P4 prompt, which real answer
length to produce. `turns` keeps the first `turns` exchanges of each
conversation (None: all), ready for multi-turn P4 chains (one P4 per turn, each extending the last).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

import orjson

from sysgen.datasets.instance import Instance
from sysgen.datasets.stream import iter_instances

PAPER_TOTAL = 806_796
# name: (instances in the paper, our sample of that kind under ../shared/data, paper's Table 9
# average query / answer length in characters)
PAPER = {
    "Capybara": (41_301, "capybara/capybara_test.jsonl", 300.24, 1423.28),
    "Airoboros": (59_277, "sharegpt_system/slim_orca_dedup_test.jsonl", 507.26, 1110.62),
    "OrcaMath": (200_035, "question_answer/gsm8k_test_first300.jsonl", 238.87, 878.43),
    "Magicoder": (111_183, "magicoder/magicoder_oss_instruct_first500.jsonl", 652.53, 1552.41),
    "MetaMath": (395_000, "metamathqa/meta_math_qa_test.jsonl", 213.53, 498.24),
}
MARKER = re.compile(r"\[#(\d+)\.(\d+)\]")
_ROLE = {"system": "system", "user": "human", "assistant": "gpt"}


def default_data_dir() -> Path:
    return Path(__file__).resolve().parents[3] / "shared" / "data"


class NoData(RuntimeError):
    """The real rows are not here (a fresh clone has none)."""


@dataclass
class Workload:
    path: Path
    instances: int
    datasets: dict[str, dict]  # per paper dataset: sample rows, instances drawn, mean lengths
    answers: list[tuple[int, ...]]  # per instance: answer tokens of each kept turn

    def answer_tokens(self, instance: int, turn: int) -> int | None:
        a = self.answers[instance] if 0 <= instance < len(self.answers) else ()
        return a[turn] if turn < len(a) else None


def load_samples(data_dir: Path) -> dict[str, list[Instance]]:
    if not data_dir.is_dir():
        raise NoData(
            f"{data_dir} is absent: bench.sim needs the real sample rows (see SOURCES.md there); "
            "pass --data DIR"
        )
    out = {}
    for name, (_, rel, _, _) in PAPER.items():
        path = data_dir / rel
        if not path.is_file():
            raise NoData(f"{path} is missing; pass --data DIR holding the five samples of SOURCES.md")
        out[name] = [x for x in iter_instances([path]) if isinstance(x, Instance) and x.original_answer]
    return out


def _exchanges(inst: Instance, turns: int | None) -> list[tuple[str, str]]:
    """(role, text) turns, cut after `turns` user turns (their answers included)."""
    kept, users = [], 0
    for t in inst.turns:
        if t.role == "user":
            if turns is not None and users == turns:
                break
            users += 1
        kept.append((t.role, t.content))
    return kept


def build(
    out: Path,
    n: int,
    tokenizer,
    *,
    data_dir: Path | None = None,
    turns: int | None = None,
    seed: int = 0,
    paper_answers: bool = False,
) -> Workload:
    """Write n instances (ShareGPT JSON Lines) to `out`; lengths per real row are tokenized once.
    `paper_answers`: scale each dataset's answer lengths so their mean matches the paper's Table 9
    (our samples' answers are shorter: GSM8K's 290 characters against Orca-Math's 878)."""
    samples = load_samples(data_dir or default_data_dir())
    names = list(PAPER)
    weights = [PAPER[k][0] for k in names]
    enc = lambda s: len(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    row_answers = {}
    for k, rows in samples.items():
        scale = 1.0
        if paper_answers:
            scale = PAPER[k][3] / (sum(len(r.original_answer or "") for r in rows) / len(rows))
        row_answers[k] = [
            tuple(max(1, round(scale * enc(c))) for r, c in _exchanges(i, turns) if r == "assistant")
            for i in rows
        ]
    rng = random.Random(seed)
    answers: list[tuple[int, ...]] = []
    drawn = dict.fromkeys(names, 0)
    with out.open("wb") as f:
        for i in range(n):
            name = rng.choices(names, weights)[0]
            k = rng.randrange(len(samples[name]))
            drawn[name] += 1
            conv, j = [], 0
            for role, text in _exchanges(samples[name][k], turns):
                if role == "user":
                    text = f"[#{i}.{j}] {text.rstrip()} [#{i}.{j}]"
                    j += 1
                conv.append({"from": _ROLE[role], "value": text})
            f.write(orjson.dumps({"conversations": conv}) + b"\n")
            answers.append(row_answers[name][k])
    info = {}
    for name, rows in samples.items():
        q = [len(r.first_user) for r in rows]
        a = [len(r.original_answer or "") for r in rows]
        info[name] = {
            "paper_instances": PAPER[name][0],
            "sample_rows": len(rows),
            "drawn": drawn[name],
            "sample_query_chars": round(sum(q) / len(q), 1),
            "paper_query_chars": PAPER[name][2],
            "sample_answer_chars": round(sum(a) / len(a), 1),
            "paper_answer_chars": PAPER[name][3],
            "source": PAPER[name][1],
        }
    return Workload(out, n, info, answers)


def parse_marker(text: str) -> tuple[int, int] | None:
    found = MARKER.findall(text)
    return (int(found[-1][0]), int(found[-1][1])) if found else None
