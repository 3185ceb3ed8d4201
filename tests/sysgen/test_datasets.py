"""Formats, detection and conversion; real sample files from ../shared/data when present."""

from __future__ import annotations

import json
from pathlib import Path

import orjson
import pytest

from sysgen.datasets import FORMATS, Instance, Rejected, detect_format, iter_instances, to_instance

SHARED_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def convert(row: object, fmt: str = "auto") -> Instance | Rejected:
    return to_instance(row, source="t", path="t.jsonl", line=7, fmt=fmt)


def roles(inst: Instance) -> list[str]:
    return [t.role for t in inst.turns]


def test_sharegpt_with_system_turn():
    row = {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Hi?"},
            {"from": "gpt", "value": "Hello."},
        ]
    }
    inst = convert(row)
    assert isinstance(inst, Instance)
    assert (inst.fmt, inst.id, inst.line, inst.offset, inst.path) == ("sharegpt", "t:7", 7, -1, "t.jsonl")
    assert (inst.system, inst.first_user, inst.original_answer) == ("Be brief.", "Hi?", "Hello.")


def test_sharegpt_accepts_user_assistant_and_role_content_keys():
    row = {
        "conversations": [
            {"role": "user", "content": "Q1"},
            {"from": "assistant", "value": "A1"},
            {"role": "human", "content": "Q2"},
            {"role": "gpt", "content": "A2"},
        ]
    }
    inst = convert(row)
    assert roles(inst) == ["user", "assistant", "user", "assistant"]
    assert [t.content for t in inst.turns] == ["Q1", "A1", "Q2", "A2"]
    assert inst.system is None


def test_empty_leading_system_turn_is_dropped():
    row = {"conversations": [{"from": "system", "value": ""}, {"from": "human", "value": "Q"}]}
    inst = convert(row)
    assert roles(inst) == ["user"]


def test_capybara_multi_turn_strips_trailing_whitespace_only():
    row = {
        "source": "x",
        "conversation": [
            {"input": "  First question\n", "output": "First answer \n"},
            {"input": "Second\n\n", "output": "Second answer"},
        ],
    }
    inst = convert(row)
    assert inst.fmt == "capybara"
    assert [t.content for t in inst.turns] == ["  First question", "First answer", "Second", "Second answer"]
    assert inst.original_answer == "First answer"


def test_capybara_last_turn_without_output_is_prompt_only():
    row = {"conversation": [{"input": "a", "output": "b"}, {"input": "c"}]}
    inst = convert(row)
    assert roles(inst) == ["user", "assistant", "user"]


def test_messages_with_text_parts_joined():
    row = {
        "messages": [
            {"role": "developer", "content": "Sys"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "Part one."}, {"type": "text", "text": "Two."}],
            },
            {"role": "assistant", "content": "Done."},
        ]
    }
    inst = convert(row)
    assert inst.fmt == "messages"
    assert inst.system == "Sys"
    assert inst.first_user == "Part one.\nTwo."
    assert inst.original_answer == "Done."


def test_messages_ending_with_user_is_prompt_only():
    inst = convert({"messages": [{"role": "user", "content": "Only a prompt"}]})
    assert isinstance(inst, Instance)
    assert inst.original_answer is None
    assert inst.first_user == "Only a prompt"


def test_alpaca_joins_non_empty_input():
    with_input = convert({"instruction": "Sum these.", "input": "1 2", "output": "3"})
    blank_input = convert({"instruction": "Say hi.", "input": "  ", "output": "hi"})
    assert with_input.fmt == blank_input.fmt == "alpaca"
    assert with_input.first_user == "Sum these.\n\n1 2"
    assert blank_input.first_user == "Say hi."
    assert with_input.original_answer == "3"


def test_alpaca_without_output_is_prompt_only():
    for row in ({"instruction": "Do it."}, {"instruction": "Do it.", "input": "", "output": None}):
        inst = convert(row)
        assert isinstance(inst, Instance) and inst.fmt == "alpaca"
        assert inst.original_answer is None and inst.first_user == "Do it."


@pytest.mark.parametrize(
    "fmt,prompt_key,answer_key",
    [
        ("question_answer", "question", "answer"),
        ("query_response", "query", "response"),
        ("problem_solution", "problem", "solution"),
        ("instruction_response", "instruction", "response"),
    ],
)
def test_flat_pair_formats(fmt, prompt_key, answer_key):
    row = {prompt_key: "P?", answer_key: "S.", "type": "extra keys are ignored"}
    assert detect_format(row) == fmt
    inst = convert(row)
    assert (inst.fmt, inst.first_user, inst.original_answer) == (fmt, "P?", "S.")
    assert roles(inst) == ["user", "assistant"]


def test_detect_format_priorities_and_unknowns():
    assert detect_format({"conversations": [], "messages": []}) == "sharegpt"
    assert detect_format({"instruction": "i", "output": "o", "response": "r"}) == "alpaca"
    assert detect_format({"instruction": "i", "input": "x"}) == "alpaca"
    assert detect_format({"question": "q"}) == "question_answer"
    # A prompt key with another format's answer key would silently lose the answer: unknown.
    assert detect_format({"question": "q", "response": "r"}) is None
    assert detect_format({"foo": 1}) is None
    # Parquet gives every column to every row; null columns do not count.
    assert detect_format({"conversations": None, "messages": [], "question": None}) == "messages"


