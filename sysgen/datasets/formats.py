"""The SFT row shapes we read, how a row's shape is recognised, and how each becomes turns.

Converters return raw turns `(role, content, label)`; `label` names where the turn came from
("turn 3", "'output'") so a rejection can point at it. `turns.check_turns` validates the sequence.
"""

from __future__ import annotations

from sysgen.datasets.errors import RowProblem, type_name

FORMATS: tuple[str, ...] = (
    "sharegpt",
    "capybara",
    "messages",
    "alpaca",
    "question_answer",
    "query_response",
    "problem_solution",
    "instruction_response",
    "prompt_response",
    "prompt_completion",
    "input_output",
    "turns",
)

RawTurn = tuple[str, str, str]

# Formats holding a list of turns, by the key that holds it.
_LIST_KEYS = {"sharegpt": "conversations", "capybara": "conversation", "messages": "messages"}
# Flat formats: (prompt key, answer key). Dict order is detection priority.
_PAIRS = {
    "alpaca": ("instruction", "output"),
    "instruction_response": ("instruction", "response"),
    "question_answer": ("question", "answer"),
    "query_response": ("query", "response"),
    "problem_solution": ("problem", "solution"),
    "prompt_response": ("prompt", "response"),
    "prompt_completion": ("prompt", "completion"),
    "input_output": ("input", "output"),
}
_ANSWER_KEYS = frozenset(a for _, a in _PAIRS.values())
EXPECTED_SHAPES = (
    "conversations, conversation, messages, turns, instruction/output, question/answer, query/response, "
    "problem/solution, instruction/response, prompt/response, prompt/completion, input/output, each "
    "answer optional"
)

_SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}
# "developer" is OpenAI's newer name for the system role.
_MESSAGES_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def present_keys(row: dict) -> set[str]:
    """Keys with a value: parquet gives every column to every row, null where the row had none."""
    return {k for k, v in row.items() if v is not None}


def detect_format(row: dict) -> str | None:
    """The format whose keys the row has, or None when no format fits.

    A prompt key alone (e.g. only `question`) counts as a prompt-only row of that format, but not
    when some other answer key is present (`question` + `response`): that shape is unknown, and
    guessing would silently drop the answer."""
    if not isinstance(row, dict):
        return None
    keys = present_keys(row)
    for fmt, key in _LIST_KEYS.items():
        if key in keys:
            return fmt
    if "turns" in keys and isinstance(row["turns"], list):
        return "turns"
    for fmt, (prompt, answer) in _PAIRS.items():
        if prompt in keys and answer in keys:
            return fmt
    if not keys & _ANSWER_KEYS:
        for fmt, (prompt, _) in _PAIRS.items():
            if prompt in keys:
                return fmt
    return None


def raw_turns(row: dict, fmt: str) -> list[RawTurn]:
    """The row's turns as the format lays them out; raises RowProblem when the row does not fit."""
    if fmt in _LIST_KEYS:
        key = _LIST_KEYS[fmt]
        items = row.get(key)
        if key not in row:
            raise RowProblem(f"row has no '{key}' field (format {fmt})", _fix_format(fmt))
        if not isinstance(items, list):
            raise RowProblem(
                f"field '{key}' must be a list, got {type_name(items)}",
                f"make '{key}' a list of turn objects, as format {fmt} expects",
            )
        if fmt == "capybara":
            return _capybara(items)
        return _role_list(items, key, _SHAREGPT_ROLES if fmt == "sharegpt" else _MESSAGES_ROLES)
    if fmt in _PAIRS:
        return _flat(row, fmt)
    if fmt == "turns":
        return _user_turns(row)
    raise RowProblem(f"unknown format '{fmt}'", f"use one of {', '.join(FORMATS)}")


def used_keys(row: dict, fmt: str) -> set[str]:
    """The row's top-level keys the format reads (what else holds text is reported, not dropped
    silently)."""
    if fmt in _LIST_KEYS:
        return {_LIST_KEYS[fmt]}
    if fmt in _PAIRS:
        return {*_PAIRS[fmt], "input"} if fmt == "alpaca" else set(_PAIRS[fmt])
    return {"turns"} if fmt == "turns" else set()


