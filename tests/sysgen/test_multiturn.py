"""Multi-turn P4 (issue 8) with the stand-in engine: every turn answered in order as a chain, prompt-only
turns written, failures named by turn, --keep-partial, loops resampled once, --turns first unchanged."""

from __future__ import annotations

import struct
from collections import Counter

import orjson
import pytest
import xxhash

from engine.backends.standin import StandInBackend
from engine.request import prompt_messages
from sysgen import standin
from sysgen.run import stats

try:
    from tests.sysgen.pipeline_helpers import records, run
except ImportError:  # tests/sysgen is not a package: pytest put its folder on sys.path
    from pipeline_helpers import records, run


def capybara_rows(n: int, turns: int = 3, answered: int | None = None) -> list[dict]:
    """Capybara-shaped rows (written here): `turns` user turns, the first `answered` with answers."""
    answered = turns if answered is None else answered
    rows = []
    for i in range(n):
        conv = [
            {
                "input": f"Row {i} turn {j}: tell me about topic {i * 10 + j}.",
                **({"output": f"Original answer {i}.{j} about topic {i * 10 + j}."} if j <= answered else {}),
            }
            for j in range(1, turns + 1)
        ]
        rows.append({"source": "test", "conversation": conv})
    return rows


def write(path, rows) -> None:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))


def prose(request, n_words: int = 60) -> str:
    """A P4 answer that does not repeat itself (the canned stand-in answer does)."""
    h = xxhash.xxh3_64_intdigest(request.key)
    return " ".join(f"w{(h >> (i % 48)) % 997}x{i}" for i in range(n_words)) + "."


def turn_of(request) -> int:
    """The P4 turn a messages prompt asks for: [system, u1, a1, ..., uj]."""
    return len(request.prompt) // 2


class Recorder:
    """A stand-in whose P4 answers are prose; logs (event, instance, turn) in engine order."""

    def __init__(self, fault=None, delay=0.002) -> None:
        self.log: list[tuple[str, str, int]] = []
        self.prompts: dict[tuple[str, int], list] = {}
        self.answers: dict[tuple[str, int], str] = {}
        self.backend = StandInBackend(self.respond, delay_s=delay, fault=fault, max_running=4)

    def respond(self, request) -> str:
        if request.group != "p4":
            return standin.respond(request)
        msgs = prompt_messages(request.prompt)
        who, j = msgs[1]["content"].split(" turn")[0], turn_of(request)
        self.log.append(("answer", who, j))
        self.prompts[(who, j)] = msgs
        self.answers[(who, j)] = text = prose(request)
        return text


def test_every_turn_is_answered_in_order_and_roles_alternate(tmp_path):
    write(tmp_path / "in.jsonl", capybara_rows(6, turns=3) + capybara_rows(2, turns=1))
    rec = Recorder()
    run([tmp_path / "in.jsonl"], tmp_path / "out", rec.backend)
    data = records(tmp_path / "out")["data"]
    assert len(data) == 8
    for r in data:
        roles = [m["role"] for m in r["messages"]]
        n = r["user_turns"]
        assert roles == ["system"] + ["user", "assistant"] * n and r["answered_turns"] == n
        assert len(r["original_answers"]) == n
        assert all(a.startswith("Original answer") for a in r["original_answers"])
        assert len(r["request_keys"]["p4"]) == n
    assert Counter(r["user_turns"] for r in data) == {3: 6, 1: 2}


def test_turns_are_a_chain_and_other_instances_fill_the_engine(tmp_path):
    write(tmp_path / "in.jsonl", capybara_rows(8, turns=3))
    rec = Recorder(delay=0.01)
    run([tmp_path / "in.jsonl"], tmp_path / "out", rec.backend)
    # Turn j+1's prompt is turn j's prompt plus the answer it got (the history holds the new answers).
    for (who, j), msgs in rec.prompts.items():
        if j > 1:
            prev = rec.prompts[(who, j - 1)]
            assert msgs[: len(prev)] == prev
            assert msgs[len(prev)] == {"role": "assistant", "content": rec.answers[(who, j - 1)]}
    # Each instance's turns reach the engine in order, and other instances' turns come in between.
    order = [(who, j) for _, who, j in rec.log]
    for who in {w for w, _ in order}:
        assert [j for w, j in order if w == who] == [1, 2, 3]
    first = {who: order.index((who, 1)) for who, _ in order}
    last = {who: order.index((who, 3)) for who, _ in order}
    assert any(first[a] < first[b] < last[a] for a in first for b in first if a != b)


