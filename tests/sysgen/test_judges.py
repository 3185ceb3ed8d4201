"""LLM judges: prompts, requests, verdict parsing, win-rate arithmetic over both orders, and a
run through the real Scheduler + Store with a stand-in backend (resume costs no engine call)."""

from __future__ import annotations

import asyncio
from typing import ClassVar

import pytest

try:
    from tests.sysgen.eval_fixtures import RECORDS, build_run
except ImportError:  # tests/sysgen is not a package: pytest put its folder on sys.path
    from eval_fixtures import RECORDS, build_run

from engine.backend import BackendBase, Capabilities
from engine.request import Request, Result, prompt_messages
from engine.scheduler import Scheduler
from engine.store import Store
from sysgen.eval import judge_stats, judges
from sysgen.eval.evaluate import JUDGEMENTS, judge
from sysgen.eval.judges import Judgement
from sysgen.eval.rundir import load_run


class StandInTokenizer:
    """One id per character, so the stand-in backend can read its prompt back; no special tokens.
    The slice of the Hugging Face tokenizer interface that engine/prefix.py uses."""

    all_special_tokens: ClassVar[list[str]] = []

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False):
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        text += "<assistant>" if add_generation_prompt else ""
        return {"input_ids": [ord(c) for c in text]} if tokenize else text

    def __call__(self, text, add_special_tokens=False, split_special_tokens=False):
        ids = [[ord(c) for c in t] for t in text] if isinstance(text, list) else [ord(c) for c in text]
        return {"input_ids": ids}

    def decode(self, ids, **_):
        return "".join(chr(i) for i in ids)


class StandInJudgeBackend(BackendBase):
    """A deterministic stand-in for a judge model (no model): `rule(prompt_text) -> output`."""

    name = "standin-judge"
    model_id = "standin-judge@1"

    def __init__(self, rule, *, regex: bool = True, token_ids: bool = True) -> None:
        self.rule = rule
        self.tokenizer = StandInTokenizer() if token_ids else None
        self.capabilities = Capabilities(regex=regex, token_ids=token_ids, max_running=8, max_context=1 << 16)
        self.calls = 0
        self.seen: list[Request] = []

    async def generate(self, request: Request) -> Result:
        self.calls += 1
        self.seen.append(request)
        if request.kind == "ids":
            text = "".join(chr(i) for i in request.prompt)
        else:
            text = "\n".join(m["content"] for m in prompt_messages(request.prompt))
        return Result(text=self.rule(text), finish_reason="stop")


def _section(text: str, name: str) -> str:
    return text.split(f"[{name}]\n", 1)[1].split("\n\n", 1)[0]


def longer_wins(text: str) -> str:
    """Order-independent judge: the longer response wins, equal length is a tie."""
    if "[Response A]" not in text:
        return "yes" if "Paris" in text else "no"
    a, b = len(_section(text, "Response A")), len(_section(text, "Response B"))
    return "A" if a > b else "B" if b > a else "tie"


def always_a(text: str) -> str:
    return "A" if "[Response A]" in text else "yes"


def test_fill_is_single_pass():
    assert judges.fill("{answer_a}|{answer_b}", answer_a="{answer_b}", answer_b="x") == "{answer_b}|x"


def test_prompts_ask_for_exactly_the_constrained_words():
    assert "exactly one of: A, B, tie" in judges.load_prompt("pairwise")
    assert "exactly one of: yes, no" in judges.load_prompt("alignment")


@pytest.mark.parametrize(
    "text,verdict",
    [
        ("A", "A"),
        ("B", "B"),
        ("tie", "tie"),
        (" Tie.", "tie"),
        ("Response B is better.", "B"),
        ("[[A]]", "A"),
        ("I think a better one is unclear", None),
        ("", None),
    ],
)
def test_parse_pairwise_lenient(text, verdict):
    assert judges.parse_pairwise(text) == verdict


