"""Each kind of bad row is rejected with a reason naming file and line, and reading goes on."""

from __future__ import annotations

import orjson
import pytest

from sysgen.datasets import Instance, Rejected, iter_instances, readers

GOOD = {"question": "What is 2+2?", "answer": "4"}


def j(row: object) -> bytes:
    return orjson.dumps(row)


def conv(*turns: tuple[str, object]) -> bytes:
    return j({"conversations": [{"from": f, "value": v} for f, v in turns]})


CASES = {
    "bad_json": (b'{"question": "a" "answer": "b"}', "not valid JSON (unexpected character"),
    "json_list": (b"[1, 2]", "row is a JSON list, not an object"),
    "json_number": (b"42", "row is a JSON int, not an object"),
    "conversations_str": (j({"conversations": "hi"}), "field 'conversations' must be a list, got str"),
    "content_number": (
        j({"messages": [{"role": "user", "content": 5}]}),
        "turn 1 of 'messages': 'content' must be a string, got int",
    ),
    "turn_not_object": (j({"conversations": ["hi"]}), "turn 1 of 'conversations' must be an object, got str"),
    "empty_user_turn": (conv(("human", "  "), ("gpt", "x")), "empty user turn (turn 1)"),
    "empty_flat_prompt": (j({"question": "", "answer": "4"}), "empty user turn ('question')"),
    "empty_answer": (
        conv(("human", "q"), ("gpt", "")),
        "empty assistant turn (turn 2): the answer is missing",
    ),
    "empty_alpaca_output": (
        j({"instruction": "i", "output": ""}),
        "empty assistant turn ('output'): the answer is missing",
    ),
    "unknown_format": (
        j({"foo": 1, "bar": 2}),
        "no known format: keys {'bar','foo'}; expected one of conversations, conversation, messages, "
        "turns, instruction/output, question/answer, query/response, problem/solution, "
        "instruction/response, prompt/response, prompt/completion, input/output, each answer optional "
        "(or pass --format or --columns)",
    ),
    "bad_utf8": (b'{"question": "caf\xe9!", "answer": "x"}', "invalid UTF-8 at byte 17 of the row"),
    "no_user_turn": (conv(("system", "You are nice.")), "conversation has no user turn"),
    "empty_conversation": (j({"messages": []}), "conversation has no user turn"),
    "starts_with_assistant": (
        conv(("system", "s"), ("gpt", "Hello!"), ("human", "hi")),
        "conversation starts with an assistant turn (turn 2)",
    ),
    # Two user turns in a row are a prompt-only conversation only when no assistant turn is there.
    "two_users_in_a_row": (
        conv(("human", "a"), ("gpt", "x"), ("human", "b"), ("human", "c")),
        "two user turns in a row (at turn 4)",
    ),
    "system_in_middle": (
        conv(("human", "a"), ("system", "b")),
        "system turn at turn 2; only a leading system turn is supported",
    ),
    "unknown_role": (
        j({"messages": [{"role": "tool", "content": "x"}]}),
        "turn 1 of 'messages' has unknown role 'tool'",
    ),
    "image_part": (
        j({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}),
        "'content' has a non-text part (image_url); only text is supported",
    ),
    "capybara_gap": (
        j({"conversation": [{"input": "a"}, {"input": "b", "output": "c"}]}),
        "turn 1 of 'conversation' has no 'output'; only the last turn may lack one",
    ),
    "mismatched_pair": (
        j({"question": "q", "response": "r"}),
        "no known format: keys {'question','response'}",
    ),
    "cut_mid_row": (b'{"question": "cut of', "not valid JSON (unexpected control character in string"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_row_is_rejected_and_reading_goes_on(tmp_path, case):
    bad, reason = CASES[case]
    path = tmp_path / "data.jsonl"
    path.write_bytes(j(GOOD) + b"\n" + bad + b"\n" + j(GOOD) + b"\n")
    first, rejected, after = list(iter_instances([str(path)]))
    assert isinstance(first, Instance) and isinstance(after, Instance)
    assert after.line == 3 and after.first_user == GOOD["question"]
    assert isinstance(rejected, Rejected)
    assert (rejected.path, rejected.line) == (str(path), 2)
    assert reason in rejected.reason
    assert str(rejected) == f"{path}:2: {rejected.reason}"


def test_huge_row_is_rejected_unread(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "MAX_ROW_BYTES", 200)
    huge = j({"question": "x" * 5000, "answer": "y"})
    path = tmp_path / "big.jsonl"
    path.write_bytes(j(GOOD) + b"\n" + huge + b"\n" + j(GOOD) + b"\n")
    items = list(iter_instances([path]))
    assert [isinstance(i, Instance) for i in items] == [True, False, True]
    assert isinstance(items[1], Rejected) and items[1].line == 2
    assert items[1].reason == "row is 4.9 KiB, over the 200 bytes limit"
    # The line after the huge one is found at its true offset.
    assert items[2].offset == len(j(GOOD)) + 1 + len(huge) + 1


def test_default_row_limit_is_8_mib():
    assert readers.MAX_ROW_BYTES == 8 * 1024 * 1024


def test_blank_lines_are_skipped_silently_but_counted(tmp_path):
    path = tmp_path / "gaps.jsonl"
    path.write_bytes(b"\n" + j(GOOD) + b"\n   \n\r\n\t\n" + j(GOOD) + b"\n\n")
    items = list(iter_instances([path]))
    assert all(isinstance(i, Instance) for i in items)
    assert [i.line for i in items] == [2, 6]  # line numbers stay the file's own


def test_truncated_final_line_without_newline_is_still_read(tmp_path):
    path = tmp_path / "tail.jsonl"
    path.write_bytes(j(GOOD) + b"\n" + j({"question": "last", "answer": "row"}))
    items = list(iter_instances([path]))
    assert [i.first_user for i in items] == [GOOD["question"], "last"]


def test_final_line_cut_mid_row_is_rejected(tmp_path):
    path = tmp_path / "cut.jsonl"
    path.write_bytes(j(GOOD) + b"\n" + j(GOOD)[:-5])
    good, cut = list(iter_instances([path]))
    assert isinstance(good, Instance) and isinstance(cut, Rejected)
    assert cut.line == 2 and cut.reason.startswith("not valid JSON (unexpected end of data at column")


def test_crlf_lines_and_byte_order_mark_are_accepted(tmp_path):
    path = tmp_path / "windows.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + j(GOOD) + b"\r\n" + j(GOOD) + b"\r\n")
    items = list(iter_instances([path]))
    assert all(isinstance(i, Instance) for i in items) and len(items) == 2
    assert items[1].offset == 3 + len(j(GOOD)) + 2