def test_prompt_only_conversations_get_every_missing_answer(tmp_path):
    def conv(*texts):
        roles = ("user", "assistant")
        return {"messages": [{"role": roles[k % 2], "content": t} for k, t in enumerate(texts)]}

    rows = [
        conv("Row a turn 1: q", "a1", "Row a turn 2: q"),  # ends on a user turn
        conv("Row b turn 1: only a prompt."),
        conv("Row c turn 1: q", "a1", "Row c turn 2: q", "a2", "Row c turn 3: q"),
    ]
    write(tmp_path / "in.jsonl", rows)
    run([tmp_path / "in.jsonl"], tmp_path / "out", Recorder().backend)
    data = {r["id"]: r for r in records(tmp_path / "out")["data"]}
    assert len(data) == 3
    for r in data.values():
        assert r["answered_turns"] == r["user_turns"]
        assert [m["role"] for m in r["messages"][1:]] == ["user", "assistant"] * r["user_turns"]
    assert data["in:1"]["original_answers"] == ["a1", None]
    assert data["in:2"]["original_answers"] == [None]
    assert data["in:3"]["original_answers"] == ["a1", "a2", None]


def test_user_turns_pairs_answers_and_gaps():
    """Shapes a reader may yield for prompt-only data: consecutive user turns leave a gap (None)."""
    from sysgen.datasets.instance import Instance, Turn
    from sysgen.run.phases import user_turns

    turns = (
        Turn("system", "s"),
        Turn("user", "u1"),
        Turn("user", "u2"),
        Turn("assistant", "a2"),
        Turn("user", "u3"),
    )
    assert user_turns(Instance("x", "x", "t", turns)) == [("u1", None), ("u2", "a2"), ("u3", None)]


def _cut_turn_2(request, attempt):
    return "truncate" if request.group == "p4" and turn_of(request) == 2 else None


def test_a_turn_cut_in_the_middle_drops_the_conversation_naming_the_turn(tmp_path):
    write(tmp_path / "in.jsonl", capybara_rows(4, turns=3) + capybara_rows(1, turns=1))
    run([tmp_path / "in.jsonl"], tmp_path / "out", Recorder(fault=_cut_turn_2).backend)
    out = records(tmp_path / "out")
    assert [r["user_turns"] for r in out["data"]] == [1]
    assert Counter(f"{d['phase']}:{d['reason']}" for d in out["dropped"]) == {"p4:truncated@turn2": 4}
    st = stats.write(tmp_path / "out", {}, rows_read=5)
    assert st["accounted"] and st["dropped"] == {"p4:truncated@turn2": 4}


def test_keep_partial_keeps_the_complete_turns_before_the_cut(tmp_path):
    write(tmp_path / "in.jsonl", capybara_rows(4, turns=3))
    run([tmp_path / "in.jsonl"], tmp_path / "out", Recorder(fault=_cut_turn_2).backend, keep_partial=True)
    out = records(tmp_path / "out")
    assert not out["dropped"] and len(out["data"]) == 4
    for r in out["data"]:
        assert [m["role"] for m in r["messages"]] == ["system", "user", "assistant"]
        assert r["answered_turns"] == 1 and r["user_turns"] == 3 and len(r["original_answers"]) == 1
        assert r["partial"]["reason"] == "p4:truncated@turn2" and r["partial"]["kept_turns"] == 1