def test_parse_alignment_lenient():
    assert judges.parse_alignment("Yes, it does.") == "yes"
    assert judges.parse_alignment("no") == "no"
    assert judges.parse_alignment("maybe") is None


def test_requests_token_ids_and_regex_when_supported():
    backend = StandInJudgeBackend(longer_wins)
    jobs = judges.plan(RECORDS, backend)
    # Two pairwise orders for the 2 records with an original answer, one alignment per record.
    assert [k for _, k, _ in jobs].count("original_first") == 2
    assert [k for _, k, _ in jobs].count("new_first") == 2
    assert [k for _, k, _ in jobs].count("alignment") == 3
    rec, kind, req = jobs[0]
    assert kind == "original_first" and req.kind == "ids" and req.regex == judges.PAIRWISE_REGEX
    assert req.sampling.temperature == 0 and req.sampling.max_new_tokens == 4
    assert req.group == "judge_pairwise" and req.model == backend.model_id
    text = "".join(chr(i) for i in req.prompt)
    assert _section(text, "Response A") == rec["original_answer"]


def test_requests_as_messages_without_regex_for_text_endpoints():
    backend = StandInJudgeBackend(longer_wins, regex=False, token_ids=False)
    _, _, req = judges.plan(RECORDS[:1], backend)[0]
    assert req.kind == "messages" and req.regex is None


def test_win_rate_arithmetic_over_both_orders():
    js = [
        Judgement("1", "s", "original_first", "B", "B"),  # new wins (B = new)
        Judgement("1", "s", "new_first", "A", "A"),  # new wins (A = new): same pick both orders
        Judgement("2", "s", "original_first", "A", "A"),  # original wins
        Judgement("2", "s", "new_first", "A", "A"),  # new wins: position bias, not the same pick
        Judgement("3", "t", "original_first", "tie", "tie"),
        Judgement("3", "t", "new_first", None, "hmm", error="unparseable"),
    ]
    s = judge_stats.pairwise_summary(js)
    of, nf, both = s["all"]["original_first"], s["all"]["new_first"], s["all"]["combined"]
    assert (of["wins"], of["losses"], of["ties"], of["judged"]) == (1, 1, 1, 3)
    assert of["win_rate"] == pytest.approx(100 / 3)
    assert (nf["wins"], nf["invalid"], nf["judged"]) == (2, 1, 2) and nf["win_rate"] == 100.0
    assert (both["wins"], both["losses"], both["ties"], both["judged"]) == (3, 1, 1, 5)
    assert both["win_rate"] == pytest.approx(60.0)
    assert (s["all"]["consistent"], s["all"]["instances_both_orders"]) == (1, 3)
    assert s["all"]["same_letter"] == 1  # instance 2: "A" in both orders
    assert s["s"]["combined"]["win_rate"] == pytest.approx(75.0)
    assert s["t"]["combined"]["judged"] == 1 and s["t"]["combined"]["win_rate"] == 0.0
    assert list(s) == ["s", "t", "all"]


def test_alignment_arithmetic_and_failures():
    js = [
        Judgement("1", "s", "alignment", "yes", "yes"),
        Judgement("2", "s", "alignment", "yes", "yes"),
        Judgement("3", "s", "alignment", "no", "no"),
        Judgement("4", "s", "alignment", None, "", error="rejected: too long"),
    ]
    a = judge_stats.alignment_summary(js)["all"]
    assert (a["yes"], a["no"], a["failed"], a["judged"]) == (2, 1, 1, 3)
    assert a["yes_rate"] == pytest.approx(200 / 3)


def test_select_round_robin_over_sources():
    picked = judges.select(RECORDS, 2)
    assert [r["source"] for r in picked] == ["capybara_test", "gsm_prompts"]
    assert judges.select(RECORDS, None) == RECORDS


