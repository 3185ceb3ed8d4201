"""Phrases copied from the P1 prompt's worked examples: found, dropped (or marked), counted."""

from __future__ import annotations

import orjson
import pytest

from engine.backends.standin import StandInBackend
from sysgen import copies, prompts, standin, tags
from sysgen.eval.evaluate import example_copies
from sysgen.eval.rundir import load_run
from sysgen.publish.report import write_report
from sysgen.run import stats
from tests.sysgen.pipeline_helpers import records, run, write_rows

# The bundled prompt's examples before issue 22 and what SmolLM2-135M wrote with them on the demo and
# on held-out rows: real outputs, kept here as the near-copy rule's measured cases (docs/copies.md).
# The numbers are the word ratio and the share of the example held as one run.
OLD_PROMPT = """<Role> who the assistant is (an expert, a tutor, a persona).
Example 1 (a user asks how to reverse a linked list in Python):
<Role>You are a senior Python developer and patient programming mentor.</Role>
<Task>Break the problem into small arithmetic steps and check the result.</Task>
<Task>Explain how to reverse a linked list and provide working code.</Task>
<Tool>Use Python 3 with type hints.</Tool>
<Format>Give a short explanation, then a single code block, then the time and space complexity.</Format>
Example 2 (a user asks a grade-school word problem about apples):
<Role>You are a friendly math tutor for school students.</Role>
<Content>Solve the word problem and teach the reasoning behind it.</Content>
<Background>The user is a student practising multi-step arithmetic.</Background>
<Format>Number each step and end with a line stating the final answer.</Format>
"""
OLD = copies.examples(OLD_PROMPT)

COPIES = [
    "You are a friendly math tutor for school students.",  # word for word
    "you are a FRIENDLY math tutor   for school students",  # case, spacing, final punctuation
    "Solve the word problem and teach the reasoning behind it!",
    "You are a friendly math tutor for school students who love puzzles.",  # the example plus a tail
    "Provide a short explanation, then a single code block, then the time and space complexity.",  # 0.93
    "You are a senior Python developer and patient tutor.",  # 0.84
    "You are a senior Python developer and patient tutor for students.",  # 0.76, run 0.80
    "Number each part and end with a line stating the final answer.",  # 0.92
    "Explain how to reverse a linked list and provide a step-by-step solution.",  # 0.72, run 0.82
    "Break the problem into small arithmetic steps and end with a line stating the final answer.",  # splice
    "You are a friendly math tutor for high school students.",
]
NOT_COPIES = [
    "You are a helpful assistant.",
    "You are a friendly tutor.",
    "Use Python 3.",
    "Break the problem into steps.",  # real output, 0.62
    "Solve the word problem using algebra.",  # real output, 0.50
    "The user is a student practising one step of the word problem.",  # real output, 0.67
    "Break the instruction into smaller steps and check the result.",  # real output, 0.76, run 0.45
    "Explain how to find palindromes and provide working code.",  # real output, 0.70, run 0.36
    "Each step is a separate code block.",
    "...",
]


def test_examples_are_the_closed_tag_lines_of_the_prompt():
    assert OLD.phrases[0] == "You are a senior Python developer and patient programming mentor."
    assert len(OLD.phrases) == 9  # the "<Role> who the assistant is" description is not an example
    bundled = copies.examples(prompts.load("p1_generate"))
    assert len(bundled) >= 10 and all(p in prompts.load("p1_generate") for p in bundled.phrases)


@pytest.mark.parametrize("phrase", COPIES)
def test_copies_and_near_copies_are_found(phrase):
    assert OLD.match(phrase) is not None


@pytest.mark.parametrize("phrase", NOT_COPIES)
def test_similar_but_own_phrases_are_not(phrase):
    assert OLD.match(phrase) is None


def test_a_generic_phrase_is_a_copy_only_when_the_prompt_shows_it():
    mine = copies.examples("<Role>You are a helpful assistant.</Role>\n")
    assert mine.match("You are a helpful assistant.") and not OLD.match("You are a helpful assistant.")
    assert not copies.examples("no examples here").match("You are a helpful assistant.")


def test_p2_drops_copies_with_their_own_reason_and_keeps_them_on_request():
    text = (
        "<Role>You are a friendly math tutor for school students.</Role>\n"
        "<Task>Explain the proof of the triangle inequality.</Task>\n"
        "<Tool>use python 3 with type hints</Tool>\n"
    )
    f = tags.filter_tags(text, OLD)
    assert f.tags == {"Task": "Explain the proof of the triangle inequality."}
    assert f.dropped == [("Role", "copied_example"), ("Tool", "copied_example")]
    assert f.well_formed and set(f.copied) == {"Role", "Tool"}
    kept = tags.filter_tags(text, OLD, keep_copies=True)
    assert list(kept.tags) == ["Role", "Task", "Tool"] and kept.dropped == [] and kept.copied == f.copied
    assert tags.filter_tags(text) == tags.filter_tags(text, copies.examples(""))  # no examples: no check


def test_a_message_holding_an_example_phrase_is_counted():
    msgs = ["You are a friendly math tutor for school students. Solve it.", "You are a geography tutor."]
    share = copies.copied_share(msgs, OLD)
    assert share["with_example_phrase"] == 1 and share["pct"] == 50.0
    assert share["by_phrase"] == {"You are a friendly math tutor for school students.": 1}