def test_forced_format_overrides_detection_and_rejects_misfits():
    row = {"instruction": "i", "response": "r", "output": "o"}
    assert convert(row, fmt="instruction_response").original_answer == "r"
    bad = convert({"question": "q", "answer": "a"}, fmt="alpaca")
    assert isinstance(bad, Rejected)
    assert "row has no 'instruction' field (format alpaca)" in bad.reason


def test_every_format_name_is_detectable():
    rows = {
        "sharegpt": {"conversations": [{"from": "human", "value": "q"}]},
        "capybara": {"conversation": [{"input": "q"}]},
        "messages": {"messages": [{"role": "user", "content": "q"}]},
        "alpaca": {"instruction": "q", "output": "a"},
        "question_answer": {"question": "q", "answer": "a"},
        "query_response": {"query": "q", "response": "a"},
        "problem_solution": {"problem": "q", "solution": "a"},
        "instruction_response": {"instruction": "q", "response": "a"},
        "prompt_response": {"prompt": "q", "response": "a"},
        "prompt_completion": {"prompt": "q", "completion": "a"},
        "input_output": {"input": "q", "output": "a"},
        "turns": {"turns": ["q", "q2"]},
    }
    assert set(rows) == set(FORMATS)
    for fmt, row in rows.items():
        assert detect_format(row) == fmt
        assert convert(row).fmt == fmt


# --- the real sample files ------------------------------------------------------------------

EXPECTED = {
    "capybara/capybara_test.jsonl": "capybara",
    "metamathqa/meta_math_qa_test.jsonl": "query_response",
    "magicoder/magicoder_oss_instruct_first500.jsonl": "alpaca",
    "sharegpt_system/slim_orca_dedup_test.jsonl": "sharegpt",
    "question_answer/gsm8k_test_first300.jsonl": "question_answer",
}


def expected_first_turns(row: dict, fmt: str) -> tuple[str, str]:
    """First user turn and original answer, taken from the raw row by hand."""
    if fmt == "capybara":
        first = row["conversation"][0]
        return first["input"].rstrip(), first["output"].rstrip()
    if fmt == "sharegpt":
        turns = [t for t in row["conversations"] if t["from"] != "system"]
        return turns[0]["value"], turns[1]["value"]
    if fmt == "alpaca":
        user = row["instruction"] + ("\n\n" + row["input"] if row["input"].strip() else "")
        return user, row["output"]
    key = {"query_response": ("query", "response"), "question_answer": ("question", "answer")}[fmt]
    return row[key[0]], row[key[1]]


@pytest.mark.parametrize("rel", sorted(EXPECTED))
def test_shared_sample_files_read_whole(rel):
    if not SHARED_DATA.is_dir():
        pytest.skip(f"no sample data at {SHARED_DATA} (it lives beside the repo, not in it)")
    path = SHARED_DATA / rel
    raw_lines = path.read_bytes().splitlines()
    raw = [json.loads(line) for line in raw_lines if line.strip()]
    items = list(iter_instances([path]))
    assert [str(r) for r in items if isinstance(r, Rejected)] == []
    assert len(items) == len(raw)
    offsets = [0]
    for line in raw_lines:
        offsets.append(offsets[-1] + len(line) + 1)
    for i, (inst, row) in enumerate(zip(items, raw, strict=True)):
        assert inst.fmt == EXPECTED[rel]
        assert inst.id == f"{path.name.removesuffix('.jsonl')}:{i + 1}"
        assert inst.offset == offsets[i]
        assert (inst.first_user, inst.original_answer) == expected_first_turns(row, inst.fmt)
        if inst.fmt == "capybara":  # multi-turn kept whole
            contents = [c for pair in row["conversation"] for c in (pair["input"], pair["output"])]
            assert [t.content for t in inst.turns] == [c.rstrip() for c in contents]
        if inst.fmt == "sharegpt" and row["conversations"][0]["from"] == "system":
            assert inst.system == row["conversations"][0]["value"]


def test_shared_capybara_is_multi_turn():
    path = SHARED_DATA / "capybara" / "capybara_test.jsonl"
    if not path.exists():
        pytest.skip(f"no sample data at {path}")
    items = list(iter_instances([path]))
    assert all(len(i.turns) >= 6 for i in items)  # 3-4 exchanges each, per SOURCES.md
    assert any(orjson.loads(line)["conversation"][0]["input"].endswith("\n") for line in path.open("rb"))


def test_known_rows_are_passed_unconverted_in_their_place(tmp_path):
    path = tmp_path / "k.jsonl"
    rows = [
        b'{"instruction": "q1", "output": "a1"}\n',
        b"not json\n",
        b'{"instruction": "q3", "output": "a3"}\n',
        b'{"instruction": "q4", "output": "a4"}\n',
    ]
    path.write_bytes(b"".join(rows))
    asked = []

    def known(p: str, line: int) -> bool:
        asked.append((p, line))
        return line in (2, 3)

    items = list(iter_instances([path], strict=True, known=known))  # the bad row is known: no error
    assert [type(i).__name__ for i in items] == ["Instance", "Known", "Known", "Instance"]
    assert (items[1].path, items[1].line, items[1].offset) == (str(path), 2, len(rows[0]))
    assert items[2].offset == len(rows[0]) + len(rows[1])
    assert asked == [(str(path), n) for n in (1, 2, 3, 4)]
    assert items[3].offset == sum(map(len, rows[:3]))
