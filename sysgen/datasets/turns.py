"""Checks that a list of turns is a conversation the pipeline can use."""

from __future__ import annotations

from sysgen.datasets.errors import RowProblem
from sysgen.datasets.formats import RawTurn
from sysgen.datasets.instance import Turn


def check_turns(raw: list[RawTurn]) -> tuple[Turn, ...]:
    """Optional leading system turn, then user/assistant alternating, starting with the user.

    An empty system turn is dropped (many ShareGPT dumps carry one, and it means "no system
    message"); an empty user or assistant turn rejects the row. Ending on a user turn is a
    prompt-only row; a conversation with no assistant turn at all may hold several user turns in a
    row (MT-Bench `turns`, a chat log of questions): the answers are all to be written."""
    prompt_only = not any(r[0] == "assistant" for r in raw)
    if raw and raw[0][0] == "system" and not raw[0][1].strip():
        raw = raw[1:]
    turns: list[Turn] = []
    for n, (role, content, label) in enumerate(raw):
        if role == "system":
            if n > 0:
                raise RowProblem(
                    f"system turn at {label}; only a leading system turn is supported",
                    "move the system text to the first turn or drop the row",
                )
        elif not content.strip():
            what = "empty user turn" if role == "user" else "empty assistant turn"
            suffix = "" if role == "user" else ": the answer is missing"
            raise RowProblem(
                f"{what} ({label}){suffix}",
                "fill in the turn or drop the row (leave the answer out entirely for a prompt-only row)",
            )
        elif not turns or turns[-1].role == "system":
            if role != "user":
                raise RowProblem(
                    f"conversation starts with an assistant turn ({label})",
                    "the first turn after the optional system turn must be the user's; drop the row",
                )
        elif turns[-1].role == role and not prompt_only:
            raise RowProblem(
                f"two {role} turns in a row (at {label})",
                "merge the consecutive turns or drop the row",
            )
        turns.append(Turn(role, content))  # type: ignore[arg-type]
    if not any(t.role == "user" for t in turns):
        raise RowProblem(
            "conversation has no user turn",
            "every row needs at least one user turn with the instruction",
        )
    return tuple(turns)