def _user_turns(row: dict) -> list[RawTurn]:
    """MT-Bench style: `turns` is the user's side of a conversation whose answers are to be written."""
    items = row.get("turns")
    if not isinstance(items, list) or not items:
        raise RowProblem(
            "field 'turns' must be a non-empty list of strings",
            "make 'turns' a list of the user's messages, in order",
        )
    return [
        ("user", text_of(t, f"turn {i} of 'turns'", "turns"), f"turn {i}") for i, t in enumerate(items, 1)
    ]


def _fix_format(fmt: str) -> str:
    return f"pass the right --format (rows here do not look like {fmt}) or fix the row's keys"


def text_of(value: object, where: str, field: str) -> str:
    """A turn's text: a string, or OpenAI-style content parts whose text parts are joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type_name(part)
                raise RowProblem(
                    f"{where}: '{field}' has a non-text part ({kind}); only text is supported",
                    "drop rows with images or other non-text parts",
                )
            if not isinstance(part.get("text"), str):
                raise RowProblem(
                    f"{where}: a text part of '{field}' has no string 'text'",
                    'write each part as {"type": "text", "text": "..."}',
                )
            texts.append(part["text"])
        # Parts are separate paragraphs in every UI we know; a newline keeps them apart.
        return "\n".join(texts)
    raise RowProblem(
        f"{where}: '{field}' must be a string, got {type_name(value)}",
        f"make '{field}' a string (or a list of text parts)",
    )


def _role_list(items: list, key: str, roles: dict[str, str]) -> list[RawTurn]:
    out: list[RawTurn] = []
    for i, item in enumerate(items, 1):
        where = f"turn {i} of '{key}'"
        if not isinstance(item, dict):
            raise RowProblem(
                f"{where} must be an object, got {type_name(item)}",
                f"make each element of '{key}' an object with a role and its text",
            )
        # Parquet gives a turn every key any turn had, null where it had none: look at values.
        role_key = "from" if item.get("from") is not None else "role"
        text_key = "value" if item.get("value") is not None else "content"
        if item.get(role_key) is None or item.get(text_key) is None:
            raise RowProblem(
                f"{where} has keys {sorted(present_keys(item))}; expected from/value or role/content",
                "give every turn a role ('from' or 'role') and its text ('value' or 'content')",
            )
        role = item[role_key]
        if role not in roles:
            raise RowProblem(
                f"{where} has unknown role {role!r}; expected one of {', '.join(roles)}",
                "map the role to one of those, or drop the row (tool turns are not supported)",
            )
        out.append((roles[role], text_of(item[text_key], where, text_key), f"turn {i}"))
    return out


def _capybara(items: list) -> list[RawTurn]:
    out: list[RawTurn] = []
    for i, item in enumerate(items, 1):
        where = f"turn {i} of 'conversation'"
        if not isinstance(item, dict):
            raise RowProblem(
                f"{where} must be an object, got {type_name(item)}",
                "make each element of 'conversation' an {input, output} object",
            )
        if item.get("input") is None:
            raise RowProblem(f"{where} has no 'input'", "give every turn an 'input' string")
        # Capybara inputs often end with a newline: the turn's text is kept, its trailing space is not.
        out.append(("user", text_of(item["input"], where, "input").rstrip(), f"turn {i} input"))
        if item.get("output") is None:
            if i != len(items):
                raise RowProblem(
                    f"{where} has no 'output'; only the last turn may lack one",
                    "fill in the missing output or cut the conversation before it",
                )
            continue
        out.append(("assistant", text_of(item["output"], where, "output").rstrip(), f"turn {i} output"))
    return out


def _flat(row: dict, fmt: str) -> list[RawTurn]:
    prompt_key, answer_key = _PAIRS[fmt]
    if row.get(prompt_key) is None:
        raise RowProblem(f"row has no '{prompt_key}' field (format {fmt})", _fix_format(fmt))
    prompt = text_of(row[prompt_key], "row", prompt_key)
    label = f"'{prompt_key}'"
    if fmt == "alpaca" and row.get("input") is not None:
        extra = text_of(row["input"], "row", "input")
        if extra.strip():
            prompt = f"{prompt}\n\n{extra}"
            label = "'instruction' + 'input'"
    turns: list[RawTurn] = [("user", prompt, label)]
    # An absent (or null) answer makes a prompt-only row; an empty string is a missing answer.
    if row.get(answer_key) is not None:
        turns.append(("assistant", text_of(row[answer_key], "row", answer_key), f"'{answer_key}'"))
    return turns