def _copying_backend():
    """The stand-in engine, except that P1 copies the bundled prompt's examples: every third
    instance writes nothing else, the others one own phrase beside two copies."""
    ex = copies.examples(prompts.load("p1_generate")).phrases

    def respond(request):
        if request.group != "p1":
            return standin.respond(request)
        n = int(str(request.prompt).split("Question number ")[1].split(":")[0])
        own = "" if n % 3 == 0 else f"<Task>Sort the list of {n} items.</Task>\n"
        return f"<Role>{ex[0]}</Role>\n{own}<Format>{ex[-1].lower().rstrip('.')}</Format>\n"

    return StandInBackend(respond)


def test_a_run_drops_copies_and_counts_them_everywhere(tmp_path):
    write_rows(tmp_path / "in.jsonl", 12)
    out = tmp_path / "out"
    run([tmp_path / "in.jsonl"], out, _copying_backend())
    got = records(out)
    ex = copies.examples(prompts.load("p1_generate"))
    assert got["data"] and all(not ex.found_in(r["messages"][0]["content"]) for r in got["data"])
    assert all(r["p2_dropped"] == {"Role": "copied_example", "Format": "copied_example"} for r in got["data"])
    all_copies = [r for r in got["dropped"] if r["reason"] == "copied_example"]
    assert len(all_copies) == 4 and all(r["phase"] == "p2" for r in all_copies)
    last = ex.phrases[-1]  # the phrase as the model wrote it stays beside the example it copies
    assert all_copies[0]["p2_copied"]["Format"] == {"phrase": last.lower().rstrip("."), "example": last}

    st = stats.write(out, {}, rows_read=12)
    assert st["p2_copied"] == {
        "instances": 12,
        "phrases": 24,
        "by_tag": {t: 12 if t in ("Role", "Format") else 0 for t in tags.TAGS},
    }
    assert st["p2_tag_drops_by_tag"]["Role"] == {"copied_example": 12}
    assert st["dropped"]["p2:copied_example"] == 4
    assert example_copies(load_run(out))["with_example_phrase"] == 0

    report = write_report(out).read_text()
    assert "P2 found 24 tag phrases copied from the P1 prompt's worked examples" in report
    assert "| p2:copied_example | 4 | 4 |" in report
    assert "| Role | 12 |" in report and (out / "tags.png").stat().st_size > 0


def test_keep_copies_keeps_and_marks_them_and_eval_sees_them(tmp_path):
    write_rows(tmp_path / "in.jsonl", 6)
    out = tmp_path / "out"
    run([tmp_path / "in.jsonl"], out, _copying_backend(), keep_copies=True)
    got = records(out)
    assert not [r for r in got["dropped"] if r["reason"] == "copied_example"]
    kept_copies = [r for r in got["data"] if r["p2_copied"].keys() == {"Role", "Format"}]
    assert kept_copies and all(r["p2_dropped"] == {} for r in got["data"])
    st = stats.compute(out)
    assert st["p2_copied"]["by_tag"]["Role"] == 6 and "copied_example" not in st["p2_tag_drops"]
    share = example_copies(load_run(out))
    assert share["with_example_phrase"] == len([r for r in got["data"] if "Role" in r["kept_tags"]]) > 0
    assert orjson.loads((out / "data.jsonl").read_bytes().splitlines()[0])["p2_copied"]


def test_malformed_lines_share_one_row_of_the_p2_table(tmp_path):
    from sysgen.eval import funnel
    from sysgen.publish.report import p2_section

    row = {
        "id": "a:1",
        "source": "a",
        "phase": "p2",
        "reason": "copied_example",
        "p1_well_formed": False,
        "p2_dropped": {"Role": "copied_example", "<Rol>You are": "malformed", "Sty": "malformed"},
        "p2_copied": {"Role": {"phrase": "x", "example": "x"}},
    }
    (tmp_path / "dropped.jsonl").write_bytes(orjson.dumps(row) + b"\n")
    assert stats.compute(tmp_path)["p2_tag_drops_by_tag"] == {
        "Role": {"copied_example": 1},
        "other": {"malformed": 2},
    }
    lines = "\n".join(p2_section(funnel.summarize([], [row]).tags))
    assert "| other lines | 2 | 0 |" in lines and "| Role | 0 | 1 |" in lines


def test_p2_checks_the_examples_of_the_prompt_in_use(monkeypatch):
    from sysgen.run.phases import PhaseSettings, p2_filter

    answer = "<Role>You are a helpful assistant.</Role>\n<Task>Sort the list.</Task>\n"
    s = PhaseSettings(model_id="m")
    assert p2_filter(answer, s).tags == {"Role": "You are a helpful assistant.", "Task": "Sort the list."}
    own = "Write a system message.\nExample:\n<Role>You are a helpful assistant.</Role>\n"
    real = prompts.load
    monkeypatch.setattr(prompts, "load", lambda n: own if n == "p1_generate" else real(n))
    assert p2_filter(answer, s).dropped == [("Role", "copied_example")]
