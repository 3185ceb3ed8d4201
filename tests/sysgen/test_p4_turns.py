"""Plain rules of multi-turn P4: repetition-loop detection and per-turn budgets."""

from __future__ import annotations

import json

from engine.request import ErrorKind, Result
from sysgen.run.p4_turns import drop_reason, looks_like_loop, turn_budget
from sysgen.run.phases import PhaseSettings
from tests.conftest import SHARED_DATA


def test_loops_are_recognised():
    assert looks_like_loop("Intro text. " + "The answer is 42. " * 40)
    assert looks_like_loop("x" * 300)
    # near-loops: a counter changes in every repetition
    steps = "".join(f"Step {i}: mix the flour and the water again.\n" for i in range(40))
    assert looks_like_loop("Steps:\n" + steps)


def test_prose_is_not_a_loop(shared_data):
    texts = []
    for line in (SHARED_DATA / "capybara" / "capybara_test.jsonl").read_text().splitlines():
        texts += [t["output"] for t in json.loads(line)["conversation"]]
    assert len(texts) > 40
    flagged = [t[:80] for t in texts if looks_like_loop(t)]
    assert not flagged
    assert not looks_like_loop("short answer")


def test_turn_budget_fits_the_original_answer():
    s = PhaseSettings(model_id="m", p4_max_tokens=256, p4_budget_factor=2.0, p4_budget_cap=1024)
    assert turn_budget(s, None) == 256  # prompt-only turn: the floor
    assert turn_budget(s, 50) == 256
    assert turn_budget(s, 300) == 600
    assert turn_budget(s, 5000) == 1024
    assert turn_budget(PhaseSettings(model_id="m", p4_budget_factor=0), 5000) == 512  # fixed


def test_an_engine_failure_is_dropped_by_its_kind_not_by_its_wording():
    refused = Result.failure("the server said no: 400 prompt too long", kind=ErrorKind.REJECTED)
    assert drop_reason(refused) == "engine_rejected"
    assert drop_reason(Result.failure("rejected-looking text", kind=ErrorKind.GAVE_UP)) == "engine_error"
    assert drop_reason(Result.failure("engine error: 500", kind=ErrorKind.ENGINE)) == "engine_error"