class Looping(Recorder):
    """Turn 1 loops under greedy decoding (cut at its budget); `sampled_loops` too when resampled."""

    def __init__(self, sampled_loops: bool) -> None:
        self.sampled_loops = sampled_loops
        super().__init__(fault=self.fault)

    def loops(self, request) -> bool:
        return (
            request.group == "p4"
            and turn_of(request) == 1
            and (request.sampling.temperature == 0 or self.sampled_loops)
        )

    def fault(self, request, attempt):
        return "truncate" if self.loops(request) else None

    def respond(self, request) -> str:
        text = super().respond(request)
        return "I repeat myself. " * 60 if self.loops(request) else text


def test_a_looping_turn_is_resampled_once_and_kept(tmp_path):
    write(tmp_path / "in.jsonl", capybara_rows(3, turns=2))
    run([tmp_path / "in.jsonl"], tmp_path / "out", Looping(sampled_loops=False).backend)
    data = records(tmp_path / "out")["data"]
    assert len(data) == 3 and all(r["p4_resampled_turns"] == [1] for r in data)
    st = stats.write(tmp_path / "out", {})
    assert st["turns"]["p4_resampled"] == 3 and st["turns"]["p4_resample_kept"] == 3


def test_a_turn_that_loops_again_is_dropped_as_a_loop(tmp_path):
    write(tmp_path / "in.jsonl", capybara_rows(3, turns=2))
    run([tmp_path / "in.jsonl"], tmp_path / "out", Looping(sampled_loops=True).backend)
    out = records(tmp_path / "out")
    assert not out["data"]
    assert Counter(d["reason"] for d in out["dropped"]) == {"loop@turn1": 3}
    st = stats.write(tmp_path / "out", {})
    assert st["turns"]["p4_resampled"] == 3 and st["turns"]["p4_resample_kept"] == 0


@pytest.mark.slow
def test_report_shows_turns_retention_and_cached_ratio_by_phase(tmp_path):
    from sysgen.publish.report import write_report

    write(tmp_path / "in.jsonl", capybara_rows(4, turns=3) + capybara_rows(2, turns=1))
    out = tmp_path / "out"
    counters = run([tmp_path / "in.jsonl"], out, Recorder(fault=_cut_turn_2).backend, keep_partial=True)
    st = stats.write(out, {"this_run": counters})
    assert st["turns"]["user_turns_histogram"] == {"1": 2, "3": 4}
    assert st["turns"]["retention_by_turn"]["2"] == {"instances": 4, "answered": 0, "pct": 0.0}
    assert st["turns"]["partial_records"] == 4
    text = write_report(out).read_text()
    assert "## Conversations (multi-turn P4)" in text and "| p4 |" in text and "cached / prompt" in text
    head = (out / "turns.png").read_bytes()[:24]  # the figure, linked from the report
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", head[16:24])[0] > 800
    assert "![conversations](turns.png)" in text


def test_eval_export_and_judges_see_every_turn(tmp_path):
    from sysgen.eval.evaluate import EvalConfig, answer_metrics
    from sysgen.eval.judges import iter_plan
    from sysgen.eval.rundir import load_run, turn_pairs
    from sysgen.publish.export import rows

    write(tmp_path / "in.jsonl", capybara_rows(3, turns=3))
    out = tmp_path / "out"
    run([tmp_path / "in.jsonl"], out, Recorder().backend)
    rd = load_run(out)
    m = answer_metrics(rd, EvalConfig(bertscore=False))
    assert m["by_source"]["all"]["with_original"] == 3  # first turns: the paper's comparison
    assert m["all_turns"]["pairs"] == 9 and m["all_turns"]["by_source"]["all"]["with_original"] == 9
    assert all(len(r["messages"]) == 7 for r in rows(rd, "messages"))
    assert all(len(r["conversations"]) == 7 for r in rows(rd, "sharegpt"))
    jobs = [j for j in iter_plan(rd.records, Recorder().backend) if j[1] == "alignment"]
    assert len(jobs) == 3 and all("[Turn 3]" in str(req.prompt) for _, _, req in jobs)
    # records written before multi-turn (one original_answer) still read
    old = {
        "messages": [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "u"},
            {"role": "assistant", "content": "a"},
        ],
        "original_answer": "o",
    }
    assert turn_pairs(old) == [("u", "a", "o")]
