"""Prompt-only and unusual row shapes, --columns mappings, and the report of text nothing read."""

from __future__ import annotations

import logging

import orjson
import pytest

from sysgen.datasets import (
    DatasetError,
    Instance,
    Rejected,
    UnusedFields,
    iter_instances,
    preflight,
    to_instance,
)
from sysgen.datasets.columns import ColumnMap


def one(row: dict, **kw) -> Instance | Rejected:
    return to_instance(row, source="s", path="s.jsonl", line=1, **kw)


@pytest.mark.parametrize("key", ["prompt", "question", "instruction", "query", "input"])
def test_a_lone_prompt_column_is_a_prompt_only_row(key):
    inst = one({"id": "x1", key: "What is 2+2?"})
    assert isinstance(inst, Instance), inst
    assert inst.first_user == "What is 2+2?" and inst.original_answer is None
    assert [t.role for t in inst.turns] == ["user"]


def test_mt_bench_turns_are_user_turns_whose_answers_are_to_be_written():
    row = {"question_id": 81, "category": "writing", "turns": ["Write a blog post.", "Rewrite it in rhymes."]}
    inst = one(row)
    assert inst.fmt == "turns" and [t.role for t in inst.turns] == ["user", "user"]
    assert inst.first_user == "Write a blog post." and inst.original_answer is None
    assert isinstance(one({"turns": []}), Rejected)
    assert "must be a string" in one({"turns": ["ok", 3]}).reason


def test_messages_and_conversations_without_assistant_turns():
    m = one(
        {
            "messages": [
                {"role": "system", "content": "S"},
                {"role": "user", "content": "a"},
                {"role": "user", "content": "b"},
            ]
        }
    )
    assert [t.role for t in m.turns] == ["system", "user", "user"] and m.original_answer is None
    c = one({"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]})
    assert [t.role for t in c.turns] == ["user", "user"]


def test_prompt_with_an_answer_column():
    assert one({"prompt": "p", "completion": "c"}).original_answer == "c"
    assert one({"prompt": "p", "response": "r"}).fmt == "prompt_response"
    assert one({"input": "i", "output": "o"}).fmt == "input_output"


def test_column_mapping_with_nested_paths():
    cmap = ColumnMap.parse("user=instances.0.input, assistant=instances.0.output,system=meta.sys")
    row = {
        "instruction": "ignored",
        "meta": {"sys": "Be brief."},
        "instances": [{"input": "2+2?", "output": "4"}, {"input": "3+3?", "output": "6"}],
    }
    inst = one(row, columns=cmap)
    assert inst.fmt == "columns"
    assert [(t.role, t.content) for t in inst.turns] == [
        ("system", "Be brief."),
        ("user", "2+2?"),
        ("assistant", "4"),
    ]
    # no answer there: prompt-only; no user text: the row is rejected, naming the path
    assert one({"instances": [{"input": "q"}]}, columns=cmap).original_answer is None
    assert "row has no 'instances.0.input'" in one({"instances": []}, columns=cmap).reason


@pytest.mark.parametrize(
    "spec, msg",
    [
        ("assistant=a", "needs user=FIELD"),
        ("user=a,user=b", "user is given twice"),
        ("speaker=a,user=b", "unknown role 'speaker'"),
        ("user", "is not ROLE=FIELD"),
        ("user=a..b", "has an empty step"),
    ],
)
def test_bad_column_specs_are_argument_errors(spec, msg):
    with pytest.raises(ValueError, match=msg):
        ColumnMap.parse(spec)


def test_mapping_checked_on_the_first_row_lists_the_fields_rows_have(tmp_path):
    path = tmp_path / "odd.jsonl"
    path.write_bytes(
        orjson.dumps({"task": "t", "instances": [{"input": "q", "output": "a"}], "meta": {"lang": "en"}})
        + b"\n"
    )
    with pytest.raises(
        DatasetError,
        match=r"--columns user=instances\.input: the first row of .*odd\.jsonl "
        r"has no such field; its fields are: task, instances\.0\.input, "
        r"instances\.0\.output, meta\.lang",
    ) as e:
        preflight([path], columns="user=instances.input")
    assert e.value.kind == "argument"
    items = list(iter_instances([path], columns="user=instances.0.input,assistant=instances.0.output"))
    assert items[0].original_answer == "a"
    with pytest.raises(DatasetError, match="--columns and --format both"):
        iter_instances([path], columns="user=task", fmt="alpaca")


def test_text_no_format_read_is_counted_per_source_and_logged_once(tmp_path, caplog):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    rows = [
        {"id": "r1", "question": "q1", "answer": "x", "explanation": "because", "category": "math"},
        {"id": "r2", "question": "q2", "answer": "y", "explanation": " ", "category": "math", "n": 3},
        {"id": "r3", "question": "q3", "answer": "z", "references": [{"text": "see [1]"}]},
    ]
    a.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    b.write_bytes(orjson.dumps({"instruction": "i", "input": "extra", "output": "o"}) + b"\n")
    unused = UnusedFields()
    with caplog.at_level(logging.WARNING):
        list(iter_instances([a, b], unused=unused))
    keys = {"category": 2, "explanation": 1, "references": 1}
    assert unused.summary("a") == {"keys": keys, "example": "a:1"}
    assert unused.summary("b") is None  # alpaca reads 'input'
    warnings = [r.getMessage() for r in caplog.records if "read by no format" in r.getMessage()]
    assert len(warnings) == 1 and "'explanation' (1 rows)" in warnings[0] and "row a:1" in warnings[0]
    # a resume that reads the same rows again does not count them twice
    again = UnusedFields(unused.to_dict())
    list(iter_instances([a], unused=again))
    assert again.summary("a") == unused.summary("a")
    # a column mapping: what it does not map is reported too
    cm = UnusedFields()
    list(iter_instances([a], columns="user=question", unused=cm))
    assert cm.summary("a")["keys"] == {"answer": 3, "category": 2, "explanation": 1, "references": 1}