async def _judge_run(run, backend, tmp_path, limit=None):
    with Store.open(tmp_path / "store.db") as store:
        async with Scheduler(backend, store) as sched:
            return await judge(run, backend, sched.submit, limit=limit, engine="standin")


def test_judge_through_scheduler_and_store_then_resume(tmp_path):
    run = load_run(build_run(tmp_path / "run"))
    backend = StandInJudgeBackend(longer_wins)
    out = asyncio.run(_judge_run(run, backend, tmp_path))
    assert backend.calls == 7
    pw = out["pairwise"]
    # capybara_test:1: equal lengths -> tie in both orders; :2: new answer longer -> wins both.
    assert pw["capybara_test"]["combined"]["wins"] == 2 and pw["capybara_test"]["combined"]["ties"] == 2
    assert pw["all"]["original_first"]["win_rate"] == 50.0 and pw["all"]["new_first"]["win_rate"] == 50.0
    assert out["alignment"]["all"]["yes"] == 1 and out["alignment"]["all"]["no"] == 2
    assert (run.path / JUDGEMENTS).read_text().count("\n") == 7
    again = StandInJudgeBackend(longer_wins)
    assert asyncio.run(_judge_run(run, again, tmp_path)) == out
    assert again.calls == 0  # every judgement came from the store


def test_position_biased_judge_shows_in_the_orders(tmp_path):
    run = load_run(build_run(tmp_path / "run"))
    out = asyncio.run(_judge_run(run, StandInJudgeBackend(always_a), tmp_path))
    pw = out["pairwise"]["all"]
    assert pw["original_first"]["win_rate"] == 0.0 and pw["new_first"]["win_rate"] == 100.0
    assert pw["combined"]["win_rate"] == 50.0 and pw["consistent"] == 0
    assert pw["same_letter"] == pw["instances_both_orders"] == 2


def test_unconstrained_endpoint_counts_unparseable(tmp_path):
    run = load_run(build_run(tmp_path / "run"))
    backend = StandInJudgeBackend(
        lambda t: "Hard to say." if "[Response A]" in t else "Yes.", regex=False, token_ids=False
    )
    out = asyncio.run(_judge_run(run, backend, tmp_path))
    assert out["regex"] is False
    assert out["pairwise"]["all"]["combined"]["invalid"] == 4
    assert out["pairwise"]["all"]["combined"]["win_rate"] is None
    assert out["alignment"]["all"]["yes_rate"] == 100.0


def test_run_bounds_concurrency_and_keeps_job_order():
    backend = StandInJudgeBackend(longer_wins)
    jobs = judges.plan(RECORDS, backend)
    live, peak = 0, 0

    async def submit(req: Request) -> Result:
        nonlocal live, peak
        live += 1
        peak = max(peak, live)
        await asyncio.sleep(0.001 * (len(req.prompt) % 3))  # finish out of order
        live -= 1
        return await backend.generate(req)

    out = asyncio.run(judges.run(iter(jobs), submit, concurrency=2))
    assert peak == 2
    assert [(j.id, j.kind) for j in out] == [(r["id"], k) for r, k, _ in jobs]


def test_judge_progress_counts_every_request_against_the_planned_total(tmp_path):
    import io

    from engine.metrics import Metrics
    from engine.progress import Progress

    run = load_run(build_run(tmp_path / "run"))
    backend = StandInJudgeBackend(longer_wins)
    planned = judges.planned_count(run.records)
    assert planned == len(list(judges.iter_plan(run.records, backend))) == 7
    buf = io.StringIO()
    progress = Progress(Metrics(), lambda: None, stream=buf, unit="req", count_kept=False)

    async def go():
        with Store.open(tmp_path / "store.db") as store:
            async with Scheduler(backend, store) as sched:
                progress.metrics = sched.metrics
                return await judge(run, backend, sched.submit, engine="standin", progress=progress)

    asyncio.run(go())
    assert progress.done == 7
    assert buf.getvalue().splitlines()[-1].startswith("[100.0%] 7 done | ")
